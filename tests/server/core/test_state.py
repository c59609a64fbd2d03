"""What every rule reads: queues made on reference and forgotten when idle, ``max_queues``."""

from __future__ import annotations

from pigeon.protocol import Ack, Declare, Get, Info, Put
from pigeon.protocol.messages import Confirmed
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, replies


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
    small = Broker(limits=Limits(max_queues=3))
    for i in range(3):
        small.handle(A, Put(i + 1, f"q{i}", b"x"))
    (reply,) = replies(small.handle(A, Put(9, "one-more", b"x")), A)
    assert reply.code == "limit" and "max_queues=3" in reply.message
    assert replies(small.handle(A, Put(10, "q0", b"y")), A) == [Confirmed(10, 1)]
