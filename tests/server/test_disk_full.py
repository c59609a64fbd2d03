"""A disk the broker filled itself: the store lets go of its reserve, so gets and acks go
on (consumers make room) while new puts are refused with a clear error; once there is
room again, puts are accepted. Run on a small tmpfs (root and mount needed: CI has both)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
from pigeon.server.core import Stored
from pigeon.server.store import LOG_DIR, LogStore
from pigeon.server.store.backup import backup_log
from tests._services import free_port, skip_or_fail, start_broker


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="pigeon-full-"))
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("a small tmpfs needs root and mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def test_a_full_disk_refuses_puts_but_lets_consumers_drain_and_then_takes_puts_again() -> None:
    with tmpfs("6m") as disk:
        port = free_port()
        seg = str(256 * 1024)
        broker = start_broker(port, "--data-dir", str(disk), "--segment-bytes", seg)
        url = f"pigeon://127.0.0.1:{port}/full"
        item = os.urandom(16 * 1024)
        stored = 0
        refused: pigeon.PigeonError | None = None
        try:
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                for _ in range(2000):  # ~32 MiB offered to a 6 MiB disk
                    try:
                        q.put(item, timeout=5)
                    except pigeon.PigeonError as exc:
                        refused = exc
                        break
                    stored += 1
                assert refused is not None, "the disk never filled"
                assert "disk is full" in str(refused), refused
                assert stored > 100
                # The consumers drain it: every get confirmed and acked on the full disk.
                for _ in range(stored):
                    m = q.get_message(timeout=10)
                    assert m.body == item
                    m.ack()
                assert q.qsize() == 0
                # Room again (acked segments deleted): puts are accepted within seconds.
                deadline = time.monotonic() + 20
                while True:
                    try:
                        q.put(b"after", timeout=5)
                        break
                    except pigeon.PigeonError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                assert q.get(timeout=5) == b"after"
        finally:
            broker.terminate()
            broker.wait(10)
        assert (disk / LOG_DIR / "reserve").exists()  # taken back


def test_a_put_larger_than_the_room_left_is_refused_and_acks_still_go_through() -> None:
    # Review 7b #1: a write larger than the room left plus the reserve failed again once
    # the reserve was let go, was retried for ever, and every ack behind it waited: no
    # ack was written, the disk never freed. Now such a put is refused before it is
    # applied, once the disk's room is low.
    with tmpfs("6m") as disk:
        port = free_port()
        broker = start_broker(port, "--data-dir", str(disk), "--segment-bytes", str(256 * 1024))
        url = f"pigeon://127.0.0.1:{port}/big"
        item = os.urandom(16 * 1024)
        try:
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                while shutil.disk_usage(disk).free > 200 * 1024:  # short of ENOSPC
                    q.put(item, timeout=5)
                with pytest.raises(pigeon.PigeonError, match="disk is full"):
                    q.put(os.urandom(2**20), timeout=5)  # more than the room and reserve
                for _ in range(3):
                    m = q.get_message(timeout=10)
                    started = time.monotonic()
                    m.ack()  # written on the full disk, not held to the store's timeout
                    assert time.monotonic() - started < 2.0
                q.put(b"small", timeout=5)  # what fits is taken
        finally:
            broker.terminate()
            broker.wait(10)


def test_a_fifo_drain_on_a_full_disk_gets_room_back_before_its_segment_empties(
    tmp_path: Path,
) -> None:
    # Review 7b #2 (b): settles were written into the reserve's room, and room came back
    # only once a whole segment had nothing live - a drain of a segment larger than the
    # reserve spent it first, and the next write met ENOSPC for good. Now a full disk
    # punches the dead prefix of the oldest segment out of the file as the drain goes.
    with tmpfs("2m") as disk:
        store = LogStore(disk, segment_bytes=64 * 2**20, reserve_bytes=256 * 1024)
        try:
            ids = itertools.count(1)
            stored: list[Stored] = []
            while store.disk_full is None:  # the last batch met ENOSPC: the reserve let go
                batch = [Stored(next(ids), os.urandom(200)) for _ in range(100)]
                store.added_plain("q", batch)
                stored += batch
            assert len(store._sizes) == 1  # all in one segment, never emptied by the drain
            low = shutil.disk_usage(disk).free
            for m in stored:  # FIFO: each delivered, then acked (a record each)
                store.delivered("q", [m.id])
                store.removed("q", m.id)
                assert store.unwritten() is None, f"a settle was not written (id {m.id})"
                low = min(low, shutil.disk_usage(disk).free)
            assert low > 0
            assert shutil.disk_usage(disk).free > 1024 * 1024  # the drained part is free
            (seg,) = (disk / LOG_DIR).glob("*.seg")
            assert seg.stat().st_blocks * 512 < seg.stat().st_size // 2  # punched out
        finally:
            store.close()
        assert backup_log(disk, tmp_path / "copy.db") == 0  # a backup skips the hole too
        again = LogStore(disk, segment_bytes=64 * 2**20, reserve_bytes=256 * 1024)
        try:
            assert list(again.recover()) == []  # the hole is skipped: nothing comes back
            assert again.quarantined == 0
        finally:
            again.close()


def test_a_full_disk_refuses_gets_before_settles_that_free_nothing_spend_its_room() -> None:
    # Review 7b #2 (a): a job nacked (requeue) and got again, over and over, writes records
    # and frees nothing; the reserve's room was spent, the next write met ENOSPC with none
    # left and was retried for ever: no ack written again. Now GETs are refused, with a
    # clear error, while the room left is what settling the messages out needs.
    with tmpfs("2m") as disk:
        port = free_port()
        broker = start_broker(port, "--data-dir", str(disk), "--segment-bytes", str(16 * 1024))
        url = f"pigeon://127.0.0.1:{port}/spend"
        try:
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                while True:
                    try:
                        q.put_many([os.urandom(1024)] * 8, timeout=1)  # (refused: retried 1 s)
                    except pigeon.PigeonError as exc:
                        assert "disk is full" in str(exc), exc
                        break
                held = q.get_message(timeout=5)  # a message out while the room runs low
                refused = None
                for _ in range(100_000):
                    try:
                        m = q.get_message(timeout=1)
                    except pigeon.Unavailable as exc:
                        refused = exc
                        break
                    started = time.monotonic()
                    m.nack(requeue=True)  # a failing job, retried: frees nothing
                    assert time.monotonic() - started < 2.0, "a nack waited on the store"
                assert refused is not None and "disk is full" in str(refused), refused
                started = time.monotonic()
                held.ack()  # what is out is still settled, at once
                assert time.monotonic() - started < 2.0
        finally:
            broker.terminate()
            broker.wait(10)
