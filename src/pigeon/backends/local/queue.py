"""The local queue's operations: ``LocalQueue`` and ``LocalMessage`` (see the package's
docstring for what it offers and how)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import heapq
import mmap
import os
import pickle
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from pigeon import _futex, _otel
from pigeon._queue_base import Message, Queue, deadline_from
from pigeon.backends import _ring, _shm_tracker
from pigeon.backends._url import check_maxsize
from pigeon.backends.local import lock
from pigeon.backends.local.codec import (
    unwrap,
    with_options,
    wrap,
)
from pigeon.backends.local.dedup import DedupBusy, DedupTable
from pigeon.backends.local.layout import (
    COPY_AS_BYTES,
    DEDUP_SUFFIX,
    GET_SEQ,
    IMMEDIATE,
    JOIN_SEQ,
    K_BYTEARRAY,
    K_BYTES,
    K_HEADERS,
    K_OPTIONS,
    K_PICKLE,
    K_PICKLE_OOB,
    K_SERIALIZED,
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
    OPTS,
    PAGE,
    PUT_SEQ,
    SHUTDOWN,
    STATE,
    U32,
    WAITERS,
    host_clock,
    pack_header,
    pack_state,
    unpack_header,
    unpack_state,
)
from pigeon.backends.local.lock import (
    LOCK_TRIES,
    MUTEX,
    C,
    fork_generation,
    release,
    shm_dir,
)
from pigeon.errors import (
    ClosedResourceError,
    DecodeError,
    Empty,
    Full,
    LocalProtocolError,
    ShutDown,
)
from pigeon.options import QueueOptions, check_dedup_ids, put_options
from pigeon.protocol.messages import PutOptions
from pigeon.protocol.rules import DEFAULT_DEDUP_WINDOW, seconds_problem
from pigeon.serializers import Pickle, SerializerLike, get_serializer

if sys.platform != "win32":
    import fcntl

T = TypeVar("T")

_EX_NB = (fcntl.LOCK_EX | fcntl.LOCK_NB) if sys.platform != "win32" else 0
_SPIN = 50e-6  # seconds a waiter watches its word before it sleeps
_SAFETY_SLICE = 1.0
# A ring smaller than this grows at once when full; a larger one first gives readers
# _GROWTH_PATIENCE seconds to make room, so a streaming producer does not grow it by
# its whole lead over the readers (growing means new zeroed pages of shared memory).
_FREE_GROWTH = 16 * 2**20
_GROWTH_PATIENCE = 0.002  # seconds: the longest a waiter sleeps before re-checking
_OOB_MIN = 64 * 1024  # pickle buffers at least this large go out of band

_DEFAULT_CAPACITY = 1 * 2**20
K_KIND = struct.Struct("<H")
# what a take finds a record to be (``_take_special``)
_LIVE, _TOMB, _TAKEN, _EXPIRED = range(4)


class LocalQueue(Queue[T]):
    """A queue in shared memory for the threads and processes of one host."""

    def __init__(
        self,
        url: None = None,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
        *,
        capacity: int = _DEFAULT_CAPACITY,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        _path: str | None = None,
    ) -> None:
        if url is not None:
            raise TypeError(
                f"the first argument of pigeon.Queue is a URL, not {url!r}; "
                f"for a local queue with a capacity write pigeon.Queue(maxsize={url!r})"
            )
        if serializer is None:
            serializer = "pickle"
        check_maxsize(maxsize)
        self._serializer_spec = serializer
        self._ser = get_serializer(serializer)
        self._pickle = isinstance(self._ser, Pickle)
        self._closed = False
        self.expired = 0  # messages past their ttl this handle found and dropped
        self._due: float | None = None  # when the next delayed message comes due (a hint)
        self._dedup_window = _check_window(dedup_window)
        self._dedup: DedupTable | None = None  # made by the first put with an id
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._creator = _path is None
        if _path is None:
            self._path = self._create(maxsize, max(PAGE, capacity))
            _shm_tracker.register(self._path)
        else:
            self._path = _path
        try:
            self._open()
        except BaseException:
            if self._creator:
                release(-1, self._path, os.getpid())
            raise

    # --- the shared file ------------------------------------------------------------

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

    def _hold(self, fd: int, unlink: str | None) -> None:
        """Own ``fd``: mark the file held (see ``_shm_tracker``) and close ``fd`` when this
        handle is closed or garbage-collected."""
        _shm_tracker.hold(fd)
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

    def __reduce__(self) -> tuple[Any, ...]:
        self._check()
        return (_attach, (self._path, self._serializer_spec, self._dedup_window))

    # --- locking and state ------------------------------------------------------------

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

    def _state(self) -> _ring.RingState:
        """The committed state (read it under the lock to change it; it has no side
        effect, so ``qsize`` may read it without the lock)."""
        # The slot index is 0 or 1: its low byte is the whole of it.
        head, tail, count, unfinished, cap, special, tombs, flags, marks = unpack_state(
            self._ctrl, OFF_SLOTS + 64 * self._ctrl[OFF_INDEX]
        )
        return _ring.RingState(head, tail, count, cap, unfinished, special, tombs, flags, marks)

    def _commit(self, st: _ring.RingState, marks: Sequence[int] = ()) -> None:
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

    def _write_state(self, st: _ring.RingState) -> None:
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

    def _apply_marks(self, st: _ring.RingState) -> None:
        """Write the published marks (idempotent: each sets a header's kind to K_TAKEN)."""
        data = self._data
        if data is None or st.capacity != self._cap:
            data = self._map_data(st.capacity)
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

    def _bump(self, word: int) -> bool:
        """Advance a sequence word; True if someone waits on it (call ``_wake`` after)."""
        w = self._words[word]
        w.value += 1  # a c_uint32: wraps at 2**32 by itself
        return bool(U32.unpack_from(self._ctrl, WAITERS[word])[0])

    def _wake(self, word: int) -> None:
        if _futex.AVAILABLE:
            _futex.wake(self._addr[word])

    def _seq(self, word: int) -> int:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        return int(self._words[word].value)

    def _register(self, word: int, delta: int) -> None:
        """Count this thread in or out of the waiters on ``word`` (under the lock): a
        waker skips its system call while no one is counted. This handle keeps its own
        share too, so that ``close()`` takes back what its waiting threads cannot."""
        off = WAITERS[word]
        n = U32.unpack_from(self._ctrl, off)[0] + delta
        self._registered[word] += delta  # (no call between this and the store below)
        U32.pack_into(self._ctrl, off, max(0, n))

    def _deregister(self, word: int) -> None:
        """Count out a waiter whose wait ended by an exception (Ctrl-C in its sleep, the
        handle closed under it)."""
        try:
            self._lock()
        except ClosedResourceError:
            return  # close() took back this handle's share
        try:
            self._register(word, -1)
        finally:
            self._unlock()

    def _spin(self, word: int, seq: int) -> int:
        """Watch ``word`` for a few microseconds before paying for a futex sleep and wake.

        A consumer that is faster than its producer would otherwise sleep after every
        item and cost the producer a wake syscall per put. Returns a non-zero count so
        the caller spins once per wait.
        """
        w = self._words[word]
        end = time.perf_counter() + _SPIN
        while w.value == seq and time.perf_counter() < end:
            pass
        return 1

    def _sleep(self, word: int, seq: int, deadline: float | None) -> None:
        """Sleep until ``word`` moves past ``seq``, the deadline, or the safety slice."""
        slice_ = _SAFETY_SLICE
        if deadline is not None:
            slice_ = min(slice_, deadline - time.monotonic())
            if slice_ <= 0:
                return
        if _futex.AVAILABLE:
            _futex.wait(self._addr[word], seq, slice_)
        else:
            time.sleep(min(slice_, 0.001))

    def _wait_change(self, word: int, seq: int, timeout: float | None) -> None:
        """Register as a waiter on ``word`` and sleep until it changes (for AsyncQueue)."""
        self._lock()
        try:
            if self._seq(word) != seq:
                return
            self._register(word, +1)
        finally:
            self._unlock()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._sleep(word, seq, deadline)
        finally:
            self._deregister(word)

    # --- encoding -------------------------------------------------------------------

    def _encode(self, item: Any) -> tuple[int, list[Any]]:
        if not self._pickle:
            return K_SERIALIZED, [self._ser.dumps(item)]
        cls = type(item)
        if cls is bytes:
            return K_BYTES, [item]
        if cls is bytearray:
            return K_BYTEARRAY, [item]
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buf: pickle.PickleBuffer) -> bool:
            if buf.raw().nbytes >= _OOB_MIN:
                buffers.append(buf)
                return False
            return True

        data = pickle.dumps(item, protocol=5, buffer_callback=out_of_band)
        if not buffers:
            return K_PICKLE, [data]
        raws = [b.raw() for b in buffers]
        head = struct.pack(f"<IQ{len(raws)}Q", len(raws), len(data), *(r.nbytes for r in raws))
        return K_PICKLE_OOB, [head, data, *raws]

    def _decode(self, kind: int, payload: Any) -> Any:
        """The item; ``DecodeError`` (holding the raw bytes) if the serializer cannot
        read it: the item has left the queue, and travels in the exception."""
        try:
            return self._decode_raw(kind, payload)
        except MemoryError:  # the process's trouble, not the item's
            raise
        except Exception as exc:
            name = str(getattr(self._ser, "name", type(self._ser).__name__))
            raise DecodeError(
                f"local queue: an item cannot be decoded with serializer={name!r} ({exc}); "
                "its bytes are in this exception's .raw (a local queue has no dead-letter "
                "queue)",
                raw=bytes(payload),
                queue=self._path,
                serializer=name,
            ) from exc

    def _decode_raw(self, kind: int, payload: Any) -> Any:
        if kind in (K_HEADERS, K_OPTIONS):
            kind, payload, _, _ = unwrap(kind, payload)
        if kind == K_BYTES:
            return bytes(payload)
        if kind == K_BYTEARRAY:
            return payload if isinstance(payload, bytearray) else bytearray(payload)
        if kind == K_PICKLE:
            return pickle.loads(payload)
        if kind == K_PICKLE_OOB:
            view = memoryview(payload)
            n, plen = struct.unpack_from("<IQ", view, 0)
            sizes = struct.unpack_from(f"<{n}Q", view, 12)
            at = 12 + 8 * n
            data = view[at : at + plen]
            at += plen
            bufs = []
            for size in sizes:
                bufs.append(view[at : at + size])
                at += size
            return pickle.loads(data, buffers=bufs)
        return self._ser.loads(bytes(payload))

    # --- the queue operations ---------------------------------------------------------

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @property
    def options(self) -> QueueOptions:
        """The options of this handle (a local queue has no lease and no URL)."""
        return QueueOptions(self.maxsize, self._serializer_spec, dedup_window=self._dedup_window)

    def put(
        self,
        item: T,
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if (
            delay is not None
            or ttl is not None
            or dedup_id is not None
            or priority is not None
            or headers
            or (_otel._api is not False and _otel.tracing())
        ):
            self._put_with_options(
                item, block, timeout, put_options(delay, ttl, dedup_id, priority, headers)
            )
            return
        parts: list[Any]
        if type(item) is bytes and self._pickle:
            kind, parts = K_BYTES, [item]
        else:
            kind, parts = self._encode(item)
        if len(parts) == 1 and (timeout is None or timeout >= 0):
            if C is None:
                if self._put_fast(kind, parts[0]):
                    return
            else:
                if self._closed or self._gen != fork_generation[0]:
                    self._check()
                if self._cfd < 0:  # the mutex excludes this process's threads too
                    done = C.put(self._ctrl_addr, self._mapped, -1, parts[0], kind, self._maxsize)
                else:
                    with self._tlock:
                        self._check()  # closed while we waited: its descriptor is gone
                        done = C.put(self._ctrl_addr, self._mapped, self._cfd, parts[0], kind,
                                      self._maxsize)  # fmt: skip
                if done >= 0:
                    if done:
                        self._wake(PUT_SEQ)
                    return
        self._put([(kind, parts)], block, timeout)

    def _put_fast(self, kind: int, payload: bytes) -> bool:
        """The common put in one locked section: room after the tail of an unwrapped ring,
        no wait, no growth. False: nothing done, take the general path."""
        n = len(payload)
        size = _ring.HEADER_SIZE + ((n + 7) & -8)
        wake = 0
        self._lock()
        try:
            ctrl = self._ctrl
            idx = ctrl[OFF_INDEX]
            head, tail, count, unfinished, cap, special, tombs, flags, _ = unpack_state(
                ctrl, OFF_SLOTS + 64 * idx
            )
            if flags & SHUTDOWN:
                return False
            data = self._data
            if data is None or cap != self._cap or (self._maxsize and count >= self._maxsize):
                return False
            if tombs and self._maxsize:
                return False
            if count == 0:
                head = tail = 0
            elif tail <= head:  # wrapped
                return False
            if cap - tail < size:
                return False
            data[tail + 8 : tail + 8 + n] = payload
            pack_header(data, tail, n, kind, 1)
            pack_state(
                ctrl, OFF_SLOTS + 64 * (idx ^ 1), head, tail + size, count + 1, unfinished + 1,
                cap, special, tombs, flags, 0,
            )  # fmt: skip
            self._publish(idx ^ 1)
            self._words[PUT_SEQ].value += 1
            wake = U32.unpack_from(ctrl, WAITERS[PUT_SEQ])[0]
        finally:
            self._unlock()
        if wake:
            self._wake(PUT_SEQ)
        return True

    def put_many(
        self,
        items: Iterable[T],
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str] | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if (
            delay is not None
            or ttl is not None
            or dedup_ids is not None
            or priority is not None
            or headers
            or (_otel._api is not False and _otel.tracing())
        ):
            batch = list(items)
            opts = put_options(delay, ttl, None, priority, headers)
            ids = check_dedup_ids(dedup_ids, len(batch))
            self._put_many_with_options(batch, block, timeout, opts, ids)
            return
        encode = self._encode
        if self._pickle:
            records = [(K_BYTES, [x]) if type(x) is bytes else encode(x) for x in items]
        else:
            records = [encode(x) for x in items]
        if self._maxsize and len(records) > self._maxsize:
            raise ValueError(
                f"put_many of {len(records)} items can never fit in maxsize={self._maxsize}; "
                "split the batch"
            )
        if not records:
            return
        if C is not None and (timeout is None or timeout >= 0):
            if self._closed or self._gen != fork_generation[0]:
                self._check()
            if self._cfd < 0:
                done = C.put_many(self._ctrl_addr, self._mapped, -1, records, self._maxsize)
            else:
                with self._tlock:
                    self._check()
                    done = C.put_many(self._ctrl_addr, self._mapped, self._cfd, records,
                                       self._maxsize)  # fmt: skip
            if done >= 0:
                if done:
                    self._wake(PUT_SEQ)
                return
        self._put(records, block, timeout)

    def _records(self, items: list[T], opts: PutOptions | None) -> list[tuple[int, list[Any]]]:
        records = [self._encode(x) for x in items]
        if opts is None:
            return records
        if opts.priority or opts.delay or opts.ttl:
            now = host_clock()
            return [with_options(r, opts, now) for r in records]
        if opts.headers:
            return [wrap(r, opts.headers) for r in records]
        return records

    def _put_with_options(
        self,
        item: T,
        block: bool,
        timeout: float | None,
        opts: PutOptions | None,
        lock_wait: float | None = None,
    ) -> None:
        if opts is not None and opts.dedup_id:
            self._put_deduplicated([item], [opts.dedup_id], block, timeout, opts, lock_wait)
            return
        self._put(self._records([item], opts), block, timeout)

    def _put_many_with_options(
        self,
        items: list[T],
        block: bool,
        timeout: float | None,
        opts: PutOptions | None,
        dedup_ids: list[str] | None,
        lock_wait: float | None = None,
    ) -> None:
        if self._maxsize and len(items) > self._maxsize:
            raise ValueError(
                f"put_many of {len(items)} items can never fit in maxsize={self._maxsize}; "
                "split the batch"
            )
        if dedup_ids is not None:
            self._put_deduplicated(items, dedup_ids, block, timeout, opts, lock_wait)
        elif items:
            self._put(self._records(items, opts), block, timeout)

    def _try_put(self, item: T, **options: Any) -> None:
        """``put(item, block=False, **options)`` that does not wait for the table of
        dedup ids either (``DedupBusy``): for the asyncio face, which must never block."""
        if options.get("dedup_id") is None:
            self.put(item, block=False, **options)
            return
        self._put_with_options(item, False, None, put_options(**options), lock_wait=0.0)

    def _try_put_many(self, items: list[T], **options: Any) -> None:
        """``put_many`` as ``_try_put`` puts one item."""
        dedup_ids = options.pop("dedup_ids", None)
        if dedup_ids is None:
            self.put_many(items, block=False, **options)
            return
        opts = put_options(dedup_id=None, **options)
        ids = check_dedup_ids(dedup_ids, len(items))
        self._put_many_with_options(items, False, None, opts, ids, lock_wait=0.0)

    def _put_deduplicated(
        self,
        items: list[T],
        dedup_ids: list[str],
        block: bool,
        timeout: float | None,
        opts: PutOptions | None,
        lock_wait: float | None = None,
    ) -> None:
        """Put the items whose dedup id the queue does not remember, and remember them
        (see ``dedup.py``): one short transaction that puts without waiting, and waits for
        room outside it. ``lock_wait``: how long to wait for the table's lock (None: the
        call's deadline, or as long as it takes)."""
        deadline: float | None = None
        if timeout is not None and block:
            deadline = deadline_from(block, timeout)
        table = self._dedup_table()
        while True:
            seq = self._seq(GET_SEQ)  # read before trying: no get can slip between
            wait = lock_wait
            if wait is None and deadline is not None:
                wait = max(0.0, deadline - time.monotonic())
            try:
                with table.transaction(wait):
                    now = host_clock()
                    new = table.remember(dedup_ids, now, self._dedup_window)
                    fresh = [item for item, is_new in zip(items, new, strict=True) if is_new]
                    if fresh:
                        self._put(self._records(fresh, opts), False, None)
                    elif self._state().flags & SHUTDOWN:  # a repeat is refused alike
                        raise ShutDown("the queue was shut down; put refused")
                return
            except DedupBusy:
                if lock_wait is not None:
                    raise
                raise Full(
                    f"put timed out after {timeout} s: the local queue's table of dedup ids "
                    "stayed locked by another put"
                ) from None
            except Full:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._wait_change(GET_SEQ, seq, left)

    def _dedup_table(self) -> DedupTable:
        """This handle's table of dedup ids (made at the first put with an id)."""
        self._check()
        if self._dedup is None:
            self._dedup = DedupTable(self._path + DEDUP_SUFFIX)
        return self._dedup

    def _put(
        self,
        records: list[tuple[int, list[Any]]],
        block: bool,
        timeout: float | None,
        deliveries: int = 1,
        requeue: bool = False,
    ) -> None:
        """Write ``records`` at the tail. A ``requeue`` (a nacked message going back) never
        waits for room and is not counted again for ``join``: it was counted when it was
        first put, and it may take the queue past ``maxsize`` (the rule of every backend:
        a message taken for processing keeps its place; see docs/local.md)."""
        deadline: float | None = None
        if timeout is not None and block:
            deadline = deadline_from(block, timeout)
        waiting = False
        spins = 0
        may_grow = False
        patience: int | None = None  # GET_SEQ when this put last let readers make room
        try:
            while True:
                self._lock()
                try:
                    if waiting:
                        self._register(GET_SEQ, -1)
                        waiting = False
                    st = self._state()
                    if st.flags & SHUTDOWN and not (requeue and not st.flags & IMMEDIATE):
                        raise ShutDown("the queue was shut down; put refused")
                    seq = self._seq(GET_SEQ)
                    if patience is not None:  # no reader made room meanwhile: grow
                        may_grow = may_grow or seq == patience
                        patience = None
                    until = deadline
                    held = st.count - st.tombs
                    if self._maxsize and held + len(records) > self._maxsize and not requeue:
                        if not block or (deadline is not None and time.monotonic() >= deadline):
                            raise Full(f"queue is full ({held} of maxsize={self._maxsize})")
                    elif self._write(
                        st, records, deliveries, may_grow or st.capacity < _FREE_GROWTH
                    ):
                        if not requeue:
                            st.unfinished += len(records)
                        self._commit(st)
                        wake = self._bump(PUT_SEQ)
                        break
                    else:
                        # The ring is full of unread items. If a reader is draining it, let
                        # it make room rather than growing the shared memory by the backlog.
                        patience = seq
                        until = time.monotonic() + _GROWTH_PATIENCE
                        spins = 1
                    if spins:
                        self._register(GET_SEQ, +1)
                        waiting = True
                finally:
                    self._unlock()
                if spins:
                    self._sleep(GET_SEQ, seq, until)
                else:
                    spins = self._spin(GET_SEQ, seq)
        finally:
            if waiting:
                self._deregister(GET_SEQ)
        if wake:
            self._wake(PUT_SEQ)

    def _write(
        self, st: _ring.RingState, records: list[tuple[int, list[Any]]], d: int, may_grow: bool
    ) -> bool:
        """Write ``records`` after ``st.tail`` (all of them, or ``st`` is left as it was);
        False if there is no room and growing is not allowed yet.

        Only free space is written. Growing moves a wrapped ring's upper part past the old
        capacity and commits that relocated ring (the same items) before anything is
        written into the room it made, which held the old upper part: a writer that dies
        then leaves a consistent ring, never a torn record under a committed state."""
        base = dataclasses.replace(st)
        data = self._data
        if data is None or st.capacity != self._cap:
            data = self._map_data(st.capacity)
        while not self._fill(data, st, records, d):
            _restore(st, base)
            if not may_grow:
                return False
            need = sum(_ring.record_size(_length(parts)) for _, parts in records)
            data = self._grow(st, need)
            base = dataclasses.replace(st)
        return True

    @staticmethod
    def _fill(
        data: mmap.mmap, st: _ring.RingState, records: list[tuple[int, list[Any]]], d: int
    ) -> bool:
        """Write each record into the free space after ``st.tail``; False at the first
        that does not fit (what was written stays free space: ``st`` is not committed)."""
        for kind, parts in records:
            pos = _ring.reserve(data, st, _length(parts))
            if pos is None:
                return False
            _ring.write(data, pos, kind, d, parts)
            if kind == K_OPTIONS:
                st.special += 1
        return True

    def _grow(self, st: _ring.RingState, need: int) -> mmap.mmap:
        """Grow the ring so that ``need`` more bytes of records fit, and commit it."""
        new_cap = _ring.grown_capacity(st, need)
        os.ftruncate(self._fd, PAGE + new_cap)
        if hasattr(os, "posix_fallocate"):
            # Reserve the pages now: running out of /dev/shm later would be a SIGBUS.
            os.posix_fallocate(self._fd, PAGE + st.capacity, new_cap - st.capacity)
        data = self._map_data(new_cap)
        _ring.relocate(data, st, new_cap)
        self._commit(st)
        return data

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        if timeout is None or timeout >= 0:
            if C is None:
                got = self._get_fast()
                if got is not None:
                    return self._decode(got[0], got[1])  # type: ignore[no-any-return]
            else:
                if self._closed or self._gen != fork_generation[0]:
                    self._check()
                if self._cfd < 0:
                    taken = C.get(self._ctrl_addr, self._mapped, -1)
                else:
                    with self._tlock:
                        self._check()
                        taken = C.get(self._ctrl_addr, self._mapped, self._cfd)
                if taken is not None:
                    kind, payload, wake = taken
                    if wake:
                        self._wake(GET_SEQ)
                    return self._decode(kind, payload)  # type: ignore[no-any-return]
        kind, _, payload = self._take(1, block, timeout)[0]
        return self._decode(kind, payload)  # type: ignore[no-any-return]

    def _get_fast(self) -> tuple[int, bytes] | None:
        """The common get in one locked section: an item is there, stored as bytes.
        None: nothing done, take the general path."""
        wake = 0
        self._lock()
        try:
            ctrl = self._ctrl
            idx = ctrl[OFF_INDEX]
            head, tail, count, unfinished, cap, special, tombs, flags, _ = unpack_state(
                ctrl, OFF_SLOTS + 64 * idx
            )
            data = self._data
            if not count or data is None or cap != self._cap or special or tombs:
                return None
            pos = head if cap - head >= _ring.HEADER_SIZE else 0
            length, kind, _ = unpack_header(data, pos)
            if kind == _ring.WRAP:
                pos = 0
                length, kind, _ = unpack_header(data, 0)
            if kind not in COPY_AS_BYTES:
                return None
            payload = data[pos + 8 : pos + 8 + length]
            count -= 1
            head = pos + _ring.HEADER_SIZE + ((length + 7) & -8) if count else 0
            pack_state(
                ctrl, OFF_SLOTS + 64 * (idx ^ 1), head, tail if count else 0, count,
                unfinished, cap, 0, 0, flags, 0,
            )  # fmt: skip
            self._publish(idx ^ 1)
            self._words[GET_SEQ].value += 1
            wake = U32.unpack_from(ctrl, WAITERS[GET_SEQ])[0]
        finally:
            self._unlock()
        if wake:
            self._wake(GET_SEQ)
        return kind, payload

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, not {max_items!r}")
        taken = self._take(max_items, block, timeout)
        if self._pickle:
            try:  # the common case in one comprehension
                return [p if k == K_BYTES else self._decode_raw(k, p) for k, _, p in taken]
            except Exception:  # decoded again below, one at a time
                pass
        out: list[T] = []
        for i, (k, _, p) in enumerate(taken):
            try:
                out.append(self._decode(k, p))
            except DecodeError:
                # the rest of the batch goes back (at the tail); the bad one travels in
                # the exception
                for item in out:
                    self._requeue(item, 1)
                for k2, d2, p2 in taken[i + 1 :]:
                    self._put([(k2, [p2])], True, None, d2, requeue=True)
                raise
        return out

    def _take(
        self, max_items: int, block: bool, timeout: float | None
    ) -> list[tuple[int, int, Any]]:
        deadline: float | None = None
        if timeout is not None and block:
            deadline = deadline_from(block, timeout)
        waiting = False
        spins = 0
        try:
            while True:
                if C is not None and not waiting:
                    got = self._take_fast(max_items)
                    if got is not None:
                        return got
                self._lock()
                try:
                    if waiting:
                        self._register(PUT_SEQ, -1)
                        waiting = False
                    st = self._state()
                    due: float | None = None  # when a delayed message comes due (monotonic)
                    if st.special or st.tombs:
                        before = (st.count, st.special)
                        out, marks, due, more = self._take_special(st, max_items)
                        changed = out or marks or (st.count, st.special) != before
                        if changed:
                            self._commit(st, marks)
                            wake = self._bump(GET_SEQ)
                        if out:
                            break
                        if changed:  # expired ones were dropped: room for blocked putters
                            if wake:
                                self._wake(GET_SEQ)
                            if more:  # more expired ones than one commit can mark
                                continue
                    elif st.count:
                        out = self._read(st, max_items)
                        self._commit(st)
                        wake = self._bump(GET_SEQ)
                        break
                    if st.flags & SHUTDOWN and st.count == st.tombs:
                        raise ShutDown("the queue was shut down and is drained")
                    self._due = due
                    if not block or (deadline is not None and time.monotonic() >= deadline):
                        raise Empty("queue is empty" if due is None else "nothing is due yet")
                    seq = self._seq(PUT_SEQ)
                    if spins:
                        self._register(PUT_SEQ, +1)
                        waiting = True
                finally:
                    self._unlock()
                if due is not None and (deadline is None or due < deadline):
                    until: float | None = due
                else:
                    until = deadline
                if spins:
                    self._sleep(PUT_SEQ, seq, until)
                else:
                    spins = self._spin(PUT_SEQ, seq)
        finally:
            if waiting:
                self._deregister(PUT_SEQ)
        if wake:
            self._wake(GET_SEQ)
        return out

    def _take_fast(self, max_items: int) -> list[tuple[int, int, Any]] | None:
        """The C path's take; None: take the Python path."""
        if self._closed or self._gen != fork_generation[0]:
            self._check()
        if self._cfd < 0:
            got = C.take(self._ctrl_addr, self._mapped, -1, max_items)
        else:
            with self._tlock:
                self._check()
                got = C.take(self._ctrl_addr, self._mapped, self._cfd, max_items)
        if got is None:
            return None
        if got[1]:
            self._wake(GET_SEQ)
        return got[0]  # type: ignore[no-any-return]

    def _take_special(
        self, st: _ring.RingState, max_items: int
    ) -> tuple[list[tuple[int, int, Any]], list[int], float | None, bool]:
        """Plan a take while the ring holds records with options or tombstones, changing
        only ``st``: up to ``max_items`` records by priority (higher first; ring order -
        put order - within one), skipping those not due yet and dropping expired ones.

        Returns the records taken, the marks the commit must write (the headers of
        records taken or dropped that the head did not pass: they become tombstones,
        ``K_TAKEN``, skipped until the head passes them), when the next delayed record
        comes due (monotonic, or None), and whether expired records were left for
        another commit (at most ``MAX_MARKS`` marks go in one).

        Nothing in the ring is written here: the change becomes visible with the commit,
        whole (``_commit``). One walk over the waiting records: O(n) per call, the price
        of one shared ring (pigeon:// keeps heaps and lanes)."""
        data = self._data
        if data is None or st.capacity != self._cap:
            data = self._map_data(st.capacity)
        now = host_clock()
        max_items = min(max_items, MAX_MARKS)
        walk = _ring.RingState(st.head, st.tail, st.count, st.capacity)
        records: list[tuple[int, int, int, int, int]] = []  # at, kind, deliveries, length, fate
        ready: list[tuple[int, int]] = []  # (-priority, index) of the records due
        next_due: float | None = None
        while walk.count:
            kind, deliveries, at, length = _ring.next_record(data, walk)
            fate = _LIVE
            if kind == K_TAKEN:
                fate = _TOMB
            elif kind == K_OPTIONS:
                _, _, priority, due, expires = OPTS.unpack_from(data, at)
                if 0 < expires <= now:  # not taken in time: dropped (no dead letters)
                    fate = _EXPIRED
                elif due > now:
                    next_due = due if next_due is None else min(next_due, due)
                else:
                    ready.append((-priority, len(records)))
            else:
                ready.append((0, len(records)))
            records.append((at, kind, deliveries, length, fate))
        chosen = [i for _, i in heapq.nsmallest(max_items, ready)]
        out: list[tuple[int, int, Any]] = []
        for i in chosen:
            at, kind, deliveries, length, _ = records[i]
            payload: Any = (
                data[at : at + length]
                if kind in COPY_AS_BYTES
                else bytearray(data[at : at + length])
            )
            out.append((kind, deliveries, payload))
            records[i] = (at, kind, deliveries, length, _TAKEN)
        # the head passes what leads the ring and is gone: tombstones, taken, expired
        passed = 0
        for _, kind, _, _, fate in records:
            if fate == _LIVE:
                break
            _ring.next_record(data, st)
            passed += 1
            if fate == _TOMB:
                st.tombs -= 1
            else:
                self._gone(st, kind, fate)
        # the rest of the taken and expired ones become tombstones, the taken ones first
        behind = records[passed:]
        taken = [r for r in behind if r[4] == _TAKEN]
        expired = [r for r in behind if r[4] == _EXPIRED]
        room = MAX_MARKS - len(taken)
        marks: list[int] = []
        for at, kind, _, _, fate in taken + expired[:room]:
            marks.append(at - _ring.HEADER_SIZE)
            st.tombs += 1
            self._gone(st, kind, fate)
        more = len(expired) > room
        if next_due is None:
            return out, marks, None, more
        return out, marks, time.monotonic() + max(0.0, next_due - now), more

    def _gone(self, st: _ring.RingState, kind: int, fate: int) -> None:
        """Count a record taken or dropped out of ``st``."""
        if kind == K_OPTIONS:
            st.special -= 1
        if fate == _EXPIRED:
            st.unfinished = max(0, st.unfinished - 1)
            self.expired += 1

    def _read(self, st: _ring.RingState, max_items: int) -> list[tuple[int, int, Any]]:
        data = self._data
        if data is None or st.capacity != self._cap:
            data = self._map_data(st.capacity)
        out = []
        for _ in range(min(max_items, st.count)):
            kind, deliveries, at, length = _ring.next_record(data, st)
            if kind in COPY_AS_BYTES:
                payload: Any = data[at : at + length]  # one copy, into a new bytes
            else:
                payload = bytearray(length)
                with memoryview(data) as view:
                    payload[:] = view[at : at + length]
            out.append((kind, deliveries, payload))
        return out

    def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> LocalMessage[T]:
        """Take the next item as a message; ``lease`` is accepted for the contract's sake
        and has no effect here: a local message is never redelivered on its own."""
        kind, deliveries, payload = self._take(1, True, timeout)[0]
        headers: dict[str, str] = {}
        priority = 0
        if kind in (K_HEADERS, K_OPTIONS):
            kind, payload, headers, priority = unwrap(kind, payload)
        return LocalMessage(self, self._decode(kind, payload), deliveries, headers, priority)

    def _next_due(self) -> float | None:
        """When the delayed message the last take of this handle saw comes due
        (monotonic), or None."""
        return self._due

    def qsize(self) -> int:
        self._check()
        st = self._state()
        return st.count - st.tombs

    def task_done(self) -> None:
        self._lock()
        try:
            st = self._state()
            if st.unfinished <= 0:
                raise ValueError("task_done() called more times than there were items")
            st.unfinished -= 1
            self._commit(st)
            wake = st.unfinished == 0 and self._bump(JOIN_SEQ)
        finally:
            self._unlock()
        if wake:
            self._wake(JOIN_SEQ)

    def join(self, timeout: float | None = None) -> None:
        deadline = deadline_from(True, timeout)
        waiting = False
        try:
            while True:
                self._lock()
                try:
                    if waiting:
                        self._register(JOIN_SEQ, -1)
                        waiting = False
                    unfinished = self._state().unfinished
                    if unfinished == 0:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"join timed out with {unfinished} tasks unfinished")
                    seq = self._seq(JOIN_SEQ)
                    self._register(JOIN_SEQ, +1)
                    waiting = True
                finally:
                    self._unlock()
                self._sleep(JOIN_SEQ, seq, deadline)
        finally:
            if waiting:
                self._deregister(JOIN_SEQ)

    def shutdown(self, immediate: bool = False) -> None:
        self._lock()
        try:
            st = self._state()
            st.flags |= SHUTDOWN | (IMMEDIATE if immediate else 0)
            if immediate:  # the flags and the dropped items in one commit
                st.unfinished = max(0, st.unfinished - (st.count - st.tombs))
                st.count = st.head = st.tail = st.special = st.tombs = 0
            self._commit(st)
            for word in (PUT_SEQ, GET_SEQ, JOIN_SEQ):
                self._bump(word)
        finally:
            self._unlock()
        for word in (PUT_SEQ, GET_SEQ, JOIN_SEQ):
            self._wake(word)

    def _requeue(
        self,
        item: T,
        deliveries: int,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Give a taken item back to the ring: it keeps its priority and headers, not its
        ttl; ``delay`` makes it due that many seconds from now, in the ring itself."""
        record = self._encode(item)
        if priority or delay:
            opts = PutOptions(delay=delay, priority=priority, headers=headers or {})
            record = with_options(record, opts, host_clock())
        elif headers:
            record = wrap(record, headers)
        self._put([record], True, None, min(deliveries, 0xFFFF), requeue=True)

    def close(self) -> None:
        """Release this handle: its descriptor at once (and, for the creator, the file).

        Other threads of this process may be inside a call on this handle - waiting for
        the lock with the GIL released, or sleeping on a futex word of the control page -
        so the mappings are not unmapped here: they go with the handle object, which
        every such call holds (no thread can touch unmapped memory). Those threads get
        ``ClosedResourceError`` the next time they take the lock or wake up; the ones
        counted as waiters in the shared control page are counted out here, as they will
        not be able to do it themselves.
        """
        if self._closed:
            return
        if self._gen != fork_generation[0]:
            self._after_fork()
        # no thread of this process is inside a locked section while the descriptor goes
        # (one could be about to flock it, or to grow the mapping from it)
        try:
            self._lock()
        except ClosedResourceError:
            return  # another thread closed it meanwhile
        try:
            self._closed = True
            for word, n in self._registered.items():
                if n > 0:
                    self._register(word, -n)
            if self._dedup is not None:
                self._dedup.close()
            if self._finalizer is not None:
                self._finalizer()  # closes the descriptor (and, for its creator, the file)
        finally:
            if self._mutex:
                self._mx.unlock(self._mutex_addr)  # type: ignore[union-attr]
            else:  # (the descriptor went, and its flock with it)
                self._tlock.release()
        for word in (PUT_SEQ, GET_SEQ, JOIN_SEQ):  # sleepers wake and see it closed
            self._wake(word)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"qsize={self.qsize()}"
        return f"<pigeon.Queue local maxsize={self._maxsize} {state}>"


def _length(parts: list[Any]) -> int:
    if len(parts) == 1:
        return len(parts[0])
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def _restore(st: _ring.RingState, saved: _ring.RingState) -> None:
    for name in _ring.RingState.__slots__:
        setattr(st, name, getattr(saved, name))


def _attach(
    path: str, serializer: SerializerLike, dedup_window: float = DEFAULT_DEDUP_WINDOW
) -> LocalQueue[Any]:
    return LocalQueue(serializer=serializer, dedup_window=dedup_window, _path=path)


def _check_window(value: Any) -> float:
    bad = seconds_problem("dedup_window", value, nil=False)
    if bad:
        raise ValueError(bad)
    return float(value)


class LocalMessage(Message[T]):
    """A message taken from a local queue.

    The item has left the queue when you get it. ``ack()`` just marks it settled;
    ``nack(requeue=True, delay=0)`` puts it back at the tail with ``delivery_count + 1``,
    at once: with a ``delay`` it waits in the shared ring until it comes due, seen by
    every process (``qsize`` counts it) and kept when this process exits. ``extend()``
    does nothing: local messages have no lease.
    """

    def __init__(
        self,
        queue: LocalQueue[T],
        body: T,
        delivery_count: int,
        headers: dict[str, str] | None = None,
        priority: int = 0,
    ) -> None:
        self._queue = queue
        self.body = body
        self.delivery_count = delivery_count
        self.headers: dict[str, str] = headers if headers is not None else {}
        self._priority = priority
        self._settled = False

    def _settle(self) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        self._settled = True

    def ack(self) -> None:
        self._settle()

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> None:
        bad = seconds_problem("delay", delay, nil=False)
        if bad:
            raise ValueError(bad)
        self._settle()
        if requeue:
            self._queue._requeue(
                self.body, self.delivery_count + 1, self.headers, self._priority, float(delay)
            )

    def extend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
