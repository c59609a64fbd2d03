"""Delivery: what a GET takes from a queue, and serving a queue's lines - parked GETs get
what is ready, parked puts get room - within each connection's unacked budget.

# Strategy:
# A GET takes messages in order up to its ``max_items``, within ``max_reply_bytes``
# (payloads, headers and framing: at least one) and, with manual ack, within the
# connection's ``max_unacked_bytes``. A queue that holds only plain new messages is taken
# from in bulk (``take_plain``: the structs made in C, no call per message); any other
# goes message by message. A message that expired while it waited goes to the dead
# letters instead, and so does one that no reply can carry. A GET whose connection holds
# its budget is set aside (``block``) out of the line, so serving never walks it; when
# the connection settles some, its GETs go back to the head of the line (``readmit``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice, repeat, starmap
from operator import attrgetter
from typing import Any

from pigeon.protocol import Deliver, Delivery, Get
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Confirmed, HeadedDelivery, PlainDelivery
from pigeon.server.core.holdings import finish, handed, park, park_refused, refuse_waiting
from pigeon.server.core.model import (
    DEAD_SUFFIX,
    DELIVERY_OVERHEAD,
    GetWaiter,
    InFlight,
    QueueState,
    Stored,
    Waiter,
    headers_size,
    reply_cost,
)
from pigeon.server.core.placement import add
from pigeon.server.core.requeue import dead_letter
from pigeon.server.core.state import BrokerState, Conn, ConnState, Out, err

__all__ = [
    "all_getters",
    "get",
    "lease",
    "nothing_for",
    "readmit",
    "serve",
    "serve_with_dead",
    "take",
]

_msg_id = attrgetter("id")


def can_take(b: BrokerState, q: QueueState, conn: Conn, manual: bool) -> bool:
    """May ``conn`` take ``q``'s next message now (its unacked budget, with manual ack)?"""
    if not q.ready:
        return False
    held = b._conn(conn).unacked if manual else 0
    return not held or held + len(q.ready.peek().payload) <= b.limits.max_unacked_bytes


def take(b: BrokerState, q: QueueState, w: GetWaiter) -> list[Delivery]:
    """Up to ``w.max_items`` messages for ``w``, within ``max_reply_bytes`` (payloads,
    headers and framing: at least one). A message that expired while it waited goes
    to the dead letters instead; one too large for any reply too (the limits shrank
    across a restart), unless it is already a dead letter: then nothing is taken."""
    # PlainDelivery (no headers: the bytes as before), HeadedDelivery, or Delivery (with
    # the message's id, for a GET that asked)
    out: list[Any] = []
    cs = b._conn(w.conn)
    held = cs.unacked
    budget = b.limits.max_reply_bytes
    limit = b.limits.max_unacked_bytes
    size = 0
    deadline = b.now + (w.lease if w.lease is not None else q.lease)
    ready, name, conn, manual, want = q.ready, q.name, w.conn, w.manual_ack, w.max_items
    ids = w.message_ids
    in_flight = q.in_flight
    removed: list[int] = []
    leased: list[int] = []
    counted: list[int] = []  # ids of the messages leased: their deliveries are stored
    # Only plain priority-0 messages waiting (the common case): take from the deque
    # itself, not through Ready's methods (four calls less per message).
    fresh = ready.plain()
    if fresh is not None and manual and want > 4:  # in bulk: for batches
        bulk = take_plain(b, q, fresh, want, conn, cs, deadline, ids)
        if bulk is not None:
            return bulk
    wall = b.now + b._wall_offset
    while len(out) < want and ready:
        msg = ready.peek() if fresh is None else fresh[0]
        extra = msg.extra
        n = len(msg.payload)
        cost = n + DELIVERY_OVERHEAD
        headers = None
        if extra is not None:
            if 0 < extra.expires <= wall:
                ready.popleft()  # its expiry is due in this very turn: not delivered
                dead_letter(b, q, msg, "expired")
                continue
            headers = extra.headers
            if headers:
                cost += headers_size(headers)
        if size + cost > budget:
            if out or q.is_dead_letters:
                break
            ready.popleft()  # it can never be delivered with these limits
            dead_letter(b, q, msg, "too_large")
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
            did = b._next_delivery
            b._next_delivery = did + 1
            in_flight[did] = InFlight(msg, conn, deadline)
            held += n
            leased.append(did)
            counted.append(msg.id)
            out.append(
                Delivery(did, msg.deliveries, msg.payload, headers or None, msg.id)
                if ids
                else HeadedDelivery(did, msg.deliveries, msg.payload, headers)
                if headers
                else PlainDelivery(did, msg.deliveries, msg.payload)
            )
        else:
            removed.append(msg.id)
            out.append(
                Delivery(0, msg.deliveries, msg.payload, headers or None, msg.id)
                if ids
                else HeadedDelivery(0, msg.deliveries, msg.payload, headers)
                if headers
                else PlainDelivery(0, msg.deliveries, msg.payload)
            )
    q.delivered_total += len(out)
    if removed:
        b.store.removed_many(name, removed)
        b._tasks_changed(q)  # auto-acked: out of the store, still unfinished
    if leased:
        b.store.delivered(name, counted)
        lease(b, deadline, name, leased)
        cs.holding += len(leased)
        handed(b, cs, name, leased)
    cs.unacked = held
    return out


