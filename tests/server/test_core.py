"""The broker's delivery rules, without a network: messages in, replies out, time by hand."""

from __future__ import annotations

import collections
from typing import Any
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pigeon.protocol import (
    Ack,
    Cancel,
    Declare,
    Deliver,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Nack,
    Ok,
    Peek,
    Purge,
    Put,
    PutBatch,
    QueueShutdown,
    Shutdown,
    TaskDone,
)
from pigeon.protocol.messages import Confirmed, PutOptions
from pigeon.server.core import Broker

A, B, C = 1, 2, 3


@pytest.fixture
def broker() -> Broker:
    b = Broker()
    for conn in (A, B, C):
        b.connection_made(conn)
    return b


def replies(outs: list[tuple[int, Any]], conn: int) -> list[Any]:
    return [m for c, m in outs if c == conn]


def payloads(msg: Any) -> list[bytes]:
    assert isinstance(msg, Deliver), msg
    return [d.payload for d in msg.messages]


def test_fifo_and_auto_ack(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2", b"3"]))
    (reply,) = replies(broker.handle(B, Get(1, "q", 2, 0)), B)
    assert payloads(reply) == [b"1", b"2"]
    assert [d.id for d in reply.messages] == [0, 0]  # nothing left to ack
    assert broker.queues["q"].depth == 1


def test_empty_without_wait_is_an_error(broker: Broker) -> None:
    (reply,) = broker.handle(A, Get(7, "q", 1, 0))[0:1]
    assert reply == (A, Error(7, "empty", "queue 'q' is empty"))


def test_parked_get_is_served_by_a_later_put(broker: Broker) -> None:
    assert broker.handle(B, Get(5, "q", 1, None)) == []
    outs = broker.handle(A, Put(1, "q", b"x"))
    assert replies(outs, A) == [Confirmed(1, 1)]
    assert payloads(replies(outs, B)[0]) == [b"x"]


def test_parked_get_times_out_on_tick(broker: Broker) -> None:
    broker.handle(B, Get(5, "q", 1, 1.0), now=100.0)
    assert broker.next_deadline() == 101.0
    assert broker.tick(100.5) == []
    assert broker.tick(101.0) == [(B, Error(5, "empty", "queue 'q' is empty"))]


def test_cancelled_get_takes_nothing(broker: Broker) -> None:
    broker.handle(B, Get(5, "q", 1, None))
    broker.handle(B, Cancel(5))
    broker.handle(A, Put(1, "q", b"kept"))
    assert broker.queues["q"].depth == 1


def test_unacked_message_returns_at_once_when_its_connection_drops(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"a", b"b"]))
    (got,) = replies(broker.handle(B, Get(1, "q", 2, 0, manual_ack=True)), B)
    assert payloads(got) == [b"a", b"b"]
    assert broker.queues["q"].depth == 0
    broker.connection_lost(B)
    (again,) = replies(broker.handle(C, Get(1, "q", 2, 0, manual_ack=True)), C)
    assert payloads(again) == [b"a", b"b"]  # in their original order, at the front
    assert [d.delivery_count for d in again.messages] == [2, 2]


def test_redelivery_goes_to_a_waiting_consumer(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"job"))
    broker.handle(B, Get(1, "q", 1, 0, manual_ack=True))
    broker.handle(C, Get(9, "q", 1, None))
    outs = broker.connection_lost(B)
    assert payloads(replies(outs, C)[0]) == [b"job"]


def test_lease_expiry_redelivers(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"job"), now=0.0)
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True, lease=2.0), now=0.0), B)
    assert broker.tick(1.9) == []
    broker.tick(2.0)
    (again,) = replies(broker.handle(C, Get(2, "q", 1, 0, True), now=2.0), C)
    assert again.messages[0].delivery_count == 2
    # the first consumer's late ack is refused: it no longer holds the message
    (ok,) = replies(broker.handle(B, Ack(3, "q", [got.messages[0].id])), B)
    assert ok.value["unknown"] == [got.messages[0].id]


def test_extend_pushes_the_lease_back(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"job"), now=0.0)
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True, lease=2.0), now=0.0), B)
    broker.handle(B, Extend(2, "q", [got.messages[0].id], 10.0), now=1.0)
    broker.tick(5.0)
    assert broker.queues["q"].depth == 0
    broker.tick(11.0)
    assert broker.queues["q"].depth == 1


def test_nack_with_delay(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"job"), now=0.0)
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True), now=0.0), B)
    broker.handle(B, Nack(2, "q", [got.messages[0].id], True, 5.0), now=0.0)
    assert broker.queues["q"].depth == 1  # delayed counts as waiting
    assert replies(broker.handle(C, Get(3, "q", 1, 0), now=1.0), C)[0].code == "empty"
    broker.tick(5.0)
    assert payloads(replies(broker.handle(C, Get(4, "q", 1, 0), now=5.0), C)[0]) == [b"job"]


def test_poison_message_moves_to_the_dead_letter_queue(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", max_deliveries=3))
    broker.handle(A, Put(2, "q", b"poison"))
    for i in range(3):
        (got,) = replies(broker.handle(B, Get(10 + i, "q", 1, 0, True)), B)
        broker.handle(B, Nack(20 + i, "q", [got.messages[0].id]))
    assert broker.queues["q"].depth == 0
    assert broker.queues["q"].dead_total == 1
    (dead,) = replies(broker.handle(C, Get(1, "q.dead", 1, 0)), C)
    assert payloads(dead) == [b"poison"]


def test_nack_without_requeue_dead_letters(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"bad"))
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True)), B)
    broker.handle(B, Nack(2, "q", [got.messages[0].id], requeue=False))
    assert broker.queues["q.dead"].depth == 1


