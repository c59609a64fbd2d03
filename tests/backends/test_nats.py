"""nats:// on its own: delay, ttl, priority and items larger than the server's max_payload
(issue 34), on the shared NATS server or on one a test starts and kills."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

import pigeon
from pigeon.backends.nats import AsyncNatsQueue, stream_name
from tests._clusters import ScratchNats
from tests._services import queue_name, require_service

R = TypeVar("R")
MiB = 1 << 20


@pytest.fixture
def url() -> str:
    require_service("NATS", 4222)
    return f"nats://127.0.0.1:4222/{queue_name()}"


def _raw(fn: Callable[[Any, Any], Awaitable[R]], server: str = "nats://127.0.0.1:4222") -> R:
    """``fn(nc, js)`` on a plain nats-py connection of its own."""

    async def run() -> R:
        import nats

        nc = await nats.connect(server)
        try:
            return await fn(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _stored(stream: str) -> int:
    from nats.js.errors import NotFoundError

    async def ask(nc: Any, js: Any) -> int:
        try:
            return int((await js.stream_info(stream)).state.messages)
        except NotFoundError:
            return 0

    return _raw(ask)


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def _chunks(queue: str) -> int:
    """Chunks stored for ``queue``'s large items."""
    from pigeon.backends.nats import chunk_stream_name

    return _stored(chunk_stream_name(queue))


# --- delay ----------------------------------------------------------------------------------


def test_a_delayed_message_handed_out_early_reaches_no_handler_and_counts_no_delivery(
    url: str,
) -> None:
    with pigeon.Queue(url) as q, pigeon.Queue(url) as other:
        started = time.monotonic()
        q.put("later", delay=1.5)
        with pytest.raises(pigeon.Empty):
            other.get_message(timeout=0.3)  # handed to it early: given back, never delivered
        assert q.qsize() == 1  # still waiting, counted
        msg = q.get_message(timeout=10)
        assert time.monotonic() - started >= 1.4
        assert (msg.body, msg.delivery_count) == ("later", 1)
        msg.nack()
        again = q.get_message(timeout=10)
        assert again.delivery_count == 2  # the real deliveries, and only those
        again.ack()
        assert q.qsize() == 0


@pytest.mark.parametrize("priority", [0, 7])
def test_a_blocked_get_wakes_when_a_delayed_message_comes_due(url: str, priority: int) -> None:
    with pigeon.Queue(url) as q:
        t = time.monotonic()
        q.put("due", delay=1.5, priority=priority)
        assert q.get(timeout=15) == "due"
        waited = time.monotonic() - t
        # never early; late by a slice at most (0.2 s), plus a generous margin for a
        # loaded machine - a liveness bound, not a speed claim
        assert 1.45 <= waited < 1.5 + 3.0


def test_qsize_counts_delayed_messages_before_and_after_they_are_handed_out_early(
    url: str,
) -> None:
    with pigeon.Queue(url) as q, pigeon.Queue(url) as other:
        q.put("b", delay=60)
        q.put("a")
        assert q.qsize() == 2
        msg = other.get_message(timeout=10)  # hands "b" out early on the way to "a"
        assert msg.body == "a"
        assert q.qsize() == 1  # "b" waits, "a" is held
        msg.ack()
        assert q.qsize() == 1
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.3)


@pytest.mark.slow
def test_delayed_messages_survive_a_server_killed_while_they_wait(
    scratch_nats: ScratchNats,
) -> None:
    """A delayed message is stored in the stream: kill -9 the server (file storage, and
    JetStream syncs what a publish ack confirmed... at its sync_interval: here the
    process dies, not the machine) and it comes back, never early, counted once."""
    server = scratch_nats
    url = f"{server.url}/{queue_name()}"
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        due = time.time() + 4.0
        q.put_many(["d0", "d1"], delay=4.0)
        q.put("d7", delay=4.0, priority=7)
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.5)  # each handed out early once, given back with a NAK delay
        server.kill()
        server.start()
        time.sleep(max(0.0, due + 0.5 - time.time()))  # all three due: priority decides
        got = []
        while len(got) < 3:
            msg = q.get_message(timeout=20)
            assert time.time() >= due - 0.05, "delivered before it was due"
            got.append((msg.body, msg.delivery_count))
            msg.ack()
        assert got == [("d7", 1), ("d0", 1), ("d1", 1)]
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.5)


