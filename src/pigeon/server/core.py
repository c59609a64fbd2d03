"""The broker's rules, sans-IO: messages in, replies out, time passed in explicitly.

# Strategy:
# ``Broker.handle(conn, message, now)`` applies one client message and returns the
# replies to send, as ``(conn, message)`` pairs; ``Broker.tick(now)`` applies the passage
# of time (leases that expired, waits that timed out, delayed redeliveries that came due)
# and ``connection_lost(conn)`` gives back what a vanished client held. Nothing here
# blocks, sleeps, reads a clock or touches a socket, so every rule of delivery is tested
# without a network (tests/server/test_core.py), and the asyncio server
# (server/app.py) is a thin loop around it.
#
# Every number in a request is range-checked first (``protocol.rules``). Nothing grows
# without a bound: deadlines live in three heaps (leases, parked requests, delayed
# messages) with lazy deletion, so no request scans every queue; what each connection
# holds (deliveries a GET at a time, parked requests, parked payload bytes) is kept by
# connection; a queue made by a mere reference is forgotten as soon as it holds nothing
# and nobody waits on it, and ``max_queues`` caps the rest. A reply never carries more than
# ``max_reply_bytes`` of payload.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import secrets
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat, starmap
from operator import attrgetter
from typing import Any, ClassVar

import msgspec

from pigeon.options import DEFAULT_LEASE, DEFAULT_MAX_DELIVERIES
from pigeon.protocol import (
    Ack,
    Cancel,
    ClientMessage,
    Declare,
    Delete,
    Deliver,
    Delivery,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Move,
    Nack,
    Ok,
    Peek,
    Ping,
    Pong,
    Purge,
    Put,
    PutBatch,
    PutOptions,
    QueueShutdown,
    Shutdown,
    Stats,
    TaskDone,
)
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Confirmed, PlainDelivery
from pigeon.protocol.rules import problem
from pigeon.server.deadlines import Deadlines
from pigeon.server.model import (
    DEAD_SUFFIX,
    Extra,
    GetWaiter,
    InFlight,
    PutWaiter,
    QueueState,
    Store,
    Stored,
    Waiter,
)

__all__ = ["Broker", "Conn", "Out"]

Conn = int
Out = tuple[Conn, Any]

# Bytes of framing per message in a DELIVER, rounded up: the entry's array header, its
# id and delivery count (up to 9 bytes each) and its payload's bin header (5).
_DELIVERY_OVERHEAD = 32
_JOIN_COST = 8  # bytes a JOIN without a wait holds while it waits (its req, in an array)
# A wall-clock time turned into the broker's clock and back may move by a rounding error:
# a deadline taken from a heap counts as reached within this many seconds of it.
_EPSILON = 1e-3
_encode = msgspec.msgpack.Encoder().encode


def headers_size(headers: dict[str, str] | None) -> int:
    """Bytes a message's headers take in a DELIVER (their msgpack map)."""
    return len(_encode(headers)) if headers else 0


def reply_cost(msg: Stored) -> int:
    """Bytes ``msg`` adds to a DELIVER: payload, headers and framing."""
    extra = msg.extra
    n = len(msg.payload) + _DELIVERY_OVERHEAD
    return n + headers_size(extra.headers) if extra is not None and extra.headers else n


_msg_id = attrgetter("id")


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_PRUNE_HANDED = 64  # a connection's record of GETs is pruned at this length at least


@dataclass(slots=True)
class _ConnState:
    """What one connection holds at the broker."""

    conn: Conn
    unacked: int = 0  # payload bytes delivered to it and not settled
    # What it was handed, a GET at a time, oldest first: (queue, delivery ids). An ACK
    # does not touch this (one entry per GET, not an index entry per delivery made at the
    # GET and removed at the ACK); the settled ones are pruned now and then, and when the
    # connection goes, those still in the queue's ``in_flight`` go back.
    handed: list[tuple[str, Sequence[int]]] = field(default_factory=list)
    prune_at: int = _PRUNE_HANDED
    holding: int = 0  # how many deliveries it holds (not settled)
    parked: dict[int, Waiter] = field(default_factory=dict)  # req -> parked request
    parked_bytes: int = 0  # bytes of its parked PUTs (payloads, headers, framing)
    parked_gets: int = 0  # its GETs and JOINs waiting
    # Queues where its GETs are set aside while it holds max_unacked_bytes (out of the
    # queues' lines, in QueueState.blocked, so serving a queue never walks them); they go
    # back to the heads of the lines once it settles some.
    blocked: set[str] = field(default_factory=set)
    joins: set[str] = field(default_factory=set)  # queues where it has JOINs without a wait


def _err(conn: Conn, req: int, code: str, message: str) -> Out:
    return conn, Error(req, code, message)


def _error(code: str, message: str, req: int) -> Error:
    return Error(req, code, message)