def test_maxsize_full_and_parked_put(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=2))
    broker.handle(A, PutBatch(2, "q", [b"1", b"2"]))
    assert replies(broker.handle(A, Put(3, "q", b"3")), A)[0].code == "full"
    assert broker.handle(A, Put(4, "q", b"3", wait=None)) == []  # parked, not stored
    assert broker.queues["q"].held == 2
    outs = broker.handle(B, Get(1, "q", 1, 0))
    assert (A, Confirmed(4, 1)) in outs
    assert broker.queues["q"].held == 2
    assert replies(broker.handle(A, PutBatch(5, "q", [b"x"] * 3)), A)[0].code == "bad_request"


def test_in_flight_messages_count_against_maxsize(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=1))
    broker.handle(A, Put(2, "q", b"1"))
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True)), B)
    assert replies(broker.handle(A, Put(3, "q", b"2")), A)[0].code == "full"
    broker.handle(B, Ack(2, "q", [got.messages[0].id]))
    assert replies(broker.handle(A, Put(4, "q", b"2")), A) == [Confirmed(4, 1)]


def test_task_done_and_join(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2"]))
    assert broker.handle(C, Join(1, "q", None)) == []
    broker.handle(B, Get(1, "q", 2, 0))
    assert replies(broker.handle(B, TaskDone(2, "q", 1)), C) == []
    outs = broker.handle(B, TaskDone(3, "q", 1))
    assert (C, Ok(1, 0)) in outs
    assert replies(broker.handle(B, TaskDone(4, "q", 1)), B)[0].code == "value"


def test_shutdown_reaches_every_connection_and_drains(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1"]))
    outs = broker.handle(A, Shutdown(2, "q"))
    assert {c for c, m in outs if isinstance(m, QueueShutdown)} == {A, B, C}
    assert replies(broker.handle(A, Put(3, "q", b"2")), A)[0].code == "shutdown"
    assert payloads(replies(broker.handle(B, Get(1, "q", 5, None)), B)[0]) == [b"1"]
    assert replies(broker.handle(B, Get(2, "q", 5, None)), B)[0].code == "shutdown"


def test_shutdown_wakes_parked_getters(broker: Broker) -> None:
    broker.handle(B, Get(1, "q", 1, None))
    outs = broker.handle(A, Shutdown(2, "q"))
    assert (B, Error(1, "shutdown", "queue 'q' was shut down")) in outs


def test_immediate_shutdown_drops_items_and_releases_join(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2"]))
    broker.handle(C, Join(1, "q", None))
    outs = broker.handle(A, Shutdown(2, "q", immediate=True))
    assert (C, Ok(1, 0)) in outs
    assert broker.queues["q"].depth == 0


def test_info_reports_the_queue(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=5, lease=3.0))
    broker.handle(A, Put(2, "q", b"x"))
    (ok,) = replies(broker.handle(A, Info(3, "q")), A)
    assert ok.value["depth"] == 1 and ok.value["maxsize"] == 5 and ok.value["lease"] == 3.0


@pytest.mark.parametrize("name", ["", "has space", "tab\there", "x" * 201, "new\nline"])
def test_bad_queue_names_are_refused(broker: Broker, name: str) -> None:
    (reply,) = replies(broker.handle(A, Put(1, name, b"x")), A)
    assert isinstance(reply, Error) and reply.code == "bad_request"


def test_a_consumer_holding_max_unacked_bytes_gets_no_more_until_it_acks() -> None:
    broker = Broker(max_unacked_bytes=10)
    broker.handle(A, PutBatch(1, "q", [b"x" * 6, b"y" * 6, b"z" * 6]))
    (first,) = replies(broker.handle(B, Get(1, "q", 3, 0, True)), B)
    assert payloads(first) == [b"x" * 6]  # a second would pass 10 bytes
    (refused,) = replies(broker.handle(B, Get(2, "q", 1, 0, True)), B)
    assert refused.code == "unacked" and "ack or nack some" in refused.message
    assert broker.handle(B, Get(3, "q", 1, None, True)) == []  # parked
    outs = broker.handle(B, Ack(4, "q", [first.messages[0].id]))
    assert payloads(next(m for c, m in outs if isinstance(m, Deliver))) == [b"y" * 6]
    # another consumer is not held back by B
    assert payloads(replies(broker.handle(C, Get(1, "q", 1, 0, True)), C)[0]) == [b"z" * 6]


def test_one_ack_may_settle_deliveries_of_several_connections(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"a1", b"a2", b"b1", b"b2", b"c"]))
    (ga,) = replies(broker.handle(A, Get(2, "q", 2, 0, True)), A)
    (gb,) = replies(broker.handle(B, Get(1, "q", 2, 0, True)), B)
    (gc,) = replies(broker.handle(C, Get(1, "q", 1, 0, True)), C)
    a1, a2 = (d.id for d in ga.messages)
    b1, b2 = (d.id for d in gb.messages)
    (ok,) = replies(broker.handle(A, Ack(3, "q", [a1, b1, 999_999, a2, b2])), A)
    assert ok.value == {"settled": 4, "unknown": [999_999]}
    conns = broker._conns
    assert conns[A].unacked == conns[B].unacked == 0
    assert conns[A].holding == conns[B].holding == 0
    assert conns[C].unacked == 1 and conns[C].holding == 1
    assert list(broker.queues["q"].in_flight) == [gc.messages[0].id]
    assert broker.queues["q"].acked_total == 4