# --- ttl ------------------------------------------------------------------------------------


def test_an_expired_message_is_dead_lettered_once_if_its_reader_dies_before_ending_it(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader publishes the dead letter, then terminates the message. If it dies in
    between, the message comes back after its lease and is moved again - under the same
    message id, so the dead queue keeps one copy (within its duplicate window)."""
    from nats.aio.msg import Msg

    with pigeon.Queue(url + "?lease=1") as q, pigeon.Queue(url + ".dead") as dead:
        q.put("stale", ttl=0.2, headers={"k": "v"})
        q.put("fresh", ttl=60)
        time.sleep(0.5)

        async def lost(self: Msg) -> None:  # the reader "dies" before its term is sent
            return None

        with monkeypatch.context() as m:
            m.setattr(Msg, "term", lost)
            assert q.get(timeout=10) == "fresh"  # "stale" went to the dead letters first
        time.sleep(1.5)  # its lease ends: JetStream hands it out again
        with pytest.raises(pigeon.Empty):
            q.get(timeout=1.0)  # moved again, terminated this time
        msg = dead.get_message(timeout=10)
        assert (msg.body, msg.headers) == ("stale", {"k": "v"})
        msg.ack()
        with pytest.raises(pigeon.Empty):
            dead.get(timeout=0.5)  # the second move was a duplicate
        assert q.qsize() == 0


def test_a_delayed_messages_ttl_counts_from_when_it_is_due(url: str) -> None:
    with pigeon.Queue(url) as q:
        q.put("kept", delay=0.5, ttl=5)
        assert q.get(timeout=10) == "kept"  # due after 0.5 s, expires 5 s after that


# --- priority -------------------------------------------------------------------------------


def test_a_higher_priority_put_by_another_handle_is_taken_first(url: str) -> None:
    with pigeon.Queue(url) as consumer, pigeon.Queue(url) as producer:
        consumer.put("low")  # the consumer's view of the queue: priority 0 only
        producer.put("high", priority=3)
        assert consumer.get(timeout=10) == "high"
        assert consumer.get(timeout=10) == "low"


def test_a_higher_priority_come_due_during_a_wait_goes_before_what_ends_the_wait(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocked get waits on priority 0; when a message arrives there, a message of a
    higher priority that came due meanwhile (a nack's delay ended) goes first, and the
    one that ended the wait is the next get's."""
    import pigeon.backends.nats as nats_backend

    monkeypatch.setattr(nats_backend, "SLICE", 5.0)  # one long wait, no new round
    with pigeon.Queue(url) as q, pigeon.Queue(url) as producer:
        producer.put("high", priority=8)
        q.get_message(timeout=10).nack(delay=0.5)
        got: list[Any] = []

        def wait_twice() -> None:  # one thread: one client of the handle, kept between
            for _ in range(2):
                msg = q.get_message(timeout=10)
                got.append((msg.body, msg.delivery_count))
                msg.ack()

        waiter = threading.Thread(target=wait_twice)
        waiter.start()
        time.sleep(1.5)  # "high" came due a second ago; the waiter still waits on 0
        producer.put("low")
        waiter.join(10)
        assert got == [("high", 2), ("low", 1)]


def test_a_stream_made_before_priorities_gains_its_priority_subjects(url: str) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    name = _name(url)

    async def old_queue(nc: Any, js: Any) -> None:  # as pigeon made it before this change
        await js.add_stream(
            StreamConfig(name=stream_name(name), subjects=[f"pigeon.{name}"],
                         retention=RetentionPolicy.WORK_QUEUE)
        )  # fmt: skip
        await js.add_consumer(
            stream_name(name),
            ConsumerConfig(durable_name="pigeon", ack_policy=AckPolicy.EXPLICIT,
                           filter_subject=f"pigeon.{name}", max_deliver=-1),
        )  # fmt: skip
        await js.publish(f"pigeon.{name}", b"\xa3old")  # msgpack "old"

    _raw(old_queue)
    with pigeon.Queue(url) as q:
        q.put("new", priority=4)
        assert [q.get(timeout=10), q.get(timeout=10)] == ["new", "old"]


_CONSUMER = r"""
import json, sys, time
import pigeon
seen = []
with pigeon.Queue(sys.argv[1]) as q:
    idle = time.monotonic()
    while time.monotonic() - idle < 4:
        try:
            msg = q.get_message(timeout=0.5)
        except pigeon.Empty:
            continue
        seen.append([msg.body, time.time(), msg.delivery_count])
        msg.ack()
        idle = time.monotonic()
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_consumers_in_several_processes_take_each_message_once_and_none_early(url: str) -> None:
    items = [(f"m{i}", i % 10, 1.5 if i % 3 == 0 else 0.0) for i in range(60)]
    with pigeon.Queue(url) as q:
        procs = [
            subprocess.Popen([sys.executable, "-c", _CONSUMER, url], stdout=subprocess.PIPE)
            for _ in range(3)
        ]
        time.sleep(1.0)  # the consumers are waiting
        due = {}
        for body, priority, delay in items:
            due[body] = time.time() + delay
            q.put(body, priority=priority, delay=delay)
    taken: list[Any] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        taken += json.loads(out)
    assert sorted(body for body, _, _ in taken) == sorted(body for body, _, _ in items)
    assert all(count == 1 for _, _, count in taken)
    early = [(body, due[body] - at) for body, at, _ in taken if at < due[body] - 0.05]
    assert early == []


# --- large items ----------------------------------------------------------------------------


def test_a_large_item_round_trips_and_its_chunks_go_once_it_is_taken(url: str) -> None:
    item = os.urandom(5 * MiB + 7)
    name = _name(url)
    with pigeon.Queue(url, serializer="raw") as q:
        q.put(item, headers={"kind": "blob"})
        assert q.qsize() == 1
        assert _chunks(name) == 6
        msg = q.get_message(timeout=30)
        assert (msg.body, msg.headers) == (item, {"kind": "blob"})
        msg.nack()  # given back: its chunks stay
        assert _chunks(name) == 6
        again = q.get_message(timeout=30)
        assert again.body == item and again.delivery_count == 2
        again.ack()
        assert _chunks(name) == 0
        assert q.qsize() == 0


def test_a_reader_never_sees_part_of_a_large_item_being_put(url: str) -> None:
    item = os.urandom(12 * MiB)
    seen: list[Any] = []
    with pigeon.Queue(url, serializer="raw") as q, pigeon.Queue(url, serializer="raw") as r:
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    seen.append(r.get(timeout=0.2))
                    return
                except pigeon.Empty:
                    seen.append(None)

        reader = threading.Thread(target=read)
        reader.start()
        q.put(item)
        reader.join(30)
        stop.set()
    assert seen[-1] == item and all(s is None for s in seen[:-1])


_DIES_AFTER_ITS_CHUNKS = r"""
import os, sys
import pigeon
from pigeon.backends.nats import AsyncNatsQueue

async def die(*args, **kwargs):
    os._exit(9)  # every chunk is stored; the manifest never goes

AsyncNatsQueue._publish = die
with pigeon.Queue(sys.argv[1], serializer="raw") as q:
    q.put(b"x" * (3 << 20))
"""


def test_a_put_that_dies_after_storing_its_chunks_leaves_nothing_visible(url: str) -> None:
    done = subprocess.run([sys.executable, "-c", _DIES_AFTER_ITS_CHUNKS, url], timeout=60)
    assert done.returncode == 9
    assert _chunks(_name(url)) == 4  # stored, but nothing names them
    with pigeon.Queue(url, serializer="raw") as q:
        assert q.qsize() == 0
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.5)


def test_a_put_refused_after_storing_its_chunks_takes_them_back(url: str) -> None:
    with pigeon.Queue(url, serializer="raw", maxsize=1) as q:
        q.put(b"small")
        with pytest.raises(pigeon.Full):
            q.put(b"x" * (3 * MiB), timeout=0.3)  # chunks stored, then no room
        assert _chunks(_name(url)) == 0
        q.shutdown()
        with pytest.raises(pigeon.ShutDown):
            q.put(b"x" * (3 * MiB))
        assert _chunks(_name(url)) == 0


def test_a_repeated_dedup_id_stores_the_chunks_of_one_item(url: str) -> None:
    with pigeon.Queue(url, serializer="raw") as q:
        q.put(b"a" * (3 * MiB), dedup_id="blob-1")
        q.put(b"b" * (3 * MiB), dedup_id="blob-1")  # confirmed, not stored again
        assert _chunks(_name(url)) == 4
        assert q.get(timeout=30) == b"a" * (3 * MiB)
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.3)


def test_a_large_item_goes_whole_to_the_dead_letters(url: str) -> None:
    item = os.urandom(3 * MiB)
    with (
        pigeon.Queue(url, serializer="raw") as q,
        pigeon.Queue(url + ".dead", serializer="raw") as dead,
    ):
        q.put(item, priority=6)
        q.get_message(timeout=30).nack(requeue=False, reason="no thanks")
        msg = dead.get_message(timeout=30)
        assert msg.body == item
        msg.ack()
    assert _chunks(_name(url)) == 0
    assert _chunks(_name(url) + ".dead") == 0


def test_an_item_over_the_readers_max_item_size_is_dead_lettered_unread(url: str) -> None:
    item = os.urandom(3 * MiB)
    with pigeon.Queue(url, serializer="raw") as q:
        q.put(item)
    with (
        pigeon.Queue(url + "?max_item_size=1048576", serializer="raw") as small,
        pytest.raises(pigeon.Empty),
    ):
        small.get(timeout=0.5)  # too large for it: moved, reason too_large
    with pigeon.Queue(url + ".dead", serializer="raw") as dead:
        msg = dead.get_message(timeout=30)
        assert msg.body == item  # its chunks were never read nor copied: the same ones
        msg.ack()
    assert _chunks(_name(url)) == 0


def test_max_item_size_is_checked_before_anything_is_sent(url: str) -> None:
    with pytest.raises(ValueError, match="max_item_size"):
        pigeon.Queue(url, max_item_size=0)
    with pytest.raises(pigeon.InvalidURL, match="max_item_size"):
        pigeon.Queue(url + "?max_item_size=lots")
    with pytest.raises(TypeError, match="max_items_size"):
        pigeon.Queue(url, max_items_size=10)  # type: ignore[call-arg]
    with pigeon.Queue(url, serializer="raw", max_item_size=10) as q:
        q.put(b"x" * 10)
        with pytest.raises(pigeon.TooLarge, match="max_item_size=10"):
            q.put(b"x" * 11)
        assert q.qsize() == 1

    async def on_asyncio() -> None:
        async with pigeon.AsyncQueue(url, serializer="raw", max_item_size=10) as aq:
            with pytest.raises(pigeon.TooLarge, match="max_item_size=10"):
                await aq.put(b"x" * 11)

    asyncio.run(on_asyncio())


# --- dedup across a restart ------------------------------------------------------------------


def _bucket_age(queue: str, server: str = "nats://127.0.0.1:4222") -> float | None:
    """The max age of ``queue``'s id bucket (None: it has none)."""
    from nats.js.errors import NotFoundError

    from pigeon.backends.nats import ids_bucket_name

    async def ask(nc: Any, js: Any) -> float | None:
        try:
            info = await js.stream_info("KV_" + ids_bucket_name(queue))
        except NotFoundError:
            return None
        return float(info.config.max_age or 0)

    return _raw(ask, server)


def test_the_dedup_id_of_an_acked_message_is_kept_across_a_server_restart(
    scratch_nats: ScratchNats,
) -> None:
    """JetStream rebuilds its duplicate map after a restart from the messages still
    stored: the id of one acked (gone from the work queue) is kept in the queue's id
    bucket, so a repeat within the window is still confirmed and not stored - put and
    put_many alike, a large item's chunks not stored either."""
    url = f"{scratch_nats.url}/{queue_name()}"
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        q.put("a", dedup_id="X")
        q.put_many(["b", "c"], dedup_ids=["Y", " z\n"])  # one escaped as a Nats-Msg-Id
        q.put(b"L" * (3 * MiB), dedup_id="large")
        got = [q.get(timeout=30) for _ in range(4)]
        assert got == ["a", "b", "c", b"L" * (3 * MiB)]
    scratch_nats.restart()
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        q.put("a again", dedup_id="X")
        q.put_many(["b again", "c again", "new"], dedup_ids=["Y", " z\n", "W"])
        q.put(b"M" * (3 * MiB), dedup_id="large")
        assert q.qsize() == 1
        assert q.get(timeout=10) == "new"
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.3)
    assert _raw(lambda nc, js: _chunk_count(js, url), scratch_nats.url) == 0


