"""The local queue's operations: ``LocalQueue`` (see the package's docstring for what it
offers and how). The shared file, its lock and its commits are ``shared.py``'s; waiting is
``waits.py``'s; what a take picks is ``pick.py``'s; records are ``codec.py``'s."""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pigeon import _otel
from pigeon._queue_base import Queue, deadline_from
from pigeon.backends.local import ring, tracker
from pigeon.backends.local.codec import decode, encode, unwrap, with_options, wrap
from pigeon.backends.local.dedup import DedupBusy, DedupTable
from pigeon.backends.local.layout import (
    COPY_AS_BYTES,
    DEDUP_SUFFIX,
    GET_SEQ,
    IMMEDIATE,
    JOIN_SEQ,
    K_BYTES,
    K_HEADERS,
    K_OPTIONS,
    OFF_INDEX,
    OFF_SLOTS,
    PAGE,
    PUT_SEQ,
    SHUTDOWN,
    U32,
    WAITERS,
    host_clock,
    pack_header,
    pack_state,
    unpack_header,
    unpack_state,
)
from pigeon.backends.local.lock import C, fork_generation, release
from pigeon.backends.local.message import LocalMessage
from pigeon.backends.local.pick import pick, read
from pigeon.backends.local.waits import Waits
from pigeon.errors import ClosedResourceError, DecodeError, Empty, Full, ShutDown, Unsupported
from pigeon.options import QueueOptions, check_dedup_ids, put_options
from pigeon.protocol.messages import PutOptions
from pigeon.protocol.rules import DEFAULT_DEDUP_WINDOW
from pigeon.serializers import Pickle, SerializerLike, get_serializer

T = TypeVar("T")

__all__ = ["LocalMessage", "LocalQueue"]

# A ring smaller than this grows at once when full; a larger one first gives readers
# _GROWTH_PATIENCE seconds to make room, so a streaming producer does not grow it by
# its whole lead over the readers (growing means new zeroed pages of shared memory).
_FREE_GROWTH = 16 * 2**20
_GROWTH_PATIENCE = 0.002  # seconds: the longest a waiter sleeps before re-checking
_DEFAULT_CAPACITY = 1 * 2**20