def test_messages_given_back_are_taken_first_then_the_new_ones_in_order(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(6)]))
    (first,) = replies(broker.handle(B, Get(1, "q", 3, 0, True)), B)
    broker.handle(B, Nack(2, "q", [first.messages[2].id, first.messages[0].id]))
    (again,) = replies(broker.handle(C, Get(1, "q", 4, 0, True)), C)
    assert payloads(again) == [b"0", b"2", b"3", b"4"]
    assert [d.delivery_count for d in again.messages] == [2, 2, 1, 1]
    (rest,) = replies(broker.handle(C, Get(2, "q", 4, 0, True)), C)
    assert payloads(rest) == [b"5"]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    want=st.integers(1, 30),
    held=st.integers(0, 60),
    reply_budget=st.integers(1, 600),
    unacked_budget=st.integers(1, 200),
)
def test_a_get_takes_what_the_reply_and_unacked_budgets_allow_in_order(
    sizes: list[int], want: int, held: int, reply_budget: int, unacked_budget: int
) -> None:
    # The rule, message by message: stop before a message that would take the reply past
    # max_reply_bytes (payload and framing; the first one always fits: a message that
    # could never fit a reply is refused at its put), or, while the connection holds
    # unacked bytes, past max_unacked_bytes. Batches of any size (the broker takes large
    # ones in bulk) must follow it exactly.
    from pigeon.server.core import _DELIVERY_OVERHEAD as over

    assume(held + over <= reply_budget)  # it was taken first, alone
    b = Broker(max_reply_bytes=reply_budget, max_unacked_bytes=unacked_budget)
    if held:
        b.handle(A, Put(1, "held", b"h" * held))
        b.handle(B, Get(1, "held", 1, 0, True))
        assert b._conns[B].unacked == held
    lengths = [len(b"%d" % i) + n for i, n in enumerate(sizes)]
    (put,) = b.handle(A, PutBatch(2, "q", [b"%d" % i + b"." * n for i, n in enumerate(sizes)]))
    if max(lengths) + over > reply_budget:
        assert isinstance(put[1], Error) and put[1].code == "too_large"
        assert not b.queues.get("q")
        return
    expect, size, h = 0, 0, held
    for n in lengths[:want]:
        if size + n + over > reply_budget:
            break
        if h and h + n > unacked_budget:
            break
        size, h, expect = size + n + over, h + n, expect + 1
    (reply,) = replies(b.handle(B, Get(2, "q", want, 0, True)), B)
    if expect == 0:
        assert isinstance(reply, Error)
        return
    assert [int(p.split(b".")[0]) for p in payloads(reply)] == list(range(expect))
    assert b._conns[B].unacked == held + sum(lengths[:expect])
    assert len(b.queues["q"].in_flight) == expect
    ids = [d.id for d in reply.messages]
    assert len(set(ids)) == expect and all(d.delivery_count == 1 for d in reply.messages)
    b.handle(B, Ack(3, "q", ids))
    assert b._conns[B].unacked == held and not b.queues["q"].in_flight


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["get", "ack", "nack", "lease"]), st.integers(1, 12), st.randoms()
        ),
        min_size=1,
        max_size=120,
    )
)
def test_a_lost_connection_gives_back_exactly_what_it_holds_in_order(
    steps: list[tuple[str, int, Any]],
) -> None:
    # What a connection holds is recorded a GET at a time and pruned as it settles (not
    # an index entry per delivery): whatever the mix of GETs, ACKs and NACKs of any
    # subset, a second queue and leases that run out, when it goes, exactly the
    # deliveries it still holds go back, in the order it was handed them, and the
    # record stays about the size of what it holds.
    with mock.patch("pigeon.server.core.holdings._PRUNE_HANDED", 2):  # prune often
        _lose_a_connection_that_holds_a_mix(steps)


def _lose_a_connection_that_holds_a_mix(steps: list[tuple[str, int, Any]]) -> None:
    b = Broker(default_lease=5.0)
    b.connection_made(A)
    b.connection_made(B)
    b._conns[B].prune_at = 2
    peak = 0
    b.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(400)]))
    b.handle(A, PutBatch(2, "r", [b"r%d" % i for i in range(400)]))
    held: dict[int, tuple[str, bytes]] = {}  # delivery id -> (queue, payload), in order
    now = 0.0
    for req, (what, n, rnd) in enumerate(steps, start=10):
        if what == "get":
            name = rnd.choice(["q", "r"])
            outs = replies(b.handle(B, Get(req, name, n, 0, True), now=now), B)
            if isinstance(outs[0], Deliver):
                held.update((d.id, (name, d.payload)) for d in outs[0].messages)
        elif what == "lease":  # time passes: every lease older than 5 s ends
            now += 3.0
            b.tick(now)
            held = {d: v for d, v in held.items() if d in b.queues[v[0]].in_flight}
        elif held:
            pick = rnd.sample(sorted(held), min(n, len(held)))
            for name in ("q", "r"):
                ids = [d for d in pick if held[d][0] == name]
                if ids:
                    kind = Ack if what == "ack" else Nack
                    b.handle(B, kind(req, name, ids, True), now=now)
            for d in pick:
                del held[d]
        cs = b._conns[B]
        peak = max(peak, len(held))
        assert cs.holding == len(held)
        assert len(cs.handed) <= cs.prune_at <= max(2, 2 * peak)
    waiting = {name: len(b.queues[name].ready) for name in ("q", "r")}
    b.connection_lost(B)
    for name, prefix in (("q", b""), ("r", b"r")):
        back = {p for n, p in held.values() if n == name}
        assert not b.queues[name].in_flight
        (rest,) = replies(b.handle(A, Get(1, name, 1000, 0), now=now), A)
        got = payloads(rest)
        # all it held is back, beside what was waiting, and in the original order
        assert len(got) == waiting[name] + len(back) and back <= set(got)
        assert got == sorted(got, key=lambda p: int(p[len(prefix) :]))


def test_timed_out_getters_do_not_pile_up(broker: Broker) -> None:
    for i in range(1000):  # a consumer polling an empty queue with a short timeout
        broker.handle(B, Get(i, "q", 1, 0.5), now=float(i))
        broker.tick(i + 0.5)
    broker.handle(B, Get(5000, "q", 1, 10.0), now=2000.0)
    assert len(broker.queues["q"].getters) == 1
    assert broker.parked(B) == 1


# --- the edges -------------------------------------------------------------------------------