async def _chunk_count(js: Any, url: str) -> int:
    from pigeon.backends.nats import chunk_stream_name

    return int((await js.stream_info(chunk_stream_name(_name(url)))).state.messages)


def test_a_dedup_window_still_ends_after_a_server_restart(scratch_nats: ScratchNats) -> None:
    url = f"{scratch_nats.url}/{queue_name()}?dedup_window=1"
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        q.put("a", dedup_id="X")
        assert q.get(timeout=10) == "a"
        assert _bucket_age(_name(url), scratch_nats.url) == 1.0
    scratch_nats.restart()
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        q.put("within", dedup_id="X")
        assert q.qsize() == 0
        time.sleep(1.5)
        q.put("after", dedup_id="X")
        assert q.get(timeout=10) == "after"


def test_a_repeat_stored_by_a_put_that_looked_before_the_first_recorded_is_taken_back(
    scratch_nats: ScratchNats,
) -> None:
    """Two puts of one id across a restart, the second looking its id up before the
    first recorded it: JetStream forgot the id, so both are stored; the record is made
    only if absent (kv.create), and the put that finds another message's record deletes
    its own."""
    url = f"{scratch_nats.url}/{queue_name()}"
    with pigeon.Queue(url, reconnect_timeout=20) as q:
        q.put("first", dedup_id="X")
        assert q.get(timeout=10) == "first"
    scratch_nats.restart()

    async def run() -> None:
        q = AsyncNatsQueue[Any](url, reconnect_timeout=20)
        try:

            async def looked_earlier(js: Any, ids: list[str]) -> set[int]:
                return set()

            q._recall = looked_earlier  # type: ignore[method-assign]
            # after a repeat in the batch, so its chunks are found by the ack's place
            await q.put_many(["y", "y again", b"L" * (3 * MiB)], dedup_ids=["Y", "Y", "X"])
            assert await q.qsize() == 1
            assert await q.get(timeout=10) == "y"
        finally:
            await q.aclose()

    asyncio.run(run())
    assert _raw(lambda nc, js: _chunk_count(js, url), scratch_nats.url) == 0


