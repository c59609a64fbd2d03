"""What acts on a queue as a whole: SHUTDOWN, PURGE, DELETE and MOVE (each drops or moves
what the queue holds, with ONE ``drop``), and PEEK and STATS, which only look.
"""

from __future__ import annotations

import itertools
from typing import Any

from pigeon.protocol import Delete, Move, Ok, Peek, Purge, QueueShutdown, Shutdown, Stats
from pigeon.protocol.codes import Code
from pigeon.server.core.delivery import all_getters, serve
from pigeon.server.core.holdings import refuse_waiting, release
from pigeon.server.core.model import Extra, QueueState, Stored, reply_cost
from pigeon.server.core.state import BrokerState, Conn, Out, err
from pigeon.server.core.tasks import finish_joins, joins_done

__all__ = ["delete", "drop", "move", "peek", "purge", "queue_stats", "shutdown", "stats"]


def drop(b: BrokerState, q: QueueState, *, in_flight: bool = False) -> int:
    """Drop what ``q`` holds ready or delayed (and, with ``in_flight``, what it has out,
    whose deliveries end) from the broker and its store; how many messages went."""
    dropped = q.ready.clear() + list(q.delayed.values())
    q.delayed.clear()
    q.expiring.clear()
    if in_flight:
        for f in q.in_flight.values():
            release(b, f)
            dropped.append(f.msg)
        q.in_flight.clear()
    for msg in dropped:
        b.store.removed(q.name, msg.id)
    q.unfinished = max(0, q.unfinished - len(dropped))
    b._tasks_changed(q)  # (only if the max(0, ...) clamped it)
    return len(dropped)


def shutdown(b: BrokerState, conn: Conn, m: Shutdown) -> list[Out]:
    """SHUTDOWN: puts are refused from now on; GETs are served until the queue is empty
    (``immediate``: it is emptied now). Every connection is told."""
    q = b._queue(m.queue)
    q.shutdown = True
    b.store.declared(q.name, q.settings())
    if m.immediate:
        drop(b, q)
    out: list[Out] = [(conn, Ok(m.req, None))]
    out += refuse_waiting(b, q.putters, Code.SHUTDOWN, f"queue {q.name!r} was shut down")
    q.putters.clear()
    out += serve(b, q)
    out += [(c, QueueShutdown(q.name, m.immediate)) for c in sorted(b._conns)]
    return out + finish_joins(b, q)


def purge(b: BrokerState, conn: Conn, m: Purge) -> list[Out]:
    """PURGE: drop the messages waiting (not those in flight); how many."""
    q = b.queues.get(m.queue)
    if q is None:
        return [(conn, Ok(m.req, 0))]
    n = drop(b, q)
    return [(conn, Ok(m.req, n)), *serve(b, q), *finish_joins(b, q)]


def delete(b: BrokerState, conn: Conn, m: Delete) -> list[Out]:
    """DELETE: the queue, its messages (in flight too), settings and dedup ids go; those
    waiting on it are answered."""
    q = b.queues.pop(m.queue, None)
    if q is None:
        return [(conn, Ok(m.req, 0))]
    n = drop(b, q, in_flight=True)
    b.store.declared(q.name, None)
    b.dedup_ids -= len(q.dedup)
    out: list[Out] = [(conn, Ok(m.req, n))]
    why = f"queue {q.name!r} was deleted"
    out += refuse_waiting(b, [*all_getters(b, q), *q.putters], Code.SHUTDOWN, why)
    return out + joins_done(b, q)


def peek(b: BrokerState, conn: Conn, m: Peek) -> list[Out]:
    """PEEK: the first messages in delivery order, as they are, then the delayed ones by
    due time (with ``due``: seconds from now), within one reply."""
    q = b.queues.get(m.queue)
    shown: list[dict[str, Any]] = []
    room = b.limits.max_reply_bytes
    wall = b.now + b._wall_offset
    delayed = q.delayed if q is not None else {}
    later = sorted(delayed.values(), key=_due)
    for msg in itertools.chain(q.ready.lazily() if q is not None else (), later):
        # its map in the reply: payload, headers and framing, origin and reason (in bytes
        # of UTF-8: 500 emoji are 2,000 bytes), the keys and numbers
        room -= reply_cost(msg) + len(msg.origin.encode()) + len(msg.reason.encode()) + 96
        if len(shown) == m.max_items or (room < 0 and shown):
            break  # within one reply's size, as a DELIVER (at least one)
        shown.append(
            {
                "id": msg.id,
                "delivery_count": msg.deliveries,
                "payload": msg.payload,
                "age": round(max(0.0, b.now - msg.enqueued), 3),
                "origin": msg.origin,
                "reason": msg.reason,
                "priority": msg.priority,
                "headers": (msg.extra.headers if msg.extra is not None else None) or {},
            }
        )
        if msg.id in delayed:  # a key appended: a delayed message's
            shown[-1]["due"] = round(max(0.0, _due(msg) - wall), 3)
    return [(conn, Ok(m.req, shown))]


def _due(msg: Stored) -> float:
    return msg.extra.due if msg.extra is not None else 0.0


def move(b: BrokerState, conn: Conn, m: Move) -> list[Out]:
    """MOVE: up to ``m.limit`` waiting messages go to ``m.to`` as new ones (a dead-letter
    replay), as many as it has room for."""
    src = b.queues.get(m.queue)
    if src is None or not src.ready:
        return [(conn, Ok(m.req, 0))]
    dst = b._queue(m.to)
    if dst.shutdown:
        return [err(conn, m.req, Code.SHUTDOWN, f"queue {dst.name!r} was shut down")]
    n = len(src.ready) if m.limit is None else min(m.limit, len(src.ready))
    room = dst.room()
    if room is not None:
        n = min(n, room)
    for _ in range(n):
        msg = src.ready.popleft()
        extra = msg.extra
        if extra is not None:  # moved as a new message: its headers and priority kept
            src.expiring.pop(msg.id, None)
            extra = Extra(extra.priority, 0.0, 0.0, extra.headers)
        moved = Stored(next(b._ids), msg.payload, enqueued=b.now, extra=extra)
        b.store.removed(src.name, msg.id)
        b.store.added(dst.name, moved)
        dst.ready.append(moved)
    src.unfinished = max(0, src.unfinished - n)
    dst.unfinished += n
    b._tasks_changed(src)  # (only if the max(0, ...) clamped it)
    dst.put_total += n
    # the source has room now, for puts parked there too
    return [(conn, Ok(m.req, n)), *serve(b, dst), *serve(b, src), *finish_joins(b, src)]


def queue_stats(b: BrokerState) -> dict[str, Any]:
    """Every queue's INFO, by name."""
    return {"queues": {name: q.info() for name, q in sorted(b.queues.items())}}


def stats(b: BrokerState, conn: Conn, m: Stats) -> list[Out]:
    """STATS: ``queue_stats``."""
    return [(conn, Ok(m.req, queue_stats(b)))]
