"""Messages given back: in their original order, after a delay, or to the dead letters
(which never forward)."""

from __future__ import annotations

from pigeon.protocol import Ack, Declare, Get, Nack, Ok, Purge, Put, PutBatch
from pigeon.protocol.messages import PutOptions
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, ids, payloads, replies


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


def test_answered_waits_and_requeued_expiries_leave_the_deadline_heaps() -> None:
    # Lazy deletion kept an entry (and the waiter) until its deadline: an hour for a GET
    # with wait=3600 answered at once, an hour per NACK of a message with a ttl.
    b = Broker(limits=Limits(max_deliveries=10**9))
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
