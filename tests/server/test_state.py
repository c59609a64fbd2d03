"""The broker's delivery rules, without a network: messages in, replies out, time by hand."""

from __future__ import annotations

from typing import Any

import pytest

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
    Put,
    PutBatch,
    QueueShutdown,
    Shutdown,
    TaskDone,
)
from pigeon.server.broker import Broker

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
    assert replies(outs, A) == [Ok(1, 1)]
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
    assert (A, Ok(4, 1)) in outs
    assert broker.queues["q"].held == 2
    assert replies(broker.handle(A, PutBatch(5, "q", [b"x"] * 3)), A)[0].code == "bad_request"


def test_in_flight_messages_count_against_maxsize(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=1))
    broker.handle(A, Put(2, "q", b"1"))
    (got,) = replies(broker.handle(B, Get(1, "q", 1, 0, True)), B)
    assert replies(broker.handle(A, Put(3, "q", b"2")), A)[0].code == "full"
    broker.handle(B, Ack(2, "q", [got.messages[0].id]))
    assert replies(broker.handle(A, Put(4, "q", b"2")), A) == [Ok(4, 1)]


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


def test_timed_out_getters_do_not_pile_up(broker: Broker) -> None:
    for i in range(1000):  # a consumer polling an empty queue with a short timeout
        broker.handle(B, Get(i, "q", 1, 0.5), now=float(i))
        broker.tick(i + 0.5)
    broker.handle(B, Get(5000, "q", 1, 10.0), now=2000.0)
    assert len(broker.queues["q"].getters) == 1
    assert broker.parked(B) == 1
