"""The durable store: what survives a restart, a damaged file, a simulated power loss."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pigeon.protocol import Ack, Delete, Deliver, Error, Get, Join, Ok, Put, PutBatch, TaskDone
from pigeon.server.core import Broker
from pigeon.server.store import DB_NAME, Durable, LogStore, SQLiteStore, StoreCorrupted

STORES: dict[str, type[Durable]] = {"log": LogStore, "sqlite": SQLiteStore}


@pytest.fixture(params=list(STORES))
def kind(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs against both durable stores."""
    return str(request.param)


def open_broker(path: Path, fsync: str = "always", kind: str = "sqlite") -> tuple[Broker, Durable]:
    store = STORES[kind](path, fsync)  # type: ignore[arg-type]
    broker = Broker(store)
    committed = threading.Event()
    store.start(lambda batch: committed.set())
    return broker, store


def deliveries(outs: list[tuple[int, Any]]) -> list[Any]:
    return [d for _, m in outs if isinstance(m, Deliver) for d in m.messages]


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_unacked_come_back_and_acked_stay_gone_after_restart(
    tmp_path: Path, fsync: str, kind: str
) -> None:
    broker, store = open_broker(tmp_path, fsync, kind)
    broker.connection_made(1)
    broker.handle(1, PutBatch(1, "q", [b"acked", b"unacked", b"waiting"]))
    got = deliveries(broker.handle(1, Get(2, "q", 2, 0, manual_ack=True)))
    broker.handle(1, Ack(3, "q", [got[0].id]))
    store.close()

    broker2, store2 = open_broker(tmp_path, fsync, kind)
    again = deliveries(broker2.handle(1, Get(1, "q", 10, 0)))
    assert [d.payload for d in again] == [b"unacked", b"waiting"]
    store2.close()


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_acks_in_runs_and_gaps_remove_exactly_those_messages(
    tmp_path: Path, fsync: str, kind: str
) -> None:
    """Removals are written as ranges of consecutive ids: out of order, with gaps, in
    one commit, exactly the acked messages go."""
    broker, store = open_broker(tmp_path, fsync, kind)
    broker.connection_made(1)
    broker.handle(1, PutBatch(1, "q", [b"%d" % i for i in range(12)]))
    got = deliveries(broker.handle(1, Get(2, "q", 12, 0, manual_ack=True)))
    ids = {d.payload: d.id for d in got}
    acked = [b"9", b"1", b"2", b"0", b"7", b"10", b"3"]  # runs 0-3 and 9-10, a lone 7
    broker.handle(1, Ack(3, "q", [ids[p] for p in acked]))
    store.close()

    broker2, store2 = open_broker(tmp_path, fsync, kind)
    left = deliveries(broker2.handle(1, Get(1, "q", 20, 0)))
    assert [d.payload for d in left] == [b"4", b"5", b"6", b"8", b"11"]
    store2.close()


def test_message_ids_continue_after_restart(tmp_path: Path, kind: str) -> None:
    broker, store = open_broker(tmp_path, kind=kind)
    broker.handle(1, Put(1, "q", b"a"))
    store.close()
    broker2, store2 = open_broker(tmp_path, kind=kind)
    broker2.handle(1, Put(1, "q", b"b"))
    store2.close()
    broker3, store3 = open_broker(tmp_path, kind=kind)
    assert [d.payload for d in deliveries(broker3.handle(1, Get(1, "q", 10, 0)))] == [b"a", b"b"]
    store3.close()


def test_truncated_database_is_reported_with_its_file(tmp_path: Path) -> None:
    broker, store = open_broker(tmp_path)
    broker.handle(1, PutBatch(1, "q", [b"x" * 5000] * 50))
    store.close()
    db = tmp_path / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreCorrupted, match=str(db)):
        SQLiteStore(tmp_path)


def test_garbage_file_is_reported_with_its_file(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupted, match="cannot be read as a pigeon store"):
        SQLiteStore(tmp_path)


def test_bit_flipped_payload_is_quarantined_not_delivered(tmp_path: Path) -> None:
    broker, store = open_broker(tmp_path)
    broker.handle(1, PutBatch(1, "q", [b"good", b"will rot", b"fine"]))
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:  # flip bits
        db.execute("UPDATE messages SET payload = ? WHERE payload = ?", (b"will r0t", b"will rot"))
    broker2, store2 = open_broker(tmp_path)
    assert store2.quarantined == 1
    got = deliveries(broker2.handle(1, Get(1, "q", 10, 0)))
    assert [d.payload for d in got] == [b"good", b"fine"]
    store2.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        assert db.execute("SELECT reason FROM quarantine").fetchall() == [("checksum mismatch",)]


