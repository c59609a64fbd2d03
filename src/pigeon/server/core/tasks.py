"""Unfinished tasks: TASK_DONE counts them down, JOIN waits until none is left (with a
wait: a parked request among the GETs' limits; without one: a bare req, paid from the
connection's parked-bytes budget).
"""

from __future__ import annotations

from pigeon.protocol import Join, Ok, TaskDone
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Joined
from pigeon.server.core.holdings import (
    JOIN_COST,
    answer_joins,
    finish,
    hold_join,
    park,
    park_refused,
    parked_bytes_refused,
)
from pigeon.server.core.model import QueueState, Waiter
from pigeon.server.core.state import BrokerState, Conn, Out, err

__all__ = ["finish_joins", "join", "joins_done", "task_done"]


def finish_joins(b: BrokerState, q: QueueState) -> list[Out]:
    """Answer ``q``'s JOINs if none of its tasks is left."""
    return [] if q.unfinished > 0 else joins_done(b, q)


def joins_done(b: BrokerState, q: QueueState) -> list[Out]:
    """Answer every JOIN on ``q``: none of its tasks is left (or the queue is gone)."""
    out: list[Out] = [(j.conn, Joined(j.req, 0)) for j in q.joiners if not j.done]
    for j in q.joiners:
        finish(b, j)
    q.joiners.clear()
    return out + answer_joins(b, q, _none_left)


def _none_left(req: int) -> Ok:
    return Joined(req, 0)


def task_done(b: BrokerState, conn: Conn, m: TaskDone) -> list[Out]:
    """TASK_DONE: ``m.count`` tasks of the queue are done."""
    q = b.queues.get(m.queue)
    if q is None or m.count > q.unfinished:
        why = (
            f"task_done() called more times than there were items "
            f"({m.count} for {q.unfinished if q else 0} unfinished)"
        )
        return [err(conn, m.req, Code.VALUE, why)]
    q.unfinished -= m.count
    b._tasks_changed(q)  # a change: the reply waits for its commit
    return [(conn, Ok(m.req, q.unfinished)), *finish_joins(b, q)]


def join(b: BrokerState, conn: Conn, m: Join) -> list[Out]:
    """JOIN: answered once no task of the queue is left (or its wait runs out)."""
    q = b.queues.get(m.queue)
    if q is None or q.unfinished == 0:
        return [(conn, Joined(m.req, 0))]
    if m.wait == 0:
        return [err(conn, m.req, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")]
    cs = b._conn(conn)
    if m.wait is None:  # no timer: a bare req, paid for like a parked put
        why = parked_bytes_refused(b, cs, JOIN_COST, "JOINs and puts waiting")
        if why is not None:
            return [err(conn, m.req, Code.LIMIT, why)]
        hold_join(b, cs, q, m.req)
        return []
    why = park_refused(b, cs, "GETs and JOINs")
    if why is not None:
        return [err(conn, m.req, Code.LIMIT, why)]
    q.compact()
    w = Waiter(conn, m.req, b._deadline(m.wait), q.name)
    q.joiners.append(w)
    park(b, w)
    return []
