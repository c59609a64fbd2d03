"""The shared file of a local queue: its control page and data ring mapped into this
process, the lock that orders every thread and process, and the committed state -
published whole by one single-byte store, with the tombstones a commit writes into the
ring going through an intent area that the next lock holder completes.

# Strategy:
# The ring state is double-buffered in the control page: a change is written into the
# spare slot and published by flipping a one-byte index, so a holder that dies or is
# interrupted leaves it complete or invisible. What a commit must write in the ring itself
# (K_TAKEN marks) is written into the intent area first and published with the state
# (``marks``); ``_lock`` completes a published state with marks before anything else
# (``_recover``). The lock is a robust process-shared mutex (EOWNERDEAD hands a dead
# holder's lock over), else flock plus a thread lock; it is dropped by one C call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from pigeon.backends.local import lock, ring, tracker
from pigeon.backends.local.layout import (
    GET_SEQ,
    JOIN_SEQ,
    K_TAKEN,
    KIND_AT,
    MAGIC,
    MAGIC_MUTEX,
    MAX_MARKS,
    OFF_INDEX,
    OFF_MARKS,
    OFF_MAXSIZE,
    OFF_MUTEX,
    OFF_SLOTS,
    OLD_MAGICS,
    PAGE,
    PUT_SEQ,
    STATE,
    WAITERS,
    pack_state,
    unpack_state,
)
from pigeon.backends.local.lock import LOCK_TRIES, MUTEX, fork_generation, release, shm_dir
from pigeon.errors import ClosedResourceError

if sys.platform != "win32":
    import fcntl

__all__ = ["SharedRing"]

_EX_NB = (fcntl.LOCK_EX | fcntl.LOCK_NB) if sys.platform != "win32" else 0
K_KIND = struct.Struct("<H")


class SharedRing:
    """A handle's view of a local queue's file: mappings, lock, committed state."""

    _path: str
    _creator: bool
    _closed: bool
    _finalizer: weakref.finalize[Any, Any] | None
    _registered: dict[int, int]  # this handle's share of the waiters (see waits.py)

    @staticmethod
    def _create(maxsize: int, capacity: int) -> str:
        capacity = (capacity + PAGE - 1) // PAGE * PAGE
        fd, path = tempfile.mkstemp(prefix="pigeon-q-", dir=shm_dir())
        try:
            os.ftruncate(fd, PAGE + capacity)
            with mmap.mmap(fd, PAGE) as ctrl:
                struct.pack_into("<Q", ctrl, OFF_MAXSIZE, maxsize)
                STATE.pack_into(ctrl, OFF_SLOTS, 0, 0, 0, 0, capacity, 0, 0, 0, 0)
                if MUTEX is not None:
                    anchor = ctypes.c_char.from_buffer(ctrl)
                    try:
                        MUTEX.init(ctypes.addressof(anchor) + OFF_MUTEX)
                    finally:
                        del anchor
                # the magic last: it says which lock the file uses
                ctrl[0:8] = MAGIC if MUTEX is None else MAGIC_MUTEX
        finally:
            os.close(fd)
        return path

    def _open(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDWR)
        except FileNotFoundError:
            raise ClosedResourceError(
                f"local queue {self._path} no longer exists: the process that created it "
                "closed it or exited; keep the creator's handle open while others use it"
            ) from None
        self._fd = fd
        self._hold(fd, self._path if self._creator else None)
        self._gen = fork_generation[0]
        self._tlock = threading.Lock()
        self._registered = dict.fromkeys(WAITERS, 0)  # this handle's share of the waiters
        self._ctrl = mmap.mmap(fd, PAGE)
        # addresses for the C fast path; the anchors keep the mappings exported (alive)
        self._ctrl_anchor: Any = ctypes.c_char.from_buffer(self._ctrl)
        self._ctrl_addr = ctypes.addressof(self._ctrl_anchor)
        self._data_anchor: Any = None
        self._retired: list[tuple[mmap.mmap, Any]] = []  # earlier mappings (see _map_data)
        self._mapped = (0, 0)  # (address, capacity) of the data mapping, for the C path
        magic = self._ctrl[0:8]
        if magic in OLD_MAGICS:
            raise ClosedResourceError(
                f"local queue {self._path} was made by an older pigeon (file layout 1): "
                "open it with the version that made it"
            )
        if magic not in (MAGIC, MAGIC_MUTEX):
            raise ClosedResourceError(f"{self._path} is not a pigeon local queue")
        self._mutex = magic == MAGIC_MUTEX
        if self._mutex and MUTEX is None:
            raise ClosedResourceError(
                f"local queue {self._path} is locked with a robust process-shared mutex, "
                "which this process cannot use (PIGEON_LOCAL_LOCK=flock, or no such mutex "
                "here): open it from processes that run alike"
            )
        self._cfd = -1 if self._mutex else fd  # the C path's lock: -1 is the mutex
        self._mx = MUTEX  # (this handle's, whatever the module's becomes)
        self._mutex_addr = self._ctrl_addr + OFF_MUTEX
        # One C call drops the lock (see lock.Mutex): a ``finally: self._unlock()`` cannot
        # be interrupted between deciding to drop it and dropping it.
        self._unlock: Callable[[], object] = (
            functools.partial(MUTEX.unlock, self._mutex_addr)  # type: ignore[union-attr]
            if self._mutex
            else self._unlock_flock
        )
        self._maxsize = struct.unpack_from("<Q", self._ctrl, OFF_MAXSIZE)[0]
        self._words = {
            off: ctypes.c_uint32.from_buffer(self._ctrl, off)
            for off in (PUT_SEQ, GET_SEQ, JOIN_SEQ)
        }
        self._addr = {off: ctypes.addressof(w) for off, w in self._words.items()}
        self._cap = 0
        self._data: mmap.mmap | None = None
        self._map_data(self._state().capacity)

    def _map_data(self, capacity: int) -> mmap.mmap:
        data = mmap.mmap(self._fd, capacity, offset=PAGE)
        anchor = ctypes.c_char.from_buffer(data)
        if self._data is not None:
            # Kept, not closed: another thread of this process may be on its way into the
            # C path with the old (address, capacity), and a growth that was interrupted
            # before its commit leaves the old capacity the committed one. The old mapping
            # stays valid memory (the file only grows); it goes with the handle.
            self._retired.append((self._data, self._data_anchor))
        self._data, self._data_anchor = data, anchor
        # one object: a thread reading it never pairs one mapping's address with another's
        # capacity (the C path checks the capacity against the committed state)
        self._mapped = (ctypes.addressof(anchor), capacity)
        self._cap = capacity
        return data

    def _mapping(self, st: ring.RingState) -> mmap.mmap:
        """The data mapping for the capacity ``st`` says (remapped if the ring grew)."""
        data = self._data
        if data is None or st.capacity != self._cap:
            data = self._map_data(st.capacity)
        return data

    def _hold(self, fd: int, unlink: str | None) -> None:
        """Own ``fd``: mark the file held (see ``tracker``) and close ``fd`` when this
        handle is closed or garbage-collected."""
        tracker.hold(fd)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, release, fd, unlink, os.getpid())

    def _after_fork(self) -> None:
        # flock belongs to the open file description, which fork shares with the
        # parent: take a description of our own, and let go of the inherited descriptor
        # (the parent's stays open); the shared-memory mutex needs nothing. The mappings
        # are inherited as they are. Once per handle and fork, whichever thread comes
        # first: two threads swapping at once would close each other's descriptor.
        with lock.fork_lock:
            if self._gen == fork_generation[0]:
                return
            old = self._fd
            try:
                fd = os.open(f"/proc/self/fd/{old}", os.O_RDWR)
            except OSError:
                fd = os.open(self._path, os.O_RDWR)
            with contextlib.suppress(OSError):
                os.close(old)
            self._hold(fd, None)  # a fork child never removes its parent's queue
            self._tlock = threading.Lock()
            self._registered = dict.fromkeys(WAITERS, 0)  # the parent's waiters stayed there
            self._fd = fd
            self._cfd = -1 if self._mutex else fd
            self._gen = fork_generation[0]  # last: the others go on only after this

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        if self._gen != fork_generation[0]:
            self._after_fork()

    def _lock(self) -> None:
        """Take the queue's lock; finish first what a holder that died or was interrupted
        published but did not complete (``_recover``)."""
        if self._closed or self._gen != fork_generation[0]:
            self._check()
        if self._mutex:  # it excludes this process's threads too
            try:
                self._mx.lock(self._mutex_addr)  # type: ignore[union-attr]
                if self._closed:  # closed while we waited: close() has let go of the file
                    raise ClosedResourceError("this queue handle was closed")
                self._recover()
                return
            except BaseException:
                # Whatever interrupted us (Ctrl-C lands after any call, the lock's too)
                # must not leave the lock held by a live thread: a robust mutex refuses
                # (EPERM) to be unlocked by a thread that does not hold it, so this is
                # right whether or not we got it.
                self._mx.unlock(self._mutex_addr)  # type: ignore[union-attr]
                raise
        self._tlock.acquire()
        try:
            if self._closed:  # closed while we waited: its descriptor is gone
                raise ClosedResourceError("this queue handle was closed")
            # Try for a few microseconds before sleeping in the kernel: the holder keeps
            # the lock for about a microsecond, and a sleep and wake cost far more.
            for _ in range(LOCK_TRIES):
                try:
                    fcntl.flock(self._fd, _EX_NB)
                    break
                except BlockingIOError:
                    pass
            else:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._recover()
        except BaseException:
            if not self._closed:  # (when closed, the descriptor is gone and not ours)
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)  # a no-op if we did not get it
            self._tlock.release()
            raise

    def _unlock_flock(self) -> None:
        # (two calls: an interruption between them leaves this handle's thread lock held;
        # this path is the one for systems without robust mutexes)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._tlock.release()

    def _state(self) -> ring.RingState:
        """The committed state (read it under the lock to change it; it has no side
        effect, so ``qsize`` may read it without the lock)."""
        # The slot index is 0 or 1: its low byte is the whole of it.
        head, tail, count, unfinished, cap, special, tombs, flags, marks = unpack_state(
            self._ctrl, OFF_SLOTS + 64 * self._ctrl[OFF_INDEX]
        )
        return ring.RingState(head, tail, count, cap, unfinished, special, tombs, flags, marks)

    def _commit(self, st: ring.RingState, marks: Sequence[int] = ()) -> None:
        """Publish ``st``: one single-byte store makes the whole change visible.

        ``marks`` are the offsets of record headers this change turns into tombstones
        (``st.tombs`` already counts them). They live in the ring, outside the
        double-buffered state, so they go through the intent area: written there, published
        with the state (``st.marks``), applied, then the state is published again without
        them. Interrupted anywhere, the change is either invisible (before the first
        publish) or complete: the next lock holder applies published marks first."""
        if marks:
            assert len(marks) <= MAX_MARKS and not st.marks
            struct.pack_into(f"<{len(marks)}Q", self._ctrl, OFF_MARKS, *marks)
            st.marks = len(marks)
            self._write_state(st)
            self._apply_marks(st)
            st.marks = 0
        self._write_state(st)

    def _write_state(self, st: ring.RingState) -> None:
        idx = self._ctrl[OFF_INDEX] ^ 1
        pack_state(
            self._ctrl, OFF_SLOTS + 64 * idx, st.head, st.tail, st.count, st.unfinished,
            st.capacity, st.special, st.tombs, st.flags, st.marks,
        )  # fmt: skip
        self._publish(idx)

    def _publish(self, idx: int) -> None:
        """The commit: one single-byte store, atomic by nature. Before it, a change is
        invisible; after it, complete."""
        self._ctrl[OFF_INDEX] = idx

    def _apply_marks(self, st: ring.RingState) -> None:
        """Write the published marks (idempotent: each sets a header's kind to K_TAKEN)."""
        data = self._mapping(st)
        for pos in struct.unpack_from(f"<{st.marks}Q", self._ctrl, OFF_MARKS):
            K_KIND.pack_into(data, pos + KIND_AT, K_TAKEN)

    def _recover(self) -> None:
        """Under the lock: complete a commit whose marks were published but maybe not all
        written (its holder died, or an exception left its section)."""
        st = self._state()
        if st.marks:
            self._apply_marks(st)
            st.marks = 0
            self._write_state(st)
