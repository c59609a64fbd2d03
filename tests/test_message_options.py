"""Message options end to end: through a real broker, the text mode, the CLI, consume,
and the W3C trace context with the OpenTelemetry SDK (the ``otel`` extra)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pigeon
from pigeon.options import put_options
from pigeon.protocol import PutOptions
from pigeon.testing.broker import BrokerThread


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(heartbeat=1.0) as b:
        yield b


def test_put_options_are_none_for_a_plain_put_and_checked_otherwise() -> None:
    assert put_options() is None
    assert put_options(headers={}) is None
    assert put_options(delay=0, priority=0) == PutOptions()
    assert put_options(delay=1, ttl=2, dedup_id="d", priority=3, headers={"k": "v"}) == (
        PutOptions(1.0, 2.0, "d", 3, {"k": "v"})
    )
    with pytest.raises(ValueError, match="ttl"):
        put_options(ttl=float("inf"))


def test_a_delay_longer_than_the_lease_runs_the_handler_exactly_once(
    broker: BrokerThread,
) -> None:
    """The classic Celery ETA bug: the delay is not a lease, so a delayed message is
    neither held by a consumer nor redelivered while it waits. (The same rule with a 60 s
    delay and a 5 s lease, time by hand: tests/server/test_options.py.)"""
    url = broker.url("eta") + "?lease=1"
    with pigeon.Queue(url) as q:
        q.put("once", delay=3.5)
    calls: list[Any] = []
    stop = threading.Event()

    def handler(item: Any) -> None:
        calls.append((item, time.monotonic()))
        threading.Timer(2.5, stop.set).start()  # room for a second delivery, if any

    started = time.monotonic()
    report = pigeon.consume(url, handler, mode="thread", concurrency=2, stop=stop)
    assert [c[0] for c in calls] == ["once"]
    assert calls[0][1] - started >= 3.0
    assert report.processed == 1 and report.retried == 0


def test_text_mode_put_takes_options_at_the_end_of_the_line(broker: BrokerThread) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(
            b"PUT tq plain words\n"
            b"PUT tq urgent delay=0 priority=9 header.tenant=acme\n"
            b"PUT tq soon delay=x\n"
            b"PUT tq gone ttl=0.2\n"
        )
        f = s.makefile("rb")
        assert [f.readline() for _ in range(4)] == [
            b"+OK\r\n",
            b"+OK\r\n",
            b"-BAD_REQUEST delay must be a number of seconds, not 'x'\r\n",
            b"+OK\r\n",
        ]
        time.sleep(0.5)
        s.sendall(b"GET tq\nGET tq\nGET tq\n")
        assert [f.readline() for _ in range(3)] == [
            b"+urgent\r\n",
            b"+plain words\r\n",
            b"-EMPTY queue 'tq' is empty\r\n",
        ]
    with pigeon.Queue(broker.url("tq"), serializer="raw") as q:
        assert q._drive(q._ops.info())["put_total"] == 3


def test_the_cli_puts_with_options(broker: BrokerThread) -> None:
    from click.testing import CliRunner

    from pigeon.cli import cli

    url = broker.url("cliq")
    result = CliRunner().invoke(cli, ["put", url, "a", "--priority", "5", "-H", "k=v"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["put", url, "b", "--ttl", "-1"])
    assert result.exit_code != 0 and "ttl" in result.output
    with pigeon.Queue(url) as q:
        msg = q.get_message(timeout=5)
        assert msg.body == "a" and msg.headers == {"k": "v"}
        msg.ack()
        assert q.qsize() == 0


def test_an_older_broker_that_cannot_honour_options_is_refused_not_ignored(
    broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker whose WELCOME lists no "options" feature (an older one ignores the PUT's
    trailing field) gets no options: Unsupported, and nothing stored."""
    import pigeon.server.connection as conn_module

    monkeypatch.setattr(conn_module, "FEATURES", [])
    with pigeon.Queue(broker.url("old")) as q:
        with pytest.raises(pigeon.Unsupported, match="per-message options"):
            q.put("x", priority=3)
        q.put("plain")  # plain puts still work
        assert q.qsize() == 1


