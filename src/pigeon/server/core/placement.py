"""Where a put's messages go: a put's options (priority, delay, ttl, headers) and its dedup
ids, remembered for the queue's window within the broker's ``max_dedup_ids``.

# Strategy:
# A plain put (no options, no dedup ids: the common case) makes its messages in bulk and
# appends them to the queue's FIFO. A put with options shares one ``Extra`` among its
# messages; a delayed message is set aside until due and an expiring one watched, each
# with an entry in its deadline heap. Dedup ids live in a dict per queue with a heap of
# their ends, forgotten lazily when the queue is next put to (or, at the limit, in every
# queue at most once a second).
"""

from __future__ import annotations

import heapq
from itertools import islice, repeat

from pigeon.protocol import PutOptions
from pigeon.server.core.model import Extra, QueueState, Stored
from pigeon.server.core.state import BrokerState

__all__ = ["add", "dedup_full", "forget_dedup", "wait"]


def add(
    b: BrokerState,
    q: QueueState,
    payloads: list[bytes],
    opts: PutOptions | None = None,
    dedup_ids: list[str] | None = None,
) -> None:
    """Store a put's messages in ``q`` (repeats of remembered dedup ids left out)."""
    ids, now = b._ids, b.now
    if opts is None and dedup_ids is None:
        msgs = list(map(Stored, islice(ids, len(payloads)), payloads, repeat(0), repeat(now)))
        q.ready.extend_plain(msgs)
        b.store.added_plain(q.name, msgs)
    else:
        msgs = _with_options(b, q, payloads, opts or PutOptions(), dedup_ids)
        b.store.added_many(q.name, msgs)
    q.unfinished += len(msgs)
    q.put_total += len(msgs)


def _with_options(
    b: BrokerState,
    q: QueueState,
    payloads: list[bytes],
    opts: PutOptions,
    dedup_ids: list[str] | None,
) -> list[Stored]:
    """The messages of a put with options, placed: repeats of a dedup id left out,
    delayed ones set aside until due, expiring ones watched."""
    if dedup_ids is None and opts.dedup_id:
        dedup_ids = [opts.dedup_id]
    if dedup_ids is not None:
        fresh = [p for p, d in zip(payloads, dedup_ids, strict=True) if _first(b, q, d)]
        payloads = fresh
    wall = b.now + b._wall_offset
    extra = None
    if opts.priority or opts.delay or opts.ttl or opts.headers:
        due = wall + opts.delay if opts.delay else 0.0
        expires = (due or wall) + opts.ttl if opts.ttl else 0.0
        extra = Extra(opts.priority, due, expires, opts.headers or None)
    ids, now = b._ids, b.now
    msgs = [Stored(next(ids), p, enqueued=now, extra=extra) for p in payloads]
    if extra is None:
        q.ready.extend(msgs)
    else:
        for msg in msgs:
            wait(b, q, msg)
    return msgs


def wait(b: BrokerState, q: QueueState, msg: Stored, back: bool = False) -> None:
    """Put ``msg``, which carries options, where it waits: set aside until it is due,
    or ready; watched for its expiry if it has one."""
    extra = msg.extra
    assert extra is not None
    offset = b._wall_offset
    if extra.expires:
        q.expiring[msg.id] = msg
        b.deadlines.expiries.push(extra.expires - offset, (q.name, msg.id))
    if extra.due and extra.due - offset > b.now:
        q.delayed[msg.id] = msg
        b.deadlines.delays.push(extra.due - offset, (q.name, msg.id))
    elif back or msg.deliveries or msg.origin:
        q.ready.give_back(msg)
    else:
        q.ready.append(msg)


def forget_dedup(b: BrokerState, q: QueueState) -> None:
    """Forget the dedup ids whose window has passed."""
    wall = b.now + b._wall_offset
    heap, seen = q.dedup_heap, q.dedup
    while heap and heap[0][0] <= wall:
        until, old = heapq.heappop(heap)
        if seen.get(old) == until:
            del seen[old]
            b.dedup_ids -= 1


def dedup_full(b: BrokerState, q: QueueState, dedup_ids: list[str]) -> bool:
    """Would remembering ``dedup_ids`` pass ``max_dedup_ids``? At the limit, the ids
    whose window passed are first forgotten in every queue (at most once a second:
    until then a put may be refused a little early)."""
    if b.dedup_ids + b.dedup_ids_parked + len(dedup_ids) <= b.limits.max_dedup_ids:
        return False
    if b.now - b._dedup_swept_at >= 1.0:
        b._dedup_swept_at = b.now
        for other in b.queues.values():
            if other.dedup:
                forget_dedup(b, other)
    new = sum(d not in q.dedup for d in set(dedup_ids)) if q.dedup_window > 0 else 0
    return b.dedup_ids + b.dedup_ids_parked + new > b.limits.max_dedup_ids


def _first(b: BrokerState, q: QueueState, dedup_id: str) -> bool:
    """True, and remembered for the queue's window, if ``dedup_id`` is not a repeat."""
    forget_dedup(b, q)
    seen, wall = q.dedup, b.now + b._wall_offset
    if dedup_id in seen:
        return False
    if q.dedup_window > 0:
        until = wall + q.dedup_window
        seen[dedup_id] = until
        b.dedup_ids += 1
        heapq.heappush(q.dedup_heap, (until, dedup_id))
        b.store.deduped(q.name, dedup_id, until)
    return True