def ids(msg: Any) -> list[int]:
    return [d.id for d in msg.messages]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (Get(1, "q", 1, 0, True, lease=float("nan")), "lease"),
        (Get(1, "q", 1, 0, True, lease=0.0), "lease"),
        (Get(1, "q", 1, 0, True, lease=-1.0), "lease"),
        (Get(1, "q", 1, float("nan")), "wait"),
        (Get(1, "q", 1, -1.0), "wait"),
        (Get(1, "q", 1, float("inf")), "wait"),
        (Get(1, "q", 2**40, 0), "max_items"),
        (Get(0, "q", 1, 0), "req"),
        (Put(1, "q", b"x", float("nan")), "wait"),
        (Declare(1, "q", lease=float("nan")), "lease"),
        (Declare(1, "q", lease=float("inf")), "lease"),
        (Declare(1, "q", max_deliveries=0), "max_deliveries"),
        (Nack(1, "q", [5], True, float("nan")), "delay"),
        (Extend(1, "q", [5], float("inf")), "seconds"),
        (TaskDone(1, "q", 0), "count"),
        (Join(1, "q", -5.0), "wait"),
        (PutBatch(1, "q", []), "payloads"),
        (Ack(1, "q", []), "ids"),
    ],
)
def test_every_number_is_range_checked_and_the_connection_goes_on(
    broker: Broker, request_: Any, field: str
) -> None:
    (reply,) = replies(broker.handle(A, request_), A)
    assert isinstance(reply, Error) and reply.code == "bad_request"
    assert reply.message.startswith(field), reply.message
    broker.handle(A, Put(2, "q", b"still served"))
    assert payloads(replies(broker.handle(A, Get(3, "q", 1, 0)), A)[0]) == [b"still served"]


def test_a_nan_lease_is_refused_and_other_leases_still_expire(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"a", b"b"]), now=0.0)
    broker.handle(B, Get(1, "q", 1, 0, True, lease=float("nan")), now=0.0)
    broker.handle(C, Get(1, "q", 1, 0, True, lease=0.3), now=0.0)
    assert broker.next_deadline() == 0.3
    broker.tick(0.3)
    (again,) = replies(broker.handle(A, Get(2, "q", 2, 0), now=0.3), A)
    assert payloads(again) == [b"a", b"b"]


def test_a_dead_letter_survives_nack_lease_and_lost_connection(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", max_deliveries=1))
    broker.handle(A, Put(2, "q", b"poison"), now=0.0)
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True), now=0.0), B)
    broker.handle(B, Nack(2, "q", ids(got), requeue=True), now=0.0)  # its last delivery
    dead = broker.queues["q.dead"]
    assert dead.depth == 1
    # nack (even requeue=False), lease expiry, a dropped connection: it stays
    (d1,) = replies(broker.handle(C, Get(1, "q.dead", 1, 0, True), now=0.0), C)
    assert d1.messages[0].delivery_count == 1  # counted afresh in the dead-letter queue
    broker.handle(C, Nack(2, "q.dead", ids(d1), requeue=False), now=0.0)
    (_d2,) = replies(broker.handle(C, Get(3, "q.dead", 1, 0, True, lease=1.0), now=0.0), C)
    broker.tick(1.0)
    (d3,) = replies(broker.handle(A, Get(3, "q.dead", 1, 0, True), now=1.0), A)
    broker.connection_lost(A)
    assert dead.depth == 1 and payloads(d3) == [b"poison"]
    stored = dead.ready.peek()
    assert (stored.origin, stored.reason) == ("q", "max_deliveries")
    # only an ack removes it
    (d4,) = replies(broker.handle(C, Get(4, "q.dead", 1, 0, True), now=1.0), C)
    broker.handle(C, Ack(5, "q.dead", ids(d4)))
    assert dead.depth == 0 and not dead.in_flight


def test_why_a_dead_letter_died_is_kept(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"a", b"b"]))
    (got,) = replies(broker.handle(B, Get(1, "q", 2, 0, True)), B)
    broker.handle(B, Nack(2, "q", [ids(got)[0]], requeue=False))
    broker.handle(B, Nack(3, "q", [ids(got)[1]], requeue=False, reason="undecodable"))
    assert [(m.origin, m.reason) for m in broker.queues["q.dead"].ready] == [
        ("q", "rejected"),
        ("q", "undecodable"),
    ]


