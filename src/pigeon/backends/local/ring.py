"""A ring of variable-length records in a flat buffer: sans-IO, no locks, no waiting.

# Strategy:
# Records are ``[u32 length][u16 kind][u16 deliveries]`` followed by the payload, padded to
# 8 bytes, so every header is aligned and a reader never straddles the end. When a record
# does not fit before the end of the buffer, the writer leaves a WRAP marker (or, with
# fewer than 8 bytes left, nothing: a reader treats a short gap as a wrap) and writes at 0.
# ``count`` tells a full ring (head == tail, count > 0) from an empty one; an empty ring
# rewinds to 0 so records stay contiguous. Growing keeps offsets valid: a ring that is not
# wrapped just gains room at the end; a wrapped one moves its upper part
# [head, old_capacity) to the end of the new buffer, keeping its distance to the end, so
# the wrap marker (or short gap) it holds still means "continue at 0".
#
# The caller (``queue.py``, ``shared.py``) holds the lock and commits ``RingState``
# atomically after writing, so a writer killed mid-record leaves only free space behind.
# Nothing here writes outside the free space of the state the caller last committed, except
# ``relocate``'s target, which lies past the old capacity: the caller commits a relocated
# ring before it writes into the room growing made (part of it held the old upper part).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pigeon.framing._base import Buffer

if TYPE_CHECKING:
    import mmap

    Ring = bytearray | mmap.mmap

HEADER = struct.Struct("<IHH")
HEADER_SIZE = 8
WRAP = 0


def record_size(length: int) -> int:
    """Bytes a payload of ``length`` takes in the ring, header and padding included."""
    return HEADER_SIZE + ((length + 7) & ~7)


@dataclass(slots=True)
class RingState:
    head: int
    tail: int
    count: int
    capacity: int
    unfinished: int = 0  # the queue's task_done counter, committed with the ring
    special: int = 0  # records with a priority, delay or ttl (the local queue's options)
    tombs: int = 0  # records taken from the middle, still in the ring until the head passes
    flags: int = 0  # the local queue's SHUTDOWN | IMMEDIATE, committed with the ring
    marks: int = 0  # tombstones published but maybe not yet written (the intent area)

    @property
    def wrapped(self) -> bool:
        return self.count > 0 and self.tail <= self.head


def reserve(buf: Ring, st: RingState, length: int) -> int | None:
    """Find room for a payload of ``length``; return its record offset, or None if full.

    On success ``st.tail`` and ``st.count`` are advanced (and a WRAP marker written if
    needed); the caller then writes the record with ``write``.
    """
    rec = record_size(length)
    if st.count == 0:
        st.head = st.tail = 0
    if st.count and st.tail <= st.head:  # wrapped
        if st.head - st.tail < rec:
            return None
        pos = st.tail
    elif st.capacity - st.tail >= rec:
        pos = st.tail
    elif st.head >= rec:
        if st.capacity - st.tail >= HEADER_SIZE:
            HEADER.pack_into(buf, st.tail, 0, WRAP, 0)
        pos = 0
    else:
        return None
    st.tail = pos + rec
    st.count += 1
    return pos


def write(buf: Ring, pos: int, kind: int, deliveries: int, parts: Sequence[Buffer]) -> None:
    """Write a record at ``pos`` (from ``reserve``): header, then the parts back to back."""
    at = pos + HEADER_SIZE
    if len(parts) == 1 and type(parts[0]) is bytes:
        n = len(parts[0])
        buf[at : at + n] = parts[0]
        HEADER.pack_into(buf, pos, n, kind, deliveries)
        return
    with memoryview(buf) as view:
        for p in parts:
            n = len(p) if not isinstance(p, memoryview) else p.nbytes
            view[at : at + n] = p
            at += n
    HEADER.pack_into(buf, pos, at - pos - HEADER_SIZE, kind, deliveries)


def next_record(buf: Ring, st: RingState) -> tuple[int, int, int, int]:
    """Take the oldest record: ``(kind, deliveries, payload offset, payload length)``.

    Advances ``st.head`` and ``st.count``. The caller copies the payload out before it
    lets any writer in.
    """
    assert st.count > 0
    pos = st.head
    if st.capacity - pos < HEADER_SIZE:
        pos = 0
    length, kind, deliveries = HEADER.unpack_from(buf, pos)
    if kind == WRAP:
        pos = 0
        length, kind, deliveries = HEADER.unpack_from(buf, 0)
    st.head = pos + record_size(length)
    st.count -= 1
    if st.count == 0:
        st.head = st.tail = 0
    return kind, deliveries, pos + HEADER_SIZE, length


def grown_capacity(st: RingState, need: int, page: int = 4096) -> int:
    """The capacity to grow to so that records of ``need`` bytes in all (``record_size``
    each) surely fit after what the ring holds."""
    need = st.capacity + need + HEADER_SIZE
    new = max(2 * st.capacity, need)
    return (new + page - 1) // page * page


def relocate(buf: Ring, st: RingState, new_capacity: int) -> None:
    """Rearrange ``buf`` (already ``new_capacity`` long) after growing from ``st.capacity``."""
    if st.wrapped:
        upper = st.capacity - st.head
        new_head = new_capacity - upper
        view = memoryview(buf)
        view[new_head:new_capacity] = view[st.head : st.capacity]
        view.release()
        st.head = new_head
    st.capacity = new_capacity
