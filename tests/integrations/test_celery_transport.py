"""pigeon.integrations.celery's transport through kombu's own API, in-process, on a broker.

The Celery worker tests (test_celery.py) run the whole framework; these pin what the
transport itself promises: settling is the broker's, the prefetch window waits for acks,
a held delivery outlives its lease, a closed channel gives back at once, several queues
are each served, options reach the broker, no fanout.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from pigeon.testing.broker import BrokerThread
from tests._services import free_port
from tests.integrations._support import require

require("celery", "celery", "kombu")

from kombu import Connection, Exchange, Queue  # noqa: E402
from kombu.exceptions import OperationalError  # noqa: E402

import pigeon  # noqa: E402
import pigeon.integrations.celery  # noqa: E402


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def connect(broker: BrokerThread, **transport_options: Any) -> Connection:
    return Connection(f"pigeon://127.0.0.1:{broker.port}//", transport_options=transport_options)


def info(broker: BrokerThread, queue: str) -> dict[str, Any]:
    with pigeon.Queue(broker.url(quote(queue, safe=""))) as q:
        value: dict[str, Any] = q.stats()["queues"].get(queue, {})
    return value


_n = iter(range(10**9))


def fresh() -> str:
    return f"kq-{time.monotonic_ns()}-{next(_n)}"


def publish(conn: Connection, queue: str, body: Any, **kwargs: Any) -> None:
    q = Queue(queue, Exchange(queue), routing_key=queue)
    conn.Producer().publish(body, exchange=q.exchange, routing_key=queue, declare=[q], **kwargs)


def test_a_message_round_trips_with_its_headers_and_properties(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        publish(conn, name, {"x": [1, 2]}, headers={"h": {"n": 1}}, priority=4)
        q = conn.SimpleQueue(name)
        m = q.get(timeout=5)
        assert (m.payload, m.headers, m.properties["priority"]) == (
            {"x": [1, 2]},
            {"h": {"n": 1}},
            4,
        )
        assert m.delivery_info["redelivered"] is False
        assert info(broker, name)["in_flight"] == 1  # held until acked: at-least-once
        m.ack()
        assert info(broker, name)["in_flight"] == 0
        q.close()


def test_a_requeued_message_comes_back_marked_redelivered(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        publish(conn, name, "again")
        q = conn.SimpleQueue(name)
        q.get(timeout=5).reject(requeue=True)
        m = q.get(timeout=5)
        assert (m.payload, m.delivery_info["redelivered"]) == ("again", True)
        m.ack()
        q.close()


def test_a_rejected_message_goes_to_the_dead_letter_queue(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        publish(conn, name, "bad")
        q = conn.SimpleQueue(name)
        q.get(timeout=5).reject(requeue=False)
        q.close()
    with pigeon.Queue(broker.url(name + ".dead"), serializer="raw") as dead:
        (shown,) = dead.peek()
    assert shown["reason"] == "rejected"
    assert json.loads(shown["payload"])["body"] == base64.b64encode(b"bad").decode()


def test_a_no_ack_consumer_leaves_nothing_in_flight(broker: BrokerThread) -> None:
    name = fresh()
    got: list[Any] = []
    with connect(broker) as conn:
        publish(conn, name, 1)
        with conn.Consumer(Queue(name), callbacks=[lambda body, m: got.append(body)], no_ack=True):
            conn.drain_events(timeout=5)
    assert got == [1]
    assert info(broker, name)["in_flight"] == 0


def test_a_full_prefetch_window_takes_nothing_until_an_ack(broker: BrokerThread) -> None:
    name = fresh()
    held: list[Any] = []
    with connect(broker) as conn:
        for i in range(2):
            publish(conn, name, i)
        with conn.Consumer(Queue(name), callbacks=[lambda body, m: held.append(m)]) as consumer:
            consumer.qos(prefetch_count=1)
            conn.drain_events(timeout=5)
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)  # the window is full: no GET is sent
            assert (info(broker, name)["depth"], len(held)) == (1, 1)
            # an ack from another thread (a pool's result handler) opens the window
            threading.Timer(0.2, held[0].ack).start()
            conn.drain_events(timeout=30)
            assert [m.payload for m in held] == [0, 1]
            held[1].ack()


def test_a_held_message_outlives_its_lease_while_the_channel_holds_it(
    broker: BrokerThread,
) -> None:
    name = fresh()
    with connect(broker, lease=0.5) as conn:
        publish(conn, name, "long task")
        q = conn.SimpleQueue(name)
        m = q.get(timeout=5)
        time.sleep(2.0)  # four leases: the transport extends it
        with pigeon.Queue(broker.url(name), serializer="raw") as other, pytest.raises(pigeon.Empty):
            other.get_message(timeout=0)
        assert info(broker, name)["redelivered_total"] == 0
        m.ack()
        q.close()


def test_closing_the_channel_gives_held_messages_back_at_once(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        publish(conn, name, "held")
        q = conn.SimpleQueue(name)
        q.get(timeout=5)
        assert info(broker, name)["in_flight"] == 1
        q.close()
    now = info(broker, name)
    assert (now["in_flight"], now["depth"]) == (0, 1)


def test_a_consumer_of_several_queues_gets_from_each(broker: BrokerThread) -> None:
    names = [fresh() for _ in range(3)]
    got: list[Any] = []
    with connect(broker) as conn:
        for n in names:
            publish(conn, n, n)

        def take(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with conn.Consumer([Queue(n) for n in names], callbacks=[take]):
            for _ in names:
                conn.drain_events(timeout=10)
    assert sorted(got) == sorted(names)


def test_eta_is_a_broker_held_delay(broker: BrokerThread) -> None:
    name = fresh()
    eta = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    with connect(broker) as conn:
        publish(conn, name, "later", headers={"eta": eta})
        q = conn.SimpleQueue(name)
        with pytest.raises(q.Empty):
            q.get(timeout=0.2)
        q.close()
    now = info(broker, name)
    assert (now["delayed"], now["in_flight"]) == (1, 0)


def test_priority_is_scaled_from_the_queues_x_max_priority(broker: BrokerThread) -> None:
    name = fresh()
    q = Queue(name, Exchange(name), routing_key=name, max_priority=255)
    with connect(broker) as conn:
        producer = conn.Producer()
        for p in (0, 100, 255):
            producer.publish(p, exchange=q.exchange, routing_key=name, declare=[q], priority=p)
    with pigeon.Queue(broker.url(name), serializer="raw") as raw:
        assert [m["priority"] for m in raw.peek()] == [9, 3, 0]


def test_a_dedup_id_stores_one_message(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        for _ in range(3):
            publish(conn, name, "once", dedup_id="job-1")
    assert info(broker, name)["depth"] == 1


def test_purge_size_and_delete_act_on_the_broker(broker: BrokerThread) -> None:
    name = fresh()
    with connect(broker) as conn:
        for i in range(3):
            publish(conn, name, i)
        channel = conn.default_channel
        assert channel.queue_declare(name, passive=True).message_count == 3
        assert channel.queue_purge(name) == 3
        publish(conn, name, "x")
        channel.queue_delete(name)
    assert info(broker, name).get("depth", 0) == 0


def test_declaring_a_fanout_exchange_raises_not_implemented(broker: BrokerThread) -> None:
    with connect(broker) as conn:
        assert not conn.supports_exchange_type("fanout")
        with pytest.raises(NotImplementedError, match="pigeon:// has no fanout exchange"):
            Exchange("bcast", type="fanout")(conn.default_channel).declare()


def test_a_message_that_reaches_no_queue_is_logged_once_per_exchange(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(broker) as conn, caplog.at_level(logging.WARNING):
        ex = Exchange("nowhere", type="topic")
        producer = conn.Producer()
        for key in ("a.b", "c.d"):
            producer.publish({"e": 1}, exchange=ex, routing_key=key, declare=[ex])
    warnings = [r for r in caplog.records if "reached no queue" in r.getMessage()]
    assert len(warnings) == 1
    assert "exchange 'nowhere'" in warnings[0].getMessage()


def test_a_broker_that_is_not_there_is_a_connection_error() -> None:
    conn = Connection(f"pigeon://127.0.0.1:{free_port()}//", connect_timeout=2)
    with pytest.raises(OperationalError):
        conn.ensure_connection(max_retries=1)
    conn.release()


def test_a_consumer_carries_on_after_its_queue_is_deleted_on_the_broker(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    name = fresh()
    got: list[Any] = []
    with connect(broker) as conn, caplog.at_level(logging.WARNING):

        def take(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        def delete() -> None:
            with pigeon.Queue(broker.url(name)) as q:
                q.delete()

        with conn.Consumer(Queue(name), callbacks=[take]):
            # the GET parked by this drain is answered "deleted"; the drain parks again
            threading.Timer(0.3, delete).start()
            threading.Timer(1.5, lambda: publish(conn, name, "after")).start()
            conn.drain_events(timeout=30)
    assert got == ["after"]
    assert any("was deleted" in r.getMessage() for r in caplog.records)


def test_a_redis_only_transport_option_is_said_to_have_no_effect(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    from pigeon.integrations.celery import transport

    transport._noted.discard("visibility_timeout")
    with caplog.at_level(logging.WARNING), connect(broker, visibility_timeout=3600) as conn:
        conn.default_channel  # noqa: B018  (opens the channel)
    (note,) = [r.getMessage() for r in caplog.records if "visibility_timeout" in r.getMessage()]
    assert "has no effect on pigeon://" in note


def test_a_delivery_the_broker_took_back_is_reported_once_and_its_ack_does_not_raise(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    name = fresh()
    with caplog.at_level(logging.WARNING), connect(broker, lease=0.3) as conn:
        publish(conn, name, "held")
        q = conn.SimpleQueue(name)
        m = q.get(timeout=5)
        with pigeon.Queue(broker.url(name)) as admin:
            admin.delete()  # drops it in flight too: its delivery id is unknown now
        time.sleep(1.5)  # five keeper rounds
        m.ack()  # at-least-once: logged, not raised
        q.close()
    said = [r.getMessage() for r in caplog.records]
    assert len([s for s in said if "could not extend" in s]) == 1
    assert len([s for s in said if "could not ack" in s]) == 1


def test_polling_interval_zero_does_not_make_a_consumer_of_two_queues_spin(
    broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.integrations.celery.transport import Channel

    takes = 0
    take = Channel._take

    def counted(self: Channel, queue: str, wait: float, no_ack: bool) -> dict[str, Any]:
        nonlocal takes
        takes += 1
        return take(self, queue, wait, no_ack)

    monkeypatch.setattr(Channel, "_take", counted)
    with connect(broker, polling_interval=0) as conn:
        queues = [Queue(fresh()), Queue(fresh())]
        with conn.Consumer(queues, callbacks=[lambda body, m: None]), pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.0)
    # three GETs (two looks, one park of at least 0.05 s) a round: not thousands
    assert takes <= 3 * 1.0 / 0.05 + 3


def test_a_queue_named_with_a_slash_round_trips(broker: BrokerThread) -> None:
    name = f"reports/{fresh()}"
    with connect(broker) as conn:
        publish(conn, name, {"n": 1})
        q = conn.SimpleQueue(name)
        m = q.get(timeout=5)
        assert m.payload == {"n": 1}
        m.ack()
        q.close()
    assert info(broker, name)["acked_total"] == 1


def test_a_slash_in_a_url_path_is_refused_naming_the_escape() -> None:
    with pytest.raises(pigeon.InvalidURL, match=r"a queue name with '/' is written %2F"):
        pigeon.Queue("pigeon://127.0.0.1:7878/reports/daily")
    with pigeon.Queue("pigeon://127.0.0.1:7878/reports%2Fdaily") as q:
        assert q.name == "reports/daily"


def test_a_dedup_id_without_the_same_task_id_is_warned_about_once(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.integrations.celery import transport

    monkeypatch.setattr(transport, "_dedup_noted", [])
    name = fresh()
    with caplog.at_level(logging.WARNING), connect(broker) as conn:
        publish(conn, name, 1, headers={"id": "same"}, dedup_id="same")  # as advised: quiet
        for n in range(2):
            publish(conn, name, n, headers={"id": f"task-{n}"}, dedup_id="other")
    noted = [r for r in caplog.records if "its AsyncResult never resolves" in r.getMessage()]
    assert len(noted) == 1
    assert "pass task_id=dedup_id too" in noted[0].getMessage()