class Broker:
    """All queues of one broker and the rules that move messages between them."""

    def __init__(
        self,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        default_lease: float = DEFAULT_LEASE,
        default_max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_unacked_bytes: int = 64 * 2**20,
        max_reply_bytes: int = 16 * 2**20,
        max_queues: int = 10_000,
        max_parked_bytes_per_connection: int = 64 * 2**20,
        max_parked_bytes: int = 256 * 2**20,
        max_parked_gets_per_connection: int = 65_536,
        max_parked_gets: int = 262_144,
        wall_clock: Callable[[], float] = time.time,
        max_dedup_ids: int = 1_000_000,
    ) -> None:
        self.store = store if store is not None else Store()
        # Bytes delivered to one connection and not yet settled: beyond this a consumer
        # gets no more until it acks (its GETs wait), so one slow consumer cannot hoard
        # the queue or make the broker hold unbounded unacked payloads for it.
        self.max_unacked_bytes = max_unacked_bytes
        self.max_reply_bytes = max_reply_bytes
        self.max_queues = max_queues
        self.max_parked_bytes_per_connection = max_parked_bytes_per_connection
        # GETs waiting for a message: each costs memory and a place in its queue's line
        self.max_parked_gets_per_connection = max_parked_gets_per_connection
        self.max_parked_gets = max_parked_gets
        self.parked_gets = 0
        self.max_parked_bytes = max_parked_bytes
        self.parked_bytes = 0
        # Dedup ids remembered, across all queues: each costs memory and a live entry in
        # the store for its whole window (up to a year): a put with new ones beyond this
        # is refused, as a full queue is, never stored with its id forgotten early.
        self.max_dedup_ids = max_dedup_ids
        self.dedup_ids = 0
        self._dedup_swept_at = float("-inf")
        self.queues: dict[str, QueueState] = {}
        self._conns: dict[Conn, _ConnState] = {}
        # Delivery ids start at a random 40-bit epoch so that an ack from before a
        # restart can never settle a different delivery after it.
        self._next_delivery = (secrets.randbits(40) << 20) + 1
        # Leases: one entry per batch handed out with one deadline. Entries whose subject
        # went meanwhile stay until their time or the heap's next rebuild from what is
        # live (these four functions), so each heap stays proportional to what waits.
        self.deadlines = Deadlines(
            self._live_leases, self._live_timeouts, self._live_delays, self._live_expiries
        )
        self._unblocked: list[_ConnState] = []  # connections that settled with GETs set aside
        self.default_lease = default_lease
        self.default_max_deliveries = default_max_deliveries
        self.now = 0.0 if clock is None else clock()
        # A message's delay and expiry are kept as wall-clock times (they outlive a
        # restart); the broker's clock is monotonic: wall = now + _wall_offset.
        self._wall_offset = wall_clock() - self.now
        for name, settings in self.store.recover_queues().items():
            self._apply_settings(self._queue(name, limit=False), settings)
        wall_now = self.now + self._wall_offset
        for name, ids in self.store.recover_dedup().items():
            q = self._queue(name, limit=False)
            for dedup_id, until in ids.items():
                if until > wall_now:
                    q.dedup[dedup_id] = until
                    q.dedup_heap.append((until, dedup_id))
                    self.dedup_ids += 1
            heapq.heapify(q.dedup_heap)
        last_id = 0
        spent: list[tuple[QueueState, Stored]] = []
        for name, msg in self.store.recover():
            q = self._queue(name, limit=False)
            msg.enqueued = self.now
            q.unfinished += 1
            last_id = max(last_id, msg.id)
            if msg.deliveries >= q.max_deliveries and not q.is_dead_letters:
                spent.append((q, msg))  # in flight at a crash after its last delivery
            elif msg.extra is not None:  # (a dead letter has no timer, unless put there with one)
                self._wait(q, msg, back=bool(msg.origin))
            elif q.is_dead_letters and msg.origin:
                q.ready.give_back(msg)
            else:
                q.ready.append(msg)
        self._ids = itertools.count(last_id + 1)
        # Deliveries are stored: a message whose last allowed delivery was in flight when
        # the broker stopped came back after it, and goes to the dead letters - else one in
        # flight at every crash would be delivered for ever.
        with self.store.atomic():
            for q, msg in spent:
                self._dead_letter(q, msg, "max_deliveries")

    @property
    def connections(self) -> set[Conn]:
        return set(self._conns)

    # --- helpers ------------------------------------------------------------------------

    def _queue(self, name: str, *, limit: bool = True) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            if limit and len(self.queues) >= self.max_queues:
                raise _Refused(
                    Code.LIMIT,
                    f"this broker holds {len(self.queues)} queues (max_queues="
                    f"{self.max_queues}); delete unused ones (pigeon delete) or raise "
                    "--max-queues",
                )
            q = self.queues[name] = QueueState(
                name, lease=self.default_lease, max_deliveries=self.default_max_deliveries
            )
        return q

    def _forget_if_idle(self, name: str) -> None:
        q = self.queues.get(name)
        if q is not None and q.idle:
            del self.queues[name]

    def _conn(self, conn: Conn) -> _ConnState:
        cs = self._conns.get(conn)
        if cs is None:
            cs = self._conns[conn] = _ConnState(conn)
        return cs

    # --- what the deadline heaps are rebuilt from ------------------------------------------

    def _live_leases(self) -> Iterator[tuple[float, tuple[str, Sequence[int]]]]:
        groups: dict[tuple[float, str], list[int]] = {}
        for name, q in self.queues.items():
            for did, f in q.in_flight.items():
                groups.setdefault((f.deadline, name), []).append(did)
        return ((d, (name, dids)) for (d, name), dids in groups.items())

    def _live_timeouts(self) -> Iterator[tuple[float, Waiter]]:
        for cs in self._conns.values():
            for w in cs.parked.values():
                if w.deadline is not None and not w.done:
                    yield w.deadline, w

    def _live_delays(self) -> Iterator[tuple[float, tuple[str, int]]]:
        offset = self._wall_offset
        for name, q in self.queues.items():
            for mid, msg in q.delayed.items():
                assert msg.extra is not None  # a delayed message carries its due time
                yield msg.extra.due - offset, (name, mid)

    def _live_expiries(self) -> Iterator[tuple[float, tuple[str, int]]]:
        offset = self._wall_offset
        for name, q in self.queues.items():
            for mid, msg in q.expiring.items():
                assert msg.extra is not None
                yield msg.extra.expires - offset, (name, mid)

    def _park(self, w: Waiter) -> None:
        cs = self._conn(w.conn)
        cs.parked[w.req] = w
        if not isinstance(w, PutWaiter):
            cs.parked_gets += 1
            self.parked_gets += 1
            if isinstance(w, GetWaiter):
                self.queues[w.queue].consumers_waiting += 1
        if w.deadline is not None:
            self.deadlines.timeouts.push(w.deadline, w)

    def _park_refused(self, cs: _ConnState, what: str) -> str | None:
        """Why ``cs`` may not park one more GET or JOIN (the limits), or None."""
        if cs.parked_gets >= self.max_parked_gets_per_connection:
            return (
                f"this connection already has {cs.parked_gets} {what} waiting "
                f"(max_parked_gets_per_connection={self.max_parked_gets_per_connection}); "
                "wait for them first"
            )
        if self.parked_gets >= self.max_parked_gets:
            return (
                f"{self.parked_gets} GETs and JOINs are waiting on this broker "
                f"(max_parked_gets={self.max_parked_gets}); try again later"
            )
        return None

    def _parked_bytes_refused(self, cs: _ConnState, size: int, what: str) -> str | None:
        """Why ``cs`` may not park ``size`` more bytes of puts or JOINs, or None."""
        if cs.parked_bytes + size > self.max_parked_bytes_per_connection:
            return (
                f"this connection's {what} already hold {cs.parked_bytes} bytes "
                f"(max_parked_bytes_per_connection={self.max_parked_bytes_per_connection}); "
                "wait for them first"
            )
        if self.parked_bytes + size > self.max_parked_bytes:
            return (
                f"{what} hold {self.parked_bytes} bytes on this broker "
                f"(max_parked_bytes={self.max_parked_bytes}); try again later"
            )
        return None

    def _finish(self, w: Waiter) -> None:
        """A parked request was answered, timed out or withdrawn: it leaves the index."""
        if w.done:
            return
        w.done = True
        q = self.queues.get(w.queue)
        if q is not None:
            q.stale += 1  # its line holds one more finished waiter (see QueueState.compact)
            if q.blocked and isinstance(w, GetWaiter):
                aside = q.blocked.get(w.conn)
                if aside is not None and aside.get(w.req) is w:
                    del aside[w.req]
                    if not aside:
                        del q.blocked[w.conn]
        cs = self._conns.get(w.conn)
        if cs is not None and cs.parked.get(w.req) is w:
            del cs.parked[w.req]
            if isinstance(w, PutWaiter):
                cs.parked_bytes -= w.size
            else:
                cs.parked_gets -= 1
                self.parked_gets -= 1
                if isinstance(w, GetWaiter) and q is not None:
                    q.consumers_waiting -= 1
        if isinstance(w, PutWaiter):
            self.parked_bytes -= w.size

    def _deadline(self, wait: float | None) -> float | None:
        return None if wait is None else self.now + wait

    def _can_take(self, q: QueueState, conn: Conn, manual: bool) -> bool:
        if not q.ready:
            return False
        held = self._conn(conn).unacked if manual else 0
        return not held or held + len(q.ready.peek().payload) <= self.max_unacked_bytes

    def _take(self, q: QueueState, w: GetWaiter) -> list[Delivery]:
        """Up to ``w.max_items`` messages for ``w``, within ``max_reply_bytes`` (payloads,
        headers and framing: at least one). A message that expired while it waited goes
        to the dead letters instead; one too large for any reply too (the limits shrank
        across a restart), unless it is already a dead letter: then nothing is taken."""
        out: list[Any] = []  # Delivery, or PlainDelivery (no headers: the bytes as before)
        cs = self._conn(w.conn)
        held = cs.unacked
        budget = self.max_reply_bytes
        limit = self.max_unacked_bytes
        size = 0
        lease = w.lease if w.lease is not None else q.lease
        deadline = self.now + lease
        ready, name, conn, manual, want = q.ready, q.name, w.conn, w.manual_ack, w.max_items
        in_flight = q.in_flight
        removed: list[int] = []
        leased: list[int] = []
        counted: list[int] = []  # ids of the messages leased: their deliveries are stored
        # Only plain priority-0 messages waiting (the common case): take from the deque
        # itself, not through Ready's methods (four calls less per message).
        fresh = ready.plain()
        if fresh is not None and manual and want > 4:  # in bulk: for batches
            bulk = self._take_plain(q, fresh, want, conn, cs, deadline)
            if bulk is not None:
                return bulk
        wall = self.now + self._wall_offset
        while len(out) < want and ready:
            msg = ready.peek() if fresh is None else fresh[0]
            extra = msg.extra
            n = len(msg.payload)
            cost = n + _DELIVERY_OVERHEAD
            headers = None
            if extra is not None:
                if 0 < extra.expires <= wall:
                    ready.popleft()  # its expiry is due in this very turn: not delivered
                    self._dead_letter(q, msg, "expired")
                    continue
                headers = extra.headers
                if headers:
                    cost += headers_size(headers)
            if size + cost > budget:
                if out or q.is_dead_letters:
                    break
                ready.popleft()  # it can never be delivered with these limits
                self._dead_letter(q, msg, "too_large")
                continue
            if manual and held and held + n > limit:
                break  # this consumer holds enough; it gets more once it settles some
            if fresh is None:
                ready.popleft()
            else:
                fresh.popleft()
            size += cost
            msg.deliveries += 1
            if extra is not None:
                q.expiring.pop(msg.id, None)  # taken in time
            if manual:
                did = self._next_delivery
                self._next_delivery = did + 1
                in_flight[did] = InFlight(msg, conn, deadline)
                held += n
                leased.append(did)
                counted.append(msg.id)
                out.append(
                    Delivery(did, msg.deliveries, msg.payload, headers)
                    if headers
                    else PlainDelivery(did, msg.deliveries, msg.payload)
                )
            else:
                removed.append(msg.id)
                out.append(
                    Delivery(0, msg.deliveries, msg.payload, headers)
                    if headers
                    else PlainDelivery(0, msg.deliveries, msg.payload)
                )
        q.delivered_total += len(out)
        if removed:
            self.store.removed_many(name, removed)
        if leased:
            self.store.delivered(name, counted)
            self._lease(deadline, name, leased)
            cs.holding += len(leased)
            self._handed(cs, name, leased)
        cs.unacked = held
        return out

    def _take_plain(
        self,
        q: QueueState,
        fresh: deque[Stored],
        want: int,
        conn: Conn,
        cs: _ConnState,
        deadline: float,
    ) -> list[Any] | None:
        """``_take`` for manual ack from a queue that holds only plain new messages, in
        bulk: the first ``want`` of them if they are all plain and all fit the reply and
        the connection's unacked budget (then every per-message test of ``_take`` would
        pass); None otherwise, for ``_take`` to go message by message."""
        msgs = list(islice(fresh, want))
        total = 0
        for m in msgs:
            if m.extra is not None:
                return None
            total += len(m.payload)
        k = len(msgs)
        if total + k * _DELIVERY_OVERHEAD > self.max_reply_bytes:
            return None
        held = cs.unacked
        if held + total > self.max_unacked_bytes:
            return None
        if k == len(fresh):
            fresh.clear()
        else:  # k calls of popleft, in C
            deque(starmap(fresh.popleft, repeat((), k)), maxlen=0)
        first = self._next_delivery
        self._next_delivery = first + k
        dids = range(first, first + k)
        counts: list[int] = []
        payloads: list[bytes] = []
        count, payload = counts.append, payloads.append
        for m in msgs:
            m.deliveries = n = m.deliveries + 1
            count(n)
            payload(m.payload)
        # map with a type: the structs are made in C, not in a comprehension's loop (a
        # third less time for a hundred)
        flights = map(InFlight, msgs, repeat(conn), repeat(deadline))
        q.in_flight.update(zip(dids, flights, strict=True))
        cs.unacked = held + total
        cs.holding += k
        q.delivered_total += k
        self.store.delivered(q.name, list(map(_msg_id, msgs)))
        self._lease(deadline, q.name, dids)
        self._handed(cs, q.name, dids)
        return list(map(PlainDelivery, dids, counts, payloads))

    def _lease(self, deadline: float, queue: str, dids: Sequence[int]) -> None:
        self.deadlines.leases.push(deadline, (queue, dids))

    def _handed(self, cs: _ConnState, queue: str, dids: Sequence[int]) -> None:
        """Note that ``cs``'s connection was handed ``dids`` of ``queue``. Every
        ``prune_at`` GETs the record drops what was settled since (a delivery id is made
        for one connection and never reused: still in the queue's ``in_flight`` means
        still this connection's), so it stays about the size of what is held."""
        if cs.holding == len(dids):  # it holds nothing older: forget the rest
            cs.handed = [(queue, dids)]
            return
        handed = cs.handed
        handed.append((queue, dids))
        if len(handed) < cs.prune_at:
            return
        kept: list[tuple[str, Sequence[int]]] = []
        queues = self.queues
        for name, ids in handed:
            q = queues.get(name)
            if q is not None and (live := [d for d in ids if d in q.in_flight]):
                kept.append((name, live))
        cs.handed = kept
        cs.prune_at = max(_PRUNE_HANDED, 2 * len(kept))

    def _too_large(self, q: QueueState, w: Waiter) -> Out:
        n = reply_cost(q.ready.peek())
        return _err(
            w.conn,
            w.req,
            Code.TOO_LARGE,
            f"the next message in {q.name!r} takes {n} bytes with its headers, more than one "
            f"reply may carry (max_reply_bytes={self.max_reply_bytes}, from --max-frame-size "
            "and --max-pending-output); raise those limits to take it",
        )

    def _release(self, f: InFlight) -> None:
        cs = self._conns.get(f.conn)
        if cs is not None:
            cs.unacked = max(0, cs.unacked - len(f.msg.payload))
            cs.holding = max(0, cs.holding - 1)
            if cs.blocked:
                self._unblocked.append(cs)

    def _block(self, q: QueueState, w: GetWaiter) -> None:
        """Set ``w`` aside: its connection holds too much unacked to take from ``q``."""
        q.blocked.setdefault(w.conn, {})[w.req] = w
        self._conn(w.conn).blocked.add(q.name)

    def _readmit(self) -> list[Out]:
        """The GETs set aside for connections that have since settled some go back to the
        heads of their lines, in their order, and their queues are served."""
        out: list[Out] = []
        seen: set[int] = set()
        for cs in self._unblocked:
            if id(cs) in seen or not cs.blocked:
                continue
            seen.add(id(cs))
            names, cs.blocked = cs.blocked, set()
            for name in names:
                q = self.queues.get(name)
                if q is None:
                    continue
                waiting = q.blocked.pop(cs.conn, {}).values()
                q.getters.extendleft(reversed([w for w in waiting if not w.done]))
                out += self._serve(q)
        self._unblocked.clear()
        return out

    def _serve(self, q: QueueState) -> list[Out]:
        """Hand ready items to parked getters, and admit parked puts that now fit."""
        if not q.getters and not q.putters and not q.shutdown:
            return []
        out: list[Out] = []
        progress = True
        while progress:
            progress = False
            if q.ready and q.getters:
                # From the head of the line while there is something to hand out: a put
                # costs the getters it serves (and those it passes over), not the line.
                getters = q.getters
                while q.ready and getters:
                    w = getters.popleft()
                    if w.done:
                        q.stale -= 1
                        continue
                    if not self._can_take(q, w.conn, w.manual_ack):
                        self._block(q, w)  # this consumer holds enough unacked already
                        continue
                    items = self._take(q, w)
                    if not items:  # what it found expired, or cannot be carried
                        if not q.ready:  # all of it went to the dead letters: it waits on
                            getters.appendleft(w)
                            break
                        if not self._can_take(q, w.conn, w.manual_ack):
                            self._block(q, w)
                            continue
                    self._finish(w)
                    q.stale -= 1  # it left the line here
                    out.append((w.conn, Deliver(w.req, items)) if items else self._too_large(q, w))
                    progress = True
            while q.putters:
                p = q.putters[0]
                if p.done:
                    q.putters.popleft()
                    continue
                room = q.room()
                if room is not None and room < p.new:
                    break
                q.putters.popleft()
                self._finish(p)
                self._add(q, p.payloads, p.options, p.dedup_ids)
                out.append((p.conn, Confirmed(p.req, len(p.payloads))))
                progress = True
        if q.shutdown and not q.ready and not q.delayed:
            for w in self._all_getters(q):
                if not w.done:
                    self._finish(w)
                    out.append(
                        _err(w.conn, w.req, Code.SHUTDOWN, f"queue {q.name!r} was shut down")
                    )
            q.getters.clear()
        return out

    def _all_getters(self, q: QueueState) -> list[GetWaiter]:
        """The GETs waiting on ``q``, those set aside included (which leave their sets)."""
        getters = list(q.getters)
        for conn, ws in q.blocked.items():
            getters += ws.values()
            cs = self._conns.get(conn)
            if cs is not None:
                cs.blocked.discard(q.name)
        q.blocked.clear()
        return getters

    def _serve_with_dead(self, q: QueueState) -> list[Out]:
        out = self._serve(q)
        dead = self.queues.get(q.name + DEAD_SUFFIX)
        if dead is not None:
            out += self._serve(dead)
        return out

    def _add(
        self,
        q: QueueState,
        payloads: list[bytes],
        opts: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
    ) -> None:
        ids, now = self._ids, self.now
        if opts is None and dedup_ids is None:
            msgs = list(map(Stored, islice(ids, len(payloads)), payloads, repeat(0), repeat(now)))
            q.ready.extend_plain(msgs)
            self.store.added_plain(q.name, msgs)
        else:
            msgs = self._with_options(q, payloads, opts or PutOptions(), dedup_ids)
            self.store.added_many(q.name, msgs)
        q.unfinished += len(msgs)
        q.put_total += len(msgs)

    def _with_options(
        self, q: QueueState, payloads: list[bytes], opts: PutOptions, dedup_ids: list[str] | None
    ) -> list[Stored]:
        """The messages of a put with options, placed: repeats of a dedup id left out,
        delayed ones set aside until due, expiring ones watched."""
        if dedup_ids is None and opts.dedup_id:
            dedup_ids = [opts.dedup_id]
        if dedup_ids is not None:
            fresh = [p for p, d in zip(payloads, dedup_ids, strict=True) if self._first(q, d)]
            payloads = fresh
        wall = self.now + self._wall_offset
        extra = None
        if opts.priority or opts.delay or opts.ttl or opts.headers:
            due = wall + opts.delay if opts.delay else 0.0
            expires = (due or wall) + opts.ttl if opts.ttl else 0.0
            extra = Extra(opts.priority, due, expires, opts.headers or None)
        ids, now = self._ids, self.now
        msgs = [Stored(next(ids), p, enqueued=now, extra=extra) for p in payloads]
        if extra is None:
            q.ready.extend(msgs)
        else:
            for msg in msgs:
                self._wait(q, msg)
        return msgs

    def _forget_dedup(self, q: QueueState) -> None:
        """Forget the dedup ids whose window has passed."""
        wall = self.now + self._wall_offset
        heap, seen = q.dedup_heap, q.dedup
        while heap and heap[0][0] <= wall:
            until, old = heapq.heappop(heap)
            if seen.get(old) == until:
                del seen[old]
                self.dedup_ids -= 1

    def _dedup_full(self, q: QueueState, dedup_ids: list[str]) -> bool:
        """Would remembering ``dedup_ids`` pass ``max_dedup_ids``? At the limit, the ids
        whose window passed are first forgotten in every queue (at most once a second:
        until then a put may be refused a little early)."""
        if self.dedup_ids + len(dedup_ids) <= self.max_dedup_ids:
            return False
        if self.now - self._dedup_swept_at >= 1.0:
            self._dedup_swept_at = self.now
            for other in self.queues.values():
                if other.dedup:
                    self._forget_dedup(other)
        new = sum(d not in q.dedup for d in set(dedup_ids)) if q.dedup_window > 0 else 0
        return self.dedup_ids + new > self.max_dedup_ids

    def _first(self, q: QueueState, dedup_id: str) -> bool:
        """True, and remembered for the queue's window, if ``dedup_id`` is not a repeat."""
        self._forget_dedup(q)
        seen, wall = q.dedup, self.now + self._wall_offset
        if dedup_id in seen:
            return False
        if q.dedup_window > 0:
            until = wall + q.dedup_window
            seen[dedup_id] = until
            self.dedup_ids += 1
            heapq.heappush(q.dedup_heap, (until, dedup_id))
            self.store.deduped(q.name, dedup_id, until)
        return True

    def _wait(self, q: QueueState, msg: Stored, back: bool = False) -> None:
        """Put ``msg``, which carries options, where it waits: set aside until it is due,
        or ready; watched for its expiry if it has one."""
        extra = msg.extra
        assert extra is not None
        offset = self._wall_offset
        if extra.expires:
            q.expiring[msg.id] = msg
            self.deadlines.expiries.push(extra.expires - offset, (q.name, msg.id))
        if extra.due and extra.due - offset > self.now:
            q.delayed[msg.id] = msg
            self.deadlines.delays.push(extra.due - offset, (q.name, msg.id))
        elif back or msg.deliveries or msg.origin:
            q.ready.give_back(msg)
        else:
            q.ready.append(msg)

    def _expired(self, q: QueueState, msg: Stored) -> bool:
        extra = msg.extra
        return extra is not None and 0 < extra.expires <= self.now + self._wall_offset + _EPSILON

    def _requeue(self, q: QueueState, msg: Stored, delay: float = 0.0) -> None:
        """Give a delivered message back, or dead-letter it after max_deliveries (a dead
        letter queue never forwards: its messages stay until acked or purged)."""
        if msg.deliveries >= q.max_deliveries and not q.is_dead_letters:
            self._dead_letter(q, msg, "max_deliveries")
            return
        extra = msg.extra
        if extra is not None and extra.expires:
            if self._expired(q, msg):
                self._dead_letter(q, msg, "expired")
                return
            q.expiring[msg.id] = msg
            self.deadlines.expiries.push(extra.expires - self._wall_offset, (q.name, msg.id))
        q.redelivered_total += 1
        if delay > 0:  # its due time travels with it, into the store too (it outlives a restart)
            due = self.now + delay
            wall_due = due + self._wall_offset
            msg.extra = (  # a new Extra: the messages of one put share theirs
                Extra(due=wall_due)
                if extra is None
                else Extra(extra.priority, wall_due, extra.expires, extra.headers)
            )
            q.delayed[msg.id] = msg
            self.deadlines.delays.push(due, (q.name, msg.id))
        else:
            q.ready.give_back(msg)
        self.store.requeued(q.name, msg)

    def _dead_letter(self, q: QueueState, msg: Stored, reason: str) -> None:
        if q.is_dead_letters:
            if reason == "expired":  # put here with a ttl, which ran out: it has nowhere
                self.store.removed(q.name, msg.id)  # further to go (no NAME.dead.dead)
                q.unfinished = max(0, q.unfinished - 1)
                q.dead_total += 1
                return
            self._requeue(q, msg)  # rejected again: it stays where it is
            return
        q.dead_total += 1
        q.unfinished = max(0, q.unfinished - 1)
        dead = self._queue(q.name + DEAD_SUFFIX, limit=False)
        if msg.extra is not None:  # a dead letter keeps its headers and priority, no timer
            q.expiring.pop(msg.id, None)
            msg.extra = Extra(msg.extra.priority, 0.0, 0.0, msg.extra.headers)
        msg.origin = q.name
        msg.reason = reason
        msg.deliveries = 0  # counted afresh in the dead-letter queue (and when replayed)
        msg.enqueued = self.now
        dead.ready.give_back(msg)  # dead letters keep their original order
        dead.unfinished += 1
        dead.put_total += 1
        self.store.moved(msg, dead.name)

    def _finish_joins(self, q: QueueState) -> list[Out]:
        if q.unfinished > 0:
            return []
        out = [(j.conn, Ok(j.req, 0)) for j in q.joiners if not j.done]
        for j in q.joiners:
            self._finish(j)
        q.joiners.clear()
        return out + self._answer_joins(q, lambda req: Ok(req, 0))

    def _answer_joins(
        self, q: QueueState, reply: Callable[[int], Any], conn: Conn | None = None
    ) -> list[Out]:
        """Answer the JOINs without a wait on ``q`` (of ``conn``, or of everyone)."""
        conns = list(q.join_reqs) if conn is None else [conn]
        out: list[Out] = []
        for c in conns:
            reqs = q.join_reqs.pop(c, None)
            if reqs is None:
                continue
            out += [(c, reply(req)) for req in reqs]
            cost = _JOIN_COST * len(reqs)
            self.parked_bytes -= cost
            cs = self._conns.get(c)
            if cs is not None:
                cs.parked_bytes -= cost
                cs.joins.discard(q.name)
        return out

    @staticmethod
    def _apply_settings(q: QueueState, settings: dict[str, Any]) -> None:
        q.declared = True
        q.maxsize = int(settings.get("maxsize", q.maxsize))
        q.lease = float(settings.get("lease", q.lease))
        q.max_deliveries = int(settings.get("max_deliveries", q.max_deliveries))
        q.dedup_window = float(settings.get("dedup_window", q.dedup_window))
        q.shutdown = bool(settings.get("shutdown", q.shutdown))

    def _persist_settings(self, q: QueueState) -> None:
        self.store.declared(
            q.name,
            {
                "maxsize": q.maxsize,
                "lease": q.lease,
                "max_deliveries": q.max_deliveries,
                "dedup_window": q.dedup_window,
                "shutdown": q.shutdown,
            },
        )

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
            return [_err(conn, req, Code.BAD_REQUEST, f"unexpected {type(msg).__name__}")]
        bad = problem(msg, self.queues)
        if bad is not None:
            return [_err(conn, req, Code.BAD_REQUEST, bad)]
        cs = self._conns.get(conn)
        if cs is not None and cs.parked and req in cs.parked and type(msg) is not Cancel:
            # Its reply could not be told from the parked one's, and the parked one would
            # be orphaned (kept in its line, taking messages for nobody).
            why = (
                f"req {req} is still waiting for its reply on this connection; give each "
                "request a req that is not in use"
            )
            return [_err(conn, req, Code.BAD_REQUEST, why)]
        try:
            with self.store.atomic():  # one request, one store transaction
                out = handler(self, conn, msg)
                if self._unblocked:
                    out += self._readmit()
        except _Refused as refused:
            return [_err(conn, req, refused.code, str(refused))]
        name = getattr(msg, "queue", None)
        if name is not None:
            self._forget_if_idle(name)
        return out

    def _put(self, conn: Conn, m: Put | PutBatch) -> list[Out]:
        if isinstance(m, Put):
            payloads, dedup_ids, largest = [m.payload], None, len(m.payload)
        else:
            payloads, dedup_ids = m.payloads, m.dedup_ids
            largest = max(map(len, payloads), default=0)
        opts = m.options
        q = self._queue(m.queue)
        if q.shutdown:
            return [
                _err(conn, m.req, Code.SHUTDOWN, f"queue {q.name!r} was shut down; put refused")
            ]
        hsize = 0
        if opts is not None:
            if opts.dedup_id:
                dedup_ids = [opts.dedup_id]
            hsize = headers_size(opts.headers)
        if largest + hsize + _DELIVERY_OVERHEAD > self.max_reply_bytes:
            why = (
                f"a message of {largest} bytes with {hsize} bytes of headers is more than one "
                f"reply may carry (max_reply_bytes={self.max_reply_bytes}, from --max-frame-size "
                "and --max-pending-output); nothing was stored: send less, or raise those limits"
            )
            return [_err(conn, m.req, Code.TOO_LARGE, why)]
        new = len(payloads)  # what it would store: repeats of remembered dedup ids do not count
        if dedup_ids is not None:
            self._forget_dedup(q)
            new = len(set(dedup_ids).difference(q.dedup))
            if not new:  # all repeats: confirmed (once what they repeat is), not stored
                return [(conn, Confirmed(m.req, len(payloads)))]
        if q.maxsize and new > q.maxsize:
            return [
                _err(
                    conn,
                    m.req,
                    Code.BAD_REQUEST,
                    f"batch of {new} new messages can never fit in maxsize={q.maxsize}",
                )
            ]
        q.compact()
        if dedup_ids is not None and self._dedup_full(q, dedup_ids):
            return [
                _err(
                    conn,
                    m.req,
                    Code.LIMIT,
                    f"this broker remembers {self.dedup_ids} dedup ids (max_dedup_ids="
                    f"{self.max_dedup_ids}); nothing was stored: retry once older ids' "
                    "windows pass, or shorten dedup_window",
                )
            ]
        room = q.room()
        if (room is None or room >= new) and not q.putters:
            self._add(q, payloads, opts, dedup_ids)
            return [(conn, Confirmed(m.req, len(payloads))), *self._serve(q)]
        if m.wait == 0:
            return [
                _err(
                    conn,
                    m.req,
                    Code.FULL,
                    f"queue {q.name!r} is full ({q.held} of maxsize={q.maxsize})",
                )
            ]
        # What it holds while it waits: payloads, and headers and framing per message (a
        # batch of 100,000 empty payloads is not free)
        size = sum(map(len, payloads)) + len(payloads) * (hsize + _DELIVERY_OVERHEAD)
        cs = self._conn(conn)
        refused = self._parked_bytes_refused(cs, size, "puts waiting for room")
        if refused is not None:
            return [_err(conn, m.req, Code.LIMIT, refused)]
        w = PutWaiter(conn, m.req, self._deadline(m.wait), q.name, payloads=payloads, size=size,
                      options=opts, dedup_ids=dedup_ids, new=new)  # fmt: skip
        cs.parked_bytes += size
        self.parked_bytes += size
        q.putters.append(w)
        self._park(w)
        return self._serve(q)

    def _get(self, conn: Conn, m: Get) -> list[Out]:
        q = self._queue(m.queue)
        q.compact()
        w = GetWaiter(
            conn, m.req, self._deadline(m.wait), q.name,
            max_items=m.max_items, manual_ack=m.manual_ack, lease=m.lease,
        )  # fmt: skip
        q.getters.append(w)
        out = self._serve(q)
        if w.done:
            return out
        if m.wait == 0:
            self._finish(w)
            q.compact()
            return [*out, self._nothing_for(q, w)]
        why = self._park_refused(self._conn(conn), "GETs and JOINs")  # it parks: the limits
        if why is not None:
            self._finish(w)
            q.compact()
            return [*out, _err(conn, m.req, Code.LIMIT, why)]
        self._park(w)
        return out

    def _nothing_for(self, q: QueueState, w: Waiter) -> Out:
        """The reply to a GET whose wait ran out with nothing for it."""
        if isinstance(w, GetWaiter) and w.manual_ack and q.ready:
            held = self._conn(w.conn).unacked
            if held and held + len(q.ready.peek().payload) > self.max_unacked_bytes:
                return _err(
                    w.conn,
                    w.req,
                    Code.UNACKED,
                    f"queue {q.name!r} has messages, but this connection holds {held} unacked "
                    f"bytes (max_unacked_bytes={self.max_unacked_bytes}); ack or nack some "
                    "to get more",
                )
        return _err(w.conn, w.req, Code.EMPTY, f"queue {q.name!r} is empty")

    def _settle(self, conn: Conn, m: Ack | Nack) -> list[Out]:
        q = self.queues.get(m.queue)
        unknown: list[int] = []
        if q is None:
            unknown = list(m.ids)
        elif isinstance(m, Ack):
            removed = self._acked(q, m.ids, unknown)
            if removed:
                q.acked_total += len(removed)
                self.store.removed_many(q.name, removed)
        else:
            in_flight, release = q.in_flight, self._release
            for did in m.ids:
                f = in_flight.pop(did, None)
                if f is None:
                    unknown.append(did)
                    continue
                release(f)
                if m.requeue:
                    self._requeue(q, f.msg, m.delay)
                else:
                    self._dead_letter(q, f.msg, m.reason or "rejected")
        out: list[Out] = []
        if not m.quiet:
            out.append(
                (conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown}))
            )
        if q is not None:
            out += self._serve_with_dead(q)
            out += self._finish_joins(q)
        return out

    def _acked(self, q: QueueState, ids: list[int], unknown: list[int]) -> list[int]:
        """Release the deliveries ``ids`` of ``q`` for good; the ids of their messages.
        Those ``q`` does not hold go to ``unknown``. (``_release`` per delivery, with the
        connection's counts settled once per run of one connection's deliveries.)"""
        removed: list[int] = []
        append, pop, conns = removed.append, q.in_flight.pop, self._conns
        last: Conn = 0  # the connection of the current run (no run before the first)
        freed = count = 0
        for did in ids:
            f = pop(did, None)
            if f is None:
                unknown.append(did)
                continue
            if f.conn != last:
                if count:
                    self._freed(conns.get(last), freed, count)
                last, freed, count = f.conn, 0, 0
            msg = f.msg
            freed += len(msg.payload)
            count += 1
            append(msg.id)
        if count:
            self._freed(conns.get(last), freed, count)
        return removed

    def _freed(self, cs: _ConnState | None, size: int, count: int) -> None:
        if cs is not None:
            cs.unacked = max(0, cs.unacked - size)
            cs.holding = max(0, cs.holding - count)
            if cs.blocked:
                self._unblocked.append(cs)

    def _extend(self, conn: Conn, m: Extend) -> list[Out]:
        q = self.queues.get(m.queue)
        unknown = []
        for did in m.ids:
            f = q.in_flight.get(did) if q is not None else None
            if f is None:
                unknown.append(did)
            else:
                f.deadline = self.now + m.seconds
                self._lease(f.deadline, m.queue, [did])
        return [(conn, Ok(m.req, {"settled": len(m.ids) - len(unknown), "unknown": unknown}))]

    def _declare(self, conn: Conn, m: Declare) -> list[Out]:
        q = self._queue(m.queue)
        out: list[Out] = []
        if (
            m.maxsize is not None
            or m.lease is not None
            or m.max_deliveries is not None
            or m.dedup_window is not None
        ):
            settings: dict[str, Any] = {}
            if m.dedup_window is not None:
                settings["dedup_window"] = m.dedup_window
            if m.maxsize is not None:
                settings["maxsize"] = m.maxsize
            if m.lease is not None:
                settings["lease"] = m.lease
            if m.max_deliveries is not None:
                settings["max_deliveries"] = m.max_deliveries
            self._apply_settings(q, settings)
            self._persist_settings(q)
            if q.maxsize:  # parked batches that can never fit now are refused at once
                for p in q.putters:
                    if not p.done and p.new > q.maxsize:
                        self._finish(p)
                        out.append(
                            _err(
                                p.conn,
                                p.req,
                                Code.BAD_REQUEST,
                                f"batch of {len(p.payloads)} can never fit in maxsize="
                                f"{q.maxsize} (the queue was redeclared)",
                            )
                        )
        return [(conn, Ok(m.req, q.info())), *out, *self._serve(q)]

    def _info(self, conn: Conn, m: Info) -> list[Out]:
        q = self.queues.get(m.queue)
        return [(conn, Ok(m.req, (q or QueueState(m.queue)).info()))]

    def _task_done(self, conn: Conn, m: TaskDone) -> list[Out]:
        q = self.queues.get(m.queue)
        if q is None or m.count > q.unfinished:
            return [
                _err(
                    conn,
                    m.req,
                    Code.VALUE,
                    f"task_done() called more times than there were items "
                    f"({m.count} for {q.unfinished if q else 0} unfinished)",
                )
            ]
        q.unfinished -= m.count
        return [(conn, Ok(m.req, q.unfinished)), *self._finish_joins(q)]

    def _join(self, conn: Conn, m: Join) -> list[Out]:
        q = self.queues.get(m.queue)
        if q is None or q.unfinished == 0:
            return [(conn, Ok(m.req, 0))]
        if m.wait == 0:
            return [_err(conn, m.req, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")]
        cs = self._conn(conn)
        if m.wait is None:  # no timer: a req in an array, paid for like a parked put
            why = self._parked_bytes_refused(cs, _JOIN_COST, "JOINs and puts waiting")
            if why is not None:
                return [_err(conn, m.req, Code.LIMIT, why)]
            q.join_reqs.setdefault(conn, array("Q")).append(m.req)
            cs.joins.add(q.name)
            cs.parked_bytes += _JOIN_COST
            self.parked_bytes += _JOIN_COST
            return []
        why = self._park_refused(cs, "GETs and JOINs")
        if why is not None:
            return [_err(conn, m.req, Code.LIMIT, why)]
        q.compact()
        w = Waiter(conn, m.req, self._deadline(m.wait), q.name)
        q.joiners.append(w)
        self._park(w)
        return []

    def _shutdown(self, conn: Conn, m: Shutdown) -> list[Out]:
        q = self._queue(m.queue)
        q.shutdown = True
        self._persist_settings(q)
        if m.immediate:
            dropped = q.ready.clear() + list(q.delayed.values())
            q.delayed.clear()
            q.expiring.clear()
            for msg in dropped:
                self.store.removed(q.name, msg.id)
            q.unfinished = max(0, q.unfinished - len(dropped))
        out: list[Out] = [(conn, Ok(m.req, None))]
        for p in q.putters:
            if not p.done:
                self._finish(p)
                out.append(_err(p.conn, p.req, Code.SHUTDOWN, f"queue {q.name!r} was shut down"))
        q.putters.clear()
        out += self._serve(q)
        out += [(c, QueueShutdown(q.name, m.immediate)) for c in sorted(self._conns)]
        return out + self._finish_joins(q)

    # --- administration ---------------------------------------------------------------------

    def _purge(self, conn: Conn, m: Purge) -> list[Out]:
        q = self.queues.get(m.queue)
        if q is None:
            return [(conn, Ok(m.req, 0))]
        dropped = q.ready.clear() + list(q.delayed.values())
        q.delayed.clear()
        q.expiring.clear()
        for msg in dropped:
            self.store.removed(q.name, msg.id)
        q.unfinished = max(0, q.unfinished - len(dropped))
        return [(conn, Ok(m.req, len(dropped))), *self._serve(q), *self._finish_joins(q)]

    def _delete(self, conn: Conn, m: Delete) -> list[Out]:
        q = self.queues.pop(m.queue, None)
        if q is None:
            return [(conn, Ok(m.req, 0))]
        dropped = q.ready.clear() + list(q.delayed.values())
        for f in q.in_flight.values():
            self._release(f)
            dropped.append(f.msg)
        for msg in dropped:
            self.store.removed(q.name, msg.id)
        self.store.declared(q.name, None)
        self.dedup_ids -= len(q.dedup)
        out: list[Out] = [(conn, Ok(m.req, len(dropped)))]
        for w in [*self._all_getters(q), *q.putters]:
            if not w.done:
                self._finish(w)
                out.append(_err(w.conn, w.req, Code.SHUTDOWN, f"queue {q.name!r} was deleted"))
        for j in q.joiners:
            if not j.done:
                self._finish(j)
                out.append((j.conn, Ok(j.req, 0)))
        return out + self._answer_joins(q, lambda req: Ok(req, 0))

    def _peek(self, conn: Conn, m: Peek) -> list[Out]:
        q = self.queues.get(m.queue)
        shown: list[dict[str, Any]] = []
        room = self.max_reply_bytes
        for msg in q.ready if q is not None else ():
            room -= reply_cost(msg) + len(msg.origin) + len(msg.reason) + 96  # the map's keys
            if len(shown) == m.max_items or (room < 0 and shown):
                break  # within one reply's size, as a DELIVER (at least one)
            shown.append(
                {
                    "id": msg.id,
                    "delivery_count": msg.deliveries,
                    "payload": msg.payload,
                    "age": round(max(0.0, self.now - msg.enqueued), 3),
                    "origin": msg.origin,
                    "reason": msg.reason,
                    "priority": msg.priority,
                    "headers": (msg.extra.headers if msg.extra is not None else None) or {},
                }
            )
        return [(conn, Ok(m.req, shown))]

    def _move(self, conn: Conn, m: Move) -> list[Out]:
        src = self.queues.get(m.queue)
        if src is None or not src.ready:
            return [(conn, Ok(m.req, 0))]
        dst = self._queue(m.to)
        if dst.shutdown:
            return [_err(conn, m.req, Code.SHUTDOWN, f"queue {dst.name!r} was shut down")]
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
            moved = Stored(next(self._ids), msg.payload, enqueued=self.now, extra=extra)
            self.store.removed(src.name, msg.id)
            self.store.added(dst.name, moved)
            dst.ready.append(moved)
        src.unfinished = max(0, src.unfinished - n)
        dst.unfinished += n
        dst.put_total += n
        return [(conn, Ok(m.req, n)), *self._serve(dst), *self._finish_joins(src)]

    def _stats(self, conn: Conn, m: Stats) -> list[Out]:
        return [(conn, Ok(m.req, self.stats()))]

    def _cancel(self, conn: Conn, m: Cancel) -> list[Out]:
        cs = self._conns.get(conn)
        if cs is None:
            return []
        w = cs.parked.get(m.req)
        if w is not None:
            self._finish(w)
            self._forget_if_idle(w.queue)
            return []
        for q in self._join_queues(cs):  # a JOIN without a wait (rare: a scan is fine)
            reqs = q.join_reqs[conn]
            if m.req in reqs:
                reqs.remove(m.req)
                cs.parked_bytes -= _JOIN_COST
                self.parked_bytes -= _JOIN_COST
                if not reqs:
                    del q.join_reqs[conn]
                    cs.joins.discard(q.name)
                    self._forget_if_idle(q.name)
                break
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
        Purge: _purge,
        Delete: _delete,
        Peek: _peek,
        Move: _move,
        Stats: _stats,
        Ping: _ping,
        Pong: _pong,
    }

    def stats(self) -> dict[str, Any]:
        return {"queues": {name: q.info() for name, q in sorted(self.queues.items())}}

    # --- time and connections -------------------------------------------------------------

    def _timed_out(self, w: Waiter) -> Out:
        q = self.queues.get(w.queue) or QueueState(w.queue)
        if isinstance(w, GetWaiter):
            return self._nothing_for(q, w)
        if isinstance(w, PutWaiter):
            return _err(
                w.conn, w.req, Code.FULL, f"queue {w.queue!r} is full (maxsize={q.maxsize})"
            )
        return _err(w.conn, w.req, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")

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
                    self._release(f)
                    self._requeue(q, f.msg)
                    touched.add(name)
            for _, w in deadlines.timeouts.due(now):
                if w.done:
                    continue
                out.append(self._timed_out(w))
                self._finish(w)
                touched.add(w.queue)
            for _, (name, msg_id) in deadlines.delays.due(now):
                q = queues.get(name)
                msg = q.delayed.get(msg_id) if q is not None else None
                if q is None or msg is None or self._due(msg) > now + _EPSILON:
                    continue  # taken, dropped or moved since (or delayed again, till later)
                del q.delayed[msg_id]
                q.ready.give_back(msg)
                touched.add(name)
            for _, (name, msg_id) in deadlines.expiries.due(now):
                q = queues.get(name)
                msg = q.expiring.get(msg_id) if q is not None else None
                if q is None or msg is None or not self._expired(q, msg):
                    continue  # taken, dropped or moved since (or due again later)
                del q.expiring[msg_id]
                if q.delayed.pop(msg_id, None) is None:
                    q.ready.discard(msg)
                self._dead_letter(q, msg, "expired")
                touched.add(name)
                touched.add(name + DEAD_SUFFIX)
            for name in touched:
                q = queues.get(name)
                if q is not None:
                    q.compact()
                    out += self._serve_with_dead(q)
                self._forget_if_idle(name)
            if self._unblocked:
                out += self._readmit()
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
        joins = sum(len(q.join_reqs.get(conn, ())) for q in self._join_queues(cs))
        return len(cs.parked) + joins

    def _join_queues(self, cs: _ConnState) -> list[QueueState]:
        """The queues where ``cs`` has JOINs without a wait."""
        return [q for name in cs.joins if (q := self.queues.get(name)) is not None]

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
                self._finish(w)
                self._forget_if_idle(w.queue)
        for q in self._join_queues(cs):
            timed_out = functools.partial(_error, Code.TIMEOUT, f"{q.unfinished} tasks unfinished")
            out += self._answer_joins(q, timed_out, conn)
            self._forget_if_idle(q.name)
        return out

    def stop(self) -> list[Out]:
        """The broker is stopping: every parked request is answered ``unavailable``."""
        out = []
        why = "the broker is stopping; retry after reconnecting"
        for cs in self._conns.values():
            for w in list(cs.parked.values()):
                out.append(_err(w.conn, w.req, Code.UNAVAILABLE, why))
                self._finish(w)
            for q in self._join_queues(cs):
                out += self._answer_joins(q, lambda req: Error(req, Code.UNAVAILABLE, why), cs.conn)
        return out

    def connection_lost(self, conn: Conn) -> list[Out]:
        """Give back what ``conn`` held: its unacked deliveries return at once, in their
        original order; its parked requests are withdrawn."""
        cs = self._conns.get(conn)
        if cs is None:
            return []
        touched: set[str] = set()
        for w in list(cs.parked.values()):
            self._finish(w)
            touched.add(w.queue)
        for jq in self._join_queues(cs):
            self._answer_joins(jq, lambda req: None, conn)  # nobody to answer
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
                    self._requeue(q, f.msg)
                    touched.add(name)
        out: list[Out] = []
        for name in touched:
            q = self.queues.get(name)
            if q is not None:
                q.compact()
                out += self._serve_with_dead(q)
            self._forget_if_idle(name)
        return [(c, m) for c, m in out if c != conn]
