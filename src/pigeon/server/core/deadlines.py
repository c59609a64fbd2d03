"""When things happen in the broker: leases that end, parked requests that time out,
delayed messages that come due, messages that expire.

# Strategy:
# One min-heap per kind of deadline, with lazy deletion: an entry whose subject was
# settled, answered, taken or dropped before its time stays in the heap and is skipped
# when it comes up (the caller checks each entry it is handed against the live state).
# Lazy deletion alone keeps every past event until its deadline - an answered GET with
# a one-hour wait, a message requeued a thousand times with a one-hour ttl - so memory
# would grow with rate x wait. Each heap is therefore rebuilt from what is still live
# (a function of the caller's) whenever it has grown past twice its size at the last
# rebuild (plus some slack): a rebuild costs O(live) and follows at least as many pushes,
# so a push costs O(log n) amortised and a heap never holds more than about twice what
# was live at its last rebuild, plus the slack.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from pigeon.server.core.model import Waiter

__all__ = ["DeadlineHeap", "Deadlines"]

T = TypeVar("T")

_SLACK = 1024  # entries a heap may hold beyond twice its last rebuilt size
_LEASE_SLACK = 65_536


class DeadlineHeap(Generic[T]):
    """``(when, seq, item)`` entries, earliest first; rebuilt from ``live()`` when stale
    entries may dominate. ``seq`` breaks ties, so items are never compared."""

    __slots__ = ("_heap", "_live", "_rebuilt_at", "_seq", "_slack")

    def __init__(self, live: Callable[[], Iterable[tuple[float, T]]], slack: int = _SLACK) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._live = live
        self._seq = itertools.count()
        self._rebuilt_at = 0
        self._slack = slack

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, item: T) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), item))
        if len(self._heap) > self._slack + 2 * self._rebuilt_at:
            self.rebuild()

    def rebuild(self) -> None:
        """Keep only what ``live()`` says is still waiting."""
        seq = self._seq
        heap = self._heap
        heap[:] = [(when, next(seq), item) for when, item in self._live()]  # the same list:
        heapq.heapify(heap)  # Deadlines.next reads it directly
        self._rebuilt_at = len(heap)

    def first(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[tuple[float, T]]:
        """Pop the entries due by ``now``, earliest first (stale ones too: the caller
        checks each against what is live). Entries pushed meanwhile are seen if due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, item = heapq.heappop(heap)
            yield when, item


class Deadlines:
    """The broker's four kinds of deadlines on its monotonic clock, each a heap rebuilt
    from the live state the broker describes:

    - ``leases``: ``(queue, delivery ids)`` handed out with one deadline;
    - ``timeouts``: parked requests with a wait;
    - ``delays``: ``(queue, message id)`` set aside until due;
    - ``expiries``: ``(queue, message id)`` that expire while they wait.
    """

    __slots__ = ("_heaps", "delays", "expiries", "leases", "timeouts")

    def __init__(
        self,
        leases: Callable[[], Iterable[tuple[float, tuple[str, Sequence[int]]]]],
        timeouts: Callable[[], Iterable[tuple[float, Waiter]]],
        delays: Callable[[], Iterable[tuple[float, tuple[str, int]]]],
        expiries: Callable[[], Iterable[tuple[float, tuple[str, int]]]],
    ) -> None:
        # Leases come a batch GET at a time, tens of thousands a second: rebuilding
        # that heap is rarer (its stale entries are settled batches, which are small).
        self.leases = DeadlineHeap(leases, slack=_LEASE_SLACK)
        self.timeouts = DeadlineHeap(timeouts)
        self.delays = DeadlineHeap(delays)
        self.expiries = DeadlineHeap(expiries)
        # the four lists themselves (never replaced): next() runs after every request
        self._heaps = tuple(
            h._heap for h in (self.leases, self.timeouts, self.delays, self.expiries)
        )

    def next(self) -> float | None:
        """The earliest deadline of any kind (None: nothing is waiting for time)."""
        first: float | None = None
        for heap in self._heaps:
            if heap and (first is None or heap[0][0] < first):
                first = heap[0][0]
        return first
