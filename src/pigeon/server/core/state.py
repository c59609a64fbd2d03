"""What every rule of the broker reads: its queues, what each connection holds, its
deadlines, ids, clocks and limits.

``BrokerState`` is the data; the rules are functions over it in the modules beside this
one (``holdings``, ``placement``, ``requeue``, ``delivery``, ...), and ``Broker``
(``broker.py``) is this state with its request handlers and its clock. Members with a
leading underscore are the package's own: the rules use them, the server shell does not.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pigeon.protocol import Error
from pigeon.protocol.codes import Code
from pigeon.server.core.deadlines import Deadlines
from pigeon.server.core.model import QueueState, Waiter
from pigeon.server.core.storage import Store
from pigeon.server.limits import Limits

__all__ = ["EPSILON", "BrokerState", "Conn", "ConnState", "Out", "Refused", "err"]

Conn = int
Out = tuple[Conn, Any]

# A wall-clock time turned into the broker's clock and back may move by a rounding error:
# a deadline taken from a heap counts as reached within this many seconds of it.
EPSILON = 1e-3
_PRUNE_HANDED = 64  # a connection's record of GETs is pruned at this length at least


class Refused(Exception):
    """A request the broker refuses from deep inside a rule (``handle`` answers it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def err(conn: Conn, req: int, code: str, message: str) -> Out:
    return conn, Error(req, code, message)


@dataclass(slots=True)
class ConnState:
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


class BrokerState:
    """All queues of one broker, what its connections hold, and its limits."""

    def __init__(
        self,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        *,
        limits: Limits | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store if store is not None else Store()
        # what a queue gets when it declares nothing, what one connection and the whole
        # broker may hold (the server passes its ServerConfig, which extends Limits)
        self.limits = limits if limits is not None else Limits()
        self.parked_gets = 0
        self.parked_bytes = 0
        self.dedup_ids = 0
        self.dedup_ids_parked = 0  # new dedup ids of puts parked for room (see dedup_full)
        self._dedup_swept_at = float("-inf")
        self.queues: dict[str, QueueState] = {}
        self._conns: dict[Conn, ConnState] = {}
        # Delivery ids start at a random 40-bit epoch so that an ack from before a
        # restart can never settle a different delivery after it.
        self._next_delivery = (secrets.randbits(40) << 20) + 1
        self._ids = itertools.count(1)  # message ids (recovery starts them past the store's)
        # Leases: one entry per batch handed out with one deadline. Entries whose subject
        # went meanwhile stay until their time or the heap's next rebuild from what is
        # live (these four functions), so each heap stays proportional to what waits.
        self.deadlines = Deadlines(
            self._live_leases, self._live_timeouts, self._live_delays, self._live_expiries
        )
        self._unblocked: list[ConnState] = []  # connections that settled with GETs set aside
        # Queues to serve once the request or tick is done with: one whose first parked put
        # left its line without being admitted (cancelled, its connection draining: the
        # puts behind it, and new ones, may fit now), a dead-letter queue that received
        # messages (GETs may wait on it)
        self._to_serve: set[str] = set()
        self.now = 0.0 if clock is None else clock()
        # A message's delay and expiry are kept as wall-clock times (they outlive a
        # restart); the broker's clock is monotonic: wall = now + _wall_offset.
        self._wall_offset = wall_clock() - self.now
        self._start()

    def _start(self) -> None:
        """What the broker does with its store's contents once its state is made
        (``Broker``: recovery); nothing for the bare state."""

    def _queue(self, name: str, *, limit: bool = True) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            if limit and len(self.queues) >= self.limits.max_queues:
                raise Refused(
                    Code.LIMIT,
                    f"this broker holds {len(self.queues)} queues (max_queues="
                    f"{self.limits.max_queues}); delete unused ones (pigeon delete) or raise "
                    "--max-queues",
                )
            q = self.queues[name] = QueueState(
                name, lease=self.limits.default_lease, max_deliveries=self.limits.max_deliveries
            )
        return q

    def _tasks_changed(self, q: QueueState) -> None:
        """Tell the store if ``q``'s tasks taken and not yet done changed: an ACK (or a
        GET's auto-ack) takes a message out of the store but leaves it unfinished until
        TASK_DONE, and a drop's ``max(0, ...)`` may clamp it. The store keeps this count
        (``Store.taken``), so recovery gives back unfinished = what it holds + taken."""
        taken = q.unfinished - q.held
        if taken != q.taken:
            q.taken = taken
            self.store.taken(q.name, taken)

    def _forget_if_idle(self, name: str) -> None:
        q = self.queues.get(name)
        if q is not None and q.idle:
            del self.queues[name]

    def _conn(self, conn: Conn) -> ConnState:
        cs = self._conns.get(conn)
        if cs is None:
            cs = self._conns[conn] = ConnState(conn)
        return cs

    def _deadline(self, wait: float | None) -> float | None:
        return None if wait is None else self.now + wait

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