def test_lease_expiry_keeps_the_original_order(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2", b"3", b"4"]), now=0.0)
    for i, lease in enumerate((3.0, 2.0, 1.0)):  # expire in reverse order
        broker.handle(B, Get(10 + i, "q", 1, 0, True, lease=lease), now=0.0)
    broker.tick(5.0)
    (again,) = replies(broker.handle(C, Get(1, "q", 10, 0), now=5.0), C)
    assert payloads(again) == [b"1", b"2", b"3", b"4"]


def test_delayed_nacks_come_back_in_the_original_order(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2", b"3"]), now=0.0)
    (got,) = replies(broker.handle(B, Get(1, "q", 3, 0, True), now=0.0), B)
    for did, delay in zip(ids(got), (3.0, 2.0, 1.0), strict=True):
        broker.handle(B, Nack(2, "q", [did], True, delay), now=0.0)
    broker.tick(3.0)
    assert payloads(replies(broker.handle(C, Get(3, "q", 10, 0), now=3.0), C)[0]) == [
        b"1",
        b"2",
        b"3",
    ]


def test_get_nowait_is_served_while_another_consumer_is_held_back(broker: Broker) -> None:
    small = Broker(max_unacked_bytes=1000)
    small.handle(A, Put(1, "q", b"x" * 900))
    small.handle(A, Get(2, "q", 1, 0, True))  # A holds 900 unacked bytes
    small.handle(A, Get(3, "q", 1, 30, True))  # and waits for more: parked
    small.handle(C, Put(1, "q", b"y" * 900))  # A may not take it
    (got,) = replies(small.handle(B, Get(1, "q", 1, 0, True)), B)  # B holds nothing
    assert payloads(got) == [b"y" * 900]


def test_a_get_parked_behind_the_unacked_cap_says_so_when_it_times_out() -> None:
    small = Broker(max_unacked_bytes=1000)
    small.handle(A, PutBatch(1, "q", [b"x" * 900, b"y" * 900]), now=0.0)
    small.handle(A, Get(2, "q", 1, 0, True), now=0.0)
    assert small.handle(A, Get(3, "q", 1, 1.0, True), now=0.0) == []
    (reply,) = replies(small.tick(1.0), A)
    assert reply.code == "unacked" and "holds 900 unacked bytes" in reply.message


def test_a_reply_takes_only_as_many_items_as_fit() -> None:
    small = Broker(max_reply_bytes=3000)
    small.handle(A, PutBatch(1, "q", [b"x" * 1000] * 5))
    (got,) = replies(small.handle(B, Get(1, "q", 10, 0)), B)
    assert len(got.messages) == 2  # 2 x (1000 + overhead) fit in 3000, 3 do not
    assert small.queues["q"].depth == 3


def test_a_put_that_no_reply_could_carry_is_refused_and_nothing_is_stored() -> None:
    small = Broker(max_reply_bytes=100)
    (reply,) = replies(small.handle(A, Put(1, "q", b"x" * 500)), A)
    assert reply.code == "too_large" and "500 bytes" in reply.message
    assert "nothing was stored" in reply.message
    with_headers = Put(2, "q", b"x", options=PutOptions(headers={"k": "v" * 90}))
    (reply,) = replies(small.handle(A, with_headers), A)
    assert reply.code == "too_large"  # headers count too
    assert small.handle(A, Put(3, "q", b"x" * 60)) == [(A, Confirmed(3, 1))]


def test_a_message_too_large_for_shrunken_limits_is_dead_lettered_not_a_block() -> None:
    # The limits shrank across a restart: the message can never be delivered; it goes to
    # the dead letters (reason too_large) instead of blocking every message behind it.
    b = Broker(max_reply_bytes=10_000)
    b.handle(A, PutBatch(1, "q", [b"x" * 500, b"small"]))
    b.max_reply_bytes = 100
    (reply,) = replies(b.handle(B, Get(1, "q", 10, 0)), B)
    assert payloads(reply) == [b"small"]
    assert b.queues["q.dead"].depth == 1 and b.queues["q.dead"].ready.peek().reason == "too_large"
    (reply,) = replies(b.handle(B, Get(2, "q.dead", 1, 0)), B)  # a dead letter stays put
    assert reply.code == "too_large" and b.queues["q.dead"].depth == 1


def test_queues_made_by_a_mere_reference_are_forgotten(broker: Broker) -> None:
    for i in range(1000):
        broker.handle(A, Info(i + 1, f"ref-{i}"))
        broker.handle(A, Get(i + 1, f"get-{i}", 1, 0))
        broker.handle(A, Ack(i + 1, f"ack-{i}", [1]))
        broker.handle(A, Declare(i + 1, f"decl-{i}"))  # no settings: a reference too
    assert broker.queues == {}
    broker.handle(A, Get(5000, "waited", 1, 1.0), now=0.0)
    assert "waited" in broker.queues  # someone waits on it
    broker.tick(1.0)
    assert "waited" not in broker.queues


def test_declared_and_used_queues_stay(broker: Broker) -> None:
    broker.handle(A, Declare(1, "kept", maxsize=5))
    broker.handle(A, Put(2, "used", b"x"))
    broker.handle(A, Get(3, "used", 1, 0))
    assert {"kept", "used"} <= set(broker.queues)


def test_max_queues_refuses_new_names_with_limit() -> None:
    small = Broker(max_queues=3)
    for i in range(3):
        small.handle(A, Put(i + 1, f"q{i}", b"x"))
    (reply,) = replies(small.handle(A, Put(9, "one-more", b"x")), A)
    assert reply.code == "limit" and "max_queues=3" in reply.message
    assert replies(small.handle(A, Put(10, "q0", b"y")), A) == [Confirmed(10, 1)]


def test_deadlines_do_not_scan_every_queue() -> None:
    big = Broker()
    for i in range(2000):
        big.handle(A, Put(i + 1, f"q{i}", b"x"), now=0.0)
    assert big.next_deadline() is None
    big.handle(B, Get(1, "q5", 1, 0, True), now=0.0)
    (got,) = replies(big.handle(B, Get(2, "q6", 1, 0, True), now=0.0), B)
    big.handle(B, Nack(3, "q6", ids(got), True, 2.0), now=0.0)
    assert big.next_deadline() == 2.0


def test_parked_put_payloads_are_limited_per_connection_and_in_total() -> None:
    small = Broker(max_parked_bytes_per_connection=2500, max_parked_bytes=3500)
    small.handle(A, Declare(1, "q", maxsize=1))
    small.handle(A, Put(2, "q", b"fills it"))
    assert small.handle(A, Put(3, "q", b"x" * 1000, None)) == []
    assert small.handle(A, Put(4, "q", b"x" * 1000, None)) == []
    (refused,) = replies(small.handle(A, Put(5, "q", b"x" * 1000, None)), A)
    assert refused.code == "limit" and "max_parked_bytes_per_connection" in refused.message
    assert small.handle(B, Put(1, "q", b"x" * 1000, None)) == []
    (total,) = replies(small.handle(C, Put(1, "q", b"x" * 1000, None)), C)
    assert total.code == "limit" and "max_parked_bytes=3500" in total.message
    small.connection_lost(A)
    assert small.parked_bytes == 1000 + 32  # payload and framing


def test_lowering_maxsize_refuses_a_parked_batch_that_can_never_fit(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=3))
    broker.handle(A, PutBatch(2, "q", [b"1", b"2"]))
    assert broker.handle(B, PutBatch(1, "q", [b"a", b"b"], None)) == []  # parked
    outs = broker.handle(A, Declare(3, "q", maxsize=1))
    (refused,) = replies(outs, B)
    assert refused.code == "bad_request" and "can never fit in maxsize=1" in refused.message
    broker.handle(A, Get(4, "q", 2, 0))  # the queue drains and takes puts again
    assert replies(broker.handle(C, Put(1, "q", b"c")), C) == [Confirmed(1, 1)]


def test_task_done_count_zero_is_a_bad_request_not_too_many(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"x"))
    (reply,) = replies(broker.handle(A, TaskDone(2, "q", 0)), A)
    assert reply.code == "bad_request" and reply.message.startswith("count")


