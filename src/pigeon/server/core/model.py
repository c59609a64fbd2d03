"""What a broker holds: messages, deliveries in flight, parked requests, queues, and what
a message costs in a reply. Data and the small rules that keep it consistent; the rules
that move messages between these are in the modules beside this one.

# Strategy:
# A queue's ready messages are a FIFO of new messages plus a min-heap (by message id) of
# messages that came back (nacked, lease expired, connection lost, delay over). Ids grow
# with every put, and a message can only come back after it was taken from the front, so
# taking from whichever of the two holds the smaller id hands messages out in their
# original order, however and in whatever order they came back.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pigeon.options import DEFAULT_DEDUP_WINDOW, DEFAULT_LEASE, DEFAULT_MAX_DELIVERIES
from pigeon.protocol.messages import PutOptions
from pigeon.server.core.message import Extra, InFlight, Stored

__all__ = [
    "DEAD_SUFFIX",
    "DELIVERY_OVERHEAD",
    "Extra",
    "GetWaiter",
    "InFlight",
    "PutWaiter",
    "QueueState",
    "Ready",
    "Stored",
    "Waiter",
    "headers_size",
    "reply_cost",
]

DEAD_SUFFIX = ".dead"


# Bytes of framing per message in a DELIVER, rounded up: the entry's array header, its
# delivery id (up to 9 bytes), delivery count (5 while under 2**32 deliveries) and its
# payload's bin header (5); for a GET that asked for message ids, a nil for no headers
# and the message id (up to 9): 30 in all.
DELIVERY_OVERHEAD = 32
_encode = msgspec.msgpack.Encoder().encode


def headers_size(headers: dict[str, str] | None) -> int:
    """Bytes a message's headers take in a DELIVER (their msgpack map)."""
    return len(_encode(headers)) if headers else 0


def reply_cost(msg: Stored) -> int:
    """Bytes ``msg`` adds to a DELIVER: payload, headers and framing."""
    extra = msg.extra
    n = len(msg.payload) + DELIVERY_OVERHEAD
    return n + headers_size(extra.headers) if extra is not None and extra.headers else n


@dataclass(slots=True, eq=False)
class Waiter:
    """A request parked until it can be served or its deadline passes."""

    conn: int
    req: int
    deadline: float | None
    queue: str = ""
    done: bool = False


@dataclass(slots=True, eq=False)
class GetWaiter(Waiter):
    max_items: int = 1
    manual_ack: bool = False
    lease: float | None = None
    message_ids: bool = False  # its DELIVER's entries carry the messages' ids


@dataclass(slots=True, eq=False)
class PutWaiter(Waiter):
    payloads: list[bytes] = field(default_factory=list)
    size: int = 0  # payload bytes it holds
    options: PutOptions | None = None
    dedup_ids: list[str] | None = None
    new: int = 0  # messages it would store (repeats of remembered dedup ids left out)
    ids_held: int = 0  # new dedup ids it counts for max_dedup_ids while it waits


def _msg_id(msg: Stored) -> int:
    return msg.id


class _Lane:
    """The messages of one priority, handed out in their original order."""

    __slots__ = ("back", "fresh")

    def __init__(self) -> None:
        self.fresh: deque[Stored] = deque()
        self.back: list[tuple[int, Stored]] = []  # came back: a heap by id

    def __len__(self) -> int:
        return len(self.fresh) + len(self.back)

    def peek(self) -> Stored:
        back, fresh = self.back, self.fresh
        if back and (not fresh or back[0][0] < fresh[0].id):
            return back[0][1]
        return fresh[0]

    def popleft(self) -> Stored:
        back, fresh = self.back, self.fresh
        if back and (not fresh or back[0][0] < fresh[0].id):
            return heapq.heappop(back)[1]
        return fresh.popleft()

    def in_order(self) -> list[Stored]:
        """In the order ``popleft`` would hand them out."""
        back = sorted([m for _, m in self.back], key=_msg_id)
        return list(heapq.merge(back, self.fresh, key=_msg_id))


def _enqueued(msg: Stored) -> float:
    return msg.enqueued