def test_delete_forgets_the_queues_dedup_ids_and_a_plain_put_makes_no_bucket(url: str) -> None:
    with pigeon.Queue(url) as q:
        q.put("plain")
        assert _bucket_age(_name(url)) is None  # a put without a dedup_id pays nothing
        q.put("a", dedup_id="X")
        assert _bucket_age(_name(url)) == 300.0
        q.delete()
        assert _bucket_age(_name(url)) is None
        q.put("a again", dedup_id="X")  # as on redis:// and pigeon://: the ids went too
        assert q.get(timeout=10) == "a again"
    with pigeon.Queue(url) as q, pigeon.Queue(url) as other:
        q.put("b", dedup_id="Y")
        other.delete()  # under q, which holds the bucket it opened: made again
        other.put("z")  # the queue made again, its bucket not yet
        q.put("b again", dedup_id="Y")
        q.put("b once more", dedup_id="Y")
        assert [q.get(timeout=10), q.get(timeout=10)] == ["z", "b again"]
        assert q.qsize() == 0
    with pigeon.Queue(url, dedup_window=0) as q:
        q.delete()
        q.put("a", dedup_id="X")
        q.put("a", dedup_id="X")
        assert q.qsize() == 2
        assert _bucket_age(_name(url)) is None  # dedup_window=0: no dedup, no bucket