def test_power_loss_under_fsync_always_loses_no_confirmed_put(tmp_path: Path, kind: str) -> None:
    """Simulated power loss: after each commit (the moment confirmations go out), take the
    files as they are on disk; a power cut keeps exactly that. Later, unsynced writes are
    dropped (they are simply not in the copy) and the last write is torn (garbage is
    appended to the WAL, as a half-written frame). Every put confirmed by then must be
    recovered."""
    live = tmp_path / "live"
    store = STORES[kind](live, "always")
    broker = Broker(store)
    snapshots: list[tuple[Path, set[bytes]]] = []
    confirmed: set[bytes] = set()
    pending: dict[int, set[bytes]] = {}
    lock = threading.Lock()

    def on_commit(batch: int) -> None:
        with lock:
            for b in [b for b in pending if b <= batch]:
                confirmed.update(pending.pop(b))
            if len(snapshots) < 12:
                snap = tmp_path / f"snap{len(snapshots)}"
                shutil.copytree(live, snap)
                snapshots.append((snap, set(confirmed)))

    store.start(on_commit)
    for i in range(300):
        payload = f"msg-{i}".encode()
        with lock:
            broker.handle(1, Put(i + 1, "q", payload))
            pending.setdefault(store.last_tag, set()).add(payload)
        if i % 25 == 24:  # let a commit happen now and then, as under real traffic
            deadline = time.monotonic() + 10
            while store.committed < store.last_tag and time.monotonic() < deadline:
                time.sleep(0.001)
    store.close()
    assert len(snapshots) >= 3
    for snap, expected in snapshots:
        tail = snap / f"{DB_NAME}-wal" if kind == "sqlite" else max((snap / "log").glob("*.seg"))
        if tail.exists():
            with open(tail, "ab") as f:
                f.write(os.urandom(1500))  # a torn, half-written last frame
        recovered = STORES[kind](snap, "always")
        payloads = {m.payload for _, m in recovered.recover()}
        recovered.close()
        assert expected <= payloads, f"{snap.name}: lost {sorted(expected - payloads)[:5]}"


def test_attached_store_commits_in_the_loop_once_per_turn(tmp_path: Path, kind: str) -> None:
    """Attached to an event loop the store commits in the loop's thread, one transaction
    per turn of the loop, and confirms there: no thread hop per commit."""
    import asyncio

    async def main() -> tuple[list[tuple[int, int]], int]:
        store = STORES[kind](tmp_path, "batch")
        store.attach(asyncio.get_running_loop())  # type: ignore[attr-defined]
        commits: list[tuple[int, int]] = []
        store.start(lambda batch: commits.append((batch, threading.get_ident())))
        broker = Broker(store)
        for i in range(5):  # one turn of the loop: five puts
            broker.handle(1, Put(i + 1, "q", f"m{i}".encode()))
        assert commits == []  # not yet: at the end of this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        batches = store.batch
        store.close()
        return commits, batches

    commits, batches = asyncio.run(main())
    assert batches == 1 and [b for b, _ in commits] == [1]
    assert commits[0][1] == threading.get_ident()  # in the loop's thread
    again = STORES[kind](tmp_path)
    assert [m.payload for _, m in again.recover()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    again.close()


def test_attached_store_retries_a_locked_database_without_blocking_the_loop(tmp_path: Path) -> None:
    import asyncio

    async def main() -> tuple[int, float, list[int]]:
        store = SQLiteStore(tmp_path, "batch")
        store.attach(asyncio.get_running_loop())
        commits: list[int] = []
        store.start(commits.append)
        broker = Broker(store)
        other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        broker.handle(1, Put(1, "q", b"waits"))
        ticks = 0
        t = time.monotonic()
        while time.monotonic() - t < 0.5:  # the loop keeps turning meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        stalled = store.stalled_for
        other.execute("ROLLBACK")
        other.close()
        deadline = time.monotonic() + 5
        while not commits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        store.close()
        return ticks, stalled, commits

    ticks, stalled, commits = asyncio.run(main())
    assert ticks > 20 and stalled > 0.3 and commits == [1]


def test_flush_writes_at_once_so_replies_go_out_in_this_turn(tmp_path: Path, kind: str) -> None:
    """The server calls ``flush`` when it has handled a read: the changes are written (and,
    for ``batch``, confirmed) before the loop turns, not in its next turn."""
    import asyncio

    async def main() -> tuple[list[int], list[int]]:
        store = STORES[kind](tmp_path, "batch")
        store.attach(asyncio.get_running_loop())  # type: ignore[attr-defined]
        commits: list[int] = []
        store.start(commits.append)
        broker = Broker(store)
        broker.handle(1, Put(1, "q", b"m"))
        store.flush()
        at_once = list(commits)
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the end-of-turn flush, had there been no flush(), is a no-op
        store.close()
        return at_once, commits

    at_once, commits = asyncio.run(main())
    assert at_once == [1] and commits == [1]


def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path, kind: str) -> None:
    """Two brokers appending to one log (or serving one SQLite file with two states in
    memory) would corrupt it or hand messages out twice: the second is refused."""
    from pigeon.errors import StoreInUse

    first = STORES[kind](tmp_path)
    with pytest.raises(StoreInUse, match=f"pid {os.getpid()}"):
        STORES[kind](tmp_path)
    with pytest.raises(StoreInUse):
        STORES["log" if kind == "sqlite" else "sqlite"](tmp_path)
    first.close()
    STORES[kind](tmp_path).close()  # free again


