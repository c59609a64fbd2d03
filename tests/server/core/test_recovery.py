"""What a broker makes of its store's contents at start (``recovery``)."""

from __future__ import annotations

from pigeon.protocol import Error, Get, Join, Put, TaskDone
from pigeon.protocol.messages import Confirmed
from pigeon.server.core import Broker, BrokerState, Extra, Stored
from tests.server.core._broker import A, Recorder, payloads, replies

WALL = 1_800_000_000.0


def broker(store: Recorder) -> Broker:
    b = Broker(store, clock=lambda: 10.0, wall_clock=lambda: WALL)
    b.connection_made(A)
    return b


def test_recovered_settings_apply_and_their_queue_stays_while_empty() -> None:
    b = broker(Recorder(queues={"q": {"maxsize": 3, "lease": 2.5, "shutdown": True}}))
    q = b.queues["q"]
    assert (q.maxsize, q.lease, q.shutdown, q.declared) == (3, 2.5, True, True)
    assert q.max_deliveries == b.limits.max_deliveries  # what was not kept keeps its default


def test_only_dedup_ids_still_within_their_window_are_remembered() -> None:
    b = broker(Recorder(dedup={"q": {"gone": WALL - 1.0, "kept": WALL + 60.0}}))
    assert b.queues["q"].dedup == {"kept": WALL + 60.0} and b.dedup_ids == 1
    assert b.queues["q"].dedup_heap == [(WALL + 60.0, "kept")]


def test_message_ids_go_on_after_the_largest_recovered() -> None:
    store = Recorder(messages=[("q", Stored(7, b"old")), ("r", Stored(41, b"older"))])
    b = broker(store)
    assert b.handle(A, Put(1, "q", b"new")) == [(A, Confirmed(1, 1))]
    assert store.of("added_plain") == [("q", [42])]
    (got,) = replies(b.handle(A, Get(2, "q", 10, 0)), A)
    assert payloads(got) == [b"old", b"new"]
    assert b.queues["q"].unfinished == 2  # a recovered message is a task not done


def test_a_message_whose_last_delivery_was_in_flight_goes_to_the_dead_letters() -> None:
    # Deliveries are stored: one delivered max_deliveries times when the broker stopped
    # came back after its last delivery, and is not delivered again.
    store = Recorder(
        messages=[
            ("q", Stored(1, b"spent", deliveries=5)),
            ("q", Stored(2, b"once", deliveries=1)),
        ],
        queues={"q": {"max_deliveries": 5}},
    )
    b = broker(store)
    assert [m.payload for m in b.queues["q"].ready] == [b"once"]
    (dead,) = b.queues["q.dead"].ready
    assert (dead.payload, dead.origin, dead.reason) == (b"spent", "q", "max_deliveries")
    assert store.of("moved") == [("q.dead", 1, "max_deliveries")]


def test_recovered_messages_with_options_wait_for_their_time() -> None:
    later = Extra(due=WALL + 5.0)
    brief = Extra(expires=WALL + 3.0)
    past = Extra(due=WALL - 5.0)
    store = Recorder(
        messages=[
            ("q", Stored(1, b"later", extra=later)),
            ("q", Stored(2, b"brief", extra=brief)),
            ("q", Stored(3, b"due while down", extra=past)),
        ]
    )
    b = broker(store)
    q = b.queues["q"]
    assert [m.payload for m in q.delayed.values()] == [b"later"]
    assert [m.payload for m in q.ready] == [b"brief", b"due while down"]
    assert b.next_deadline() == 13.0  # the expiry, on the broker's clock (10 at WALL)
    b.tick(15.0)
    assert [m.payload for m in q.ready] == [b"later", b"due while down"]  # in their order
    assert [m.payload for m in b.queues["q.dead"].ready] == [b"brief"]


def test_the_bare_state_leaves_its_store_unread() -> None:
    store = Recorder(messages=[("q", Stored(1, b"x"))], queues={"q": {"maxsize": 1}})
    assert BrokerState(store).queues == {}
    assert set(Broker(store).queues) == {"q"}


def test_tasks_taken_and_not_yet_done_are_unfinished_after_a_restart() -> None:
    # unfinished = what the store holds + the tasks it kept as taken and not yet done;
    # a count that would go below 0 (a message of it quarantined since) is 0, and told.
    store = Recorder(
        messages=[("q", Stored(1, b"held"))],
        taken={"q": 2, "gone": 5, "less": -3},
    )
    b = broker(store)
    assert [b.queues[n].unfinished for n in ("q", "gone", "less")] == [3, 5, 0]
    assert store.of("taken") == [("less", 0)]
    (late,) = replies(b.handle(A, Join(1, "gone", 0)), A)
    assert isinstance(late, Error) and late.code == "timeout"
    b.handle(A, TaskDone(2, "gone", 5))
    assert store.of("taken")[-1] == ("gone", 0)
