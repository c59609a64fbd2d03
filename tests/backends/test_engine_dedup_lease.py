"""Redis and NATS: the dedup window (URL and keyword, 0, rounding), dedup memory at its
bounds, short leases, and the trace context against NATS's max_payload (review round 6,
engines #2)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.backends.nats import stream_name
from tests._clusters import ScratchNats, need
from tests._services import free_port, queue_name, wait_for_port


def _twice(q: pigeon.Queue[Any]) -> int:
    q.put("1", dedup_id="x")
    q.put("2", dedup_id="x")
    return q.qsize()


@pytest.mark.parametrize("given", ["url", "keyword"])
def test_redis_dedup_window_0_stores_every_put(redis_url: str, given: str) -> None:
    """As on pigeon://: 0 is no dedup (it was SET PX 0: the put failed; the keyword was
    a TypeError)."""
    url, kw = (
        (redis_url + "?dedup_window=0", {}) if given == "url" else (redis_url, {"dedup_window": 0})
    )
    with pigeon.Queue(url, **kw) as q:
        assert _twice(q) == 2
        q.delete()


def test_redis_a_window_under_a_millisecond_rounds_up_not_to_zero(redis_url: str) -> None:
    with pigeon.Queue(redis_url + "?dedup_window=0.0004") as q:
        q.put("1", dedup_id="x")  # was 'invalid expire time' (PX 0)
        q.delete()


def test_redis_dedup_window_0_still_knows_an_id_remembered_before(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q, pigeon.Queue(redis_url, dedup_window=0) as none:
        q.put("first", dedup_id="x")
        none.put("repeat", dedup_id="x")
        none.put("new", dedup_id="y")
        none.put("new again", dedup_id="y")
        assert q.get_many(10, timeout=5) == ["first", "new", "new again"]
        q.delete()


def _duplicate_window(queue: str) -> float:
    import nats

    async def ask() -> float:
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            info = await nc.jetstream().stream_info(stream_name(queue))
            return float(info.config.duplicate_window)
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_nats_dedup_window_is_the_streams_duplicate_window(nats_url: str) -> None:
    name = nats_url.rsplit("/", 1)[1]
    with pigeon.Queue(nats_url) as q:
        q.put("made")
        assert _duplicate_window(name) == 300  # DEFAULT_DEDUP_WINDOW, not JetStream's 120
    with pigeon.Queue(nats_url, dedup_window=1) as q:  # an existing stream takes it
        assert _duplicate_window(name) == 1
        q.get(timeout=5)
        q.put("1", dedup_id="x")
        q.put("2", dedup_id="x")
        time.sleep(1.3)
        q.put("3", dedup_id="x")
        assert q.get_many(10, timeout=5) == ["1", "3"]
    with pigeon.Queue(nats_url) as q:  # a handle that asks nothing keeps the queue's
        q.put("4", dedup_id="x")
        assert _duplicate_window(name) == 1
        q.delete()


def test_nats_dedup_window_0_stores_every_put(nats_url: str) -> None:
    with pigeon.Queue(nats_url + "?dedup_window=0") as q:
        assert _twice(q) == 2
        q.delete()


def test_nats_dedup_ids_nats_would_alter_stay_distinct(nats_url: str) -> None:
    """nats-py trims a header's value: 'a' and ' a' were one Nats-Msg-Id."""
    with pigeon.Queue(nats_url) as q:
        for i, dedup_id in enumerate(["a", " a", "a ", "pigeon-id:a", "a\r\nb"]):
            q.put(i, dedup_id=dedup_id)
            q.put(i, dedup_id=dedup_id)
        assert q.get_many(10, timeout=5) == [0, 1, 2, 3, 4]
        q.delete()


def test_nats_a_lease_under_a_nanosecond_is_a_millisecond_not_ackwaits_default(
    nats_url: str,
) -> None:
    with pigeon.Queue(nats_url + "?lease=1e-10") as a, pigeon.Queue(nats_url) as b:
        assert b._queue_lease(5) == 0.001  # type: ignore[attr-defined]
        a.put("x")
        a.get_message(timeout=5)
        again = b.get_message(timeout=2)  # was held for AckWait's 30 s default
        assert again.delivery_count == 2
        again.ack()
        a.delete()


@pytest.mark.parametrize("lease", [0.1, 0.4])
def test_nats_a_short_lease_is_the_lease_asked_for(nats_url: str, lease: float) -> None:
    with pigeon.Queue(f"{nats_url}?lease={lease}") as a, pigeon.Queue(nats_url) as b:
        a.put("x")
        a.get_message(timeout=5)
        started = time.monotonic()
        again = b.get_message(timeout=10)
        assert time.monotonic() - started >= lease - 0.01  # never early
        again.ack()
        a.delete()


def _redis_server(*args: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def test_redis_refuses_dedup_ids_where_the_server_may_evict_them() -> None:
    """volatile-* policies evict keys with a ttl first: the dedup keys (found: a repeat
    stored once memory ran short)."""
    for base in _redis_server("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"):
        with pigeon.Queue(f"{base}/{queue_name()}") as q:
            q.put("plain")  # no dedup id: nothing to lose
            with pytest.raises(pigeon.Unsupported, match="maxmemory-policy volatile-lru"):
                q.put("x", dedup_id="x")
            with pigeon.Queue(f"{base}/{queue_name()}?dedup_window=0") as none:
                none.put("x", dedup_id="x")  # no dedup asked: nothing to evict


def test_redis_out_of_memory_says_so_and_stores_nothing() -> None:
    for base in _redis_server("--maxmemory", "2mb", "--maxmemory-policy", "noeviction"):
        with pigeon.Queue(f"{base}/{queue_name()}") as q:
            stored = 0
            with pytest.raises(pigeon.Unavailable, match="redis is out of memory"):
                for i in range(200_000):
                    q.put_many([i, i], dedup_ids=[f"a{i}", f"b{i}"])
                    stored += 2
            assert q.qsize() == stored  # the refused batch: none of it


class _SmallNats(ScratchNats):
    """A nats-server whose max_payload is 8 KiB."""

    def argv(self) -> list[str]:
        conf = Path(self.dir) / "small.conf"
        conf.write_text(
            f"host: 127.0.0.1\nport: {self.port}\nmax_payload: 8192\n"
            f'jetstream {{ store_dir: "{self.dir}" }}\n'
        )
        return [self.exe, "-c", str(conf)]


def test_nats_the_trace_context_never_makes_a_chunked_put_too_large(tmp_path: Path) -> None:
    """An item stored in chunks whose headers leave just room for its manifest: with
    traceparent added it was refused (TooLarge); now it goes untraced."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel test extra")
    from opentelemetry.sdk.trace import TracerProvider

    # a provider of its own: the global one can be set once, and test_message_options
    # sets it with its exporter
    tracer = TracerProvider().get_tracer("test")
    server = _SmallNats(tmp_path)
    try:
        item = b"x" * 20_000
        with pigeon.Queue(f"{server.url}/{queue_name()}", serializer="raw") as q:
            tight = 0
            for pad in range(3700, 4200, 10):
                headers = {"x-pad": "p" * pad}
                try:
                    q.put(item, headers=headers)
                except pigeon.TooLarge:
                    break  # too large untraced too: tracing's doing no longer
                tight = pad
                with tracer.start_as_current_span("produce"):
                    q.put(item, headers=headers)  # TooLarge before the fix, near the edge
            assert tight  # the loop reached the edge
            got = q.get_many(1000, timeout=5)
            assert got and all(g == item for g in got) and len(got) % 2 == 0
    finally:
        server.close()