def test_a_window_given_by_a_handle_becomes_the_id_buckets_ttl(url: str) -> None:
    with pigeon.Queue(url, dedup_window=5) as q:
        q.put("a", dedup_id="X")
        assert _bucket_age(_name(url)) == 5.0
    with pigeon.Queue(url, dedup_window=2.5) as q:
        q.qsize()
        assert _bucket_age(_name(url)) == 2.5


# --- pulls ----------------------------------------------------------------------------------


def test_a_delivery_that_comes_after_its_pull_gave_up_is_handed_out_by_the_next(
    url: str,
) -> None:
    """A pull request's answer that arrives after the client stopped waiting (a stalled
    connection) is kept: the next pull of that consumer hands it out at once, instead of
    leaving it leased to nobody until AckWait."""

    async def run() -> None:
        q = AsyncNatsQueue[Any](url)
        try:
            await q.put("late")
            await q._jetstream()
            pulls = q._pulls
            assert pulls is not None
            # what a request given up leaves: a delivery for a consumer nobody reads now
            msgs = await pulls.pull("pigeon", 1, 0.0)
            assert len(msgs) == 1
            await pulls._route(msgs[0])
            again = await pulls.pull("pigeon", 1, 0.0)
            assert again == msgs
            await again[0].ack()
        finally:
            await q.aclose()

    asyncio.run(run())


