"""The local queue's table of dedup ids (backends/local/dedup.py): shared by processes,
safe from several threads of one handle, short transactions that never wait for room
while they hold the table's lock, and an asyncio face that never waits for that lock."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle
import threading
import time
from typing import Any

import pytest

import pigeon
from pigeon.backends.local import LocalQueue


def _put_once(q: LocalQueue[Any], n: int) -> None:
    for i in range(n):
        q.put(f"item {i}", dedup_id=f"id-{i}")


def test_dedup_ids_are_shared_by_processes_and_go_with_the_queue() -> None:
    import os

    q: LocalQueue[Any] = pigeon.Queue(dedup_window=60)  # type: ignore[assignment]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_put_once, args=(q, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert q.qsize() == 50  # three producers, one copy of each id
    q.put_many(["a", "b", "c"], dedup_ids=["id-1", "new", "new"])
    assert q.qsize() == 51
    table = q._path + ".dedup"
    assert os.path.exists(table)
    q.close()
    assert not os.path.exists(table)


def test_a_dedup_window_of_zero_remembers_nothing() -> None:
    with pigeon.Queue(dedup_window=0) as q:
        q.put("x", dedup_id="k")
        q.put("x", dedup_id="k")
        assert q.qsize() == 2
    with pytest.raises(ValueError, match="dedup_window"):
        pigeon.Queue(dedup_window=-1)


def test_dedup_puts_from_threads_of_one_handle_store_each_item_once() -> None:
    """Round 4, clients #5: threads putting with dedup ids on one handle shared one SQLite
    connection and interleaved their transactions (raw sqlite3 errors, items stored twice,
    puts confirmed for items never stored)."""
    threads_, puts = 8, 100
    errors: list[BaseException] = []
    with pigeon.Queue() as q:

        def producer(t: int) -> None:
            try:
                for j in range(puts):
                    q.put(f"{t}-{j}", dedup_id=f"{t}-{j}")
                    q.put(f"{t}-{j}", dedup_id=f"{t}-{j}")  # a repeat: confirmed, not stored
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads_)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors[:3]
        items = q.get_many(10 * threads_ * puts, timeout=5)
        assert sorted(items) == sorted(f"{t}-{j}" for t in range(threads_) for j in range(puts))


def _ticking(gaps: list[float]) -> Any:
    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    return ticker()


def test_an_async_dedup_put_waits_for_room_without_blocking_the_loop() -> None:
    """Round 4, clients #17: another handle's blocking dedup put into a full queue held
    the table's write lock while it waited for room, and the asyncio face ran BEGIN
    IMMEDIATE on the loop's thread: the loop froze and the put's timeout was ignored."""
    with pigeon.Queue(maxsize=1) as q1:
        q1.put("filler")
        q2: LocalQueue[Any] = pickle.loads(pickle.dumps(q1))
        other = threading.Thread(target=q1.put, args=("theirs",), kwargs={"dedup_id": "a"})
        other.start()
        time.sleep(0.3)  # it waits for room (in the old code: holding the table's lock)
        consumer = threading.Timer(2.5, q1.get)  # makes room later
        consumer.start()

        async def main() -> tuple[float, float]:
            gaps: list[float] = []
            tick = asyncio.create_task(_ticking(gaps))
            async with pigeon.AsyncQueue(q2) as aq:
                started = time.monotonic()
                with pytest.raises(pigeon.Full):
                    await aq.put("mine", dedup_id="b", timeout=0.5)
                took = time.monotonic() - started
            tick.cancel()
            return took, max(gaps, default=float("inf"))  # no tick at all: frozen

        took, worst = asyncio.run(main())
        assert took < 2, f"the put's timeout of 0.5 s was not honoured ({took:.1f} s)"
        assert worst < 0.4, f"the event loop stalled {worst:.2f} s"
        consumer.join(10)  # it took the filler: room, and the other put went in
        other.join(10)
        assert q1.get(timeout=5) == "theirs"
        q2.close()


def test_a_dedup_put_waits_for_the_table_only_as_long_as_its_timeout() -> None:
    """The table's lock held by someone else (here a raw connection): the sync put gives
    up at its deadline with Full; the async put sleeps and retries without blocking the
    loop, and gets in once the lock is let go."""
    import sqlite3

    with pigeon.Queue() as q:
        q.put("made", dedup_id="first")  # the table exists now
        path = q._path + ".dedup"  # type: ignore[attr-defined]
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            holder.execute("BEGIN IMMEDIATE")
            let_go = threading.Timer(2.0, holder.execute, ("COMMIT",))
            let_go.start()
            started = time.monotonic()
            with pytest.raises(pigeon.Full, match="table of dedup ids stayed locked"):
                q.put("x", dedup_id="k", timeout=0.3)
            assert time.monotonic() - started < 1.5
            let_go.join()

            async def main() -> float:
                gaps: list[float] = []
                tick = asyncio.create_task(_ticking(gaps))
                async with pigeon.AsyncQueue(q) as aq:
                    await aq.put("y", dedup_id="k", timeout=10)
                tick.cancel()
                return max(gaps, default=float("inf"))

            holder.execute("BEGIN IMMEDIATE")
            let_go = threading.Timer(0.6, holder.execute, ("COMMIT",))
            let_go.start()
            worst = asyncio.run(main())
            let_go.join()
            assert worst < 0.4, f"the event loop stalled {worst:.2f} s"
        finally:
            holder.close()
        assert q.get_many(10, timeout=1) == ["made", "y"]


def test_a_repeated_dedup_id_is_refused_after_shutdown_like_any_put() -> None:
    """Found by the model (test_local_model.py): a put whose every id was a repeat did
    not reach the ring, so it returned normally on a shut-down queue."""
    with pigeon.Queue() as q:
        q.put("x", dedup_id="k")
        q.shutdown()
        with pytest.raises(pigeon.ShutDown):
            q.put("x", dedup_id="k")
        with pytest.raises(pigeon.ShutDown):
            q.put_many(["x"], dedup_ids=["k"])
