"""The broker's queues, sans-IO: messages in, replies out, time passed in explicitly.

# Strategy:
# ``Broker.handle(conn, message)`` applies one client message and returns the replies to
# send, as ``(conn, message)`` pairs; ``Broker.tick(now)`` applies the passage of time
# (leases that expired, waits that timed out, delayed redeliveries that came due) and
# ``connection_lost(conn)`` gives back what a vanished client held. Nothing here blocks,
# sleeps, reads a clock on its own or touches a socket, so every rule of delivery is
# tested without a network (tests/server/test_state.py), and the asyncio server
# (server/app.py) is a thin loop around it.
#
# Each queue holds: ``ready`` (a deque, FIFO; redeliveries go to the front), ``delayed``
# (a heap of nacked items waiting for their delay), ``in_flight`` (delivery id ->
# message, owner, lease deadline), parked GETs waiting for items, parked PUTs waiting for
# room, and parked JOINs. Deadlines live in one heap per kind with lazy deletion.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pigeon.protocol import (
    Ack,
    Cancel,
    ClientMessage,
    Declare,
    Deliver,
    Delivery,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Nack,
    Ok,
    Ping,
    Pong,
    Put,
    PutBatch,
    QueueShutdown,
    Shutdown,
    Stats,
    TaskDone,
)

Conn = int
Out = tuple[Conn, Any]

DEFAULT_LEASE = 30.0
DEFAULT_MAX_DELIVERIES = 20
DEAD_SUFFIX = ".dead"
MAX_QUEUE_NAME = 200


@dataclass(slots=True)
class Stored:
    """A message the broker holds."""

    id: int
    payload: bytes
    deliveries: int = 0  # how many times it was handed out


@dataclass(slots=True)
class InFlight:
    msg: Stored
    conn: Conn
    deadline: float


@dataclass(slots=True)
class Waiter:
    conn: Conn
    req: int
    deadline: float | None
    cancelled: bool = False


@dataclass(slots=True)
class GetWaiter(Waiter):
    max_items: int = 1
    manual_ack: bool = False
    lease: float | None = None


@dataclass(slots=True)
class PutWaiter(Waiter):
    payloads: list[bytes] = field(default_factory=list)


@dataclass
class QueueState:
    name: str
    maxsize: int = 0
    lease: float = DEFAULT_LEASE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    ready: deque[Stored] = field(default_factory=deque)
    delayed: list[tuple[float, int, Stored]] = field(default_factory=list)
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    getters: deque[GetWaiter] = field(default_factory=deque)
    putters: deque[PutWaiter] = field(default_factory=deque)
    joiners: list[Waiter] = field(default_factory=list)
    unfinished: int = 0
    shutdown: bool = False
    # counters for stats
    put_total: int = 0
    delivered_total: int = 0
    acked_total: int = 0
    redelivered_total: int = 0
    dead_total: int = 0

    @property
    def depth(self) -> int:
        """Items waiting to be delivered (ready or delayed): ``qsize``."""
        return len(self.ready) + len(self.delayed)

    @property
    def held(self) -> int:
        """Items the broker holds for this queue, in flight included: counts for maxsize."""
        return len(self.ready) + len(self.delayed) + len(self.in_flight)

    def room(self) -> int | None:
        return None if not self.maxsize else max(0, self.maxsize - self.held)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "depth": self.depth,
            "in_flight": len(self.in_flight),
            "maxsize": self.maxsize,
            "unfinished": self.unfinished,
            "shutdown": self.shutdown,
            "consumers_waiting": sum(not g.cancelled for g in self.getters),
            "lease": self.lease,
            "max_deliveries": self.max_deliveries,
            "put_total": self.put_total,
            "delivered_total": self.delivered_total,
            "acked_total": self.acked_total,
            "redelivered_total": self.redelivered_total,
            "dead_total": self.dead_total,
        }


class Store:
    """Where a broker keeps messages. This base class keeps nothing: ``--memory``.

    A durable store records puts and removals; the broker calls these as its state
    changes, and ``recover`` returns what survived a restart.
    """

    def added(self, queue: str, msg: Stored) -> None:
        """``msg`` entered ``queue``."""

    def removed(self, queue: str, msg_id: int) -> None:
        """The message left the broker for good (acked, delivered without ack, dropped)."""

    def moved(self, msg_id: int, queue: str) -> None:
        """The message moved to another queue (a dead letter)."""

    def requeued(self, queue: str, msg: Stored) -> None:
        """The message goes back to its queue after ``msg.deliveries`` deliveries."""

    last_tag = 0  # a durable store: the batch of the latest change (see server/store.py)
    committed = 0
    changes = 0

    @property
    def holds_replies(self) -> bool:
        return False

    def start(self, on_commit: Callable[[int], None]) -> None:
        """Begin persisting (a durable store starts its writer here)."""

    def close(self) -> None:
        """Flush and release."""

    def recover(self) -> Iterable[tuple[str, Stored]]:
        """Messages to reload at start, in order, per queue."""
        return ()


def _err(conn: Conn, req: int, code: str, message: str) -> Out:
    return conn, Error(req, code, message)


class Broker:
    """All queues of one broker and the rules that move messages between them."""

    def __init__(
        self,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        default_lease: float = DEFAULT_LEASE,
        default_max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_unacked_bytes: int = 64 * 2**20,
    ) -> None:
        self.store = store if store is not None else Store()
        # Bytes delivered to one connection and not yet settled: beyond this a consumer
        # gets no more until it acks (its GETs wait), so one slow consumer cannot hoard
        # the queue or make the broker hold unbounded unacked payloads for it.
        self.max_unacked_bytes = max_unacked_bytes
        self.unacked: dict[Conn, int] = {}
        self.queues: dict[str, QueueState] = {}
        self.connections: set[Conn] = set()
        self._ids = itertools.count(1)
        # Delivery ids start at a random 40-bit epoch so that an ack from before a
        # restart can never settle a different delivery after it.
        self._deliveries = itertools.count((secrets.randbits(40) << 20) + 1)
        self._seq = itertools.count()
        self._leases: list[tuple[float, int, str]] = []  # (deadline, delivery id, queue)
        self._timeouts: list[tuple[float, int, str, Waiter]] = []
        self._parked: dict[tuple[Conn, int], Waiter] = {}
        self.default_lease = default_lease
        self.default_max_deliveries = default_max_deliveries
        self.now = 0.0 if clock is None else clock()
        last_id = 0
        for name, msg in self.store.recover():
            q = self.queue(name)
            q.ready.append(msg)
            q.unfinished += 1
            last_id = max(last_id, msg.id)
        self._ids = itertools.count(last_id + 1)

    # --- helpers ------------------------------------------------------------------------

    def queue(self, name: str) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = QueueState(
                name, lease=self.default_lease, max_deliveries=self.default_max_deliveries
            )
        return q

    def _park(self, q: QueueState, w: Waiter) -> None:
        self._parked[w.conn, w.req] = w
        if w.deadline is not None:
            heapq.heappush(self._timeouts, (w.deadline, next(self._seq), q.name, w))

    def _done(self, w: Waiter) -> None:
        """A parked request was answered, timed out or withdrawn: it leaves the index."""
        w.cancelled = True
        if self._parked.get((w.conn, w.req)) is w:
            del self._parked[w.conn, w.req]

    @staticmethod
    def _compact(q: QueueState) -> None:
        """Drop finished waiters, so consumers that time out again and again on an empty
        queue do not pile up in it (memory, and a scan per request)."""
        if any(w.cancelled for w in q.getters):
            q.getters = deque(w for w in q.getters if not w.cancelled)
        if any(w.cancelled for w in q.putters):
            q.putters = deque(w for w in q.putters if not w.cancelled)
        if any(w.cancelled for w in q.joiners):
            q.joiners = [w for w in q.joiners if not w.cancelled]

    def _deadline(self, wait: float | None) -> float | None:
        return None if wait is None else self.now + max(0.0, wait)

    def _take(
        self, q: QueueState, conn: Conn, n: int, manual: bool, lease: float | None
    ) -> list[Delivery]:
        out: list[Delivery] = []
        held = self.unacked.get(conn, 0)
        while q.ready and len(out) < n:
            if manual and held and held + len(q.ready[0].payload) > self.max_unacked_bytes:
                break  # this consumer holds enough; it gets more once it settles some
            msg = q.ready.popleft()
            msg.deliveries += 1
            q.delivered_total += 1
            if manual:
                did = next(self._deliveries)
                deadline = self.now + (lease if lease is not None else q.lease)
                q.in_flight[did] = InFlight(msg, conn, deadline)
                held += len(msg.payload)
                heapq.heappush(self._leases, (deadline, did, q.name))
                out.append(Delivery(did, msg.deliveries, msg.payload))
            else:
                self.store.removed(q.name, msg.id)
                out.append(Delivery(0, msg.deliveries, msg.payload))
        if manual:
            self.unacked[conn] = held
        return out

    def _can_take(self, q: QueueState, conn: Conn, manual: bool) -> bool:
        if not q.ready:
            return False
        held = self.unacked.get(conn, 0) if manual else 0
        return not held or held + len(q.ready[0].payload) <= self.max_unacked_bytes

    def _release(self, f: InFlight) -> None:
        left = self.unacked.get(f.conn, 0) - len(f.msg.payload)
        if left > 0:
            self.unacked[f.conn] = left
        else:
            self.unacked.pop(f.conn, None)

    def _serve(self, q: QueueState) -> list[Out]:
        """Hand ready items to parked getters, and admit parked puts that now fit."""
        out: list[Out] = []
        progress = True
        while progress:
            progress = False
            if q.ready and q.getters:
                waiting: deque[GetWaiter] = deque()
                while q.getters:
                    w = q.getters.popleft()
                    if w.cancelled:
                        continue
                    if not self._can_take(q, w.conn, w.manual_ack):
                        waiting.append(w)  # nothing left, or this consumer holds enough
                        continue
                    self._done(w)
                    items = self._take(q, w.conn, w.max_items, w.manual_ack, w.lease)
                    out.append((w.conn, Deliver(w.req, items)))
                    progress = True
                q.getters = waiting
            while q.putters:
                p = q.putters[0]
                if p.cancelled:
                    q.putters.popleft()
                    continue
                room = q.room()
                if room is not None and room < len(p.payloads):
                    break
                q.putters.popleft()
                self._done(p)
                self._add(q, p.payloads)
                out.append((p.conn, Ok(p.req, len(p.payloads))))
                progress = True
        if q.shutdown and not q.ready and not q.delayed:
            for w in q.getters:
                if not w.cancelled:
                    self._done(w)
                    out.append(_err(w.conn, w.req, "shutdown", f"queue {q.name!r} was shut down"))
            q.getters.clear()
        return out

    def _add(self, q: QueueState, payloads: list[bytes]) -> None:
        for p in payloads:
            msg = Stored(next(self._ids), p)
            q.ready.append(msg)
            self.store.added(q.name, msg)
        q.unfinished += len(payloads)
        q.put_total += len(payloads)

    def _requeue(self, q: QueueState, msg: Stored, delay: float = 0.0) -> None:
        """Give a delivered message back, or dead-letter it after max_deliveries."""
        if msg.deliveries >= q.max_deliveries:
            self._dead_letter(q, msg)
            return
        q.redelivered_total += 1
        self.store.requeued(q.name, msg)
        if delay > 0:
            heapq.heappush(q.delayed, (self.now + delay, next(self._seq), msg))
        else:
            q.ready.appendleft(msg)

    def _dead_letter(self, q: QueueState, msg: Stored) -> None:
        q.dead_total += 1
        q.unfinished = max(0, q.unfinished - 1)
        if q.name.endswith(DEAD_SUFFIX):
            self.store.removed(q.name, msg.id)  # a dead letter's dead letter is dropped
            return
        dead = self.queue(q.name + DEAD_SUFFIX)
        dead.ready.append(msg)
        dead.unfinished += 1
        dead.put_total += 1
        self.store.moved(msg.id, dead.name)

    def _finish_joins(self, q: QueueState) -> list[Out]:
        if q.unfinished > 0:
            return []
        out = [(j.conn, Ok(j.req, 0)) for j in q.joiners if not j.cancelled]
        for j in q.joiners:
            self._done(j)
        q.joiners.clear()
        return out

    # --- the protocol ---------------------------------------------------------------------

    def connection_made(self, conn: Conn) -> None:
        self.connections.add(conn)

    def handle(self, conn: Conn, msg: ClientMessage, now: float | None = None) -> list[Out]:
        """Apply one message from ``conn``; return the replies to send."""
        if now is not None:
            self.now = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            return [
                _err(
                    conn, getattr(msg, "req", 0), "bad_request", f"unexpected {type(msg).__name__}"
                )
            ]
        name = getattr(msg, "queue", None)
        if name is not None and name not in self.queues and not _valid_name(name):
            return [
                _err(
                    conn,
                    getattr(msg, "req", 0),
                    "bad_request",
                    f"invalid queue name {name[:40]!r}: "
                    f"1 to {MAX_QUEUE_NAME} characters, no whitespace or control characters",
                )
            ]
        return handler(self, conn, msg)

    def _put(self, conn: Conn, m: Put | PutBatch) -> list[Out]:
        payloads = [m.payload] if isinstance(m, Put) else m.payloads
        wait = m.wait
        q = self.queue(m.queue)
        if q.shutdown:
            return [_err(conn, m.req, "shutdown", f"queue {q.name!r} was shut down; put refused")]
        if q.maxsize and len(payloads) > q.maxsize:
            return [
                _err(
                    conn,
                    m.req,
                    "bad_request",
                    f"batch of {len(payloads)} can never fit in maxsize={q.maxsize}",
                )
            ]
        self._compact(q)
        room = q.room()
        if (room is not None and room < len(payloads)) or q.putters:
            if wait == 0:
                return [
                    _err(
                        conn,
                        m.req,
                        "full",
                        f"queue {q.name!r} is full ({q.held} of maxsize={q.maxsize})",
                    )
                ]
            w = PutWaiter(conn, m.req, self._deadline(wait), payloads=payloads)
            q.putters.append(w)
            self._park(q, w)
            return self._serve(q)
        self._add(q, payloads)
        return [(conn, Ok(m.req, len(payloads))), *self._serve(q)]

    def _get(self, conn: Conn, m: Get) -> list[Out]:
        if m.max_items < 1:
            return [_err(conn, m.req, "bad_request", f"max_items must be >= 1, not {m.max_items}")]
        q = self.queue(m.queue)
        self._compact(q)
        if not q.getters and self._can_take(q, conn, m.manual_ack):
            items = self._take(q, conn, m.max_items, m.manual_ack, m.lease)
            return [(conn, Deliver(m.req, items)), *self._serve(q)]
        if q.shutdown and not q.delayed and not q.ready:
            return [_err(conn, m.req, "shutdown", f"queue {q.name!r} was shut down")]
        if m.wait == 0:
            if q.ready:
                return [
                    _err(
                        conn,
                        m.req,
                        "limit",
                        f"this connection holds {self.unacked.get(conn, 0)} unacked bytes "
                        f"(max_unacked_bytes={self.max_unacked_bytes}); ack some first",
                    )
                ]
            return [_err(conn, m.req, "empty", f"queue {q.name!r} is empty")]
        w = GetWaiter(
            conn,
            m.req,
            self._deadline(m.wait),
            max_items=m.max_items,
            manual_ack=m.manual_ack,
            lease=m.lease,
        )
        q.getters.append(w)
        self._park(q, w)
        return self._serve(q)

    def _settle(self, conn: Conn, m: Ack | Nack) -> list[Out]:
        q = self.queue(m.queue)
        unknown: list[int] = []
        for did in m.ids:
            f = q.in_flight.pop(did, None)
            if f is not None:
                self._release(f)
            if f is None:
                unknown.append(did)
            elif isinstance(m, Ack):
                q.acked_total += 1
                self.store.removed(q.name, f.msg.id)
            elif m.requeue:
                self._requeue(q, f.msg, max(0.0, m.delay))
            else:
                self._dead_letter(q, f.msg)
        out: list[Out] = [
            (conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown}))
        ]
        out += self._serve(q)
        if q.name + DEAD_SUFFIX in self.queues:
            out += self._serve(self.queues[q.name + DEAD_SUFFIX])
        return out + self._finish_joins(q)

    def _extend(self, conn: Conn, m: Extend) -> list[Out]:
        q = self.queue(m.queue)
        unknown = []
        for did in m.ids:
            f = q.in_flight.get(did)
            if f is None:
                unknown.append(did)
            else:
                f.deadline = self.now + max(0.0, m.seconds)
                heapq.heappush(self._leases, (f.deadline, did, q.name))
        return [(conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown}))]

    def _declare(self, conn: Conn, m: Declare) -> list[Out]:
        q = self.queue(m.queue)
        for name, value, low in (
            ("maxsize", m.maxsize, 0),
            ("lease", m.lease, 0.0),
            ("max_deliveries", m.max_deliveries, 1),
        ):
            if value is not None and value < low:
                return [_err(conn, m.req, "bad_request", f"{name} must be >= {low}, not {value}")]
        if m.maxsize is not None:
            q.maxsize = m.maxsize
        if m.lease is not None:
            q.lease = m.lease
        if m.max_deliveries is not None:
            q.max_deliveries = m.max_deliveries
        return [(conn, Ok(m.req, q.info())), *self._serve(q)]

    def _info(self, conn: Conn, m: Info) -> list[Out]:
        return [(conn, Ok(m.req, self.queue(m.queue).info()))]

    def _task_done(self, conn: Conn, m: TaskDone) -> list[Out]:
        q = self.queue(m.queue)
        if m.count < 1 or m.count > q.unfinished:
            return [
                _err(conn, m.req, "value", "task_done() called more times than there were items")
            ]
        q.unfinished -= m.count
        return [(conn, Ok(m.req, q.unfinished)), *self._finish_joins(q)]

    def _join(self, conn: Conn, m: Join) -> list[Out]:
        q = self.queue(m.queue)
        if q.unfinished == 0:
            return [(conn, Ok(m.req, 0))]
        if m.wait == 0:
            return [_err(conn, m.req, "timeout", f"{q.unfinished} tasks unfinished")]
        self._compact(q)
        w = Waiter(conn, m.req, self._deadline(m.wait))
        q.joiners.append(w)
        self._park(q, w)
        return []

    def _shutdown(self, conn: Conn, m: Shutdown) -> list[Out]:
        q = self.queue(m.queue)
        q.shutdown = True
        if m.immediate:
            dropped = list(q.ready) + [d[2] for d in q.delayed]
            for msg in dropped:
                self.store.removed(q.name, msg.id)
            q.ready.clear()
            q.delayed.clear()
            q.unfinished = max(0, q.unfinished - len(dropped))
        out: list[Out] = [(conn, Ok(m.req, None))]
        for p in q.putters:
            if not p.cancelled:
                self._done(p)
                out.append(_err(p.conn, p.req, "shutdown", f"queue {q.name!r} was shut down"))
        q.putters.clear()
        out += self._serve(q)
        out += [(c, QueueShutdown(q.name, m.immediate)) for c in sorted(self.connections)]
        return out + self._finish_joins(q)

    def _stats(self, conn: Conn, m: Stats) -> list[Out]:
        return [(conn, Ok(m.req, self.stats()))]

    def _cancel(self, conn: Conn, m: Cancel) -> list[Out]:
        w = self._parked.pop((conn, m.req), None)
        if w is not None:
            self._done(w)
        return []

    def _ping(self, conn: Conn, m: Ping) -> list[Out]:
        return [(conn, Pong(m.nonce))]

    def _pong(self, conn: Conn, m: Pong) -> list[Out]:
        return []

    _handlers: ClassVar[dict[type, Callable[[Broker, Conn, Any], list[Out]]]] = {
        Put: _put,
        PutBatch: _put,
        Get: _get,
        Cancel: _cancel,
        Ack: _settle,
        Nack: _settle,
        Extend: _extend,
        Declare: _declare,
        Info: _info,
        TaskDone: _task_done,
        Join: _join,
        Shutdown: _shutdown,
        Stats: _stats,
        Ping: _ping,
        Pong: _pong,
    }

    def stats(self) -> dict[str, Any]:
        return {"queues": {name: q.info() for name, q in sorted(self.queues.items())}}

    # --- time and connections -------------------------------------------------------------

    def tick(self, now: float) -> list[Out]:
        """Apply the passage of time up to ``now``."""
        self.now = now
        touched: set[str] = set()
        out: list[Out] = []
        leases = self._leases
        while leases and leases[0][0] <= now:
            deadline, did, name = heapq.heappop(leases)
            q = self.queues.get(name)
            f = q.in_flight.get(did) if q else None
            if q is None or f is None or f.deadline != deadline:
                continue  # settled or extended since
            del q.in_flight[did]
            self._release(f)
            self._requeue(q, f.msg)
            touched.add(name)
        timeouts = self._timeouts
        while timeouts and timeouts[0][0] <= now:
            _, _, name, w = heapq.heappop(timeouts)
            if w.cancelled:
                continue
            self._done(w)
            if isinstance(w, GetWaiter):
                out.append(_err(w.conn, w.req, "empty", f"queue {name!r} is empty"))
            elif isinstance(w, PutWaiter):
                out.append(_err(w.conn, w.req, "full", f"queue {name!r} is full"))
            else:
                q = self.queues[name]
                out.append(_err(w.conn, w.req, "timeout", f"{q.unfinished} tasks unfinished"))
            touched.add(name)
        for name, q in self.queues.items():
            while q.delayed and q.delayed[0][0] <= now:
                q.ready.appendleft(heapq.heappop(q.delayed)[2])
                touched.add(name)
        for name in touched:
            q = self.queues[name]
            out += self._serve(q)
            if name + DEAD_SUFFIX in self.queues:
                out += self._serve(self.queues[name + DEAD_SUFFIX])
        return out

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (or None)."""
        candidates = []
        if self._leases:
            candidates.append(self._leases[0][0])
        if self._timeouts:
            candidates.append(self._timeouts[0][0])
        for q in self.queues.values():
            if q.delayed:
                candidates.append(q.delayed[0][0])
        return min(candidates) if candidates else None

    def connection_lost(self, conn: Conn) -> list[Out]:
        """Give back what ``conn`` held: its unacked deliveries return to the front at once."""
        self.connections.discard(conn)
        self.unacked.pop(conn, None)
        out: list[Out] = []
        for q in self.queues.values():
            lost = [did for did, f in q.in_flight.items() if f.conn == conn]
            # requeue oldest last so it ends up first: keep their original order in front
            for did in reversed(lost):
                self._requeue(q, q.in_flight.pop(did).msg)
            for waiters in (q.getters, q.putters, q.joiners):
                for w in waiters:
                    if w.conn == conn and not w.cancelled:
                        self._done(w)
            if lost:
                out += self._serve(q)
        return [(c, m) for c, m in out if c != conn]


def _valid_name(name: str) -> bool:
    return (
        0 < len(name) <= MAX_QUEUE_NAME
        and name.isprintable()
        and not any(c.isspace() for c in name)
    )