def take_plain(
    b: BrokerState,
    q: QueueState,
    fresh: deque[Stored],
    want: int,
    conn: Conn,
    cs: ConnState,
    deadline: float,
    ids: bool = False,
) -> list[Any] | None:
    """``take`` for manual ack from a queue that holds only plain new messages, in
    bulk: the first ``want`` of them if they are all plain and all fit the reply and
    the connection's unacked budget (then every per-message test of ``take`` would
    pass); None otherwise, for ``take`` to go message by message. ``ids``: the entries
    carry the messages' ids."""
    msgs = list(islice(fresh, want))
    total = 0
    for m in msgs:
        if m.extra is not None:
            return None
        total += len(m.payload)
    k = len(msgs)
    if total + k * DELIVERY_OVERHEAD > b.limits.max_reply_bytes:
        return None
    held = cs.unacked
    if held + total > b.limits.max_unacked_bytes:
        return None
    if k == len(fresh):
        fresh.clear()
    else:  # k calls of popleft, in C
        deque(starmap(fresh.popleft, repeat((), k)), maxlen=0)
    first = b._next_delivery
    b._next_delivery = first + k
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
    mids = list(map(_msg_id, msgs))
    b.store.delivered(q.name, mids)
    lease(b, deadline, q.name, dids)
    handed(b, cs, q.name, dids)
    if ids:
        return list(map(Delivery, dids, counts, payloads, repeat(None), mids))
    return list(map(PlainDelivery, dids, counts, payloads))


def lease(b: BrokerState, deadline: float, queue: str, dids: Sequence[int]) -> None:
    """``dids`` of ``queue`` go back at ``deadline`` unless settled or extended."""
    b.deadlines.leases.push(deadline, (queue, dids))


def too_large(b: BrokerState, q: QueueState, w: Waiter) -> Out:
    """The reply to ``w`` when ``q``'s next message cannot fit any reply."""
    n = reply_cost(q.ready.peek())
    return err(
        w.conn,
        w.req,
        Code.TOO_LARGE,
        f"the next message in {q.name!r} takes {n} bytes with its headers, more than one "
        f"reply may carry (max_reply_bytes={b.limits.max_reply_bytes}, from --max-frame-size "
        "and --max-pending-output); raise those limits to take it",
    )


def block(b: BrokerState, q: QueueState, w: GetWaiter) -> None:
    """Set ``w`` aside: its connection holds too much unacked to take from ``q``."""
    q.blocked.setdefault(w.conn, {})[w.req] = w
    b._conn(w.conn).blocked.add(q.name)


