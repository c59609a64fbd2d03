"""Settlement: ACK (the message leaves the broker), NACK (it goes back, perhaps after a
delay, or to the dead letters) and EXTEND (its lease runs longer) of deliveries made with
manual ack.

A delivery id is made for one delivery and never reused, so a settlement of one that has
ended meanwhile (its lease ran out, its connection went) is answered ``unknown`` and does
nothing.
"""

from __future__ import annotations

from pigeon.protocol import Ack, Extend, Nack, Ok
from pigeon.server.core.delivery import lease, serve_with_dead
from pigeon.server.core.holdings import freed, release
from pigeon.server.core.model import QueueState
from pigeon.server.core.requeue import dead_letter, requeue
from pigeon.server.core.state import BrokerState, Conn, Out
from pigeon.server.core.tasks import finish_joins

__all__ = ["acked", "extend", "settle"]


def settle(b: BrokerState, conn: Conn, m: Ack | Nack) -> list[Out]:
    """ACK and NACK."""
    q = b.queues.get(m.queue)
    unknown: list[int] = []
    if q is None:
        unknown = list(m.ids)
    elif isinstance(m, Ack):
        removed = acked(b, q, m.ids, unknown)
        if removed:
            q.acked_total += len(removed)
            b.store.removed_many(q.name, removed)
            b._tasks_changed(q)  # out of the store, unfinished until TASK_DONE
    else:
        in_flight = q.in_flight
        for did in m.ids:
            f = in_flight.pop(did, None)
            if f is None:
                unknown.append(did)
                continue
            release(b, f)
            if m.requeue:
                requeue(b, q, f.msg, m.delay)
            else:
                dead_letter(b, q, f.msg, m.reason or "rejected")
    out: list[Out] = []
    if not m.quiet:
        out.append((conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown})))
    if q is not None:
        out += serve_with_dead(b, q)
        out += finish_joins(b, q)
    return out


def acked(b: BrokerState, q: QueueState, ids: list[int], unknown: list[int]) -> list[int]:
    """Release the deliveries ``ids`` of ``q`` for good; the ids of their messages.
    Those ``q`` does not hold go to ``unknown``. (``release`` per delivery, with the
    connection's counts settled once per run of one connection's deliveries.)"""
    removed: list[int] = []
    append, pop, conns = removed.append, q.in_flight.pop, b._conns
    last: Conn = 0  # the connection of the current run (no run before the first)
    size = count = 0
    for did in ids:
        f = pop(did, None)
        if f is None:
            unknown.append(did)
            continue
        if f.conn != last:
            if count:
                freed(b, conns.get(last), size, count)
            last, size, count = f.conn, 0, 0
        msg = f.msg
        size += len(msg.payload)
        count += 1
        append(msg.id)
    if count:
        freed(b, conns.get(last), size, count)
    return removed


def extend(b: BrokerState, conn: Conn, m: Extend) -> list[Out]:
    """EXTEND: the deliveries' leases end ``m.seconds`` from now."""
    q = b.queues.get(m.queue)
    unknown = []
    for did in m.ids:
        f = q.in_flight.get(did) if q is not None else None
        if f is None:
            unknown.append(did)
        else:
            f.deadline = b.now + m.seconds
            lease(b, f.deadline, m.queue, [did])
    return [(conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown}))]
