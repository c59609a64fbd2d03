"""The broker: one client message in, the replies out; time passed in explicitly.

# Strategy:
# ``Broker.handle(conn, message, now)`` applies one client message and returns the
# replies to send, as ``(conn, message)`` pairs; ``Broker.tick(now)`` applies the passage
# of time (leases that expired, waits that timed out, delayed messages that came due,
# messages that expired) and ``connection_lost(conn)`` gives back what a vanished client
# held. Nothing here blocks, sleeps, reads a clock or touches a socket
# (tests/server/core/test_layers.py), so every rule of delivery is tested without a
# network (tests/server/core/), and the asyncio server (server/app.py) is a thin loop
# around it.
#
# ``handle`` checks every number in a request first (``protocol.rules``), then calls the
# request's handler - in the module of its concept - inside one store transaction.
# Nothing grows without a bound: deadlines live in four heaps (``deadlines``) rebuilt
# from what is live, so no request scans every queue; what each connection holds is kept
# by connection (``holdings``); a queue made by a mere reference is forgotten as soon as
# it holds nothing and nobody waits on it, and ``max_queues`` caps the rest. A reply
# never carries more than ``max_reply_bytes`` (``delivery``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, final

from pigeon.protocol import (
    Ack,
    Cancel,
    ClientMessage,
    Declare,
    Delete,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Move,
    Nack,
    Peek,
    Ping,
    Pong,
    Purge,
    Put,
    PutBatch,
    Shutdown,
    Stats,
    TaskDone,
)
from pigeon.protocol.codes import Code
from pigeon.protocol.rules import problem
from pigeon.server.core.admin import delete, move, peek, purge, queue_stats, shutdown, stats
from pigeon.server.core.admission import put
from pigeon.server.core.delivery import get, nothing_for, readmit, serve_with_dead
from pigeon.server.core.holdings import (
    answer_joins,
    cancel,
    finish,
    join_queues,
    refuse_waiting,
    release,
)
from pigeon.server.core.model import DEAD_SUFFIX, GetWaiter, PutWaiter, QueueState, Stored, Waiter
from pigeon.server.core.recovery import recover
from pigeon.server.core.requeue import dead_letter, expired, requeue
from pigeon.server.core.settings import declare, info
from pigeon.server.core.settlement import extend, settle
from pigeon.server.core.state import EPSILON, BrokerState, Conn, Out, Refused, err
from pigeon.server.core.tasks import finish_joins, join, task_done

__all__ = ["Broker"]

Handler = Callable[[BrokerState, Conn, Any], list[Out]]  # a request's rules: its replies


def _ping(b: BrokerState, conn: Conn, m: Ping) -> list[Out]:
    return [(conn, Pong(m.nonce))]


def _pong(b: BrokerState, conn: Conn, m: Pong) -> list[Out]:
    return []


def _error(code: str, message: str, req: int) -> Error:
    return Error(req, code, message)


# Each request's handler, in the module of its concept.
_HANDLERS: dict[type, Handler] = {
    Put: put,
    PutBatch: put,
    Get: get,
    Cancel: cancel,
    Ack: settle,
    Nack: settle,
    Extend: extend,
    Declare: declare,
    Info: info,
    TaskDone: task_done,
    Join: join,
    Shutdown: shutdown,
    Purge: purge,
    Delete: delete,
    Peek: peek,
    Move: move,
    Stats: stats,
    Ping: _ping,
    Pong: _pong,
}


@final  # compiled (pigeon/_compiled.py): Python code cannot subclass it
class Broker(BrokerState):
    """All queues of one broker and the rules that move messages between them. Made over
    a store, it first recovers what the store kept (``recovery``)."""

    def _start(self) -> None:
        recover(self)

    @property
    def connections(self) -> set[Conn]:
        return set(self._conns)

    # --- the protocol ---------------------------------------------------------------------

    def connection_made(self, conn: Conn) -> None:
        self._conn(conn)

    def handle(self, conn: Conn, msg: ClientMessage, now: float | None = None) -> list[Out]:
        """Apply one message from ``conn``; return the replies to send."""
        if now is not None:
            self.now = now
        req = getattr(msg, "req", 0)
        handler = self._handlers.get(type(msg))
        if handler is None:
            return [err(conn, req, Code.BAD_REQUEST, f"unexpected {type(msg).__name__}")]
        bad = problem(msg, self.queues)
        if bad is not None:
            return [err(conn, req, Code.BAD_REQUEST, bad)]
        cs = self._conns.get(conn)
        if cs is not None and cs.parked and req in cs.parked and type(msg) is not Cancel:
            # Its reply could not be told from the parked one's, and the parked one would
            # be orphaned (kept in its line, taking messages for nobody).
            why = (
                f"req {req} is still waiting for its reply on this connection; give each "
                "request a req that is not in use"
            )
            return [err(conn, req, Code.BAD_REQUEST, why)]
        try:
            with self.store.atomic():  # one request, one store transaction
                out = handler(self, conn, msg)
                if self._unblocked:
                    out += readmit(self)
                if self._to_serve:
                    out += self._serve_touched(set())
        except Refused as refused:
            return [err(conn, req, refused.code, str(refused))]
        name = getattr(msg, "queue", None)
        if name is not None:
            self._forget_if_idle(name)
        return out

    _handlers: ClassVar[dict[type, Handler]] = _HANDLERS

    def stats(self) -> dict[str, Any]:
        return queue_stats(self)

    # --- time and connections -------------------------------------------------------------

    def _timed_out(self, w: Waiter) -> Out:
        q = self.queues.get(w.queue) or QueueState(w.queue)
        if isinstance(w, GetWaiter):
            return nothing_for(self, q, w)
        if isinstance(w, PutWaiter):
            return err(w.conn, w.req, Code.FULL, f"queue {w.queue!r} is full (maxsize={q.maxsize})")
        return err(w.conn, w.req, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")

    def tick(self, now: float) -> list[Out]:
        """Apply the passage of time up to ``now``."""
        self.now = now
        touched: set[str] = set()
        out: list[Out] = []
        queues, deadlines = self.queues, self.deadlines
        with self.store.atomic():
            for deadline, (name, dids) in deadlines.leases.due(now):
                q = queues.get(name)
                if q is None:
                    continue
                for did in dids:
                    f = q.in_flight.get(did)
                    if f is None or f.deadline != deadline:
                        continue  # settled or extended since
                    del q.in_flight[did]
                    release(self, f)
                    requeue(self, q, f.msg)
                    touched.add(name)
            for _, w in deadlines.timeouts.due(now):
                if w.done:
                    continue
                out.append(self._timed_out(w))
                finish(self, w)
                touched.add(w.queue)
            for _, (name, msg_id) in deadlines.delays.due(now):
                q = queues.get(name)
                msg = q.delayed.get(msg_id) if q is not None else None
                if q is None or msg is None or self._due(msg) > now + EPSILON:
                    continue  # taken, dropped or moved since (or delayed again, till later)
                del q.delayed[msg_id]
                q.ready.give_back(msg)
                touched.add(name)
            for _, (name, msg_id) in deadlines.expiries.due(now):
                q = queues.get(name)
                msg = q.expiring.get(msg_id) if q is not None else None
                if q is None or msg is None or not expired(self, msg):
                    continue  # taken, dropped or moved since (or due again later)
                del q.expiring[msg_id]
                if q.delayed.pop(msg_id, None) is None:
                    q.ready.discard(msg)
                dead_letter(self, q, msg, "expired")
                touched.add(name)
                touched.add(name + DEAD_SUFFIX)
            out += self._serve_touched(touched)
            if self._unblocked:
                out += readmit(self)
        return out

    def _due(self, msg: Stored) -> float:
        """When a delayed message comes due, on the broker's clock."""
        return msg.extra.due - self._wall_offset if msg.extra is not None else 0.0

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (or None)."""
        return self.deadlines.next()

    def parked(self, conn: Conn) -> int:
        """How many of ``conn``'s requests wait for an answer."""
        cs = self._conns.get(conn)
        if cs is None:
            return 0
        joins = sum(len(q.join_reqs.get(conn, ())) for q in join_queues(self, cs))
        return len(cs.parked) + joins

    def busy(self, conn: Conn) -> bool:
        """Does ``conn`` hold deliveries or wait for a reply? (Then it is not idle, however
        long it has been silent: a worker busy with a long job reads nothing meanwhile.)"""
        cs = self._conns.get(conn)
        return cs is not None and bool(cs.holding or cs.parked or cs.joins)

    def drain(self, conn: Conn) -> list[Out]:
        """``conn`` sends nothing more (FIN, GOODBYE, QUIT): its parked requests that have
        a deadline wait for it as usual; those without one are answered now, as if their
        wait had run out."""
        cs = self._conns.get(conn)
        if cs is None:
            return []
        out = []
        for w in list(cs.parked.values()):
            if w.deadline is None:
                out.append(self._timed_out(w))
                finish(self, w)
                self._forget_if_idle(w.queue)
        for q in join_queues(self, cs):
            timed_out = functools.partial(_error, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")
            out += answer_joins(self, q, timed_out, conn)
            self._forget_if_idle(q.name)
        if self._to_serve:
            out += self._serve_touched(set())
        return out

    def stop(self) -> list[Out]:
        """The broker is stopping: every parked request is answered ``unavailable``."""
        out: list[Out] = []
        why = "the broker is stopping; retry after reconnecting"
        for cs in self._conns.values():
            out += refuse_waiting(self, list(cs.parked.values()), Code.UNAVAILABLE, why)
            for q in join_queues(self, cs):
                out += answer_joins(self, q, lambda req: Error(req, Code.UNAVAILABLE, why), cs.conn)
        return out

    def connection_lost(self, conn: Conn) -> list[Out]:
        """Give back what ``conn`` held: its unacked deliveries return at once, in their
        original order; its parked requests are withdrawn."""
        cs = self._conns.get(conn)
        if cs is None:
            return []
        touched: set[str] = set()
        for w in list(cs.parked.values()):
            finish(self, w)
            touched.add(w.queue)
        for jq in join_queues(self, cs):
            answer_joins(self, jq, lambda req: None, conn)  # nobody to answer
            touched.add(jq.name)
        del self._conns[conn]
        for name, dids in cs.handed:  # oldest first: they go back in their order
            q = self.queues.get(name)
            if q is None:
                continue
            in_flight = q.in_flight
            for did in dids:
                f = in_flight.get(did)
                if f is not None and f.conn == conn:
                    del in_flight[did]
                    requeue(self, q, f.msg)
                    touched.add(name)
        return [(c, m) for c, m in self._serve_touched(touched) if c != conn]

    def _serve_touched(self, names: set[str]) -> list[Out]:
        """Serve the queues ``names`` (and their dead letters) after messages came back to
        them, went to the dead letters or expired, or waiters left them (the queues whose
        line of parked puts was freed too); answer their JOINs if that was the last of
        their work; forget those left idle."""
        if self._to_serve:
            names = names | self._to_serve
            self._to_serve = set()
        out: list[Out] = []
        for name in names:
            q = self.queues.get(name)
            if q is not None:
                q.compact()
                out += serve_with_dead(self, q)
                out += finish_joins(self, q)
            self._forget_if_idle(name)
        return out
