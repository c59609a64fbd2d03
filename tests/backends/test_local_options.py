"""Message options on the local queue: priority, delay and ttl records in the shared ring,
tombstones, and the fast path coming back (the contract itself: tests/conformance)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import pytest

import pigeon
from pigeon.backends.local import LocalQueue


def _producer(q: LocalQueue[Any]) -> None:
    q.put("low")
    q.put("high", priority=8, headers={"from": "child"})
    q.put("soon", delay=0.3)
    q.put("gone", ttl=0.05)


def test_options_cross_processes() -> None:
    with pigeon.Queue() as q:
        p = mp.get_context("spawn").Process(target=_producer, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        time.sleep(0.1)
        msg = q.get_message(timeout=5)
        assert (msg.body, msg.headers) == ("high", {"from": "child"})
        msg.ack()
        assert q.get(timeout=5) == "low"
        assert q.get(timeout=5) == "soon"
        assert q.qsize() == 0 and q.expired == 1


def test_taking_from_the_middle_leaves_tombstones_the_head_clears() -> None:
    with pigeon.Queue(maxsize=4) as q:
        q.put("a")
        q.put("b")
        q.put("urgent", priority=1)
        assert q.get_nowait() == "urgent"  # from the middle: a tombstone at the tail end
        st = q._state()  # type: ignore[attr-defined]
        assert (st.count, st.tombs, st.special) == (3, 1, 0)
        assert q.qsize() == 2 and not q.full()
        q.put("c")
        q.put("d")  # the tombstone does not count against maxsize
        with pytest.raises(pigeon.Full):
            q.put_nowait("e")
        assert q.get_many(10, timeout=1) == ["a", "b", "c", "d"]
        st = q._state()  # type: ignore[attr-defined]
        assert (st.count, st.tombs, st.special) == (0, 0, 0)  # the fast path is back


def test_a_blocked_get_wakes_when_a_delay_ends_not_only_on_a_put() -> None:
    with pigeon.Queue() as q:
        q.put("later", delay=0.4)
        started = time.monotonic()
        assert q.get(timeout=5) == "later"
        assert 0.3 <= time.monotonic() - started < 4
        q.put("later", delay=30)
        with pytest.raises(pigeon.Empty, match="nothing is due"):
            q.get(timeout=0.1)
        assert q.qsize() == 1


def test_the_async_face_wakes_at_the_due_time() -> None:
    async def main() -> None:
        with pigeon.Queue() as q:
            async with pigeon.AsyncQueue(q) as aq:
                await aq.put("later", delay=0.3, priority=2)
                started = time.monotonic()
                assert await aq.get(timeout=5) == "later"
                assert time.monotonic() - started >= 0.25

    asyncio.run(main())


def test_join_counts_an_expired_message_as_done() -> None:
    with pigeon.Queue() as q:
        q.put("stale", ttl=0.05)
        q.put("kept")
        time.sleep(0.1)
        assert q.get(timeout=1) == "kept"
        q.task_done()
        q.join(timeout=1)  # the expired one was dropped and counted done


def test_shutdown_immediate_clears_option_records() -> None:
    with pigeon.Queue() as q:
        q.put("p", priority=5)
        q.put("d", delay=60)
        q.shutdown(immediate=True)
        st = q._state()  # type: ignore[attr-defined]
        assert (st.count, st.tombs, st.special, st.unfinished) == (0, 0, 0, 0)
        with pytest.raises(pigeon.ShutDown):
            q.get(timeout=1)


def test_a_get_waits_for_a_delayed_message_after_shutdown() -> None:
    """Shut down (not immediate): what remains is still delivered, delayed ones too."""
    with pigeon.Queue() as q:
        q.put("last", delay=0.2)
        q.shutdown()
        assert q.get(timeout=5) == "last"
        with pytest.raises(pigeon.ShutDown):
            q.get(timeout=1)
