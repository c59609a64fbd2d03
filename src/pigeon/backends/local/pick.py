"""What a take copies out of the ring, and how the state changes: sans-IO (a buffer and a
``RingState`` in, records and the new state out; the caller holds the lock and commits).

# Strategy:
# While no record has options and none was taken from the middle, a take reads from the
# head (``read``), as the C path does. Otherwise ``pick`` walks the waiting records once:
# the highest priority that is due wins, ring order (put order) breaks ties, a record past
# its ttl is dropped. The head passes what leads the ring and is gone (tombstones, the
# records taken, expired ones) with no write at all; the others taken or dropped become
# tombstones, marks the commit writes through the intent area (``shared._commit``), so
# the take is complete or invisible whatever interrupts it. O(waiting records) per take:
# the price of one shared ring (pigeon:// keeps heaps and lanes).
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

from pigeon.backends.local import ring
from pigeon.backends.local.layout import COPY_AS_BYTES, K_OPTIONS, K_TAKEN, MAX_MARKS, OPTS

__all__ = ["Picked", "pick", "read"]

Record = tuple[int, int, Any]  # kind, deliveries, payload (a copy)

# what a take finds a record to be
_LIVE, _TOMB, _TAKEN, _EXPIRED = range(4)


class Picked(NamedTuple):
    records: list[Record]  # taken, in the order they are delivered
    marks: list[int]  # offsets of the headers the commit turns into tombstones
    next_due: float | None  # when the next delayed record comes due (host clock), or None
    more: bool  # expired records were left for another commit (MAX_MARKS per commit)
    expired: int  # expired records dropped


def read(data: Any, st: ring.RingState, max_items: int) -> list[Record]:
    """Take up to ``max_items`` records from the head (a ring with no options and no
    tombstones), advancing ``st``."""
    out = []
    for _ in range(min(max_items, st.count)):
        kind, deliveries, at, length = ring.next_record(data, st)
        if kind in COPY_AS_BYTES:
            payload: Any = data[at : at + length]  # one copy, into a new bytes
        else:
            payload = bytearray(length)
            with memoryview(data) as view:
                payload[:] = view[at : at + length]
        out.append((kind, deliveries, payload))
    return out


def pick(data: Any, st: ring.RingState, max_items: int, now: float) -> Picked:
    """Take up to ``max_items`` records (at most ``MAX_MARKS``) by priority from a ring
    with options or tombstones, skipping those not due at ``now`` and dropping expired
    ones; ``st`` becomes the state to commit with the returned marks. Nothing in ``data``
    is written."""
    max_items = min(max_items, MAX_MARKS)
    walk = ring.RingState(st.head, st.tail, st.count, st.capacity)
    records: list[tuple[int, int, int, int, int]] = []  # at, kind, deliveries, length, fate
    ready: list[tuple[int, int]] = []  # (-priority, index) of the records due
    next_due: float | None = None
    while walk.count:
        kind, deliveries, at, length = ring.next_record(data, walk)
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
    out: list[Record] = []
    for _, i in heapq.nsmallest(max_items, ready):
        at, kind, deliveries, length, _ = records[i]
        payload: Any = (
            data[at : at + length] if kind in COPY_AS_BYTES else bytearray(data[at : at + length])
        )
        out.append((kind, deliveries, payload))
        records[i] = (at, kind, deliveries, length, _TAKEN)
    expired = 0
    # the head passes what leads the ring and is gone: tombstones, taken, expired
    passed = 0
    for _, kind, _, _, fate in records:
        if fate == _LIVE:
            break
        ring.next_record(data, st)
        passed += 1
        if fate == _TOMB:
            st.tombs -= 1
        else:
            expired += _gone(st, kind, fate)
    # the rest of the taken and expired ones become tombstones, the taken ones first
    behind = records[passed:]
    taken = [r for r in behind if r[4] == _TAKEN]
    dropped = [r for r in behind if r[4] == _EXPIRED]
    room = MAX_MARKS - len(taken)
    marks: list[int] = []
    for at, kind, _, _, fate in taken + dropped[:room]:
        marks.append(at - ring.HEADER_SIZE)
        st.tombs += 1
        expired += _gone(st, kind, fate)
    return Picked(out, marks, next_due, len(dropped) > room, expired)


def _gone(st: ring.RingState, kind: int, fate: int) -> int:
    """Count a record taken or dropped out of ``st``; 1 if it expired."""
    if kind == K_OPTIONS:
        st.special -= 1
    if fate != _EXPIRED:
        return 0
    st.unfinished = max(0, st.unfinished - 1)
    return 1