# --- a settle only counts for the delivery that holds the message ---------------------------
# JetStream acts on an ack, NAK, TERM or in-progress sent on any delivery's reply subject:
# after a redelivery, the old delivery's would settle the new one's copy.


def _lease_url(url: str, lease: float) -> str:
    return f"{url}?lease={lease:g}"


def test_an_ack_after_the_lease_equal_to_ack_wait_ran_out_and_another_got_it_is_refused(
    url: str,
) -> None:
    """The queue's lease is the consumer's AckWait (``?lease=1``, no ``lease=`` asked for):
    JetStream redelivers to ``b`` by itself, and ``a``'s late ack must not settle ``b``'s
    copy."""
    with pigeon.Queue(_lease_url(url, 1)) as a, pigeon.Queue(_lease_url(url, 1)) as b:
        a.put("job")
        first = a.get_message(timeout=10)
        time.sleep(1.5)  # AckWait runs out
        second = b.get_message(timeout=10)
        assert (second.body, second.delivery_count) == ("job", 2)
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out and it was deliv"):
            first.ack()
        with pytest.raises(pigeon.Empty):
            a.get_message(timeout=0.5)  # b still holds it
        second.ack()
        assert b.qsize() == 0
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=1.5)  # settled once, and for good


def test_an_ack_after_a_shorter_lease_gave_the_message_back_and_another_got_it_is_refused(
    url: str,
) -> None:
    """A lease shorter than AckWait ends with pigeon's own NAK; the late ack says the lease
    ran out (not "already acked or nacked") and leaves ``b``'s copy alone."""
    with pigeon.Queue(_lease_url(url, 30)) as a, pigeon.Queue(_lease_url(url, 30)) as b:
        a.put("job")
        first = a.get_message(timeout=10, lease=0.3)
        time.sleep(0.6)
        second = b.get_message(timeout=10)
        assert (second.body, second.delivery_count) == ("job", 2)
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            first.extend(30)  # would keep b's copy
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            first.ack()
        second.ack()
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=0.5)


def test_the_same_handle_cannot_settle_its_earlier_delivery_of_a_message(url: str) -> None:
    with pigeon.Queue(_lease_url(url, 1)) as q:
        q.put("job")
        first = q.get_message(timeout=10)
        time.sleep(1.5)
        second = q.get_message(timeout=10)
        assert second.delivery_count == 2
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            first.nack(requeue=False)  # would dead-letter the second delivery
        second.ack()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=0.5)
        with pigeon.Queue(f"{url}.dead") as dead:
            assert dead.qsize() == 0


