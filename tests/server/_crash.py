"""Crashing a durable store in-process, for tests/server/test_model.py.

# Strategy:
# The store runs in the test's thread only: its syncer (or SQLite's writer) thread is
# never started; the test runs one pass of that thread's own loop when it decides the
# disk has caught up (``syncer_pass``, ``writer_pass``), and drives the event loop the
# store is attached to by hand (``FakeLoop``). So every interleaving is chosen by
# Hypothesis and replayed exactly.
#
# ``Disk`` stands for what a power cut keeps. It wraps ``os.fsync``/``os.fdatasync`` for
# the files under the test's directory: each successful call records the file's bytes
# (or a directory's names) as durable; a call told to fail raises EIO and, as Linux does
# after a failed writeback, the bytes it covered are lost for good (zeros on the disk,
# even if a later fsync succeeds: "fsyncgate"). A crash image is then:
#
#   kill -9    every file as it is now (the bytes written are in the OS; what the
#              process still held - changes not yet written - is gone)
#   power cut  the names the directory had at its last fsync, each file as at its last
#              fsync, plus a fraction of its unsynced tail (a record cut in half)
#
# SQLite does its own I/O, so its images are taken at the store's boundary, as
# tests/server/test_store.py does: the database and WAL as they are (with
# synchronous=FULL, under --fsync always, everything committed is fsynced), plus a torn
# frame after a power cut.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pigeon.server.app import BrokerServer
from pigeon.server.core import Broker, Out
from pigeon.server.store import DB_NAME, LOG_DIR, Durable, LogStore, SQLiteStore

__all__ = ["Disk", "FakeLoop", "Gate", "abandon", "image_of", "syncer_pass", "writer_pass"]


class FakeLoop:
    """The event loop a store is attached to: callbacks run when the test turns it."""

    def __init__(self) -> None:
        self.callbacks: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, cb: Callable[..., Any], *args: Any) -> None:
        self.callbacks.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., Any], *args: Any) -> None:
        self.callbacks.append((cb, args))  # a retry: in the next turn

    def turn(self) -> int:
        """Run the callbacks scheduled so far (those they schedule wait for the next turn)."""
        todo, self.callbacks = self.callbacks, []
        for cb, args in todo:
            cb(*args)
        return len(todo)


class Disk:
    """What a power cut would keep of the files under ``root`` (see the module's
    docstring). Install with ``patches()``."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.synced: dict[str, bytes] = {}  # file -> its bytes at its last fsync
        self.names: dict[str, set[str]] = {}  # directory -> its names at its last fsync
        self.holes: dict[str, list[tuple[int, int]]] = {}  # file -> ranges a failure lost
        self.context = "loop"  # who calls fsync now: "loop" or "syncer"
        self.fail: str | None = None  # the next fsync in this context fails
        self.failures: list[str] = []  # contexts of the failures injected
        # A directory fsync made a name's removal durable while some file still had
        # unsynced bytes: a power cut then may keep the removal but not the write that
        # justified it (FINDINGS-broker.md #1).
        self.removed_before_sync = False
        self._real = {"fsync": os.fsync, "fdatasync": os.fdatasync}

    def patches(self) -> list[Any]:
        from unittest import mock

        return [mock.patch.object(os, name, self._hook(name)) for name in ("fsync", "fdatasync")]

    def _path(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return path if path.startswith(self.root + os.sep) else None

    def _hook(self, name: str) -> Callable[[int], None]:
        real = self._real[name]

        def fsync(fd: int) -> None:
            path = self._path(fd)
            if path is None:
                real(fd)
                return
            if self.fail is not None and self.fail == self.context:
                self.fail = None
                self.failures.append(self.context)
                if os.path.isfile(path):
                    start = len(self.synced.get(path, b""))
                    self.holes.setdefault(path, []).append((start, os.fstat(fd).st_size))
                raise OSError(errno.EIO, "Input/output error (simulated)")
            real(fd)
            if os.path.isdir(path):
                names = set(os.listdir(path))
                if self.names.get(path, set()) - names and self.unsynced(path):
                    self.removed_before_sync = True
                self.names[path] = names
            else:
                self.synced[path] = self._durable(path, Path(path).read_bytes())
                if not self.unsynced(os.path.dirname(path)):
                    self.removed_before_sync = False

        return fsync

    def _durable(self, path: str, data: bytes) -> bytes:
        if not self.holes.get(path):
            return data
        out = bytearray(data)
        for start, end in self.holes[path]:
            out[start:end] = bytes(len(out[start:end]))
        return bytes(out)

    def unsynced(self, directory: str) -> bool:
        """Some segment in ``directory`` has bytes no fsync made durable."""
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(".seg") and Path(path).read_bytes() != self.synced.get(path):
                return True
        return False

    def adopt(self, directory: Path) -> None:
        """Everything in ``directory`` (a crash image just made) is on the disk."""
        for dirpath, _, files in os.walk(os.path.realpath(directory)):
            self.names[dirpath] = set(os.listdir(dirpath))
            for f in files:
                path = os.path.join(dirpath, f)
                self.synced[path] = Path(path).read_bytes()

    def power_cut(self, src: Path, dst: Path, tear: float) -> None:
        """``dst``: what a power cut leaves of directory ``src`` (not recursive): the names
        of its last fsync, each file as at its last fsync plus ``tear`` of its unsynced
        tail."""
        src_real = os.path.realpath(src)
        dst.mkdir(parents=True)
        for name in sorted(self.names.get(src_real, set())):
            if not name.endswith(".seg"):
                continue
            path = os.path.join(src_real, name)
            kept = self.synced.get(path, b"")
            if os.path.isfile(path):
                tail = Path(path).read_bytes()[len(kept) :]
                kept += tail[: int(len(tail) * tear)]
            (dst / name).write_bytes(kept)


def image_of(store: Durable, disk: Disk, dst: Path, kind: str, tear: float) -> None:
    """Write to ``dst`` the data directory a crash of ``kind`` (kill, power) leaves."""
    src = store.dir  # type: ignore[attr-defined]
    dst.mkdir(parents=True)
    if isinstance(store, LogStore):
        if kind == "power":
            disk.power_cut(src / LOG_DIR, dst / LOG_DIR, tear)
        else:
            shutil.copytree(src / LOG_DIR, dst / LOG_DIR, ignore=shutil.ignore_patterns("*.bad"))
        return
    for suffix in ("", "-wal"):  # not -shm: SQLite rebuilds it from the WAL
        path = Path(f"{src / DB_NAME}{suffix}")
        if path.exists():
            shutil.copyfile(path, f"{dst / DB_NAME}{suffix}")
    wal = Path(f"{dst / DB_NAME}-wal")
    if kind == "power" and wal.exists() and tear > 0:  # a frame cut short by the power cut
        with open(wal, "ab") as f:
            f.write(hashlib.sha256(str(tear).encode()).digest() * int(1 + 40 * tear))


def abandon(store: Durable) -> None:
    """The process died: drop the store without writing anything more."""
    if isinstance(store, LogStore):  # (no lock to take: the syncer never ran in a thread)
        if store._fd >= 0:
            os.close(store._fd)
            store._fd = -1
    elif isinstance(store, SQLiteStore):
        store._db.close()
    store._unlock_dir()


def _one_pass(store: Durable, disk: Disk, loop: Callable[[], None]) -> None:
    """One pass of a store thread's ``loop``, in this thread, its disk calls counted as
    that thread's. (With ``_closing`` set, the loop does one pass and returns.)"""
    disk.context = "syncer"
    store._closing = True
    try:
        loop()
    finally:
        store._closing = False
        disk.context = "loop"


def syncer_pass(store: Durable, disk: Disk) -> bool:
    """One pass of the store's syncer thread (``Durable._syncer``, or the log's C syncer,
    ``NativeSyncer``, where ``_use_native`` put it in place): it fsyncs what was written
    and confirms what waited for that. False if its fsync failed: the thread has then
    ended for good."""
    failed = len(disk.failures)
    native = getattr(store, "_native", None)
    if native is not None:  # the C pass, its fdatasync the disk's (os.fdatasync, patched)
        disk.context = "syncer"
        try:
            native.pass_by_hand(os.fdatasync)
        finally:
            disk.context = "loop"
    else:
        _one_pass(store, disk, store._syncer)
    return len(disk.failures) == failed


def writer_pass(store: SQLiteStore, disk: Disk) -> None:
    """One pass of SQLite's writer thread (``--fsync always``, not attached to a loop):
    it commits what is pending (synchronous=FULL: the commit is the fsync) and confirms."""
    _one_pass(store, disk, store._writer)


class Gate:
    """The server's commit gate, run on the broker in this thread: the server's own code
    (``pigeon.server.commit_gate.CommitGate`` where it exists, else ``BrokerServer.apply``
    and ``_committed`` duck-typed onto this object), so a change to the rule that holds
    replies until the store commits is tested here too. ``released(outs)`` is called
    with replies as they go out."""

    def __init__(self, broker: Broker, released: Callable[[list[Out]], None]) -> None:
        self.broker = broker
        self._held: deque[Any] = deque()
        self._draining: set[Any] = set()
        self.released = released
        try:
            from pigeon.server.commit_gate import CommitGate  # type: ignore[import-not-found]
        except ImportError:
            self._gate = None
        else:
            self._gate = CommitGate(broker.store, lambda: 0.0)

    def dispatch(self, outs: list[Out]) -> None:
        self.released(outs)

    def _arm(self) -> None:
        pass

    def apply(self, fn: Callable[[], list[Out]]) -> None:
        if self._gate is None:
            BrokerServer.apply(self, fn)  # type: ignore[arg-type]
            return
        before = self.broker.store.changes
        outs = fn()
        if not self._gate.hold(before, outs):
            self.released(outs)

    def committed(self, batch: int) -> None:
        if self._gate is None:
            BrokerServer._committed(self, batch)  # type: ignore[arg-type]
        else:
            self.released(self._gate.committed(batch))
