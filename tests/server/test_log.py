"""The log store: torn tails, damaged records, a failing disk, reclaimed space, and the
same state as the SQLite store after any sequence of requests and restarts."""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pigeon.server.store as stores
from pigeon.protocol import (
    Ack,
    Declare,
    Delete,
    Deliver,
    Get,
    Move,
    Nack,
    Purge,
    Put,
    PutBatch,
    TaskDone,
)
from pigeon.protocol.messages import Confirmed
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from pigeon.server.store import (
    DB_NAME,
    LOG_DIR,
    LogStore,
    SQLiteStore,
    StoreCorrupted,
    backup_log,
    open_store,
    records,
)
from pigeon.server.store import backup as backups
from pigeon.server.store import log as logstore
from pigeon.server.store.durable import FsyncFailed


def opened(path: Path, fsync: str = "batch", **kw: Any) -> tuple[Broker, LogStore]:
    store = LogStore(path, fsync, **kw)  # type: ignore[arg-type]
    store.start(lambda batch: None)
    broker = Broker(store)
    broker.connection_made(1)
    return broker, store


def payloads(broker: Broker, queue: str = "q") -> list[bytes]:
    outs = broker.handle(1, Get(99, queue, 10_000, 0))
    return [d.payload for _, m in outs if isinstance(m, Deliver) for d in m.messages]


def confirmed_put(store: Any, payload: bytes) -> tuple[Broker, list[int]]:
    """``store`` started, a broker on it, and a put of ``payload`` to "q" the store's own
    thread has confirmed; the list its confirmations go to."""
    commits: list[int] = []
    store.start(commits.append)
    broker = Broker(store)
    broker.connection_made(1)
    broker.handle(1, Put(1, "q", payload))
    wait_commits(commits)
    assert commits == [1]
    return broker, commits


def wait_commits(commits: list[int], timeout: float = 5.0) -> None:
    """Until the store's own thread has confirmed something (or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not commits and time.monotonic() < deadline:
        time.sleep(0.01)


def segments(path: Path) -> list[Path]:
    return sorted((path / LOG_DIR).glob("*.seg"))


def test_a_torn_tail_is_cut_off_and_the_log_goes_on(tmp_path: Path, caplog: Any) -> None:
    broker, store = opened(tmp_path)
    for i in range(3):  # three records
        broker.handle(1, Put(i + 1, "q", b"message %d" % i))
    store.close()
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 4)  # the last write, cut short by a crash
    broker, store = opened(tmp_path)
    assert "cut off" in caplog.text
    broker.handle(1, Put(9, "q", b"after"))
    store.close()
    broker, store = opened(tmp_path)
    assert store.quarantined == 0
    assert payloads(broker) == [b"message 0", b"message 1", b"after"]
    store.close()


def test_messages_given_out_of_order_keep_their_ids(tmp_path: Path) -> None:
    """The short form of a batch (first id and payloads) is used only for consecutive
    ids in order; any other batch keeps each message's own id."""
    from pigeon.server.core import Stored

    store = LogStore(tmp_path)
    store.start(lambda batch: None)
    store.added_many("q", [Stored(i, b"m%d" % i) for i in (1, 3, 2, 4)])
    store.close()
    again = LogStore(tmp_path)
    assert [(m.id, m.payload) for _, m in again.recover()] == [
        (1, b"m1"), (2, b"m2"), (3, b"m3"), (4, b"m4")
    ]  # fmt: skip
    again.close()


def test_a_segment_that_is_no_log_is_reported_with_its_file(tmp_path: Path) -> None:
    (tmp_path / LOG_DIR).mkdir()
    bad = tmp_path / LOG_DIR / "0000000000000001.seg"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupted, match=str(bad)):
        LogStore(tmp_path)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_record_is_quarantined_once_and_the_rest_delivered(
    tmp_path: Path, where: str
) -> None:
    broker, store = opened(tmp_path)
    broker.handle(1, Put(1, "q", b"good"))
    broker.handle(1, Put(2, "q", b"will rot"))
    broker.handle(1, Put(3, "q", b"fine"))
    store.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    at = data.index(b"will rot")
    if where == "payload":
        data[at + 5] ^= 0x40  # one bit
    else:  # the record's length field: recovery must find the next record by itself
        start = data.rindex(records.MAGIC, 0, at)
        data[start + 4 : start + 8] = b"\xff\xff\xff\x7f"
    seg.write_bytes(bytes(data))

    broker, store = opened(tmp_path)
    assert store.quarantined == 1
    assert payloads(broker) == [b"good", b"fine"]
    store.close()
    kept = list((tmp_path / LOG_DIR / "quarantine").iterdir())
    assert len(kept) == 1 and b"will " in kept[0].read_bytes()
    broker, store = opened(tmp_path)  # reported once: the damage was padded over
    assert store.quarantined == 0
    store.close()


def test_a_record_hidden_in_a_payload_is_never_taken_for_one(tmp_path: Path) -> None:
    """A client can put bytes that form a valid record; after damage, when recovery looks
    for the next record, it must not find that one: records' CRCs are seeded with a salt
    of their segment that no client knows."""

    import msgspec

    body = msgspec.msgpack.encode([[records.ADDS, "q", 999, [b"forged"]]])
    forged = records.record_header(body, 0) + body  # as the log would, had it no salt
    broker, store = opened(tmp_path)
    broker.handle(1, Put(1, "q", b"first"))
    broker.handle(1, Put(2, "q", b"carrier:" + forged))
    broker.handle(1, Put(3, "q", b"last"))
    store.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    start = data.rindex(records.MAGIC, 0, data.index(b"carrier:"))
    data[start + 4 : start + 8] = b"\xff\xff\xff\x7f"  # the carrier's length, damaged
    seg.write_bytes(bytes(data))
    broker, store = opened(tmp_path)
    assert store.quarantined == 1
    assert payloads(broker) == [b"first", b"last"]
    store.close()


