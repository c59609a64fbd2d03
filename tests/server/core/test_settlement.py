"""ACK, NACK and EXTEND of deliveries made with manual ack, and leases that run out."""

from __future__ import annotations

from pigeon.protocol import Ack, Extend, Get, Nack, Put, PutBatch
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, ids, payloads, replies


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


def test_a_nan_lease_is_refused_and_other_leases_still_expire(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"a", b"b"]), now=0.0)
    broker.handle(B, Get(1, "q", 1, 0, True, lease=float("nan")), now=0.0)
    broker.handle(C, Get(1, "q", 1, 0, True, lease=0.3), now=0.0)
    assert broker.next_deadline() == 0.3
    broker.tick(0.3)
    (again,) = replies(broker.handle(A, Get(2, "q", 2, 0), now=0.3), A)
    assert payloads(again) == [b"a", b"b"]


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


def test_a_lease_extended_to_its_batchs_own_deadline_still_runs_out_in_order() -> None:
    # A batch's lease and one delivery's extension may land on the very same deadline (a
    # clock that has not moved): the lease heap must never compare their id lists (a
    # range with a list raised TypeError), and both run out as they should.
    from pigeon.protocol import Extend

    b = Broker(limits=Limits(default_lease=30.0))
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