@pytest.mark.parametrize("lease", [None, 0.3])
def test_a_late_ack_before_anyone_took_the_message_again_settles_it(
    url: str, lease: float | None
) -> None:
    """Nobody holds another delivery: the late holder's ack still counts."""
    with pigeon.Queue(_lease_url(url, 1)) as q:
        q.put("job")
        msg = q.get_message(timeout=10, lease=lease)
        time.sleep(1.5)
        msg.ack()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=1.5)


def test_an_ack_of_a_message_another_delivery_settled_is_refused(url: str) -> None:
    with pigeon.Queue(_lease_url(url, 1)) as q:
        q.put("job")
        first = q.get_message(timeout=10)
        time.sleep(1.5)
        q.get_message(timeout=10).ack()
        with pytest.raises(pigeon.LocalProtocolError, match="no longer in the queue"):
            first.ack()


def test_a_settle_well_within_the_lease_asks_nothing_first(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path: while AckWait surely runs, no delivery can have come after this one,
    so an ack, nack or extend is sent without asking whether it still holds the message."""

    async def asked(self: Any, d: Any) -> int:
        raise AssertionError("asked whether a fresh delivery still holds its message")

    monkeypatch.setattr(AsyncNatsQueue, "_holds", asked)
    with pigeon.Queue(_lease_url(url, 30)) as q:
        q.put_many(["a", "b"])
        m = q.get_message(timeout=10)
        m.extend(60)
        m.ack()
        n = q.get_message(timeout=10)
        n.nack()
        q.get_message(timeout=10).ack()
        assert q.qsize() == 0


# --- handles with different leases share one consumer ---------------------------------------
# The consumer (and its AckWait) is the queue's, shared by every handle: a handle opened
# with a shorter lease must not end the deliveries other handles hold sooner than they
# count on; its own lease is kept on the handle (a NAK when it ends).


def _natslease_url() -> str:
    require_service("NATS", 4222)
    return f"nats://127.0.0.1:4222/natslease-{queue_name()}"


def _ack_wait(url: str) -> float:
    async def ask(nc: Any, js: Any) -> float:
        info = await js.consumer_info(stream_name(_name(url)), "pigeon")
        return float(info.config.ack_wait)

    return _raw(ask)


def _set_ack_wait(url: str, seconds: float) -> None:
    """What an older pigeon (or an administrator) does: the consumer's AckWait set, lower
    than what the handles already open counted on."""

    async def change(nc: Any, js: Any) -> None:
        stream = stream_name(_name(url))
        config = (await js.consumer_info(stream, "pigeon")).config
        config.ack_wait = seconds
        await js.add_consumer(stream, config)

    _raw(change)


def test_a_handle_opened_with_a_shorter_lease_leaves_the_held_deliveries_theirs() -> None:
    """Round 7 #1: ``a`` (lease 30) holds the job; ``b`` opening with lease 2 rewrote the
    consumer's AckWait for all, the job went to ``b`` after 2 s and ``a``'s ack, believed
    fresh, settled ``b``'s copy. Now the AckWait stays 30 s: ``a`` holds the job until it
    settles it, and ``b`` is not handed it meanwhile."""
    url = _natslease_url()
    with pigeon.Queue(url, lease=30) as a:
        try:
            a.put("job")
            first = a.get_message(timeout=10)
            with pigeon.Queue(url, lease=2) as b:
                assert _ack_wait(url) == 30
                time.sleep(2.5)
                with pytest.raises(pigeon.Empty):
                    b.get_message(timeout=1)  # a's lease runs: not redelivered
                first.ack()  # a still holds it: its ack counts
                with pytest.raises(pigeon.Empty):
                    b.get_message(timeout=2.5)
                assert b.qsize() == 0
                assert _ack_wait(url) == 30
        finally:
            a.delete()


def test_a_late_ack_is_refused_after_the_ack_wait_was_lowered_behind_the_handle() -> None:
    """The review's scenario where something other than a pigeon handle opening lowers
    the AckWait (an older pigeon, an administrator): ``a`` (lease 30) reads the AckWait
    again when it fetches, learns it is 2 s, and no longer trusts its held delivery past
    that: the late ack is refused (``b`` holds the job), and ``b``'s nack brings it back."""
    url = _natslease_url()
    with pigeon.Queue(url, lease=30) as a:
        try:
            a.put("job")
            first = a.get_message(timeout=10)
            _set_ack_wait(url, 2)
            time.sleep(1.2)  # the next fetch reads the AckWait again
            with pytest.raises(pigeon.Empty):
                a.get_message(timeout=0.3)
            with pigeon.Queue(url, lease=2) as b:
                time.sleep(1.5)
                second = b.get_message(timeout=10)  # the server redelivered it after 2 s
                assert (second.body, second.delivery_count) == ("job", 2)
                with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
                    first.ack()
                second.nack(requeue=True)  # b's handler failed: the job comes back
                again = b.get_message(timeout=5)
                assert (again.body, again.delivery_count) == ("job", 3)
                again.ack()
                assert b.qsize() == 0
        finally:
            a.delete()


@pytest.mark.parametrize("short_first", [False, True])
def test_a_message_taken_with_a_short_lease_comes_back_after_it_while_another_holds_a_long_one(
    short_first: bool,
) -> None:
    """``b``'s lease (1 s) is its own although the consumer's AckWait is ``a``'s 30 s -
    whether ``a`` opened first or raised it after ``b`` opened: a message ``b`` takes and
    does not settle goes back (``b``'s NAK) after about 1 s, to ``a``; ``b``'s late ack
    is refused."""
    url = _natslease_url()
    first, second = (1, 30) if short_first else (30, 1)
    with pigeon.Queue(url, lease=first) as one, pigeon.Queue(url, lease=second) as two:
        a, b = (two, one) if short_first else (one, two)
        try:
            assert _ack_wait(url) == 30
            b.put("job")
            time.sleep(1.2)  # b reads the AckWait again at its next fetch
            taken = b.get_message(timeout=10)
            assert taken.body == "job"
            back = a.get_message(timeout=10)  # after ~1 s, not 30
            assert (back.body, back.delivery_count) == ("job", 2)
            with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
                taken.ack()
            back.ack()
            assert a.qsize() == 0
        finally:
            a.delete()


def test_the_consumers_ack_wait_is_raised_by_a_longer_lease_never_lowered() -> None:
    url = _natslease_url()
    try:
        with pigeon.Queue(url, lease=5):
            assert _ack_wait(url) == 5
        with pigeon.Queue(url, lease=2) as q:
            assert _ack_wait(url) == 5
            assert q._queue_lease(5) == 2  # what pigeon.consume extends by: this handle's
        with pigeon.Queue(url, lease=8):
            assert _ack_wait(url) == 8
        with pigeon.Queue(url) as q:  # no lease asked for: the queue's
            assert q._queue_lease(5) == 8
    finally:
        with pigeon.Queue(url) as q:
            q.delete()


def test_two_handles_opening_at_once_leave_the_longer_lease_as_ack_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review 7b #3: each open read the AckWait and then wrote its own, so of two handles
    opening at once (leases 8 and 4) the last write could leave 4 s while the first
    handle trusted its deliveries for 8 s (5 of 7 trials; a job was lost). Here a
    shorter write lands right after each of the longer one's first two."""
    import copy

    from nats.js.manager import JetStreamManager

    url = _natslease_url()
    real = JetStreamManager.add_consumer
    raced: list[float] = []

    async def racing(self: Any, stream: str, config: Any = None, **kw: Any) -> Any:
        made = await real(self, stream, config, **kw)
        if len(raced) < 2 and config is not None and config.ack_wait == 8:
            low = copy.copy(config)
            low.ack_wait = 4
            raced.append(4)
            await real(self, stream, low)  # another handle's write, just after (twice)
        return made

    monkeypatch.setattr(JetStreamManager, "add_consumer", racing)
    try:
        with pigeon.Queue(url, lease=8) as a:
            assert raced == [4, 4]
            assert _ack_wait(url) == 8  # read again, and raised again
            assert a._queue_lease(5) == 8
    finally:
        monkeypatch.undo()
        with pigeon.Queue(url) as q:
            q.delete()
