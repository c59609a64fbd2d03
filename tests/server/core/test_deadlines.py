"""The deadline heaps: what is live comes due in order, what went meanwhile is not kept."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.server.core.deadlines import DeadlineHeap


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=3000))
def test_a_heap_yields_what_is_live_in_order_and_stays_near_its_live_size(
    entries: list[tuple[float, bool]],
) -> None:
    live: dict[int, float] = {}
    heap: DeadlineHeap[int] = DeadlineHeap(lambda: ((w, k) for k, w in live.items()), slack=16)
    peak = 0
    for key, (when, stays) in enumerate(entries):
        live[key] = when
        peak = max(peak, len(live))
        heap.push(when, key)
        if not stays:  # settled, answered or taken before its time
            del live[key]
        assert len(heap) <= 16 + 2 * peak  # bounded by what was live, not by the pushes...
    heap.rebuild()
    assert len(heap) == len(live)  # ...and nothing but the live after a rebuild
    due = [(w, k) for w, k in heap.due(50.0)]
    assert due == sorted((w, k) for k, w in live.items() if w <= 50.0)
    assert heap.first() == min((w for w in live.values() if w > 50.0), default=None)


def test_stale_entries_are_dropped_as_pushes_go_on() -> None:
    heap: DeadlineHeap[int] = DeadlineHeap(lambda: [], slack=100)
    for i in range(100_000):
        heap.push(3600.0 + i, i)  # each answered at once: nothing stays live
    assert len(heap) <= 101