class Ready:
    """Messages waiting to be delivered: higher priority first, each priority in its
    original order.

    Priority 0 - every plain message - is the lane the hot path uses; the lanes of
    priorities 1-9 exist only once used, and ``_high`` counts what they hold, so a queue
    without priorities pays one integer test per take. A message can be withdrawn from
    the middle (it expired while waiting: ``discard``) in O(1): it is marked and skipped
    when it reaches the head of its lane.
    """

    __slots__ = ("_back", "_base", "_fresh", "_gone", "_high", "_lanes", "_len")

    def __init__(self) -> None:
        self._base = _Lane()
        self._fresh = self._base.fresh
        self._back = self._base.back
        self._lanes: dict[int, _Lane] = {}  # priority 1-9 -> its lane
        self._high = 0  # messages in self._lanes, withdrawn ones included
        self._gone: set[int] = set()  # ids withdrawn but still in a lane
        self._len = 0  # messages withdrawn: len() is the lanes' total minus this

    def __len__(self) -> int:
        return len(self._fresh) + len(self._back) + self._high - self._len

    def __bool__(self) -> bool:
        return len(self) > 0

    def _lane(self, msg: Stored) -> _Lane:
        p = msg.extra.priority if msg.extra is not None else 0
        if not p:
            return self._base
        lane = self._lanes.get(p)
        if lane is None:
            lane = self._lanes[p] = _Lane()
            self._lanes = dict(sorted(self._lanes.items(), reverse=True))
        self._high += 1
        return lane

    def append(self, msg: Stored) -> None:
        """A new message, at the tail of its priority."""
        if msg.extra is None:
            self._fresh.append(msg)
        else:
            self._lane(msg).fresh.append(msg)

    def extend_plain(self, msgs: list[Stored]) -> None:
        """New messages without options (``extra`` None), at the tail, in order."""
        self._fresh.extend(msgs)

    def extend(self, msgs: list[Stored]) -> None:
        """New messages, at the tail, in order."""
        if all(m.extra is None for m in msgs):
            self._fresh.extend(msgs)
        else:
            for m in msgs:
                self.append(m)

    def give_back(self, msg: Stored) -> None:
        """A message that was handed out comes back, ahead of every newer one of its
        priority."""
        if msg.extra is None:
            heapq.heappush(self._back, (msg.id, msg))
        else:
            heapq.heappush(self._lane(msg).back, (msg.id, msg))

    def discard(self, msg: Stored) -> None:
        """Withdraw ``msg``, which is waiting here (it expired)."""
        self._gone.add(msg.id)
        self._len += 1

    def _head(self) -> _Lane:
        """The lane to take from next, with withdrawn messages dropped from its head."""
        while True:
            lane = self._base
            if self._high:
                for lane in self._lanes.values():
                    if lane.fresh or lane.back:
                        break
                else:
                    lane = self._base
            if self._gone and self._gone_at_head(lane):
                continue
            return lane

    def _gone_at_head(self, lane: _Lane) -> bool:
        msg = lane.peek()
        if msg.id not in self._gone:
            return False
        lane.popleft()
        self._gone.discard(msg.id)
        self._len -= 1
        if lane is not self._base:
            self._high -= 1
        return True

    def plain(self) -> deque[Stored] | None:
        """The FIFO of new priority-0 messages when it is all there is (nothing came back,
        no other priority, nothing withdrawn): taking from its head is then taking in
        order, without a call per message. None otherwise."""
        if self._high or self._gone or self._back:
            return None
        return self._fresh

    def peek(self) -> Stored:
        if self._high or self._gone:
            return self._head().peek()
        back, fresh = self._back, self._fresh
        if back and (not fresh or back[0][0] < fresh[0].id):
            return back[0][1]
        return fresh[0]

    def popleft(self) -> Stored:
        if self._high or self._gone:
            lane = self._head()
            if lane is not self._base:
                self._high -= 1
            return lane.popleft()
        back, fresh = self._back, self._fresh
        if back and (not fresh or back[0][0] < fresh[0].id):
            return heapq.heappop(back)[1]
        return fresh.popleft()

    def oldest(self) -> Stored | None:
        """The message that has waited longest (the oldest head of the lanes: each lane
        is in id order, so its head is its oldest), or None when empty."""
        gone = self._gone
        heads = []
        for lane in (*self._lanes.values(), self._base):
            if lane.fresh or lane.back:
                head = lane.peek()
                if head.id in gone:  # rare: withdrawn messages sit at its head
                    head = next((m for m in lane.in_order() if m.id not in gone), head)
                if head.id not in gone:
                    heads.append(head)
        return min(heads, key=_enqueued) if heads else None

    def lazily(self) -> Iterator[Stored]:
        """In delivery order, one at a time (PEEK costs what it shows, not the queue): per
        lane, a copy of the given-back heap popped as it goes, merged with the FIFO."""
        gone = self._gone
        for lane in (*self._lanes.values(), self._base):
            back = lane.back[:]

            def popped(heap: list[tuple[int, Stored]] = back) -> Iterator[Stored]:
                while heap:
                    yield heapq.heappop(heap)[1]

            for msg in heapq.merge(popped(), lane.fresh, key=_msg_id):
                if msg.id not in gone:
                    yield msg

    def __iter__(self) -> Iterator[Stored]:
        """In delivery order (for peek and purge; not on the hot path)."""
        lanes = [*self._lanes.values(), self._base]
        gone = self._gone
        return iter([m for lane in lanes for m in lane.in_order() if m.id not in gone])

    def clear(self) -> list[Stored]:
        out = list(self)
        self._fresh.clear()
        self._back.clear()
        self._lanes.clear()
        self._gone.clear()
        self._high = self._len = 0
        return out


