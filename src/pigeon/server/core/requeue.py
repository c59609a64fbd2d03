"""Where a delivered message goes when it is not acked: back to its queue (at once, or
after a NACK's delay), or to the dead letters (``NAME.dead``) after ``max_deliveries``,
when it expired, when it was rejected, or when no reply can carry it.

A dead-letter queue never forwards: its messages stay until acked or purged, but for one
put there with a ttl, which is dropped when the ttl runs out.
"""

from __future__ import annotations

from pigeon.server.core.model import DEAD_SUFFIX, Extra, QueueState, Stored
from pigeon.server.core.state import EPSILON, BrokerState

__all__ = ["dead_letter", "expired", "requeue"]


def expired(b: BrokerState, msg: Stored) -> bool:
    """Has ``msg``'s ttl run out (within the clocks' rounding)?"""
    extra = msg.extra
    return extra is not None and 0 < extra.expires <= b.now + b._wall_offset + EPSILON


def requeue(b: BrokerState, q: QueueState, msg: Stored, delay: float = 0.0) -> None:
    """Give a delivered message back, or dead-letter it after max_deliveries."""
    if msg.deliveries >= q.max_deliveries and not q.is_dead_letters:
        dead_letter(b, q, msg, "max_deliveries")
        return
    extra = msg.extra
    if extra is not None and extra.expires:
        if expired(b, msg):
            dead_letter(b, q, msg, "expired")
            return
        q.expiring[msg.id] = msg
        b.deadlines.expiries.push(extra.expires - b._wall_offset, (q.name, msg.id))
    q.redelivered_total += 1
    if delay > 0:  # its due time travels with it, into the store too (it outlives a restart)
        due = b.now + delay
        wall_due = due + b._wall_offset
        msg.extra = (  # a new Extra: the messages of one put share theirs
            Extra(due=wall_due)
            if extra is None
            else Extra(extra.priority, wall_due, extra.expires, extra.headers)
        )
        q.delayed[msg.id] = msg
        b.deadlines.delays.push(due, (q.name, msg.id))
    else:
        q.ready.give_back(msg)
    b.store.requeued(q.name, msg)


def dead_letter(b: BrokerState, q: QueueState, msg: Stored, reason: str) -> None:
    """Move ``msg``, which ``q`` no longer holds anywhere, to ``q``'s dead letters."""
    if q.is_dead_letters:
        q.expiring.pop(msg.id, None)  # (its expiry is what brought it here, or moot)
        if reason == "expired":  # put here with a ttl, which ran out: it has nowhere
            b.store.removed(q.name, msg.id)  # further to go (no NAME.dead.dead)
            q.unfinished = max(0, q.unfinished - 1)
            q.dead_total += 1
            b._tasks_changed(q)  # (only if the max(0, ...) clamped it)
            return
        requeue(b, q, msg)  # rejected again: it stays where it is
        return
    q.dead_total += 1
    q.unfinished = max(0, q.unfinished - 1)
    b._tasks_changed(q)  # (only if the max(0, ...) clamped it)
    dead = b._queue(q.name + DEAD_SUFFIX, limit=False)
    if msg.extra is not None:  # a dead letter keeps its headers and priority, no timer
        q.expiring.pop(msg.id, None)
        msg.extra = Extra(msg.extra.priority, 0.0, 0.0, msg.extra.headers)
    msg.origin = q.name
    msg.reason = reason
    msg.deliveries = 0  # counted afresh in the dead-letter queue (and when replayed)
    msg.enqueued = b.now
    dead.ready.give_back(msg)  # dead letters keep their original order
    dead.unfinished += 1
    dead.put_total += 1
    b.store.moved(msg, dead.name)
    if dead.getters:
        b._to_serve.add(dead.name)  # a GET may wait there
