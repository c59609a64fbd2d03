"""The broker's data: a queue's ready messages and its counts."""

from __future__ import annotations

from pigeon.protocol import (
    Get,
    Put,
)
from pigeon.protocol.messages import PutOptions
from pigeon.server.core import Broker
from tests.server.core._broker import A


def test_the_oldest_age_counts_a_low_priority_message_starved_by_higher_ones() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"old, priority 0"), now=0.0)
    for t in range(1, 7):
        b.handle(A, Put(1, "q", b"new", options=PutOptions(priority=9)), now=float(t))
        b.handle(A, Get(2, "q", 1, 0), now=float(t))
    assert b.queues["q"].oldest_age(6.0) == 6.0
