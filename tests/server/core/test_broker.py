"""The broker's face: one request in, its replies out (every number checked first, a req in
use refused), time by ``tick``, connections that drain, stop or go."""

from __future__ import annotations

from typing import Any

import pytest

from pigeon.protocol import (
    Ack,
    Cancel,
    Declare,
    Error,
    Extend,
    Get,
    Join,
    Nack,
    Ok,
    Purge,
    Put,
    PutBatch,
    TaskDone,
)
from pigeon.protocol.messages import Confirmed, Joined
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, ids, payloads, replies


@pytest.mark.parametrize("name", ["", "has space", "tab\there", "x" * 201, "new\nline"])
def test_bad_queue_names_are_refused(broker: Broker, name: str) -> None:
    (reply,) = replies(broker.handle(A, Put(1, name, b"x")), A)
    assert isinstance(reply, Error) and reply.code == "bad_request"


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


def test_the_broker_marks_putput_confirmations_and_nothing_else(broker: Broker) -> None:
    """The server holds put confirmations for the store and answers them ``unavailable``
    when it cannot commit; it knows them because the broker marks them (Confirmed), not by
    their shape: PURGE, DELETE, MOVE and JOIN also answer an OK with an integer."""
    from pigeon.protocol import Delete, Move
    from pigeon.server.commit_gate import put_confirmations

    outs = broker.handle(A, Put(1, "q", b"x"))
    outs += broker.handle(A, PutBatch(2, "q", [b"y", b"z"]))
    outs += broker.handle(A, Move(3, "q", "r", 1))
    outs += broker.handle(A, Purge(4, "q"))
    outs += broker.handle(A, Delete(5, "r"))
    outs += broker.handle(A, Join(6, "r", 0))
    assert [type(m) for _, m in outs] == [Confirmed, Confirmed, Ok, Ok, Ok, Joined]
    assert all(isinstance(m.value, int) for _, m in outs)
    assert put_confirmations(outs) == {(A, 1), (A, 2)}


def test_deadlines_do_not_scan_every_queue() -> None:
    big = Broker()
    for i in range(2000):
        big.handle(A, Put(i + 1, f"q{i}", b"x"), now=0.0)
    assert big.next_deadline() is None
    big.handle(B, Get(1, "q5", 1, 0, True), now=0.0)
    (got,) = replies(big.handle(B, Get(2, "q6", 1, 0, True), now=0.0), B)
    big.handle(B, Nack(3, "q6", ids(got), True, 2.0), now=0.0)
    assert big.next_deadline() == 2.0


def test_a_join_is_answered_when_a_timer_ends_the_last_task(broker: Broker) -> None:
    # tick and connection_lost never answered JOINs: the last task expiring (or going to
    # the dead letters with its connection) left them waiting for their own timeout.
    from pigeon.protocol.messages import PutOptions

    broker.handle(A, Put(1, "q", b"job", 0.0, PutOptions(ttl=1.0)), now=0.0)
    broker.handle(B, Join(2, "q", 10.0), now=0.0)
    broker.handle(C, Join(3, "q"), now=0.0)
    outs = broker.tick(1.0)
    assert replies(outs, B) == [Joined(2, 0)] and replies(outs, C) == [Joined(3, 0)]


def test_a_join_is_answered_when_a_lost_connection_dead_letters_the_last_task() -> None:
    b = Broker(limits=Limits(max_deliveries=1))
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"job"))
    b.handle(B, Get(2, "q", 1, 0, True))
    b.handle(C, Join(3, "q"))
    assert replies(b.connection_lost(B), C) == [Joined(3, 0)]


def test_a_cancelled_parked_put_does_not_block_puts_that_fit(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=2))
    broker.handle(A, Put(2, "q", b"a"))
    assert broker.handle(A, PutBatch(3, "q", [b"b", b"c"], 5.0)) == []  # parked: no room
    broker.handle(A, Cancel(3))
    assert broker.handle(A, Put(4, "q", b"d")) == [(A, Confirmed(4, 1))]


def test_a_put_parked_behind_a_cancelled_one_is_admitted_once_it_fits(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=2))
    broker.handle(A, Put(2, "q", b"a"))
    broker.handle(A, PutBatch(3, "q", [b"b", b"c"], 5.0))  # parked: no room for two
    broker.handle(B, Put(4, "q", b"d", 5.0))  # parked behind it, though one would fit
    assert replies(broker.handle(A, Cancel(3)), B) == [Confirmed(4, 1)]


def test_a_move_admits_the_puts_parked_in_its_source(broker: Broker) -> None:
    from pigeon.protocol import Move

    broker.handle(A, Declare(1, "q", maxsize=1))
    broker.handle(A, Put(2, "q", b"a"))
    assert broker.handle(B, Put(3, "q", b"b", 5.0)) == []
    outs = broker.handle(A, Move(4, "q", "r"))
    assert replies(outs, B) == [Confirmed(3, 1)] and broker.queues["q"].depth == 1