def readmit(b: BrokerState) -> list[Out]:
    """The GETs set aside for connections that have since settled some go back to the
    heads of their lines, in their order, and their queues are served."""
    out: list[Out] = []
    seen: set[int] = set()
    for cs in b._unblocked:
        if id(cs) in seen or not cs.blocked:
            continue
        seen.add(id(cs))
        names, cs.blocked = cs.blocked, set()
        for name in names:
            q = b.queues.get(name)
            if q is None:
                continue
            waiting = q.blocked.pop(cs.conn, {}).values()
            q.getters.extendleft(reversed([w for w in waiting if not w.done]))
            out += serve(b, q)
    b._unblocked.clear()
    return out


def serve(b: BrokerState, q: QueueState) -> list[Out]:
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
                if not can_take(b, q, w.conn, w.manual_ack):
                    block(b, q, w)  # this consumer holds enough unacked already
                    continue
                items = take(b, q, w)
                if not items:  # what it found expired, or cannot be carried
                    if not q.ready:  # all of it went to the dead letters: it waits on
                        getters.appendleft(w)
                        break
                    if not can_take(b, q, w.conn, w.manual_ack):
                        block(b, q, w)
                        continue
                finish(b, w)
                q.stale -= 1  # it left the line here
                out.append((w.conn, Deliver(w.req, items)) if items else too_large(b, q, w))
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
            finish(b, p)
            add(b, q, p.payloads, p.options, p.dedup_ids)
            out.append((p.conn, Confirmed(p.req, len(p.payloads))))
            progress = True
    if q.shutdown and not q.ready and not q.delayed:
        why = f"queue {q.name!r} was shut down"
        out += refuse_waiting(b, all_getters(b, q), Code.SHUTDOWN, why)
        q.getters.clear()
    return out


def all_getters(b: BrokerState, q: QueueState) -> list[GetWaiter]:
    """The GETs waiting on ``q``, those set aside included (which leave their sets)."""
    getters = list(q.getters)
    for conn, ws in q.blocked.items():
        getters += ws.values()
        cs = b._conns.get(conn)
        if cs is not None:
            cs.blocked.discard(q.name)
    q.blocked.clear()
    return getters


def serve_with_dead(b: BrokerState, q: QueueState) -> list[Out]:
    """Serve ``q`` and its dead letters (where messages may just have gone)."""
    out = serve(b, q)
    dead = b.queues.get(q.name + DEAD_SUFFIX)
    if dead is not None:
        out += serve(b, dead)
    return out


def get(b: BrokerState, conn: Conn, m: Get) -> list[Out]:
    """GET: served at once if it can be; else parked (within the limits) or answered."""
    q = b._queue(m.queue)
    q.compact()
    w = GetWaiter(
        conn, m.req, b._deadline(m.wait), q.name,
        max_items=m.max_items, manual_ack=m.manual_ack, lease=m.lease,
        message_ids=m.message_ids,
    )  # fmt: skip
    q.getters.append(w)
    out = serve(b, q)
    if w.done:
        return out
    if m.wait == 0:
        finish(b, w)
        q.compact()
        return [*out, nothing_for(b, q, w)]
    why = park_refused(b, b._conn(conn), "GETs and JOINs")  # it parks: the limits
    if why is not None:
        finish(b, w)
        q.compact()
        return [*out, err(conn, m.req, Code.LIMIT, why)]
    park(b, w)
    return out


def nothing_for(b: BrokerState, q: QueueState, w: Waiter) -> Out:
    """The reply to a GET whose wait ran out with nothing for it."""
    if isinstance(w, GetWaiter) and w.manual_ack and q.ready:
        held = b._conn(w.conn).unacked
        if held and held + len(q.ready.peek().payload) > b.limits.max_unacked_bytes:
            return err(
                w.conn,
                w.req,
                Code.UNACKED,
                f"queue {q.name!r} has messages, but this connection holds {held} unacked "
                f"bytes (max_unacked_bytes={b.limits.max_unacked_bytes}); ack or nack some "
                "to get more",
            )
    return err(w.conn, w.req, Code.EMPTY, f"queue {q.name!r} is empty")