def test_drain_answers_parked_requests_without_a_deadline(broker: Broker) -> None:
    broker.handle(A, Get(1, "q", 1, None), now=0.0)  # no deadline
    broker.handle(A, Get(2, "other", 1, 5.0), now=0.0)  # a deadline: it keeps waiting
    (reply,) = replies(broker.drain(A), A)
    assert reply == Error(1, "empty", "queue 'q' is empty")
    assert broker.parked(A) == 1
    broker.handle(B, Put(1, "other", b"x"), now=1.0)
    assert broker.parked(A) == 0


def test_stop_answers_every_parked_request_unavailable(broker: Broker) -> None:
    broker.handle(A, Get(1, "q", 1, None))
    broker.handle(B, Join(1, "j", None))
    broker.handle(C, Put(1, "j", b"x"))
    broker.handle(B, Join(2, "j", None))
    codes = {(c, m.code) for c, m in broker.stop()}
    assert codes == {(A, "unavailable"), (B, "unavailable")}


def test_settled_deliveries_do_not_pile_up_in_the_lease_heap(broker: Broker) -> None:
    """A busy queue with a 30 s lease: 150,000 messages taken one at a time and acked
    within the lease. The lease heap stays bounded (it kept an entry per delivery until
    its deadline: 150,000 here, a million at 35,000 messages a second), and a batch takes
    one entry; leases still expire on time afterwards."""
    for i in range(150_000):
        broker.handle(A, Put(i + 1, "q", b"m"), now=1.0)
        (got,) = replies(broker.handle(B, Get(i + 1, "q", 1, 0, True), now=1.0), B)
        broker.handle(B, Ack(i + 1, "q", ids(got), quiet=True), now=1.0)
    assert len(broker.deadlines.leases) <= 65_536
    broker.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(100)]), now=1.0)
    before = len(broker.deadlines.leases)
    (batch,) = replies(broker.handle(C, Get(1, "q", 100, 0, True, lease=5.0), now=1.0), C)
    assert len(broker.deadlines.leases) == before + 1
    broker.handle(C, Ack(2, "q", ids(batch)[:60]), now=2.0)  # 40 are still held at 6.0
    broker.tick(6.0)
    (again,) = replies(broker.handle(A, Get(2, "q", 100, 0), now=6.0), A)
    assert payloads(again) == [b"%d" % i for i in range(60, 100)]


def test_parked_gets_are_limited_per_connection_and_in_all() -> None:
    b = Broker(max_parked_gets_per_connection=3, max_parked_gets=5)
    for conn in (A, B):
        b.connection_made(conn)
    for req in range(1, 4):
        assert b.handle(A, Get(req, "q", 1, None)) == []  # parked
    ((_, refused),) = b.handle(A, Get(4, "q", 1, None))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert "max_parked_gets_per_connection=3" in refused.message
    assert b.handle(B, Get(1, "q", 1, None)) == [] and b.handle(B, Get(2, "q", 1, None)) == []
    ((_, refused),) = b.handle(B, Get(3, "q", 1, None))
    assert isinstance(refused, Error) and "max_parked_gets=5" in refused.message
    b.handle(A, PutBatch(9, "q", [b"x"]))  # serves A's first GET: room for one more
    assert b.handle(B, Get(3, "q", 1, None)) == []
    b.connection_lost(A)  # its two parked GETs go with it
    assert b.parked_gets == 3
    b.connection_made(C)
    assert b.handle(C, Get(1, "q", 1, None)) == [] and b.handle(C, Get(2, "q", 1, None)) == []


class _CountingLine(collections.deque):  # type: ignore[type-arg]
    """A queue's line of waiters that counts the waiters anyone walks through."""

    walked = 0

    def __iter__(self) -> Any:
        for w in super().__iter__():
            _CountingLine.walked += 1
            yield w


def test_parking_and_serving_getters_does_not_walk_the_whole_line() -> None:
    b = Broker()
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, Get(1, "q", 1, None))
    q = b.queues["q"]
    q.getters = _CountingLine(q.getters)
    _CountingLine.walked = 0
    n = 4_000
    for req in range(2, n + 2):  # each GET used to scan every parked one
        b.handle(A if req % 2 else B, Get(req, "q", 1, None))
    for req in range(1, 101):  # and so did each put
        b.handle(C, PutBatch(req, "q", [b"x"]))
    assert len(q.getters) == n + 1 - 100
    assert _CountingLine.walked <= 2 * n, _CountingLine.walked


def test_the_broker_marks_putput_confirmations_and_nothing_else(broker: Broker) -> None:
    """The server holds put confirmations for the store and answers them ``unavailable``
    when it cannot commit; it knows them because the broker marks them (Confirmed), not by
    their shape: PURGE, DELETE, MOVE and JOIN also answer an OK with an integer."""
    from pigeon.protocol import Delete, Move, Purge
    from pigeon.server.commit_gate import put_confirmations

    outs = broker.handle(A, Put(1, "q", b"x"))
    outs += broker.handle(A, PutBatch(2, "q", [b"y", b"z"]))
    outs += broker.handle(A, Move(3, "q", "r", 1))
    outs += broker.handle(A, Purge(4, "q"))
    outs += broker.handle(A, Delete(5, "r"))
    outs += broker.handle(A, Join(6, "r", 0))
    assert [type(m) for _, m in outs] == [Confirmed, Confirmed, Ok, Ok, Ok, Ok]
    assert all(isinstance(m.value, int) for _, m in outs)
    assert put_confirmations(outs) == {(A, 1), (A, 2)}


