"""What a connection holds at the broker: its parked requests (within the limits on
parked GETs and parked bytes), the deliveries it was handed and the unacked bytes they
count, its JOINs without a wait; and what CANCEL withdraws.

# Strategy:
# Every count is kept as it changes, per connection (``ConnState``) and for the broker,
# so no limit check and no lost connection scans a queue's line: a parked request is
# indexed by its req, deliveries are recorded a GET at a time (pruned as they are
# settled), and a JOIN without a wait is a bare req (an entry of a dict, about 80 bytes,
# paid from the connection's parked-bytes budget; a CANCEL finds it in O(1)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pigeon.protocol import Cancel
from pigeon.server.core.model import GetWaiter, InFlight, PutWaiter, QueueState, Waiter
from pigeon.server.core.state import _PRUNE_HANDED, BrokerState, Conn, ConnState, Out, err

__all__ = [
    "JOIN_COST",
    "answer_joins",
    "cancel",
    "finish",
    "freed",
    "handed",
    "hold_join",
    "join_queues",
    "park",
    "park_refused",
    "parked_bytes_refused",
    "refuse_waiting",
    "release",
]

JOIN_COST = 80  # bytes a JOIN without a wait holds while it waits (a dict entry and its int)


def park(b: BrokerState, w: Waiter) -> None:
    """``w`` waits: indexed by its req, counted, and timed if it has a deadline."""
    cs = b._conn(w.conn)
    cs.parked[w.req] = w
    if not isinstance(w, PutWaiter):
        cs.parked_gets += 1
        b.parked_gets += 1
        if isinstance(w, GetWaiter):
            b.queues[w.queue].consumers_waiting += 1
    if w.deadline is not None:
        b.deadlines.timeouts.push(w.deadline, w)


def park_refused(b: BrokerState, cs: ConnState, what: str) -> str | None:
    """Why ``cs`` may not park one more GET or JOIN (the limits), or None."""
    if cs.parked_gets >= b.limits.max_parked_gets_per_connection:
        return (
            f"this connection already has {cs.parked_gets} {what} waiting "
            f"(max_parked_gets_per_connection={b.limits.max_parked_gets_per_connection}); "
            "wait for them first"
        )
    if b.parked_gets >= b.limits.max_parked_gets:
        return (
            f"{b.parked_gets} GETs and JOINs are waiting on this broker "
            f"(max_parked_gets={b.limits.max_parked_gets}); try again later"
        )
    return None


def parked_bytes_refused(b: BrokerState, cs: ConnState, size: int, what: str) -> str | None:
    """Why ``cs`` may not park ``size`` more bytes of puts or JOINs, or None."""
    if cs.parked_bytes + size > b.limits.max_parked_bytes_per_connection:
        return (
            f"this connection's {what} already hold {cs.parked_bytes} bytes "
            f"(max_parked_bytes_per_connection={b.limits.max_parked_bytes_per_connection}); "
            "wait for them first"
        )
    if b.parked_bytes + size > b.limits.max_parked_bytes:
        return (
            f"{what} hold {b.parked_bytes} bytes on this broker "
            f"(max_parked_bytes={b.limits.max_parked_bytes}); try again later"
        )
    return None


def finish(b: BrokerState, w: Waiter) -> None:
    """A parked request was answered, timed out or withdrawn: it leaves the index."""
    if w.done:
        return
    w.done = True
    q = b.queues.get(w.queue)
    if q is not None:
        q.stale += 1  # its line holds one more finished waiter (see QueueState.compact)
        if q.blocked and isinstance(w, GetWaiter):
            aside = q.blocked.get(w.conn)
            if aside is not None and aside.get(w.req) is w:
                del aside[w.req]
                if not aside:
                    del q.blocked[w.conn]
    cs = b._conns.get(w.conn)
    if cs is not None and cs.parked.get(w.req) is w:
        del cs.parked[w.req]
        if isinstance(w, PutWaiter):
            cs.parked_bytes -= w.size
        else:
            cs.parked_gets -= 1
            b.parked_gets -= 1
            if isinstance(w, GetWaiter) and q is not None:
                q.consumers_waiting -= 1
    if isinstance(w, PutWaiter):
        b.parked_bytes -= w.size
        b.dedup_ids_parked -= w.ids_held
        if q is not None and q.putters and q.putters[0] is w:
            b._to_serve.add(q.name)


def refuse_waiting(b: BrokerState, waiters: Iterable[Waiter], code: str, why: str) -> list[Out]:
    """Answer each of ``waiters`` still waiting with an error (their queue was shut down
    or deleted, the broker stops)."""
    out: list[Out] = []
    for w in waiters:
        if not w.done:
            finish(b, w)
            out.append(err(w.conn, w.req, code, why))
    return out


def handed(b: BrokerState, cs: ConnState, queue: str, dids: Sequence[int]) -> None:
    """Note that ``cs``'s connection was handed ``dids`` of ``queue``. Every
    ``prune_at`` GETs the record drops what was settled since (a delivery id is made
    for one connection and never reused: still in the queue's ``in_flight`` means
    still this connection's), so it stays about the size of what is held."""
    if cs.holding == len(dids):  # it holds nothing older: forget the rest
        cs.handed = [(queue, dids)]
        return
    record = cs.handed
    record.append((queue, dids))
    if len(record) < cs.prune_at:
        return
    kept: list[tuple[str, Sequence[int]]] = []
    queues = b.queues
    for name, ids in record:
        q = queues.get(name)
        if q is not None and (live := [d for d in ids if d in q.in_flight]):
            kept.append((name, live))
    cs.handed = kept
    cs.prune_at = max(_PRUNE_HANDED, 2 * len(kept))


def release(b: BrokerState, f: InFlight) -> None:
    """A delivery was settled or given back: its connection holds it no more (``freed``
    for one, without the call: this runs per message of a NACK or an expired lease)."""
    cs = b._conns.get(f.conn)
    if cs is not None:
        cs.unacked = max(0, cs.unacked - len(f.msg.payload))
        cs.holding = max(0, cs.holding - 1)
        if cs.blocked:
            b._unblocked.append(cs)


def freed(b: BrokerState, cs: ConnState | None, size: int, count: int) -> None:
    """``cs`` holds ``count`` deliveries of ``size`` payload bytes less; the GETs it had
    set aside are readmitted (``delivery.readmit``, before the request's replies go)."""
    if cs is not None:
        cs.unacked = max(0, cs.unacked - size)
        cs.holding = max(0, cs.holding - count)
        if cs.blocked:
            b._unblocked.append(cs)


def join_queues(b: BrokerState, cs: ConnState) -> list[QueueState]:
    """The queues where ``cs`` has JOINs without a wait."""
    return [q for name in cs.joins if (q := b.queues.get(name)) is not None]


def hold_join(b: BrokerState, cs: ConnState, q: QueueState, req: int) -> None:
    """``cs``'s JOIN ``req`` without a wait waits on ``q``: a bare req, paid from the
    parked-bytes budgets (the caller checked them: ``parked_bytes_refused``). A req
    repeated while it waits is one JOIN, answered once."""
    reqs = q.join_reqs.setdefault(cs.conn, {})
    if req in reqs:
        return
    reqs[req] = None
    cs.joins.add(q.name)
    cs.parked_bytes += JOIN_COST
    b.parked_bytes += JOIN_COST


def answer_joins(
    b: BrokerState, q: QueueState, reply: Callable[[int], Any], conn: Conn | None = None
) -> list[Out]:
    """Answer the JOINs without a wait on ``q`` (of ``conn``, or of everyone)."""
    conns = list(q.join_reqs) if conn is None else [conn]
    out: list[Out] = []
    for c in conns:
        reqs = q.join_reqs.pop(c, None)
        if reqs is None:
            continue
        out += [(c, reply(req)) for req in reqs]
        cost = JOIN_COST * len(reqs)
        b.parked_bytes -= cost
        cs = b._conns.get(c)
        if cs is not None:
            cs.parked_bytes -= cost
            cs.joins.discard(q.name)
    return out


def cancel(b: BrokerState, conn: Conn, m: Cancel) -> list[Out]:
    """CANCEL: withdraw the parked request ``m.req`` (a GET, PUT or JOIN); no reply."""
    cs = b._conns.get(conn)
    if cs is None:
        return []
    w = cs.parked.get(m.req)
    if w is not None:
        finish(b, w)
        b._forget_if_idle(w.queue)
        return []
    for q in join_queues(b, cs):  # a JOIN without a wait: a lookup per queue it joins
        reqs = q.join_reqs[conn]
        if m.req in reqs:
            del reqs[m.req]
            cs.parked_bytes -= JOIN_COST
            b.parked_bytes -= JOIN_COST
            if not reqs:
                del q.join_reqs[conn]
                cs.joins.discard(q.name)
                b._forget_if_idle(q.name)
            break
    return []
