"""Where a put's messages go (``placement``), on a bare ``BrokerState``: plain puts in
bulk, options shared, delays and expiries timed, dedup ids remembered for their window
within ``max_dedup_ids``."""

from __future__ import annotations

from pigeon.protocol import PutOptions
from pigeon.server.core import BrokerState, Store
from pigeon.server.core.placement import add, dedup_full, forget_dedup
from pigeon.server.limits import Limits
from tests.server.core._broker import Recorder

WALL = 1_800_000_000.0


def state(
    store: Store | None = None, wall: list[float] | None = None, **limits: int
) -> BrokerState:
    """A broker's state whose clock reads 0 when the wall clock reads ``wall[0]``."""
    clock = wall if wall is not None else [WALL]
    return BrokerState(
        store, clock=lambda: 0.0, wall_clock=lambda: clock[0], limits=Limits(**limits)
    )


def test_a_plain_put_is_stored_in_bulk_in_order_with_consecutive_ids() -> None:
    store = Recorder()
    b = state(store)
    q = b._queue("q")
    add(b, q, [b"a", b"b", b"c"])
    add(b, q, [b"d"])
    assert store.calls == [("added_plain", "q", [1, 2, 3]), ("added_plain", "q", [4])]
    assert [m.payload for m in q.ready] == [b"a", b"b", b"c", b"d"]
    assert all(m.extra is None for m in q.ready)
    assert q.unfinished == q.put_total == 4


def test_the_messages_of_a_put_with_options_share_one_extra() -> None:
    store = Recorder()
    b = state(store)
    q = b._queue("q")
    add(b, q, [b"a", b"b"], PutOptions(priority=3, headers={"k": "v"}))
    first, second = q.ready
    assert first.extra is second.extra and first.extra is not None
    assert (first.extra.priority, first.extra.headers) == (3, {"k": "v"})
    assert store.of("added") == [("q", 1), ("q", 2)]  # one by one: the base store's loop


def test_a_delayed_message_waits_apart_and_an_expiring_one_is_watched() -> None:
    b = state()
    q = b._queue("q")
    add(b, q, [b"later"], PutOptions(delay=5.0))
    add(b, q, [b"brief"], PutOptions(ttl=2.0))
    add(b, q, [b"later, then brief"], PutOptions(delay=5.0, ttl=2.0))
    assert [m.payload for m in q.delayed.values()] == [b"later", b"later, then brief"]
    assert [m.payload for m in q.ready] == [b"brief"]
    assert [m.payload for m in q.expiring.values()] == [b"brief", b"later, then brief"]
    assert b.deadlines.delays.first() == 5.0  # on the broker's clock
    assert b.deadlines.expiries.first() == 2.0
    (late,) = (m for m in q.delayed.values() if m.extra and m.extra.expires)
    assert late.extra is not None and late.extra.expires == WALL + 7.0  # its ttl runs from its due


def test_repeats_of_a_dedup_id_are_left_out_and_remembered_for_the_window() -> None:
    store = Recorder()
    wall = [WALL]
    b = state(store, wall)
    q = b._queue("q")
    q.dedup_window = 60.0
    add(b, q, [b"a", b"b", b"a again"], dedup_ids=["a", "b", "a"])
    add(b, q, [b"b again"], PutOptions(dedup_id="b"))
    assert [m.payload for m in q.ready] == [b"a", b"b"]
    assert store.of("deduped") == [("q", "a", WALL + 60.0), ("q", "b", WALL + 60.0)]
    assert b.dedup_ids == 2
    b.now, wall[0] = 61.0, WALL + 61.0
    forget_dedup(b, q)
    assert b.dedup_ids == 0 and not q.dedup
    add(b, q, [b"a after its window"], dedup_ids=["a"])
    assert len(q.ready) == 3


def test_at_the_dedup_limit_ids_past_their_window_are_forgotten_in_every_queue() -> None:
    wall = [WALL]
    b = state(wall=wall, max_dedup_ids=2)
    one, two = b._queue("one"), b._queue("two")
    one.dedup_window, two.dedup_window = 10.0, 100.0
    add(b, one, [b"x"], dedup_ids=["x"])
    add(b, two, [b"y"], dedup_ids=["y"])
    assert dedup_full(b, two, ["z"])
    b.now, wall[0] = 11.0, WALL + 11.0  # "x" is past its window, "y" is not
    assert not dedup_full(b, two, ["z"])  # swept: "x" forgotten in the other queue
    assert b.dedup_ids == 1 and not one.dedup
    add(b, two, [b"z"], dedup_ids=["z"])
    assert not dedup_full(b, two, ["y", "z"])  # repeats are no new ids
    assert dedup_full(b, two, ["y", "w"])
