"""SHUTDOWN, PURGE, DELETE, MOVE, PEEK and STATS, without a network."""

from __future__ import annotations

from pigeon.protocol import (
    Error,
    Get,
    Join,
    Ok,
    Peek,
    Put,
    PutBatch,
    QueueShutdown,
    Shutdown,
)
from pigeon.server.core import Broker
from tests.server.core._broker import A, B, C, payloads, replies


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