class LocalQueue(Waits, Queue[T]):
    """A queue in shared memory for the threads and processes of one host."""

    def __init__(
        self,
        url: None = None,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
        *,
        capacity: int = _DEFAULT_CAPACITY,
        dedup_window: float | None = None,
        _path: str | None = None,
    ) -> None:
        if url is not None:
            raise TypeError(
                f"the first argument of pigeon.Queue is a URL, not {url!r}; "
                f"for a local queue with a capacity write pigeon.Queue(maxsize={url!r})"
            )
        opts = QueueOptions.from_url(None, maxsize, serializer, dedup_window=dedup_window)
        self._serializer_spec = opts.serializer
        self._ser = get_serializer(opts.serializer)
        self._pickle = isinstance(self._ser, Pickle)
        self._closed = False
        self.expired = 0  # messages past their ttl this handle found and dropped
        self._due: float | None = None  # when the next delayed message comes due (a hint)
        # a handle's own (kept when it is pickled): the default when none is given
        self._dedup_window = (
            DEFAULT_DEDUP_WINDOW if opts.dedup_window is None else opts.dedup_window
        )
        self._dedup: DedupTable | None = None  # made by the first put with an id
        self._finalizer = None
        self._creator = _path is None
        if _path is None:
            self._path = self._create(opts.maxsize, max(PAGE, capacity))
            tracker.register(self._path)
        else:
            self._path = _path
        try:
            self._open()
        except BaseException:
            if self._creator:
                release(-1, self._path, os.getpid())
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        self._check()
        return (_attach, (self._path, self._serializer_spec, self._dedup_window))

    # --- encoding -------------------------------------------------------------------

    def _encode(self, item: Any) -> tuple[int, list[Any]]:
        return encode(item, self._ser, self._pickle)

    def _decode(self, kind: int, payload: Any) -> Any:
        """The item; ``DecodeError`` (holding the raw bytes) if the serializer cannot
        read it: the item has left the queue, and travels in the exception."""
        try:
            return decode(kind, payload, self._ser)
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
        return decode(kind, payload, self._ser)

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
        size = ring.HEADER_SIZE + ((n + 7) & -8)
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
        self, st: ring.RingState, records: list[tuple[int, list[Any]]], d: int, may_grow: bool
    ) -> bool:
        """Write ``records`` after ``st.tail`` (all of them, or ``st`` is left as it was);
        False if there is no room and growing is not allowed yet.

        Only free space is written. Growing moves a wrapped ring's upper part past the old
        capacity and commits that relocated ring (the same items) before anything is
        written into the room it made, which held the old upper part: a writer that dies
        then leaves a consistent ring, never a torn record under a committed state."""
        base = dataclasses.replace(st)
        data = self._mapping(st)
        while not self._fill(data, st, records, d):
            _restore(st, base)
            if not may_grow:
                return False
            need = sum(ring.record_size(_length(parts)) for _, parts in records)
            data = self._grow(st, need)
            base = dataclasses.replace(st)
        return True

    @staticmethod
    def _fill(
        data: mmap.mmap, st: ring.RingState, records: list[tuple[int, list[Any]]], d: int
    ) -> bool:
        """Write each record into the free space after ``st.tail``; False at the first
        that does not fit (what was written stays free space: ``st`` is not committed)."""
        for kind, parts in records:
            pos = ring.reserve(data, st, _length(parts))
            if pos is None:
                return False
            ring.write(data, pos, kind, d, parts)
            if kind == K_OPTIONS:
                st.special += 1
        return True

    def _grow(self, st: ring.RingState, need: int) -> mmap.mmap:
        """Grow the ring so that ``need`` more bytes of records fit, and commit it."""
        new_cap = ring.grown_capacity(st, need)
        os.ftruncate(self._fd, PAGE + new_cap)
        if hasattr(os, "posix_fallocate"):
            # Reserve the pages now: running out of /dev/shm later would be a SIGBUS.
            os.posix_fallocate(self._fd, PAGE + st.capacity, new_cap - st.capacity)
        data = self._map_data(new_cap)
        ring.relocate(data, st, new_cap)
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
            pos = head if cap - head >= ring.HEADER_SIZE else 0
            length, kind, _ = unpack_header(data, pos)
            if kind == ring.WRAP:
                pos = 0
                length, kind, _ = unpack_header(data, 0)
            if kind not in COPY_AS_BYTES:
                return None
            payload = data[pos + 8 : pos + 8 + length]
            count -= 1
            head = pos + ring.HEADER_SIZE + ((length + 7) & -8) if count else 0
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
        self, st: ring.RingState, max_items: int
    ) -> tuple[list[tuple[int, int, Any]], list[int], float | None, bool]:
        """``pick.pick`` on this handle's mapping: the records taken, the marks to commit,
        when the next delayed record comes due (monotonic, or None), and whether expired
        records were left for another commit."""
        now = host_clock()
        got = pick(self._mapping(st), st, max_items, now)
        self.expired += got.expired
        if got.next_due is None:
            return got.records, got.marks, None, got.more
        return got.records, got.marks, time.monotonic() + max(0.0, got.next_due - now), got.more

    def _read(self, st: ring.RingState, max_items: int) -> list[tuple[int, int, Any]]:
        return read(self._mapping(st), st, max_items)

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

    # --- administration: none (see _no_admin) ------------------------------------------

    def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        raise _no_admin("peek", "there is no look without taking: get_many() takes what waits")

    def purge(self) -> int:
        raise _no_admin(
            "purge",
            "shutdown(immediate=True) drops what waits (and ends the queue for every handle)",
        )

    def delete(self) -> int:
        raise _no_admin("delete", "close its handles: its shared memory goes with them")

    def move_to(self, queue: str, limit: int | None = None) -> int:
        raise _no_admin("move_to", "take with get_many() and put_many() into the other queue")

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
        # No thread of this process is inside a locked section when it is marked closed
        # (one could be about to flock the descriptor, or to grow the mapping from it);
        # the ones that wait for the lock find it closed when they get it.
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
        finally:
            # Dropped before the descriptor goes: closing it would not drop a flock, as
            # the mappings hold duplicates of it (the same open file description).
            self._unlock()
        if self._finalizer is not None:
            self._finalizer()  # closes the descriptor (and, for its creator, the file)
        for word in (PUT_SEQ, GET_SEQ, JOIN_SEQ):  # sleepers wake and see it closed
            self._wake(word)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"qsize={self.qsize()}"
        return f"<pigeon.Queue local maxsize={self._maxsize} {state}>"


def _no_admin(call: str, instead: str) -> Unsupported:
    """A local queue has no administration: no server holds it and it has no name to
    reach it by, and a call that changes it for every process would need its own
    crash-safe steps in the shared ring (a held message is not even in the ring: only its
    taker has it)."""
    return Unsupported(
        f"a local queue has no {call}: peek, purge, delete and move_to (pigeon peek/purge/"
        "delete/move) are for a queue a server holds - pigeon://, redis://, nats://; on a "
        f"local queue, {instead}"
    )


def _length(parts: list[Any]) -> int:
    if len(parts) == 1:
        return len(parts[0])
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def _restore(st: ring.RingState, saved: ring.RingState) -> None:
    for name in ring.RingState.__slots__:
        setattr(st, name, getattr(saved, name))


def _attach(
    path: str, serializer: SerializerLike, dedup_window: float = DEFAULT_DEDUP_WINDOW
) -> LocalQueue[Any]:
    return LocalQueue(serializer=serializer, dedup_window=dedup_window, _path=path)