def test_a_delivery_in_flight_at_a_crash_is_counted_after_it(tmp_path: Path, kind: str) -> None:
    # Each delivery increments delivery_count, also one in flight when the broker dies:
    # else a message in flight at every crash would never reach max_deliveries.
    from pigeon.protocol import Declare

    broker, store = open_broker(tmp_path, "batch", kind)
    broker.connection_made(1)
    broker.handle(1, Declare(1, "q", max_deliveries=3))
    broker.handle(1, PutBatch(2, "q", [b"poison", b"fine"]))
    changes = store.changes
    (first,) = deliveries(broker.handle(1, Get(3, "q", 1, 0, manual_ack=True)))
    assert store.changes == changes  # counting it holds no reply (the DELIVER goes at once)
    counts = [first.delivery_count]
    for _ in range(3):  # the broker dies (its store written) with "poison" in flight
        store.close()
        broker, store = open_broker(tmp_path, "batch", kind)
        broker.connection_made(1)
        got = deliveries(broker.handle(1, Get(4, "q", 1, 0, manual_ack=True)))
        counts += [d.delivery_count for d in got if d.payload == b"poison"]
    assert counts == [1, 2, 3]  # then, after its third delivery, it went to the dead letters
    dead = [m for m in broker.queues["q.dead"].ready]
    assert [(m.payload, m.reason, m.origin) for m in dead] == [(b"poison", "max_deliveries", "q")]
    assert [d.payload for d in deliveries(broker.handle(1, Get(5, "q", 5, 0)))] == []
    store.close()