def test_a_lease_extended_to_its_batchs_own_deadline_still_runs_out_in_order() -> None:
    # A batch's lease and one delivery's extension may land on the very same deadline (a
    # clock that has not moved): the lease heap must never compare their id lists (a
    # range with a list raised TypeError), and both run out as they should.
    from pigeon.protocol import Extend

    b = Broker(default_lease=30.0)
    b.connection_made(A)
    b.connection_made(B)
    sent = [b"%d" % i for i in range(10)]
    b.handle(A, PutBatch(1, "q", sent), now=0.0)
    (got,) = replies(b.handle(B, Get(2, "q", 10, 0, True), now=0.0), B)  # in bulk
    first = got.messages[0].id
    (ok,) = replies(b.handle(B, Extend(3, "q", [first], 30.0), now=0.0), B)
    assert ok.value == {"settled": 1, "unknown": []}
    b.tick(30.0)
    (again,) = replies(b.handle(A, Get(4, "q", 10, 0), now=30.0), A)
    assert payloads(again) == sent  # all went back, in order


def test_a_req_still_waiting_is_refused_and_nothing_is_orphaned() -> None:
    # A second GET with the req of a parked one used to replace it in the connection's
    # index while both stayed in the queue's line: the orphan outlived the connection and
    # took the next put for nobody (auto-ack: lost), and leaked a unit of the limits.
    b = Broker()
    for conn in (A, B):
        b.connection_made(conn)
    assert b.handle(A, Get(7, "q", 1, None)) == []
    ((_, refused),) = b.handle(A, Get(7, "q", 1, None))
    assert isinstance(refused, Error) and refused.code == "bad_request"
    assert "req 7 is still waiting" in refused.message
    b.handle(A, Cancel(7))  # a CANCEL names the parked req: not refused
    assert b.parked(A) == 0
    assert b.handle(A, Get(7, "q", 1, None)) == []  # the req is free again
    b.connection_lost(A)
    b.handle(B, PutBatch(1, "q", [b"1", b"2", b"3"]))
    (got,) = replies(b.handle(B, Get(2, "q", 10, 0)), B)
    assert payloads(got) == [b"1", b"2", b"3"] and b.parked_gets == 0


def test_gets_held_back_by_the_unacked_budget_are_limited_and_set_aside() -> None:
    # A connection at its max_unacked_bytes has its GETs passed over while the queue has
    # messages: they used to park with no limit check, and every serve walked them all.
    b = Broker(max_unacked_bytes=10, max_parked_gets_per_connection=3)
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"x" * 10] * 5))
    (first,) = replies(b.handle(B, Get(1, "q", 1, 0, True)), B)
    outs = [b.handle(B, Get(req, "q", 1, None, True)) for req in range(2, 6)]
    assert outs[:3] == [[], [], []]
    ((_, refused),) = outs[3]
    assert isinstance(refused, Error) and refused.code == "limit"
    q = b.queues["q"]
    assert not q.getters and len(q.blocked[B]) == 3  # out of the line: serving skips them
    assert q.info()["consumers_waiting"] == 3
    got = replies(b.handle(B, Ack(6, "q", ids(first), quiet=True)), B)
    assert [m.req for m in got] == [2]  # the first set aside is served first, one fits
    assert len(q.blocked[B]) == 2 and b.parked_gets == 2


def test_joins_with_a_wait_are_limited_like_gets() -> None:
    b = Broker(max_parked_gets_per_connection=2, max_parked_gets=3)
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"unfinished"))
    assert b.handle(A, Join(2, "q", 60.0)) == [] and b.handle(A, Get(3, "other", 1, None)) == []
    ((_, refused),) = b.handle(A, Join(4, "q", 60.0))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert b.handle(B, Join(1, "q", 60.0)) == []
    ((_, refused),) = b.handle(B, Join(2, "q", 60.0))
    assert isinstance(refused, Error) and "max_parked_gets=3" in refused.message


def test_joins_without_a_wait_cost_eight_bytes_of_the_parked_budget_and_are_all_answered() -> None:
    # They parked a waiter each with no limit: a million JOINs took 154 MiB.
    b = Broker(max_parked_bytes_per_connection=8 * 100_000)
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"unfinished"))
    for req in range(1, 100_001):
        assert b.handle(B, Join(req, "q")) == []
    ((_, refused),) = b.handle(B, Join(100_001, "q"))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert b.parked_bytes == 800_000 and b.parked(B) == 100_000
    b.handle(C, Join(1, "q"))
    b.handle(A, Get(2, "q", 1, 0))
    done = b.handle(A, TaskDone(3, "q", 1))
    assert len(replies(done, B)) == 100_000 and replies(done, C) == [Ok(1, 0)]
    assert b.parked_bytes == 0 and b.parked(B) == 0
    b.handle(A, Put(4, "q", b"again"))
    b.handle(B, Join(7, "q"))
    assert b.drain(B) == [(B, Error(7, "timeout", "1 tasks unfinished"))]
    b.handle(C, Join(8, "q"))
    ((conn, stopping),) = b.stop()
    assert conn == C and stopping.req == 8 and stopping.code == "unavailable"
    b.handle(C, Join(9, "q"))
    b.connection_lost(C)
    assert b.parked_bytes == 0


def test_a_parked_put_counts_framing_and_headers_per_message() -> None:
    # 100,000 empty payloads are not free to hold: each counts its framing and headers.
    b = Broker(max_parked_bytes_per_connection=1_000_000)
    b.connection_made(A)
    b.handle(A, Declare(1, "q", maxsize=100_000))
    b.handle(A, PutBatch(2, "q", [b""] * 100_000))
    ((_, refused),) = b.handle(A, PutBatch(3, "q", [b""] * 40_000, None))
    assert isinstance(refused, Error) and refused.code == "limit"
    headers = PutOptions(headers={"h": "v" * 100})
    assert b.handle(A, PutBatch(4, "q", [b""] * 1000, None, headers)) == []
    assert b.parked_bytes == 1000 * (32 + 1 + 2 + 2 + 100)  # framing, the map of headers