def test_recovery_after_damage_reads_each_byte_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload packed with things that look like record headers, each claiming a long
    body, inside a damaged record: looking for the next record must not checksum each
    claimed body (quadratic: minutes for one damaged segment), only headers."""
    fake = records.MAGIC + (200_000).to_bytes(4, "little") + bytes(8)
    broker, store = opened(tmp_path)
    broker.handle(1, Put(1, "q", b"first"))
    broker.handle(1, Put(2, "q", b"carrier:" + fake * 20_000))  # 320 kB of fake headers
    broker.handle(1, Put(3, "q", b"last"))
    store.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    start = data.rindex(records.MAGIC, 0, data.index(b"carrier:"))
    data[start + 4 : start + 8] = b"\xff\xff\xff\x7f"
    seg.write_bytes(bytes(data))

    real = records.zlib.crc32
    checked = [0]

    def counting(data: Any, value: int = 0) -> int:
        checked[0] += len(data)
        return real(data, value)

    monkeypatch.setattr(records.zlib, "crc32", counting)
    broker, store = opened(tmp_path)
    assert payloads(broker) == [b"first", b"last"]
    store.close()
    assert checked[0] < 3 * len(data)  # each byte about once, not once per fake header


@pytest.mark.parametrize("kind", ["log", "sqlite"])
def test_a_failed_fsync_is_never_confirmed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """After a failed fsync the kernel may have dropped the written pages: what waited
    for it is never confirmed, even if a later fsync succeeds, and the store stops taking
    writes (the log with --fsync always; SQLite's own commits fsync there, so its syncer
    is tried with batch)."""
    store: Any = LogStore(tmp_path, "always") if kind == "log" else SQLiteStore(tmp_path, "batch")
    broker, commits = confirmed_put(store, b"synced")
    calls = [0]

    def eio(fd: int) -> None:
        calls[0] += 1
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    monkeypatch.setattr(os, "fsync", eio)
    broker.handle(1, Put(2, "q", b"lost?"))
    deadline = time.monotonic() + 2
    while not calls[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    monkeypatch.undo()  # the disk "works" again: the old code's retry then confirmed
    broker.handle(1, Put(3, "q", b"after"))
    time.sleep(0.3)
    assert calls[0] >= 1 and store.stalled_for == float("inf")
    assert 3 not in commits and (kind == "sqlite" or commits == [1])
    store.close()


def test_a_failing_disk_is_retried_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after half a record: the loop keeps turning, the store reports how long it
    has failed, the retry writes over the half record, and nothing is lost or doubled."""
    real = os.pwritev
    failing = threading.Event()
    failing.set()

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        if failing.is_set():
            data = b"".join(buffers)
            os.pwrite(fd, data[: len(data) // 2], offset)  # half of it lands
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    async def main() -> tuple[int, float, list[int]]:
        store = LogStore(tmp_path, "batch")
        store.attach(asyncio.get_running_loop())
        commits: list[int] = []
        store.start(commits.append)
        broker = Broker(store)
        broker.handle(1, Put(1, "q", b"before"))
        await asyncio.sleep(0.01)
        monkeypatch.setattr(logstore.os, "pwritev", pwritev)
        broker.handle(1, PutBatch(2, "q", [b"waits-%d" % i for i in range(50)]))
        ticks = 0
        t = time.monotonic()
        while time.monotonic() - t < 0.5:
            await asyncio.sleep(0.01)
            ticks += 1
        stalled = store.stalled_for
        failing.clear()
        deadline = time.monotonic() + 5
        while len(commits) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        store.close()
        return ticks, stalled, commits

    ticks, stalled, commits = asyncio.run(main())
    assert ticks > 20 and stalled > 0.3 and commits == [1, 2]
    broker, store = opened(tmp_path)
    assert store.quarantined == 0
    assert payloads(broker) == [b"before"] + [b"waits-%d" % i for i in range(50)]
    store.close()


def test_space_of_acked_messages_is_reclaimed_and_old_ones_kept(tmp_path: Path) -> None:
    """Small segments, a steady flow of acked messages, and one old message that stays:
    the log stays bounded, the old message is written forward with its delivery count,
    and a restart finds exactly what is live."""
    broker, store = opened(tmp_path, segment_bytes=4096)
    broker.handle(1, Put(1, "q", b"old"))
    first = broker.handle(1, Get(2, "q", 1, 0, manual_ack=True))
    old_id = next(d.id for _, m in first if isinstance(m, Deliver) for d in m.messages)
    broker.handle(1, Nack(3, "q", [old_id]))  # delivered once, back in the queue
    biggest = 0
    for r in range(300):
        broker.handle(1, PutBatch(10 + r, "busy", [b"x" * 200] * 20))
        outs = broker.handle(1, Get(10 + r, "busy", 20, 0, manual_ack=True))
        ids = [d.id for _, m in outs if isinstance(m, Deliver) for d in m.messages]
        broker.handle(1, Ack(10 + r, "busy", ids))
        biggest = max(biggest, store.disk_bytes)
    assert store.compactions >= 1
    assert biggest < 10 * 4096  # 1.2 MB of messages went through
    assert len(segments(tmp_path)) <= 4
    store.close()
    broker, store = opened(tmp_path, segment_bytes=4096)
    outs = broker.handle(1, Get(1, "q", 10, 0))
    got = [d for _, m in outs if isinstance(m, Deliver) for d in m.messages]
    assert [(d.payload, d.delivery_count) for d in got] == [(b"old", 2)]
    assert payloads(broker, "busy") == []
    store.close()


def test_writing_forward_a_few_a_turn_survives_a_crash_at_any_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty live messages in the oldest segment, written forward three a turn while
    acked traffic flows: a copy of the files taken at each turn of it (a crash there)
    recovers every live message once, in order."""
    import shutil

    monkeypatch.setattr(logstore, "_FORWARD_CHUNK", 3)
    broker, store = opened(tmp_path / "live", segment_bytes=4096)
    broker.handle(1, PutBatch(1, "keep", [b"keep-%02d" % i + b"k" * 100 for i in range(40)]))
    snapshots: list[tuple[Path, list[bytes]]] = []
    for r in range(400):
        broker.handle(1, PutBatch(10 + r, "busy", [b"x" * 200] * 10))
        outs = broker.handle(1, Get(10 + r, "busy", 10, 0, manual_ack=True))
        ids = [d.id for _, m in outs if isinstance(m, Deliver) for d in m.messages]
        broker.handle(1, Ack(10 + r, "busy", ids))
        if store._forwarding and len(snapshots) < 20:  # part-way through
            snap = tmp_path / f"snap{len(snapshots)}"
            shutil.copytree(tmp_path / "live", snap)
            snapshots.append((snap, [m.payload for _, m in store.recover()]))
    assert store.compactions >= 1 and len(snapshots) >= 3
    store.close()
    for snap, expected in snapshots:
        recovered = LogStore(snap)
        assert [m.payload for _, m in recovered.recover()] == expected
        recovered.close()
    broker, store = opened(tmp_path / "live", segment_bytes=4096)
    assert payloads(broker, "keep") == [b"keep-%02d" % i + b"k" * 100 for i in range(40)]
    store.close()


def test_a_backup_is_a_sqlite_store_a_broker_starts_on(tmp_path: Path) -> None:
    broker, store = opened(tmp_path / "data", segment_bytes=4096)
    broker.handle(1, Declare(1, "q", maxsize=500))
    broker.handle(1, PutBatch(2, "q", [b"%d" % i for i in range(300)]))
    outs = broker.handle(1, Get(3, "q", 100, 0, manual_ack=True))
    ids = [d.id for _, m in outs if isinstance(m, Deliver) for d in m.messages]
    broker.handle(1, Ack(4, "q", ids))
    broker.handle(1, Put(5, "q", b"last"))
    seg = segments(tmp_path / "data")[-1]
    with open(seg, "ab") as f:  # a write in progress as the copy is made
        f.write(records.MAGIC + b"\x10\x00")
    begun = tmp_path / "data" / LOG_DIR / "9999999999999999.seg"
    begun.write_bytes(b"")  # a segment the broker is creating at this very moment
    n = backup_log(tmp_path / "data", tmp_path / "copy.sqlite3")
    begun.unlink()
    store.close()
    assert n == 201
    (tmp_path / "restored").mkdir()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "restored" / DB_NAME)
    restored = open_store(tmp_path / "restored")  # auto: a SQLite-only directory
    assert isinstance(restored, SQLiteStore)
    assert restored.recover_queues()["q"]["maxsize"] == 500
    assert [m.payload for _, m in restored.recover()][-2:] == [b"299", b"last"]
    restored.close()


def test_store_log_imports_a_sqlite_store_once(tmp_path: Path) -> None:
    old = SQLiteStore(tmp_path, "batch")
    old.start(lambda batch: None)
    broker = Broker(old)
    broker.connection_made(1)
    broker.handle(1, Declare(1, "q", lease=7.0))
    broker.handle(1, PutBatch(2, "q", [b"a", b"b", b"c"]))
    old.close()
    LogStore(tmp_path).close()  # an (empty) log beside the SQLite file
    with pytest.raises(StoreCorrupted, match="messages behind"):
        open_store(tmp_path, "sqlite")
    for p in (tmp_path / LOG_DIR).glob("*.seg"):
        p.unlink()
    store = open_store(tmp_path, "log")
    assert isinstance(store, LogStore)
    assert not (tmp_path / DB_NAME).exists() and (tmp_path / f"{DB_NAME}.imported").exists()
    broker = Broker(store)
    store.start(lambda batch: None)
    assert broker.queues["q"].lease == 7.0
    assert payloads(broker) == [b"a", b"b", b"c"]
    store.close()
    again = open_store(tmp_path)  # auto: the log now
    assert isinstance(again, LogStore) and [m.payload for _, m in again.recover()] == []
    again.close()


def _sqlite_with(path: Path, n: int) -> None:
    old = SQLiteStore(path, "batch")
    old.start(lambda batch: None)
    broker = Broker(old)
    broker.connection_made(1)
    broker.handle(1, Declare(1, "q", lease=7.0))
    broker.handle(1, PutBatch(2, "q", [str(i).encode() for i in range(n)]))
    old.close()


def _all_payloads(store: Any) -> list[bytes]:
    return [m.payload for _, m in store.recover()]


def test_an_import_that_fails_midway_leaves_the_sqlite_store_in_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sqlite_with(tmp_path, 250)
    monkeypatch.setattr(stores, "_IMPORT_CHUNK", 100)
    real = LogStore._write
    writes = [0]

    def full_disk(self: LogStore, ops: Any) -> None:
        writes[0] += 1
        if writes[0] == 3:  # the second chunk of messages
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, ops)

    monkeypatch.setattr(LogStore, "_write", full_disk)
    with pytest.raises(StoreCorrupted, match="could not write the imported messages"):
        open_store(tmp_path, "log")
    monkeypatch.setattr(LogStore, "_write", real)
    assert (tmp_path / LOG_DIR / stores.IMPORTING).exists() and (tmp_path / DB_NAME).exists()
    again = open_store(tmp_path)  # auto: the half log goes; the SQLite store, whole
    assert isinstance(again, SQLiteStore) and len(_all_payloads(again)) == 250
    again.close()
    store = open_store(tmp_path, "log")  # the import, again, whole
    assert isinstance(store, LogStore) and len(_all_payloads(store)) == 250
    store.close()


def test_an_import_killed_while_writing_is_done_again(tmp_path: Path) -> None:
    _sqlite_with(tmp_path, 30)
    (tmp_path / LOG_DIR).mkdir()
    (tmp_path / LOG_DIR / stores.IMPORTING).write_text(DB_NAME)  # what a killed import
    half = LogStore(tmp_path)  # leaves behind: the mark, and a log with part of it
    half.declared("q", {"lease": 7.0})
    half.close()
    store = open_store(tmp_path)  # auto, as an operator restarts it: the SQLite store, whole
    assert isinstance(store, SQLiteStore) and len(_all_payloads(store)) == 30
    assert not (tmp_path / LOG_DIR / stores.IMPORTING).exists() and not segments(tmp_path)
    store.close()
    store = open_store(tmp_path, "log")
    assert isinstance(store, LogStore) and len(_all_payloads(store)) == 30
    store.close()


def test_an_import_discarded_after_its_imported_mark_leaves_no_mark(tmp_path: Path) -> None:
    # Killed between writing log/IMPORTED and removing log/IMPORTING: the next start
    # discards the import, mark and all - a stale IMPORTED would later let a log found
    # beside the SQLite store pass for one made from it (and set the SQLite store aside).
    _sqlite_with(tmp_path, 30)
    (tmp_path / LOG_DIR).mkdir()
    (tmp_path / LOG_DIR / stores.IMPORTING).write_text(DB_NAME)
    LogStore(tmp_path).close()
    (tmp_path / LOG_DIR / stores.IMPORTED_MARK).write_text(DB_NAME)
    store = open_store(tmp_path, "sqlite")
    assert isinstance(store, SQLiteStore) and len(_all_payloads(store)) == 30
    store.close()
    assert not (tmp_path / LOG_DIR / stores.IMPORTED_MARK).exists()
    LogStore(tmp_path).close()  # a log that has nothing to do with it appears beside it
    with pytest.raises(StoreCorrupted, match="holds both a log store"):
        open_store(tmp_path)


def test_an_import_killed_before_the_sqlite_file_was_renamed_is_finished(tmp_path: Path) -> None:
    _sqlite_with(tmp_path, 30)
    open_store(tmp_path, "log").close()
    for suffix in ("", "-wal", "-shm"):  # as if killed between the two renames
        done = tmp_path / f"{DB_NAME}.imported{suffix}"
        if done.exists():
            done.rename(tmp_path / f"{DB_NAME}{suffix}")
    store = open_store(tmp_path)
    assert isinstance(store, LogStore) and len(_all_payloads(store)) == 30
    assert not (tmp_path / DB_NAME).exists() and (tmp_path / f"{DB_NAME}.imported").exists()
    store.close()


def test_a_log_beside_a_sqlite_store_it_was_not_made_from_is_refused(tmp_path: Path) -> None:
    LogStore(tmp_path).close()
    _sqlite_with(tmp_path, 3)
    for kind in ("auto", "log", "sqlite"):
        with pytest.raises(StoreCorrupted, match="holds both a log store"):
            open_store(tmp_path, kind)


def _records(path: Path) -> list[list[Any]]:
    import msgspec

    out = []
    for seg in segments(path):
        data = seg.read_bytes()
        salt = records.read_segment(seg, data)
        for off, end, valid in records.scan(data, records.FILE_HEADER_SIZE, salt):
            body = data[off + records.RECORD_HEADER.size : end]
            if valid and body[:1] != records.PAD:
                out.append(msgspec.msgpack.decode(body))
    return out


def test_tasks_taken_and_not_yet_done_are_written_forward_with_what_is_live(
    tmp_path: Path,
) -> None:
    # A queue's count of tasks taken and not yet done (a TASKS op) is live like its
    # settings: compaction writes it forward before it drops the segment holding it.
    broker, store = opened(tmp_path, segment_bytes=4096)
    broker.handle(1, PutBatch(1, "t", [b"1", b"2"]))
    assert payloads(broker, "t") == [b"1", b"2"]  # taken (auto-acked), neither done
    first = segments(tmp_path)[0]
    for i in range(60):  # acked traffic elsewhere: the log outgrows what is live
        broker.handle(1, Put(10 + i, "x", b"." * 500))
        payloads(broker, "x")
    assert first not in segments(tmp_path) and store.compactions
    assert store._tasks["t"][0] == 2
    assert (store._seg_live, store._live_bytes) == _recount(store)
    store.close()
    broker, store = opened(tmp_path, segment_bytes=4096)
    assert broker.queues["t"].unfinished == 2 and broker.queues["x"].unfinished == 60
    store.close()


def test_counts_of_tasks_in_one_change_are_one_op_and_a_delete_between_them_holds(
    tmp_path: Path,
) -> None:
    # Acks pipelined in one read make one record: one TASKS op of the queue, with its last
    # count. A DELETE of the queue in the same change comes after the count before it and
    # before any count after it (the queue made again), as it happened.
    broker, store = opened(tmp_path)
    broker.handle(1, PutBatch(1, "q", [b"a", b"b", b"c"]))
    outs = broker.handle(1, Get(2, "q", 3, 0, manual_ack=True))
    dids = [d.id for _, m in outs if isinstance(m, Deliver) for d in m.messages]
    with store.atomic():  # one read's requests: one change
        for i, did in enumerate(dids):
            broker.handle(1, Ack(3 + i, "q", [did]))
    (last,) = _records(tmp_path)[-1:]
    assert [op for op in last if op[0] == records.TASKS] == [[records.TASKS, "q", 3]]
    broker.handle(1, TaskDone(9, "q", 1))
    assert _records(tmp_path)[-1] == [[records.TASKS, "q", 2]]
    with store.atomic():
        broker.handle(1, TaskDone(10, "q", 1))  # 1 left ...
        broker.handle(1, Delete(11, "q"))  # ... and forgotten with the queue
        broker.handle(1, Put(12, "q", b"d"))
        assert payloads(broker) == [b"d"]  # taken: 1 unfinished in the new queue
    assert [op[0] for op in _records(tmp_path)[-1]].count(records.TASKS) == 2
    store.close()
    broker, store = opened(tmp_path)
    assert broker.queues["q"].unfinished == 1 and store.recover_taken() == {"q": 1}
    store.close()


def test_a_backup_and_an_import_keep_tasks_taken_and_not_yet_done(tmp_path: Path) -> None:
    broker, store = opened(tmp_path / "data")
    broker.handle(1, PutBatch(1, "q", [b"a", b"b"]))
    assert payloads(broker) == [b"a", b"b"]
    broker.handle(1, TaskDone(2, "q", 1))
    backup_log(tmp_path / "data", tmp_path / "copy.sqlite3")
    store.close()
    (tmp_path / "restored").mkdir()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "restored" / DB_NAME)
    restored = open_store(tmp_path / "restored")  # auto: a SQLite-only directory
    assert isinstance(restored, SQLiteStore) and restored.recover_taken() == {"q": 1}
    restored.close()
    imported = open_store(tmp_path / "restored", "log")  # imports the SQLite store
    assert isinstance(imported, LogStore) and imported.recover_taken() == {"q": 1}
    imported.close()


def test_a_change_larger_than_a_record_is_split_and_recovered_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logstore, "_MAX_RECORD", 2_000)  # 4 GiB, for a test
    broker, store = opened(tmp_path)
    for i in range(200):
        broker.handle(1, Put(i + 1, "q", b"%090d" % i))
    broker.handle(1, Move(500, "q", "r"))  # 200 messages change queue in one change
    store.close()
    parts = [r for r in _records(tmp_path) if r[0] == [records.PART]]
    assert len(parts) >= 5  # 200 x ~100 bytes in records of at most 2,000 bytes
    broker, store = opened(tmp_path)
    assert payloads(broker, "q") == [] and len(payloads(broker, "r")) == 200
    store.close()


def test_messages_that_share_their_options_are_still_split_into_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One MSGS op carries a batch's shared options once; it holds a bounded payload, so a
    # change still splits into records (an op is never split).
    from pigeon.protocol import PutOptions

    monkeypatch.setattr(logstore, "_MAX_RECORD", 2_000)
    monkeypatch.setattr(records, "MSGS_BYTES", 500)
    broker, store = opened(tmp_path)
    batch = [b"%090d" % i for i in range(200)]
    broker.handle(1, PutBatch(1, "q", batch, 0.0, PutOptions(headers={"h": "v"})))
    store.close()
    bodies = _records(tmp_path)
    assert len([r for r in bodies if r[0] == [records.PART]]) >= 5
    assert max(len(op[5]) for r in bodies for op in r if op[0] == records.MSGS) <= 7
    broker, store = opened(tmp_path)
    assert payloads(broker) == batch
    store.close()


def test_a_split_change_cut_short_by_a_crash_is_not_applied_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logstore, "_MAX_RECORD", 2_000)
    broker, store = opened(tmp_path)
    for i in range(200):
        broker.handle(1, Put(i + 1, "q", b"%090d" % i))
    store.close()
    (seg,) = segments(tmp_path)
    before = seg.stat().st_size
    broker, store = opened(tmp_path)
    broker.handle(1, Move(500, "q", "r"))
    store.close()
    with open(seg, "r+b") as f:  # the crash: the change's last record never made it
        f.truncate(seg.stat().st_size - 50)
    assert seg.stat().st_size > before + 2_000  # some of its first records did
    broker, store = opened(tmp_path)
    assert seg.stat().st_size == before  # its first records were cut off too
    assert len(payloads(broker, "q")) == 200 and payloads(broker, "r") == []
    broker.handle(1, Put(9, "z", b"after"))  # what follows never joins them
    store.close()
    broker, store = opened(tmp_path)
    assert payloads(broker, "r") == [] and payloads(broker, "z") == [b"after"]
    store.close()


def test_compaction_counts_what_a_forwarded_message_really_costs(tmp_path: Path) -> None:
    from pigeon.server.core import Stored

    store = LogStore(tmp_path, "never", segment_bytes=16 * 1024)
    long_name = "q" * 200
    for i in range(1, 301):  # live messages whose copies carry a long name and a reason
        with store.atomic():
            store.added(long_name, Stored(i, b"x" * 64, 1, 0.0, "origin-" * 20, "why " * 50))
    start = store.compactions
    for i in range(1000, 3000):  # put and ack on another queue, one request each
        with store.atomic():
            store.added("other", Stored(i, b"y" * 64))
        with store.atomic():
            store.removed("other", i)
    # The live set (~180 KiB written forward, 11 segments' worth) is copied once in a
    # while, not on every write: an estimate below its real cost made every write copy
    # all of it (thousands of segments forwarded here).
    assert store.compactions - start <= 50, store.compactions - start
    store.close()
    reopened = LogStore(tmp_path)
    assert len(_all_payloads(reopened)) == 300
    reopened.close()


def test_one_turn_of_housekeeping_does_a_bounded_amount_of_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.server.core import Stored

    store = LogStore(tmp_path, "batch", segment_bytes=64 * 1024)
    keep, purge = [], []
    for i in range(1, 40_001):  # 1 KiB each, 1 kept for 3 purged
        (keep if i % 4 == 0 else purge).append(i)
        with store.atomic():
            store.added("keep" if i % 4 == 0 else "big", Stored(i, b"p" * 1024))
    segments_before = len(store._sizes)
    work = {"forwarded": 0, "fdatasync": 0, "unlink": 0}
    real_forward, real_fdatasync, real_unlink = store._forward, os.fdatasync, Path.unlink

    def forward(seg: int, ids: list[int]) -> None:
        work["forwarded"] += min(len(ids), logstore._FORWARD_CHUNK)
        real_forward(seg, ids)

    def fdatasync(fd: int) -> None:
        work["fdatasync"] += 1
        real_fdatasync(fd)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        work["unlink"] += 1
        real_unlink(path, missing_ok)

    monkeypatch.setattr(store, "_forward", forward)
    monkeypatch.setattr(logstore.os, "fdatasync", fdatasync)
    monkeypatch.setattr(Path, "unlink", unlink)
    with store.atomic():  # `pigeon purge big`: one request, one turn of the loop
        store.removed_many("big", purge)
    turns = 1
    assert work["forwarded"] <= logstore._FORWARD_CHUNK and work["fdatasync"] <= 2
    assert work["unlink"] <= logstore._DROPS_PER_TURN
    while store._maintain():  # the following turns, each as bounded
        turns += 1
        work.update(forwarded=0, fdatasync=0, unlink=0)
        assert turns < 10_000
    assert work["forwarded"] <= logstore._FORWARD_CHUNK and work["fdatasync"] <= 2
    assert not store._over_threshold([]) and turns > 1  # at most twice what is live
    assert len(store._sizes) < segments_before * 0.6
    store.close()
    monkeypatch.undo()
    reopened = LogStore(tmp_path)
    assert sorted(m.id for _, m in reopened.recover()) == keep
    reopened.close()


def _flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_a_damaged_segment_salt_is_mended_or_refused_never_taken_for_a_torn_tail(
    tmp_path: Path,
) -> None:
    broker, store = opened(tmp_path)
    broker.handle(1, PutBatch(1, "q", [b"a", b"b", b"c"]))
    store.close()
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    _flip(seg, 16, 0x04)  # one bit of the salt (bytes 16-19 of the header)
    broker, store = opened(tmp_path)
    assert payloads(broker) == [b"a", b"b", b"c"]  # mended from its checksum
    store.close()
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    _flip(seg, 17, 0x81)
    _flip(seg, 18, 0x10)  # three bits: no mending
    with pytest.raises(StoreCorrupted, match="its header is damaged"):
        LogStore(tmp_path)
    assert seg.stat().st_size == size  # nothing cut off as a "torn tail"


def test_a_backup_misses_nothing_while_segments_are_written_forward_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.server.core import Stored

    store = LogStore(tmp_path / "data", "never", segment_bytes=4096)
    for i in range(1, 6):  # live, in the first segment
        with store.atomic():
            store.added("q", Stored(i, b"keep-%d" % i))
    for i in range(100, 300):  # put and gone: more segments, nothing live in them
        with store.atomic():
            store.added("q", Stored(i, b"x" * 100))
        with store.atomic():
            store.removed("q", i)
    first = min(store._sizes)
    monkeypatch.setattr(store, "_over_threshold", lambda dropped: True)
    real_open = open

    def racing_open(path: Any, *args: Any) -> Any:
        # As the backup opens the oldest segment it listed, the broker begins a new
        # segment, writes the oldest's live messages forward into it, and drops it.
        if Path(path).name == f"{first:016d}.seg" and first in store._sizes:
            store._roll()
            while first in store._sizes:
                store._maintain()
        return real_open(path, *args)

    monkeypatch.setattr(backups, "open", racing_open, raising=False)
    n = backup_log(tmp_path / "data", tmp_path / "copy.sqlite3")
    store.close()
    assert n == 5
    (tmp_path / "restored").mkdir()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "restored" / DB_NAME)
    restored = open_store(tmp_path / "restored")
    assert sorted(_all_payloads(restored)) == [b"keep-%d" % i for i in range(1, 6)]
    restored.close()


# --- the log and SQLite agree, whatever happens --------------------------------------

_queue = st.sampled_from(["a", "a", "b", "a.dead"])
_step = st.one_of(
    st.tuples(st.just("put"), _queue, st.integers(1, 30), st.integers(0, 300), st.integers(0, 3)),
    st.tuples(st.just("get"), _queue, st.integers(1, 20), st.booleans()),
    st.tuples(st.just("ack"), st.integers(0, 20)),
    st.tuples(
        st.just("nack"), st.integers(0, 10), st.booleans(), st.sampled_from([0.0, 0.0, 60.0])
    ),
    st.tuples(st.just("move"), st.integers(1, 10)),
    st.tuples(st.just("declare"), _queue, st.integers(0, 1000)),
    st.tuples(st.just("purge"), _queue),
    st.tuples(st.just("delete"), _queue),
    st.tuples(st.just("restart")),
)


class _Pair:
    """The same requests to a broker on each store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.open()

    def open(self) -> None:
        self.log = LogStore(self.root / "log", "batch", segment_bytes=4096)
        self.sql = SQLiteStore(self.root / "sql", "batch")
        self.brokers = []
        for store in (self.log, self.sql):
            store.start(lambda batch: None)
            broker = Broker(store, limits=Limits(max_deliveries=3))
            broker.connection_made(1)
            self.brokers.append(broker)
        # per broker: (queue, delivery id) handed out with manual ack (delivery ids are
        # the broker's own: they differ between the two)
        self.held: list[list[tuple[str, int]]] = [[], []]

    def close(self) -> None:
        self.log.close()
        self.sql.close()

    def handle(self, msg: Any) -> list[list[Any]]:
        return [b.handle(1, msg) for b in self.brokers]

    def step(self, step: tuple[Any, ...], req: int) -> None:
        kind = step[0]
        if kind == "put":  # options: none, or a priority and headers the batch shares
            from pigeon.protocol import PutOptions

            _, q, n, size, p = step
            batch = [b"%d-" % (req * 100 + i) + b"p" * size for i in range(n)]
            options = PutOptions(priority=p, headers={"h": "v" * size}) if p else None
            self.handle(PutBatch(req, q, batch, 0.0, options))
        elif kind == "get":
            _, q, n, manual = step
            for held, outs in zip(
                self.held, self.handle(Get(req, q, n, 0, manual_ack=manual)), strict=True
            ):
                if manual:
                    held += [
                        (q, d.id) for _, m in outs if isinstance(m, Deliver) for d in m.messages
                    ]
        elif kind in ("ack", "nack"):
            n = step[1]
            for k, broker in enumerate(self.brokers):
                done, self.held[k] = self.held[k][:n], self.held[k][n:]
                for q, mid in done:
                    if kind == "ack":
                        broker.handle(1, Ack(req, q, [mid]))
                    else:
                        broker.handle(1, Nack(req, q, [mid], step[2], step[3], "why"))
        elif kind == "move":
            self.handle(Move(req, "a.dead", "a", step[1]))
        elif kind == "declare":
            self.handle(Declare(req, step[1], maxsize=step[2]))
        elif kind == "purge":
            self.handle(Purge(req, step[1]))
        elif kind == "delete":
            self.handle(Delete(req, step[1]))
            self.held = [[(q, i) for q, i in held if q != step[1]] for held in self.held]
        elif kind == "restart":
            self.close()
            self.open()

    def at_rest(self) -> tuple[Any, Any]:
        """What each store holds, opened with no broker (whose recovery would write)."""
        self.log = LogStore(self.root / "log", "batch", segment_bytes=4096)
        self.sql = SQLiteStore(self.root / "sql", "batch")
        try:
            return self.states()
        finally:
            self.close()

    def states(self) -> tuple[Any, Any]:
        out = []
        for store in (self.log, self.sql):
            out.append(
                (
                    [
                        (
                            q,
                            m.id,
                            m.payload,
                            m.origin,
                            m.reason,
                            m.deliveries,
                            bool(m.extra and m.extra.due),
                            m.priority,
                            m.extra.headers if m.extra else None,
                        )
                        for q, m in store.recover()
                    ],
                    store.recover_queues(),
                )
            )
        return out[0], out[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=10, max_size=60))
@example(  # dead letters, a requeue, a restart, a replay: each record kind at least once
    [("declare", "a", 50), ("put", "a", 5, 3000, 2), ("get", "a", 3, True),
     ("nack", 1, False, 0.0), ("nack", 1, True, 60.0), ("restart",), ("move", 1),
     ("get", "a.dead", 1, True), ("ack", 1), ("put", "b", 20, 300, 0), ("delete", "b"),
     ("restart",)]
)  # fmt: skip
@example(  # its last delivery in flight at the restart: recovery dead-letters it, and writes
    [("ack", 0), ("put", "a", 1, 0, 0), ("put", "a", 1, 0, 0), ("get", "a", 1, True),
     ("put", "a", 1, 0, 0), ("restart",), ("get", "a", 1, True), ("put", "a", 1, 0, 0),
     ("nack", 1, True, 0.0), ("get", "a", 1, True)]
)  # fmt: skip
def test_the_log_recovers_what_sqlite_recovers(steps: list[tuple[Any, ...]]) -> None:
    """Any sequence of puts (some with shared options), gets, acks, nacks (some with a
    delay), dead letters, replays, declares, purges, deletes and restarts, through 4 KiB
    segments that roll and are reclaimed: after a restart the log holds what the SQLite
    store holds, delivery counts (in flight at a restart included), nack delays,
    priorities and headers too."""
    with tempfile.TemporaryDirectory() as d, mock.patch.object(logstore, "_FORWARD_CHUNK", 2):
        pair = _Pair(Path(d))
        for req, step in enumerate(steps, 1):
            pair.step(step, req)
        pair.close()
        pair.open()  # a restart: the brokers' recovery may write (a spent message dead-lettered)
        pair.close()  # ... which the close commits: the stores are read at rest, as written
        (log_msgs, log_queues), (sql_msgs, sql_queues) = pair.at_rest()
    assert log_msgs == sql_msgs
    assert log_queues == sql_queues


def test_serve_refuses_sqlite_on_a_directory_that_holds_a_log(tmp_path: Path) -> None:
    import subprocess
    import sys

    LogStore(tmp_path).close()
    out = subprocess.run(
        [sys.executable, "-m", "pigeon", "serve", "--port", "0", "--data-dir", str(tmp_path),
         "--store", "sqlite"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert "holds a log store" in out.stderr and "--store log" in out.stderr


def _recount(store: LogStore) -> tuple[dict[int, int], int]:
    """What recovery counts from the live set: messages per segment, bytes to forward."""
    per_seg = dict.fromkeys(store._seg_live, 0)
    size = 0
    for seg, queue, msg in store._live.values():
        per_seg[seg] += 1
        size += len(msg.payload) + len(queue) + logstore._ENTRY_OVERHEAD
        if msg.origin or msg.reason or msg.extra is not None:
            size += logstore.extra_bytes(msg)
    for name, seg in store._queue_seg.items():  # queue settings and dedup ids are live too
        per_seg[seg] += 1
        size += store._settings_size(name, store._queues[name])
    for queue, ids in store._dedup.items():
        for dedup_id, (_, seg) in ids.items():
            per_seg[seg] += 1
            size += logstore._dedup_size(queue, dedup_id)
    for queue, (_, seg) in store._tasks.items():  # tasks taken and not yet done
        per_seg[seg] += 1
        size += logstore._tasks_size(queue)
    return per_seg, size


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["put", "put with options", "ack", "nack", "dead"]),
            st.integers(1, 40),
            st.integers(0, 300),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_bulk_puts_and_acks_keep_the_counts_compaction_relies_on(
    tmp_path: Path, steps: list[tuple[str, int, int]]
) -> None:
    # A plain put and an ACK reach the log in bulk (added_plain, removed_many with map):
    # the live bytes and per-segment counts compaction decides by must stay what a
    # recount of the live set (recovery's) gives, across segments, dead letters and
    # messages with options; and what is live survives a reopen.
    path = Path(tempfile.mkdtemp(dir=tmp_path))
    store = LogStore(path, "never", segment_bytes=8 * 1024)
    broker = Broker(store)
    broker.connection_made(1)
    broker.handle(1, Declare(1, "q", max_deliveries=2))
    req = 10
    for what, n, size in steps:
        req += 1
        if what == "put":
            broker.handle(1, PutBatch(req, "q", [b"p" * size] * n))
        elif what == "put with options":
            from pigeon.protocol import PutOptions

            broker.handle(1, PutBatch(req, "q", [b"o" * size] * n, 0.0, PutOptions(priority=3)))
        else:
            outs = broker.handle(1, Get(req, "q", n, 0, True))
            ids = [d.id for _, m in outs if isinstance(m, Deliver) for d in m.messages]
            if ids and what == "ack":
                broker.handle(1, Ack(req, "q", ids, True))
            elif ids:  # back to the queue, or on the second time to q.dead
                broker.handle(1, Nack(req, "q", ids, what == "nack", 0.0, "", True))
        assert (store._seg_live, store._live_bytes) == _recount(store)
    live = sorted(store._live)
    broker.connection_lost(1)
    store.close()
    reopened = LogStore(path, "never")
    assert sorted(reopened._live) == live
    assert (reopened._seg_live, reopened._live_bytes) == _recount(reopened)
    reopened.close()


def test_a_read_that_changes_nothing_leaves_later_changes_to_be_written(tmp_path: Path) -> None:
    # While the server handles a read, changes schedule no write of their own (the read's
    # flush writes them). A read that changed nothing must not leave the store thinking a
    # write is coming: a change made next by a timer (a lease that ran out) is written
    # within the loop's turn all the same, and so is one made while a read is handled.
    from pigeon.server.core import Stored

    async def main() -> None:
        store = LogStore(tmp_path, "batch")
        store.attach(asyncio.get_running_loop())
        store.start(lambda batch: None)
        try:
            store.flush_follows()  # a read that changes nothing
            store.flush()
            store.added("q", Stored(1, b"by a timer"))  # then a change outside any read
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert store.unwritten() is None and store.committed == store.last_tag

            store.flush_follows()  # a read that changes something
            store.added("q", Stored(2, b"in a read"))
            assert store.unwritten() is not None  # not written behind the read's back
            store.flush()
            assert store.unwritten() is None and store.committed == store.last_tag
        finally:
            store.close()

    asyncio.run(main())
    reopened = LogStore(tmp_path)
    assert len(_all_payloads(reopened)) == 2
    reopened.close()


# --- durability of housekeeping: what a power cut or a failed fsync leaves ------------


class _PowerCut:
    """What a power cut would leave: every fsync or fdatasync of a segment records the
    size it made durable, and ``cut`` copies each segment as far as that. The syncer's
    fdatasyncs can be held back (the disk is still busy with them when the power fails)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.durable: dict[str, int] = {}
        self.hold = threading.Event()
        self.release = threading.Event()
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def record(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isfile(path):
                self.durable[path] = os.fstat(fd).st_size

        def fsync(fd: int) -> None:
            real_fsync(fd)
            record(fd)

        def fdatasync(fd: int) -> None:
            if self.hold.is_set() and threading.current_thread().name == "pigeon-log-sync":
                self.release.wait(10)
                return
            real_fdatasync(fd)
            record(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def cut(self, data: Path, where: Path) -> dict[str, int]:
        """Open a copy of the log as the cut leaves it; the messages per queue it holds."""
        (where / LOG_DIR).mkdir(parents=True)
        for seg in segments(data):
            kept = seg.read_bytes()[: self.durable.get(str(seg.resolve()), 0)]
            (where / LOG_DIR / seg.name).write_bytes(kept)
        store = LogStore(where, "never")
        found: dict[str, int] = {}
        for q, _ in store.recover():
            found[q] = found.get(q, 0) + 1
        store.close()
        return found


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_a_segment_is_deleted_only_once_the_change_that_emptied_it_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    # A MOVE (remove here, add there: one record) empties the oldest segment, which is
    # then deleted. If the power fails before the syncer's fdatasync of that record, the
    # deletion must not be what survives: the moved messages would be nowhere.
    # (The syncer held back is the Python one, whose fdatasyncs _PowerCut sees; the C one
    # fdatasyncs unseen, which only makes the cut keep less: tested below.)
    monkeypatch.setenv("PIGEON_PURE_PYTHON", "1")
    power = _PowerCut(monkeypatch)
    broker, store = opened(tmp_path / "data", fsync, segment_bytes=4096)
    for i in range(10):
        broker.handle(1, Put(i + 1, "src", b"src-%d " % i + b"." * 90))
    broker.handle(1, Put(20, "other", b"o" * 3500))  # fills segment 1: a roll
    [(_, deliver)] = broker.handle(1, Get(21, "other", 1, 0.0, True))
    broker.handle(1, Ack(22, "other", [deliver.messages[0].id]))  # only src's 10 live in 1
    time.sleep(0.2)
    assert power.cut(tmp_path / "data", tmp_path / "before") == {"src": 10}
    power.hold.set()  # the syncer's next fdatasync does not reach the disk in time
    assert broker.handle(1, Move(23, "src", "dst"))[0][1].value == 10
    assert [s.name for s in segments(tmp_path / "data")] == ["0000000000000002.seg"]
    found = power.cut(tmp_path / "data", tmp_path / "after")  # the power fails now
    power.release.set()
    store.close()
    assert found == {"dst": 10}


def test_a_failed_fsync_in_the_loops_thread_is_never_confirmed_by_the_syncers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop's thread fdatasyncs a full segment before it begins the next. If that
    # fails, the kernel reports the error once: the syncer's fdatasync of the same file
    # afterwards returns 0 - and must not confirm the batch the failed one covered.
    store = LogStore(tmp_path, "always", segment_bytes=4096)
    broker, commits = confirmed_put(store, b"first")
    loop_thread = threading.get_ident()
    failed = threading.Event()
    real_fdatasync, real_fsync_now = os.fdatasync, store._fsync_now

    def fdatasync(fd: int) -> None:
        if threading.get_ident() == loop_thread and not failed.is_set():
            failed.set()
            raise OSError(errno.EIO, "Input/output error")  # reported once ...
        real_fdatasync(fd)  # ... and the next fdatasync of the file returns 0

    def syncer_after_the_failure() -> None:
        failed.wait(5)  # the order the threads almost always take: the loop's first
        real_fsync_now()

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(store, "_fsync_now", syncer_after_the_failure)
    broker.handle(1, Put(2, "q", b"x" * 5000))  # fills the segment: a roll
    assert failed.wait(5)
    time.sleep(0.3)
    assert store.stalled_for == float("inf") and commits == [1]
    store.close()


def test_housekeeping_scheduled_before_close_does_nothing_after_it(tmp_path: Path) -> None:
    from pigeon.server.core import Stored

    async def main() -> tuple[list[Any], set[str], set[str]]:
        loop = asyncio.get_running_loop()
        errors: list[Any] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        store = LogStore(tmp_path, "batch", segment_bytes=4096)
        store.attach(loop)
        store.start(lambda batch: None)
        ids = iter(range(1, 1 << 40))
        store.added_many("q", [Stored(next(ids), b"L" * 40) for _ in range(60)])  # live
        store.flush()
        for _ in range(5000):  # puts and acks until a turn leaves housekeeping pending
            msgs = [Stored(next(ids), b"x" * 200) for _ in range(5)]
            store.added_many("q", msgs)
            store.flush()
            store.removed_many("q", [m.id for m in msgs])
            store.flush()
            if store._maintaining:
                break
            await asyncio.sleep(0)
        assert store._maintaining
        before = set(os.listdir(store.path))
        store.close()  # what the server does last when it stops
        await asyncio.sleep(0.05)  # the loop turns again before the process exits
        return errors, before, set(os.listdir(store.path))

    errors, before, after = asyncio.run(main())
    assert errors == [] and after == before


@pytest.mark.parametrize("torn_after", [False, True])
def test_a_whole_last_record_that_fails_its_checksum_is_quarantined_not_cut_off(
    tmp_path: Path, caplog: Any, torn_after: bool
) -> None:
    # Its header checks out and its length fits the file: not a write a crash cut short
    # but a record (confirmed, perhaps) that rotted - kept and reported as damage. Bytes
    # after it that are no record are still a torn tail.
    broker, store = opened(tmp_path, "always")
    for i in range(3):
        broker.handle(1, Put(i + 1, "q", b"confirmed-%d" % i))
    store.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[data.rindex(b"confirmed-2") + 3] ^= 0x01
    seg.write_bytes(bytes(data) + (b"PgR1\x10\x00" if torn_after else b""))
    broker, store = opened(tmp_path)
    assert store.quarantined == 1 and "failed their checksum" in caplog.text
    assert ("cut off 6 byte(s)" in caplog.text) == torn_after
    assert payloads(broker) == [b"confirmed-0", b"confirmed-1"]
    store.close()
    (kept,) = (tmp_path / LOG_DIR / "quarantine").iterdir()
    assert kept.read_bytes().endswith(b"congirmed-2") and kept.stat().st_size == 36


# --- queue settings and dedup ids: live entries, written forward, never a snapshot ------


def test_dedup_ids_and_settings_larger_than_a_segment_do_not_make_the_log_roll(
    tmp_path: Path,
) -> None:
    # Every segment used to begin with a snapshot of every queue's settings and dedup id:
    # once that outgrew a segment, each new one was born full and the log rolled (and
    # rewrote the snapshot) on every turn, with no request. Now they are live entries
    # like messages: written once, written forward by compaction, never copied per segment.
    broker, store = opened(tmp_path, "never", segment_bytes=4096)
    for i in range(300):
        broker.handle(1, Declare(i + 1, f"queue-{i:05d}", None, 60.0, 5))
    ids = [f"{i:08d}-".ljust(200, "x") for i in range(2000)]
    for k in range(0, 2000, 100):
        broker.handle(1, PutBatch(1000 + k, "q", [b"m"] * 100, 0.0, None, ids[k : k + 100]))
    got = broker.handle(1, Get(3000, "q", 10_000, 0))  # taken and gone: the ids stay
    assert sum(len(m.messages) for _, m in got if isinstance(m, Deliver)) == 2000
    turns = 0
    while store._maintain():
        turns += 1
        assert turns < 1000
    active, size = store._active, store.disk_bytes
    for _ in range(50):  # idle: nothing more to do
        assert not store._maintain()
    assert (store._active, store.disk_bytes) == (active, size)
    assert size < 2 * store._live_bytes + 2 * 4096
    assert store._live_bytes > 2000 * 200  # the ids count as what is live
    store.close()
    broker, store = opened(tmp_path, "never", segment_bytes=4096)
    assert len(store.recover_dedup()["q"]) == 2000 and len(store.recover_queues()) == 300
    again = broker.handle(1, PutBatch(4000, "q", [b"again"] * 100, 0.0, None, ids[:100]))
    assert isinstance(again[0][1], Confirmed) and broker.queues["q"].depth == 0
    store.close()


def test_expired_dedup_ids_are_forgotten_at_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not only when a segment begins: in a quiet log an id whose window passed would stay
    # in memory (and keep its segment) until then.
    from pigeon.server.core import Stored

    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    store = LogStore(tmp_path, "never")
    with store.atomic():
        for i in range(100):
            store.deduped("q", f"id-{i}", now[0] + 10)
        store.deduped("q", "later", now[0] + 100)
    now[0] += 11
    with store.atomic():
        store.added("q", Stored(1, b"a write"))
    assert store.recover_dedup() == {"q": {"later": now[0] + 89}}
    assert store._live_bytes == _recount(store)[1]
    store.close()


def test_a_slow_fsync_counts_as_a_stalled_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fsync always: while a write waits for an fsync that does not return, the store
    reports how long (new puts are then refused rather than held until store_timeout)."""
    store = LogStore(tmp_path, "always")
    commits: list[int] = []
    store.start(commits.append)
    broker = Broker(store)
    broker.connection_made(1)
    release = threading.Event()
    real = os.fdatasync

    def slow(fd: int) -> None:
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    broker.handle(1, Put(1, "q", b"waits for its fsync"))
    time.sleep(0.3)
    assert not commits and store.stalled_for >= 0.25
    release.set()
    wait_commits(commits)
    assert commits and store.stalled_for == 0.0
    store.close()


# --- the C syncer (--fsync batch where pigeon._fastring is built) ---------------------------


def _native_or_skip(store: LogStore) -> Any:
    native = store._native
    if native is None:
        if os.environ.get("CI") and not os.environ.get("PIGEON_PURE_PYTHON"):
            pytest.fail("the log store's C syncer is not built (CI builds pigeon._fastring)")
        pytest.skip("the log store's C syncer is not built here (pigeon._fastring)")
    return native


def test_batch_fsyncs_in_the_c_syncer_within_the_interval_and_follows_segment_rolls(
    tmp_path: Path,
) -> None:
    broker, store = opened(tmp_path, "batch", segment_bytes=4096)
    native = _native_or_skip(store)
    assert not store._thread.is_alive()  # no Python syncer beside it
    for i in range(200):  # ~40 segments: the descriptor it fsyncs is switched under it
        broker.handle(1, Put(i + 1, "q", b"x" * 600))
        if i % 50 == 0:
            time.sleep(0.03)  # the interval passes: an fdatasync of the active segment
    deadline = time.monotonic() + 5
    while native.fsyncs < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native.fsyncs >= 4 and store.fsyncs >= native.fsyncs
    assert native.error == 0 and store.unwritten() is None  # never a closed descriptor
    store.close()
    reopened = LogStore(tmp_path, "never")
    assert sum(1 for _ in reopened.recover()) == 200
    reopened.close()


def test_a_failed_fdatasync_of_the_c_syncer_breaks_the_store_and_confirms_nothing_after(
    tmp_path: Path,
) -> None:
    confirmed: list[int] = []
    store = LogStore(tmp_path, "batch")
    store.start(confirmed.append)
    native = _native_or_skip(store)
    broker = Broker(store)
    broker.connection_made(1)
    r, w = os.pipe()  # fdatasync of a pipe fails (EINVAL): a disk that failed a writeback
    try:
        with native:
            native.set_fd(r)
        broker.handle(1, Put(1, "q", b"a"))
        assert confirmed == [store.batch]  # written before the failure: confirmed
        deadline = time.monotonic() + 5
        while native.error == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert native.error == errno.EINVAL
        # Seen at once, before any write (round 7 #2): the server asks before each put,
        # /readyz and the metrics too; the store broke as the Python syncer's does.
        assert store.stalled_for == float("inf") and store._error is not None
        before = list(confirmed)
        broker.handle(1, Put(2, "q", b"b"))  # written after it: never confirmed
        assert confirmed == before and store.committed < store.last_tag
        why = store.unwritten()
        assert why is not None and "fsync failed" in why
        assert store.stalled_for == float("inf")
        with pytest.raises(FsyncFailed):
            store._fsync_or_break(lambda: None)  # nor does any later fsync count
    finally:
        with native:
            native.set_fd(store._fd)
        store.close()
        os.close(r)
        os.close(w)


def test_housekeeping_that_fails_on_a_full_disk_is_logged_once_not_after_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Review round 7b #4: a full disk failed the segment roll or the writing forward after
    # every write, and each failure was an ERROR line: 849 in 2.6 s, one per ack.
    store = LogStore(tmp_path, "never")

    def no_room() -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_maintain", no_room)
    with caplog.at_level("ERROR", logger="pigeon.store"):
        for _ in range(200):
            store._after_write()
    said = [r for r in caplog.records if "reclaiming space failed" in r.getMessage()]
    assert len(said) == 1
    store.close()