def test_a_dedup_id_makes_a_retried_put_safe_across_a_reconnect(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("retry")) as q:
        q.put("order 7", dedup_id="order-7")
        q._drop()  # the connection is lost after the confirmation: the client retries
        q.put("order 7", dedup_id="order-7")
        assert q.get(timeout=5) == "order 7"
        assert q.qsize() == 0


otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel test extra")


@pytest.fixture(scope="module")
def spans() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.mark.parametrize("where", ["broker", "local"])
def test_one_trace_from_the_producer_to_the_handler(
    broker: BrokerThread, spans: Any, where: str
) -> None:
    from opentelemetry import trace

    spans.clear()
    q: pigeon.Queue[Any] = (
        pigeon.Queue(broker.url(f"traced-{where}")) if where == "broker" else pigeon.Queue()
    )
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("produce") as producer:
        q.put({"n": 1})
    q.put({"n": 2})  # no span current: no trace context
    seen: list[Any] = []
    stop = threading.Event()

    def handler(item: Any) -> None:
        seen.append((item, trace.get_current_span().get_span_context()))
        if len(seen) == 2:
            stop.set()

    pigeon.consume(q, handler, mode="thread", concurrency=1, stop=stop)
    q.close()
    (first, ctx1), (second, ctx2) = seen
    assert first == {"n": 1} and second == {"n": 2}
    assert ctx1.trace_id == producer.get_span_context().trace_id
    assert ctx2.trace_id != producer.get_span_context().trace_id
    consumer = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CONSUMER]
    assert len(consumer) == 2
    linked = [s for s in consumer if s.parent is not None]
    assert len(linked) == 1
    assert linked[0].parent.span_id == producer.get_span_context().span_id
    attrs = linked[0].attributes
    assert attrs["messaging.system"] == ("pigeon" if where == "broker" else "pigeon-local")
    assert attrs["messaging.message.delivery_count"] == 1


@pytest.mark.parametrize("scheme", ["redis", "nats"])
def test_engine_headers_travel_to_dead_letters_and_dedup_ids_hold(scheme: str) -> None:
    from tests._services import queue_name, require_service

    port = {"redis": 6379, "nats": 4222}[scheme]
    require_service("Redis" if scheme == "redis" else "NATS", port)
    url = f"{scheme}://127.0.0.1:{port}/{queue_name()}"
    with pigeon.Queue(url) as q, pigeon.Queue(url + ".dead") as dead:
        q.put("tagged", headers={"tenant": "acme"}, dedup_id="once")
        q.put("tagged again", headers={"tenant": "acme"}, dedup_id="once")
        msg = q.get_message(timeout=10)
        assert (msg.body, msg.headers) == ("tagged", {"tenant": "acme"})
        msg.nack(requeue=False, reason="bad")
        gone = dead.get_message(timeout=10)
        assert (gone.body, gone.headers) == ("tagged", {"tenant": "acme"})
        gone.ack()
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.5)
        q.put("urgent", priority=9)  # both engines honour priorities now
        assert q.get(timeout=10) == "urgent"


@pytest.mark.parametrize("where", ["broker", "local"])
def test_the_trace_context_never_makes_a_valid_put_fail(
    broker: BrokerThread, spans: Any, where: str
) -> None:
    """The header limits are the caller's: the trace context goes in the room they leave
    (a header the caller set wins) and is left out when there is none."""
    from opentelemetry import trace

    q: pigeon.Queue[Any] = (
        pigeon.Queue(broker.url(f"room-{where}")) if where == "broker" else pigeon.Queue()
    )
    full = {f"x-attr-{i}": "1" for i in range(64)}
    big = {"x-blob": "b" * (16 * 1024 - len("x-blob"))}
    room = {f"x-attr-{i}": "1" for i in range(63)}
    own = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    try:
        with trace.get_tracer("test").start_as_current_span("produce"):
            for headers in (full, big, room, own):
                q.put("x", headers=headers)
        got = []
        for _ in range(4):
            msg = q.get_message(timeout=5)
            got.append(msg.headers)
            msg.ack()
    finally:
        q.close()
    assert got[0] == full and got[1] == big  # no room: untraced, not refused
    assert set(got[2]) - set(room) == {"traceparent"}  # room: traced
    assert got[3] == own  # the caller's own wins