def test_a_get_costs_no_write_of_its_own(tmp_path: Path, kind: str) -> None:
    # The record of a GET's deliveries goes with the next change's write, or within
    # fsync_interval when none comes: a consumer's GET is no extra transaction (SQLite)
    # or write and fsync (the log), and its DELIVER waits for nothing.
    import asyncio

    async def main() -> None:
        store = STORES[kind](tmp_path, "batch")
        store.attach(asyncio.get_running_loop())  # type: ignore[attr-defined]
        store.start(lambda batch: None)
        broker = Broker(store)
        broker.connection_made(1)
        try:
            broker.handle(1, PutBatch(1, "q", [b"a", b"b"]))
            store.flush()
            written = store.batch
            store.flush_follows()  # the server reads a GET
            (d,) = deliveries(broker.handle(1, Get(2, "q", 1, 0, manual_ack=True)))
            store.flush()
            assert store.batch == written and store.unwritten() is None
            broker.handle(1, Ack(3, "q", [d.id]))  # a change: the deliveries go with it
            store.flush()
            assert store.batch == written + 1 and not store._ops
            deliveries(broker.handle(1, Get(4, "q", 1, 0, manual_ack=True)))
            store.flush()
            assert store.batch == written + 1
            await asyncio.sleep(store.fsync_interval * 5)  # no change came: written anyway
            assert store.batch == written + 2 and not store._ops
        finally:
            store.close()

    asyncio.run(main())
    broker, store = open_broker(tmp_path, "batch", kind)
    broker.connection_made(1)
    assert [d.delivery_count for d in deliveries(broker.handle(1, Get(5, "q", 1, 0)))] == [2]
    store.close()


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_tasks_taken_and_not_yet_done_survive_a_restart(
    tmp_path: Path, fsync: str, kind: str
) -> None:
    # A queue's unfinished count (task_done/join) is what it holds plus the tasks taken
    # (acked, or auto-acked by a GET) and not yet marked done; a restart kept only the
    # first (round 6, FINDINGS-nemesis.md #2): join() returned at once after it, and the
    # next task_done() raised ValueError.
    broker, store = open_broker(tmp_path, fsync, kind)
    broker.connection_made(1)
    broker.handle(1, PutBatch(1, "q", [b"a", b"b", b"c", b"d"]))
    deliveries(broker.handle(1, Get(2, "q", 2, 0)))  # auto-acked: gone from the store
    (held,) = deliveries(broker.handle(1, Get(3, "q", 1, 0, manual_ack=True)))
    broker.handle(1, Ack(4, "q", [held.id]))
    changes = store.changes
    assert broker.handle(1, TaskDone(5, "q", 1)) == [(1, Ok(5, 3))]
    assert store.changes > changes  # a change: the server holds its reply for the commit
    broker.handle(1, PutBatch(6, "early", [b"x", b"y"]))
    broker.handle(1, TaskDone(7, "early", 1))  # marked done before it was taken
    broker.handle(1, PutBatch(8, "gone", [b"z"]))
    deliveries(broker.handle(1, Get(9, "gone", 1, 0)))
    broker.handle(1, Delete(10, "gone"))  # its count goes with it
    store.close()

    broker, store = open_broker(tmp_path, fsync, kind)
    broker.connection_made(1)
    assert [broker.queues[n].unfinished for n in ("q", "early")] == [3, 1]
    assert "gone" not in broker.queues
    ((_, join),) = broker.handle(1, Join(1, "q", 0))
    assert isinstance(join, Error) and join.code == "timeout"
    assert broker.handle(1, TaskDone(2, "q", 2)) == [(1, Ok(2, 1))]  # 1: "d", still held
    store.close()

    broker, store = open_broker(tmp_path, fsync, kind)
    assert broker.queues["q"].unfinished == 1
    assert store.recover_taken() == {"early": -1}  # "q": taken 0, kept as no entry
    store.close()


def test_a_sqlite_store_written_before_the_tasks_table_counts_none_taken(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.executescript(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, payload BLOB "
            "NOT NULL, crc INTEGER NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0);"
            "CREATE TABLE queues (name TEXT PRIMARY KEY, settings TEXT NOT NULL);"
        )
        db.execute("INSERT INTO messages VALUES (1, 'q', x'6f6c64', ?, 0)", (zlib_crc(b"old"),))
    broker, store = open_broker(tmp_path, "batch", "sqlite")
    assert store.recover_taken() == {} and broker.queues["q"].unfinished == 1
    broker.connection_made(1)
    deliveries(broker.handle(1, Get(1, "q", 1, 0)))
    store.close()
    broker, store = open_broker(tmp_path, "batch", "sqlite")
    assert broker.queues["q"].unfinished == 1 and store.recover_taken() == {"q": 1}
    store.close()


def test_a_sqlite_store_written_before_shared_rows_is_read_and_written_on(tmp_path: Path) -> None:
    # Rows of an earlier pigeon keep their own origin, reason and options; new rows name
    # a row of ``shared``; both are read back, and moving an old row re-points it.
    import msgspec

    from pigeon.protocol import Nack
    from pigeon.server.core import Extra

    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.executescript(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, payload BLOB "
            "NOT NULL, crc INTEGER NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, origin TEXT "
            "NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', extra BLOB);"
        )
        extra = msgspec.msgpack.encode(Extra(4, 0.0, 0.0, {"h": "old"}))
        db.execute("INSERT INTO messages VALUES (1, 'q', x'6f6c64', ?, 1, '', '', ?)",
                   (zlib_crc(b"old"), extra))  # fmt: skip
    broker, store = open_broker(tmp_path, "batch", "sqlite")
    broker.connection_made(1)
    (d,) = deliveries(broker.handle(1, Get(1, "q", 1, 0, manual_ack=True)))
    assert (d.payload, d.delivery_count, d.headers) == (b"old", 2, {"h": "old"})
    broker.handle(1, Nack(2, "q", [d.id], False, 0.0, "by hand"))
    store.close()
    broker, store = open_broker(tmp_path, "batch", "sqlite")
    (m,) = broker.queues["q.dead"].ready
    assert (m.payload, m.origin, m.reason, m.priority) == (b"old", "q", "by hand", 4)
    assert m.extra is not None and m.extra.headers == {"h": "old"}
    store.close()


def zlib_crc(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)