@dataclass(eq=False)
class QueueState:
    name: str
    maxsize: int = 0
    lease: float = DEFAULT_LEASE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    declared: bool = False  # its settings were set explicitly: kept while empty
    ready: Ready = field(default_factory=Ready)
    delayed: dict[int, Stored] = field(default_factory=dict)  # msg id -> message
    in_flight: dict[int, InFlight] = field(default_factory=dict)  # delivery id -> ...
    getters: deque[GetWaiter] = field(default_factory=deque)
    # GETs of connections that hold max_unacked_bytes, out of the line: conn -> its GETs
    blocked: dict[int, dict[int, GetWaiter]] = field(default_factory=dict)  # conn -> req ->
    consumers_waiting: int = 0  # parked GETs (in the line or blocked) not yet answered
    putters: deque[PutWaiter] = field(default_factory=deque)
    joiners: list[Waiter] = field(default_factory=list)  # JOINs with a wait
    # JOINs without a wait, the reqs of each connection's: a dict entry each, not a waiter
    # (a client may hold one per queue per thread or coroutine; a flood of them costs little)
    join_reqs: dict[int, dict[int, None]] = field(default_factory=dict)
    # messages put with a ttl, while they wait (ready or delayed): id -> message
    expiring: dict[int, Stored] = field(default_factory=dict)
    dedup_window: float = DEFAULT_DEDUP_WINDOW  # seconds a dedup id is remembered
    dedup: dict[str, float] = field(default_factory=dict)  # dedup id -> wall-clock until
    dedup_heap: list[tuple[float, str]] = field(default_factory=list)  # (until, id)
    stale: int = 0  # finished waiters still in the three lines above (an estimate >= 0)
    unfinished: int = 0
    # What the store was last told of unfinished - held: tasks taken (acked) and not yet
    # marked done (negative after task_done() for items still held). Kept across a restart
    # (``BrokerState._tasks_changed``), so unfinished is too.
    taken: int = 0
    shutdown: bool = False
    # counters for stats and metrics
    put_total: int = 0
    delivered_total: int = 0
    acked_total: int = 0
    redelivered_total: int = 0
    dead_total: int = 0

    @property
    def is_dead_letters(self) -> bool:
        return self.name.endswith(DEAD_SUFFIX)

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

    @property
    def idle(self) -> bool:
        """Holds nothing and nobody waits on it: a queue made by a mere reference may go."""
        return not (
            self.declared
            or self.shutdown
            or self.unfinished
            or self.ready
            or self.delayed
            or self.in_flight
            or self.put_total
            or self.dedup
            or self.consumers_waiting
            or any(not w.done for w in self.putters)
            or self.join_reqs
            or any(not w.done for w in self.joiners)
        )

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest message ready to be delivered has been in the queue, whatever
        its priority (a low-priority message starved by higher ones keeps ageing)."""
        oldest = self.ready.oldest() if self.ready else None
        return max(0.0, now - oldest.enqueued) if oldest is not None else 0.0

    def compact(self) -> None:
        """Drop finished waiters, so consumers that time out again and again on an empty
        queue do not pile up in it. Amortised: the lines are rebuilt only once finished
        waiters (``stale``, counted as they finish) are half of them, so each request
        pays O(1) on average, however many wait."""
        if self.stale < 16:
            return
        if self.stale * 2 < len(self.getters) + len(self.putters) + len(self.joiners):
            return
        self.getters = deque(w for w in self.getters if not w.done)
        self.putters = deque(w for w in self.putters if not w.done)
        self.joiners = [w for w in self.joiners if not w.done]
        self.stale = 0

    def configure(self, settings: dict[str, Any]) -> None:
        """Take the settings given (a DECLARE's, or a store's at start); it is declared."""
        self.declared = True
        self.maxsize = int(settings.get("maxsize", self.maxsize))
        self.lease = float(settings.get("lease", self.lease))
        self.max_deliveries = int(settings.get("max_deliveries", self.max_deliveries))
        self.dedup_window = float(settings.get("dedup_window", self.dedup_window))
        self.shutdown = bool(settings.get("shutdown", self.shutdown))

    def settings(self) -> dict[str, Any]:
        """What the store keeps of this queue's settings."""
        return {
            "maxsize": self.maxsize,
            "lease": self.lease,
            "max_deliveries": self.max_deliveries,
            "dedup_window": self.dedup_window,
            "shutdown": self.shutdown,
        }

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "depth": self.depth,
            "delayed": len(self.delayed),
            "in_flight": len(self.in_flight),
            "maxsize": self.maxsize,
            "unfinished": self.unfinished,
            "shutdown": self.shutdown,
            "consumers_waiting": self.consumers_waiting,
            "lease": self.lease,
            "max_deliveries": self.max_deliveries,
            "dedup_window": self.dedup_window,
            "put_total": self.put_total,
            "delivered_total": self.delivered_total,
            "acked_total": self.acked_total,
            "redelivered_total": self.redelivered_total,
            "dead_total": self.dead_total,
        }