def test_a_reply_counts_headers_within_max_reply_bytes() -> None:
    from pigeon.server.core import _DELIVERY_OVERHEAD as over
    from pigeon.server.core import headers_size

    headers = {"k": "v" * 500}
    b = Broker(max_reply_bytes=5_000)
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"p"] * 100, None, PutOptions(headers=headers)))
    cost = 1 + over + headers_size(headers)
    (got,) = replies(b.handle(B, Get(1, "q", 100, 0)), B)
    assert len(got.messages) == 5_000 // cost  # headers counted: 9, not 100
    (peeked,) = replies(b.handle(B, Peek(2, "q", 100)), B)
    assert 0 < len(peeked.value) <= 5_000 // cost


def test_answered_waits_and_requeued_expiries_leave_the_deadline_heaps() -> None:
    # Lazy deletion kept an entry (and the waiter) until its deadline: an hour for a GET
    # with wait=3600 answered at once, an hour per NACK of a message with a ttl.
    b = Broker(default_max_deliveries=10**9)
    for conn in (A, B):
        b.connection_made(conn)
    for _ in range(20_000):
        b.handle(B, Get(1, "q", 1, 3600.0), now=1.0)
        b.handle(A, Put(1, "q", b"m"), now=1.0)
    assert b.parked_gets == 0 and len(b.deadlines.timeouts) <= 2_100
    b.handle(A, Put(2, "t", b"x", options=PutOptions(ttl=3600)), now=1.0)
    for _ in range(20_000):
        (got,) = replies(b.handle(B, Get(3, "t", 1, 0, True), now=1.0), B)
        b.handle(B, Nack(4, "t", ids(got), quiet=True), now=1.0)
    assert len(b.deadlines.expiries) <= 2_100
    b.tick(4000.0)  # and the one that is live still expires
    assert b.queues["t.dead"].depth == 1


def test_a_get_never_receives_a_message_whose_ttl_passed() -> None:
    # Between its expiry and the tick that moves it (a late loop, a broker that just
    # started), a GET used to deliver it.
    wall = [1000.0]
    b = Broker(clock=lambda: 0.0, wall_clock=lambda: wall[0])
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"stale", options=PutOptions(ttl=1.0)), now=0.0)
    b.handle(A, Put(2, "q", b"fresh"), now=0.0)
    (got,) = replies(b.handle(B, Get(1, "q", 10, 0), now=2.0), B)  # no tick in between
    assert payloads(got) == [b"fresh"]
    dead = b.queues["q.dead"].ready.peek()
    assert dead.payload == b"stale" and dead.reason == "expired"


def test_a_ttl_put_into_a_dead_letter_queue_drops_it_when_it_runs_out() -> None:
    # It used to be requeued into the queue it was withdrawn from: counted, not shown,
    # not purged, back after a restart.
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q.dead", b"parked by hand", options=PutOptions(ttl=0.5)), now=0.0)
    b.handle(A, Put(2, "q.dead", b"kept"), now=0.0)
    b.tick(1.0)
    q = b.queues["q.dead"]
    assert q.depth == 1 and [m.payload for m in q.ready] == [b"kept"]
    assert b.handle(A, Purge(3, "q.dead")) == [(A, Ok(3, 1))]


def test_the_oldest_age_counts_a_low_priority_message_starved_by_higher_ones() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"old, priority 0"), now=0.0)
    for t in range(1, 7):
        b.handle(A, Put(1, "q", b"new", options=PutOptions(priority=9)), now=float(t))
        b.handle(A, Get(2, "q", 1, 0), now=float(t))
    assert b.queues["q"].oldest_age(6.0) == 6.0


def test_a_batch_of_dedup_repeats_fits_a_full_bounded_queue() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Declare(1, "q", maxsize=1))
    b.handle(A, PutBatch(2, "q", [b"a"], dedup_ids=["a"]))
    outs = b.handle(A, PutBatch(3, "q", [b"a", b"a"], 0.0, dedup_ids=["a", "a"]))
    assert outs == [(A, Confirmed(3, 2))]  # two repeats store nothing: maxsize is no bar
    ((_, refused),) = b.handle(A, PutBatch(4, "q", [b"b", b"c"], 0.0, dedup_ids=["b", "c"]))
    assert isinstance(refused, Error) and "batch of 2 new messages" in refused.message


def test_peek_shows_recovered_messages_in_delivery_order() -> None:
    # Recovered, a plain message that was delivered before waits among the new ones and
    # one with options among those given back: PEEK listed the latter first.
    from pigeon.server.core import Extra, Store, Stored

    class Recovered(Store):
        def recover(self) -> list[tuple[str, Stored]]:
            return [
                ("q", Stored(1, b"plain", deliveries=1)),
                ("q", Stored(2, b"headers", deliveries=1, extra=Extra(headers={"k": "v"}))),
            ]

    b = Broker(Recovered())
    b.connection_made(A)
    (peeked,) = replies(b.handle(A, Peek(1, "q", 10)), A)
    (taken,) = replies(b.handle(A, Get(2, "q", 10, 0)), A)
    assert [m["payload"] for m in peeked.value] == payloads(taken) == [b"plain", b"headers"]


def test_a_join_without_a_wait_can_be_cancelled() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"unfinished"))
    b.handle(A, Join(2, "q"))
    b.handle(A, Join(3, "q"))
    b.handle(A, Cancel(2))
    assert b.parked(A) == 1 and b.parked_bytes == 8
    b.handle(A, Get(4, "q", 1, 0))
    assert replies(b.handle(A, TaskDone(5, "q", 1)), A) == [Ok(5, 0), Ok(3, 0)]
