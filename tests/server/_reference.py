"""A plain reference model of the broker's rules, for tests/server/test_model.py.

What is ready in which order, what is delayed until when, in flight with whom until
when, dead with which reason, which dedup ids are remembered until when - in lists and
dicts, written from the contract (DESIGN.md, docs/protocol.md, the findings' intended
behaviour), not from core.py. It knows nothing of pigeon: payloads are the messages'
names (every payload the test puts is unique), replies are plain tuples, and time is
two numbers (the broker's monotonic ``now`` and the wall clock's offset from it).

Each request method applies the request and returns the replies the broker must send,
as ``(conn, reply)`` with ``reply`` one of::

    ("confirmed", req, n)        ("error", req, code)        ("ok", req, value)
    ("deliver", req, ((payload, delivery_count, headers), ...), manual)
    ("queue_shutdown", queue, immediate)

Where the contract says nothing, the model follows what the broker was observed to do
(FINDINGS-spec.md), and says so. Where a known finding changes what the broker does
today, the test gates the rule on a flag (``Known`` below) that names it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEAD = ".dead"
DEFAULT_LEASE = 30.0
DEFAULT_MAX_DELIVERIES = 20
DEFAULT_DEDUP_WINDOW = 300.0

Reply = tuple[Any, ...]
Out = tuple[int, Reply]


@dataclass
class Known:
    """Known findings the model works around while they are open (True: still open; all
    of them are fixed now, their flags kept so each scenario still checks its fix).
    Each flag names one; turn it off once its fix is merged (or for one run, set
    ``PIGEON_MODEL_FIXED=name,name`` - see tests/server/test_model.py)."""

    # FINDINGS-broker.md (review round 4)
    drop_before_sync: bool = False  # 1: a segment emptied by an unsynced write is dropped
    dedup_repeat_early: bool = False  # 2: a repeat is confirmed before its original commits
    roll_fsync_confirmed: bool = False  # 4: the loop's fsync fails, the syncer's confirms
    ttl_after_restart: bool = False  # 13: a GET before the first tick takes an expired message
    nack_delay_lost: bool = False  # 14: a NACK's delay is not stored
    dead_queue_ttl: bool = False  # 15: a ttl (or delay) on a put into NAME.dead
    # FINDINGS-spec.md
    inflight_not_counted: bool = False  # 5: a delivery in flight at a crash is not counted
    repeats_count_for_maxsize: bool = False  # 20: repeats count against maxsize
    # suspected in FINDINGS-broker.md, confirmed by this model
    peek_order: bool = False  # PEEK lists a lane's given-back messages before its new ones
    # new, found by this model (docs/reliability.md, "The model of the broker")
    join_not_answered: bool = False  # a timer or a lost connection ends the work: no answer
    move_leaves_puts_parked: bool = False  # MOVE frees room but admits no parked put
    cancelled_put_blocks: bool = False  # a cancelled parked PUT makes puts that fit `full`


@dataclass
class Msg:
    key: bytes  # its payload: unique, so it names the message
    seq: int  # put order across the whole run (the broker's ids grow the same way)
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    put_due: float = 0.0  # wall clock: the put's delay ends (0: none)
    due: float = 0.0  # wall clock: not ready before (a put's or a NACK's delay)
    expires: float = 0.0  # wall clock: dead-lettered as expired if still waiting (0: never)
    handed: int = 0  # deliveries (delivery_count of the last one)
    recorded: int = 0  # deliveries as last written by a requeue (see Known.inflight_not_counted)
    origin: str = ""
    reason: str = ""
    call: int | None = None  # the broker call that stored it (None: recovered)


@dataclass
class Flight:
    msg: Msg
    conn: int
    deadline: float  # monotonic
    queue: str
    req: int
    did: int = 0  # the broker's delivery id, bound once the DELIVER is seen


@dataclass
class Waiter:
    kind: str  # get | put | join
    conn: int
    req: int
    deadline: float | None  # monotonic
    queue: str
    max_items: int = 1
    manual: bool = False
    lease: float | None = None
    payloads: list[bytes] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Queue:
    name: str
    maxsize: int = 0
    lease: float = DEFAULT_LEASE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    shutdown: bool = False
    waiting: list[Msg] = field(default_factory=list)  # ready or delayed
    flights: list[Flight] = field(default_factory=list)
    dedup: dict[str, tuple[float, int | None]] = field(default_factory=dict)  # id -> until, call
    waiters: list[Waiter] = field(default_factory=list)  # parked, in the order they came
    unfinished: int = 0

    @property
    def dead(self) -> bool:
        return self.name.endswith(DEAD)

    def settings(self) -> dict[str, Any]:
        return {
            "maxsize": self.maxsize,
            "lease": self.lease,
            "max_deliveries": self.max_deliveries,
            "dedup_window": self.dedup_window,
            "shutdown": self.shutdown,
        }


# What a store keeps of a message: (queue, priority, headers, put_due, due, expires,
# recorded, handed, origin, reason, seq).
Durable = tuple[Any, ...]


@dataclass
class Image:
    """What the model says a store holds after a batch: the durable projection."""

    messages: dict[bytes, Durable]
    settings: dict[str, dict[str, Any]]
    dedup: dict[tuple[str, str], float]  # (queue, id) -> until (wall)
    # queue -> its unfinished count beyond the messages it holds (tasks taken - acked, or
    # auto-acked by a GET - and not yet marked done), where not 0: it survives a restart
    taken: dict[str, int] = field(default_factory=dict)


class Model:
    """The broker as the contract describes it."""

    def __init__(self, known: Known, now: float, offset: float) -> None:
        self.known = known
        self.now = now  # the broker's monotonic clock
        self.offset = offset  # wall = now + offset
        self.queues: dict[str, Queue] = {}
        self.settings: dict[str, dict[str, Any]] = {}  # what DECLARE/SHUTDOWN persisted
        self.seq = 0
        self.call = 0  # the broker call being applied (see Msg.call)
        self.gone: set[bytes] = set()  # acked or dropped for good

    # --- helpers --------------------------------------------------------------------------

    @property
    def wall(self) -> float:
        return self.now + self.offset

    def q(self, name: str) -> Queue:
        if name not in self.queues:
            self.queues[name] = Queue(name)
        return self.queues[name]

    def ready(self, q: Queue) -> list[Msg]:
        """The messages ``q`` would hand out now, in order: higher priority first, then
        in put order (messages given back keep their place: ahead of newer ones)."""
        wall = self.wall
        return sorted((m for m in q.waiting if m.due <= wall), key=lambda m: (-m.priority, m.seq))

    def delayed(self, q: Queue) -> list[Msg]:
        wall = self.wall
        return [m for m in q.waiting if m.due > wall]

    def held(self, q: Queue) -> int:
        return len(q.waiting) + len(q.flights)

    def room(self, q: Queue) -> int | None:
        return None if not q.maxsize else max(0, q.maxsize - self.held(q))

    def persist(self, q: Queue) -> None:
        self.settings[q.name] = q.settings()

    def remembered(self, q: Queue, dedup_id: str) -> bool:
        entry = q.dedup.get(dedup_id)
        return entry is not None and entry[0] > self.wall

    def _store(self, q: Queue, key: bytes, opts: dict[str, Any]) -> Msg:
        self.seq += 1
        wall = self.wall
        delay, ttl = opts.get("delay", 0.0), opts.get("ttl", 0.0)
        due = wall + delay if delay else 0.0
        expires = (due or wall) + ttl if ttl else 0.0
        m = Msg(
            key,
            self.seq,
            opts.get("priority", 0),
            dict(opts.get("headers") or {}),
            due,
            due,
            expires,
            call=self.call,
        )
        q.waiting.append(m)
        q.unfinished += 1
        return m

    def _fresh(self, q: Queue, payloads: list[bytes], ids: list[str] | None) -> list[bytes]:
        """The payloads of a put that are not repeats (remembering their ids as it goes)."""
        if ids is None:
            return list(payloads)
        out = []
        for p, d in zip(payloads, ids, strict=True):
            if self.remembered(q, d):
                continue
            if q.dedup_window > 0:
                q.dedup[d] = (self.wall + q.dedup_window, self.call)
            out.append(p)
        return out

    def _new_count(self, q: Queue, ids: list[str] | None, n: int) -> int:
        """How many payloads of a put would be stored (repeats left out)."""
        if ids is None or self.known.repeats_count_for_maxsize:
            return n
        seen: set[str] = set()
        count = 0
        for d in ids:
            if self.remembered(q, d) or (d in seen and q.dedup_window > 0):
                continue
            seen.add(d)
            count += 1
        return count

    def promises(self, q: Queue, ids: list[str] | None) -> list[int | None]:
        """The calls that stored the originals of a put's repeats (its confirmation says
        they are stored)."""
        if ids is None:
            return []
        return [q.dedup[d][1] for d in ids if self.remembered(q, d)]

    # --- dead letters and requeues --------------------------------------------------------

    def dead_letter(self, q: Queue, m: Msg, reason: str) -> None:
        if q.dead and reason == "expired":  # put here with a ttl: nowhere further to go
            self.gone.add(m.key)
            q.unfinished = max(0, q.unfinished - 1)
            return
        if q.dead:  # rejected again: it stays where it is
            self.requeue(q, m)
            return
        q.unfinished = max(0, q.unfinished - 1)
        dead = self.q(q.name + DEAD)
        m.put_due = m.due = m.expires = 0.0  # a dead letter keeps its headers and priority
        m.origin, m.reason = q.name, reason
        m.handed = m.recorded = 0  # counted afresh there
        dead.waiting.append(m)
        dead.unfinished += 1

    def requeue(self, q: Queue, m: Msg, delay: float = 0.0) -> None:
        if not q.dead and m.handed >= q.max_deliveries:
            self.dead_letter(q, m, "max_deliveries")
            return
        if m.expires and m.expires <= self.wall:
            self.dead_letter(q, m, "expired")
            return
        m.recorded = m.handed
        if delay > 0:
            m.due = self.wall + delay
        q.waiting.append(m)

    # --- serving parked requests ----------------------------------------------------------

    def _take(self, q: Queue, w: Waiter) -> Reply:
        out = []
        for m in self.ready(q)[: w.max_items]:
            q.waiting.remove(m)
            m.handed += 1
            if w.manual:
                lease = w.lease if w.lease is not None else q.lease
                q.flights.append(Flight(m, w.conn, self.now + lease, q.name, w.req))
            else:
                self.gone.add(m.key)
            out.append((m.key, m.handed, tuple(sorted(m.headers.items()))))
        return ("deliver", w.req, tuple(out), w.manual)

    def serve(self, joins: str | None = None) -> list[Out]:
        """Hand ready messages to parked GETs, admit parked PUTs that fit, answer JOINs
        of queues with nothing unfinished, refuse GETs of a drained shut-down queue.
        (``joins``: the queue whose JOINs the broker answers today, with
        ``Known.join_not_answered``; else every queue's.)"""
        out: list[Out] = []
        progress = True
        while progress:
            progress = False
            for q in list(self.queues.values()):
                for w in [w for w in q.waiters if w.kind == "get"]:
                    if not self.ready(q):
                        break
                    q.waiters.remove(w)
                    out.append((w.conn, self._take(q, w)))
                    progress = True
                for w in [w for w in q.waiters if w.kind == "put"]:
                    room = self.room(q)
                    if room is not None and room < len(w.payloads):
                        break
                    q.waiters.remove(w)
                    self._admit(q, w)
                    out.append((w.conn, ("confirmed", w.req, len(w.payloads))))
                    progress = True
        for q in self.queues.values():
            if q.shutdown and not q.waiting:
                for w in [w for w in q.waiters if w.kind == "get"]:
                    q.waiters.remove(w)
                    out.append((w.conn, ("error", w.req, "shutdown")))
            if not self.known.join_not_answered or q.name == joins:
                out += self._joins(q)
        return out

    def _joins(self, q: Queue) -> list[Out]:
        if q.unfinished:
            return []
        joins = [w for w in q.waiters if w.kind == "join"]
        for w in joins:
            q.waiters.remove(w)
        return [(w.conn, ("ok", w.req, 0)) for w in joins]

    def _admit(self, q: Queue, w: Waiter) -> None:
        for p in self._fresh(q, w.payloads, w.options.get("dedup_ids")):
            self._store(q, p, w.options)

    def _park(self, w: Waiter) -> None:
        self.q(w.queue).waiters.append(w)

    # --- requests ---------------------------------------------------------------------------

    def put(
        self,
        conn: int,
        req: int,
        queue: str,
        payloads: list[bytes],
        opts: dict[str, Any],
        ids: list[str] | None,
        wait: float | None,
    ) -> tuple[list[Out], list[int | None]]:
        """A PUT or PUT_BATCH. Also returns the calls whose storing the confirmation
        vouches for (the originals of repeats)."""
        q = self.q(queue)
        if q.shutdown:
            return [(conn, ("error", req, "shutdown"))], []
        n = len(payloads)
        new = self._new_count(q, ids, n)
        if q.maxsize and new > q.maxsize:
            return [(conn, ("error", req, "bad_request"))], []
        if ids is not None and all(self.remembered(q, d) for d in ids):
            return [(conn, ("confirmed", req, n))], self.promises(q, ids)
        room = self.room(q)
        parked = any(w.kind == "put" for w in q.waiters)
        if (room is None or room >= new) and not parked:
            promised = self.promises(q, ids)
            for p in self._fresh(q, payloads, ids):
                self._store(q, p, opts)
            return [(conn, ("confirmed", req, n)), *self.serve()], promised
        if wait == 0:
            return [(conn, ("error", req, "full"))], []
        deadline = None if wait is None else self.now + wait
        self._park(
            Waiter(
                "put",
                conn,
                req,
                deadline,
                queue,
                payloads=list(payloads),
                options={**opts, "dedup_ids": ids},
            )
        )
        return self.serve(), []

    def get(
        self,
        conn: int,
        req: int,
        queue: str,
        max_items: int,
        wait: float | None,
        manual: bool,
        lease: float | None,
    ) -> list[Out]:
        q = self.q(queue)
        w = Waiter(
            "get", conn, req, None if not wait else self.now + wait, queue, max_items, manual, lease
        )
        if self.ready(q):
            return [(conn, self._take(q, w)), *self.serve()]
        if q.shutdown and not q.waiting:
            return [(conn, ("error", req, "shutdown"))]
        if wait == 0:
            return [(conn, ("error", req, "empty"))]
        self._park(w)
        return []

    def _flight(self, queue: str, did: int) -> Flight | None:
        q = self.queues.get(queue)
        if q is None:
            return None
        return next((f for f in q.flights if f.did == did), None)

    def _settle(
        self, conn: int, req: int, queue: str, dids: list[int], settle: Callable[[Flight], None]
    ) -> Out:
        """``settle`` each of ``dids`` in flight on ``queue``, in order (a repeat is no
        longer in flight); the reply: how many were, and which were not."""
        unknown = []
        for did in dids:
            f = self._flight(queue, did)
            if f is None:
                unknown.append(did)
            else:
                settle(f)
        return (conn, ("ok", req, ("settled", len(dids) - len(unknown), tuple(unknown))))

    def ack(self, conn: int, req: int, queue: str, dids: list[int], quiet: bool) -> list[Out]:
        def acked(f: Flight) -> None:
            self.q(queue).flights.remove(f)
            self.gone.add(f.msg.key)

        reply = self._settle(conn, req, queue, dids, acked)
        return ([] if quiet else [reply]) + self.serve(queue)

    def nack(
        self,
        conn: int,
        req: int,
        queue: str,
        dids: list[int],
        requeue: bool,
        delay: float,
        reason: str,
        quiet: bool,
    ) -> list[Out]:
        def nacked(f: Flight) -> None:
            q = self.q(queue)
            q.flights.remove(f)
            if requeue:
                self.requeue(q, f.msg, delay)
            else:
                self.dead_letter(q, f.msg, reason or "rejected")

        reply = self._settle(conn, req, queue, dids, nacked)
        return ([] if quiet else [reply]) + self.serve(queue)

    def extend(self, conn: int, req: int, queue: str, dids: list[int], seconds: float) -> list[Out]:
        def extended(f: Flight) -> None:
            f.deadline = self.now + seconds

        return [self._settle(conn, req, queue, dids, extended)]

    def declare(self, conn: int, req: int, queue: str, settings: dict[str, Any]) -> list[Out]:
        q = self.q(queue)
        out: list[Out] = []
        if settings:
            for k, v in settings.items():
                setattr(q, k, v)
            self.persist(q)
            if q.maxsize:  # parked batches that can never fit now are refused
                for w in [w for w in q.waiters if w.kind == "put"]:
                    if len(w.payloads) > q.maxsize:
                        q.waiters.remove(w)
                        out.append((w.conn, ("error", w.req, "bad_request")))
        return [(conn, ("ok", req, "info")), *out, *self.serve()]

    def shutdown(
        self, conn: int, req: int, queue: str, immediate: bool, conns: list[int]
    ) -> list[Out]:
        q = self.q(queue)
        q.shutdown = True
        self.persist(q)
        if immediate:
            dropped = list(q.waiting)
            q.waiting.clear()
            self.gone.update(m.key for m in dropped)
            q.unfinished = max(0, q.unfinished - len(dropped))
        out: list[Out] = [(conn, ("ok", req, None))]
        for w in [w for w in q.waiters if w.kind == "put"]:
            q.waiters.remove(w)
            out.append((w.conn, ("error", w.req, "shutdown")))
        out += [(c, ("queue_shutdown", queue, immediate)) for c in conns]
        return out + self.serve(queue)

    def purge(self, conn: int, req: int, queue: str) -> list[Out]:
        q = self.queues.get(queue)
        if q is None:
            return [(conn, ("ok", req, 0))]
        dropped = list(q.waiting)
        q.waiting.clear()
        self.gone.update(m.key for m in dropped)
        q.unfinished = max(0, q.unfinished - len(dropped))
        return [(conn, ("ok", req, len(dropped))), *self.serve(queue)]

    def delete(self, conn: int, req: int, queue: str) -> list[Out]:
        q = self.queues.pop(queue, None)
        self.settings.pop(queue, None)
        if q is None:
            return [(conn, ("ok", req, 0))]
        dropped = [*q.waiting, *(f.msg for f in q.flights)]
        self.gone.update(m.key for m in dropped)
        out: list[Out] = [(conn, ("ok", req, len(dropped)))]
        for w in q.waiters:
            reply = ("ok", w.req, 0) if w.kind == "join" else ("error", w.req, "shutdown")
            out.append((w.conn, reply))
        return out + self.serve()

    def move(
        self, conn: int, req: int, src_name: str, dst_name: str, limit: int | None
    ) -> list[Out]:
        src = self.queues.get(src_name)
        if src is None or not self.ready(src):
            return [(conn, ("ok", req, 0))]
        dst = self.q(dst_name)
        if dst.shutdown:
            return [(conn, ("error", req, "shutdown"))]
        ready = self.ready(src)
        n = len(ready) if limit is None else min(limit, len(ready))
        room = self.room(dst)
        if room is not None:
            n = min(n, room)
        for m in ready[:n]:  # moved as new messages: headers and priority kept
            src.waiting.remove(m)
            self.seq += 1
            moved = Msg(m.key, self.seq, m.priority, m.headers, call=self.call)
            dst.waiting.append(moved)
        src.unfinished = max(0, src.unfinished - n)
        dst.unfinished += n
        return [(conn, ("ok", req, n)), *self.serve(src_name)]

    def task_done(self, conn: int, req: int, queue: str, count: int) -> list[Out]:
        q = self.queues.get(queue)
        if q is None or count > q.unfinished:
            return [(conn, ("error", req, "value"))]
        q.unfinished -= count
        return [(conn, ("ok", req, q.unfinished)), *self.serve(queue)]

    def join(self, conn: int, req: int, queue: str, wait: float | None) -> list[Out]:
        q = self.queues.get(queue)
        if q is None or q.unfinished == 0:
            return [(conn, ("ok", req, 0))]
        if wait == 0:
            return [(conn, ("error", req, "timeout"))]
        self._park(Waiter("join", conn, req, None if wait is None else self.now + wait, queue))
        return []

    def cancel(self, conn: int, req: int) -> list[Out]:
        for q in self.queues.values():
            for w in q.waiters:
                if w.conn == conn and w.req == req:
                    q.waiters.remove(w)
                    # a put that waited ahead of others leaves room for them to be admitted
                    return [] if self.known.cancelled_put_blocks else self.serve()
        return []

    def connection_lost(self, conn: int) -> list[Out]:
        for q in list(self.queues.values()):
            q.waiters = [w for w in q.waiters if w.conn != conn]
            mine = [f for f in q.flights if f.conn == conn]
            for f in mine:
                q.flights.remove(f)
                self.requeue(q, f.msg)
        return [(c, r) for c, r in self.serve() if c != conn]

    # --- time -------------------------------------------------------------------------------

    def deadlines(self) -> list[float]:
        """When something is due (monotonic), soonest first."""
        out: list[float] = []
        for q in self.queues.values():
            out += [f.deadline for f in q.flights]
            out += [w.deadline for w in q.waiters if w.deadline is not None]
            out += [m.due - self.offset for m in q.waiting if m.due > self.wall]
            out += [m.expires - self.offset for m in q.waiting if m.expires]
        return sorted(d for d in out if d > self.now)

    def tick(self, now: float) -> list[Out]:
        """Time passes to ``now``, with nothing else happening meanwhile (the broker's
        timer is punctual: the test ticks at every deadline on the way)."""
        self.now = now
        out: list[Out] = []
        wall = self.wall
        for q in list(self.queues.values()):  # leases that ran out: given back
            for f in sorted(q.flights, key=lambda f: f.deadline):
                if f.deadline <= now:
                    q.flights.remove(f)
                    self.requeue(q, f.msg)
        for q in list(self.queues.values()):  # waits that ran out
            for w in list(q.waiters):
                if w.deadline is not None and w.deadline <= now:
                    q.waiters.remove(w)
                    code = {"get": "empty", "put": "full", "join": "timeout"}[w.kind]
                    out.append((w.conn, ("error", w.req, code)))
        # Expired while waiting: dead-lettered, in the order their ttls ran out (then put
        # order), across queues - after a restart many at once. The order is seen: a
        # queue's unfinished count below what it holds (task_done() before the take, kept
        # across a restart) is clamped at 0 when a message leaves it, not when one enters.
        expired = [
            (m.expires, m.seq, q, m)
            for q in self.queues.values()
            for m in q.waiting
            if m.expires and m.expires <= wall
        ]
        for _, _, q, m in sorted(expired, key=lambda e: (e[0], e[1])):
            q.waiting.remove(m)
            self.dead_letter(q, m, "expired")
        return out + self.serve()

    # --- what a store keeps -------------------------------------------------------------------

    def image(self) -> Image:
        messages: dict[bytes, Durable] = {}
        for q in self.queues.values():
            for m in [*q.waiting, *(f.msg for f in q.flights)]:
                messages[m.key] = (
                    q.name,
                    m.priority,
                    tuple(sorted(m.headers.items())),
                    m.put_due,
                    m.due,
                    m.expires,
                    m.recorded,
                    m.handed,
                    m.origin,
                    m.reason,
                    m.seq,
                )
        dedup = {
            (q.name, d): until for q in self.queues.values() for d, (until, _) in q.dedup.items()
        }
        taken = {
            q.name: q.unfinished - self.held(q)
            for q in self.queues.values()
            if q.unfinished != self.held(q)
        }
        return Image(messages, copy.deepcopy(self.settings), dedup, taken)

    def restart(self, image: Image, found: dict[bytes, int], now: float, offset: float) -> None:
        """The broker restarted on a store holding ``image`` (``found``: the delivery
        count each message was recovered with): nothing in flight, nothing parked. A
        queue's unfinished count is what it holds plus its tasks taken and not yet done
        (README: task_done/join across clients; nothing resets them)."""
        self.now, self.offset = now, offset
        wall = self.wall
        self.queues = {}
        self.settings = copy.deepcopy(image.settings)
        for name, settings in image.settings.items():
            q = self.q(name)
            for k, v in settings.items():
                setattr(q, k, v)
        for (name, d), until in image.dedup.items():
            if until > wall:
                self.q(name).dedup[d] = (until, None)
        for key, dur in sorted(image.messages.items(), key=lambda kv: kv[1][-1]):
            name, prio, headers, put_due, due, expires, _, _, origin, reason, seq = dur
            q = self.q(name)
            if self.known.nack_delay_lost:
                due = put_due
            m = Msg(key, seq, prio, dict(headers), put_due, due, expires, found[key],
                    found[key], origin, reason)  # fmt: skip
            q.waiting.append(m)
            q.unfinished += 1
        for name, taken in image.taken.items():
            q = self.q(name)
            q.unfinished = max(0, q.unfinished + taken)
        # What the store holds as it was recovered: the dead letters made below are the
        # new broker's first change, which a crash before its write loses (and the next
        # start makes again).
        self.recovered = self.image()
        if not self.known.inflight_not_counted:  # deliveries are stored: one whose last
            for q in list(self.queues.values()):  # allowed delivery was in flight is dead
                for m in sorted(q.waiting, key=lambda m: m.seq):
                    if not q.dead and m.handed >= q.max_deliveries:
                        q.waiting.remove(m)
                        self.dead_letter(q, m, "max_deliveries")
