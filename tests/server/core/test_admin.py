"""SHUTDOWN, PURGE, DELETE, MOVE, PEEK and STATS, without a network."""

from __future__ import annotations

from typing import Any

from pigeon.protocol import (
    Delete,
    Error,
    Get,
    Join,
    Ok,
    Peek,
    Purge,
    Put,
    PutBatch,
    PutOptions,
    QueueShutdown,
    Shutdown,
)
from pigeon.protocol.messages import Joined
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, Recorder, payloads, replies


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
    assert (C, Joined(1, 0)) in outs
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


def test_purge_and_an_immediate_shutdown_drop_what_waits_not_what_is_in_flight() -> None:
    for request in (Purge(9, "q"), Shutdown(9, "q", immediate=True)):
        store = Recorder()
        b = Broker(store)
        for conn in (A, B, C):
            b.connection_made(conn)
        b.handle(A, PutBatch(1, "q", [b"out", b"ready"]))
        b.handle(A, Put(2, "q", b"delayed", options=PutOptions(delay=60.0, ttl=120.0)))
        b.handle(B, Get(3, "q", 1, 0, True))  # "out" is in flight
        store.calls.clear()
        b.handle(C, Join(4, "q"))
        outs = b.handle(A, request)
        assert store.of("removed") == [("q", 2), ("q", 3)], request  # ready, then delayed
        q = b.queues["q"]
        assert q.depth == 0 and not q.expiring and len(q.in_flight) == 1
        assert q.unfinished == 1 and (C, Ok(4, 0)) not in outs  # "out" is still a task
        if isinstance(request, Purge):
            assert (A, Ok(9, 2)) in outs


def test_delete_drops_what_is_in_flight_too_and_answers_who_waits() -> None:
    store = Recorder()
    b = Broker(store, limits=Limits(max_unacked_bytes=1))
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"out", b"ready"]))
    b.handle(B, Get(2, "q", 1, 0, True))  # "out" is in flight: B holds its budget
    b.handle(B, Get(3, "q", 1, None, True))  # so this GET is set aside
    b.handle(C, Join(4, "q"))
    store.calls.clear()
    outs = b.handle(A, Delete(5, "q"))
    assert outs == [
        (A, Ok(5, 2)),
        (B, Error(3, "shutdown", "queue 'q' was deleted")),
        (C, Joined(4, 0)),
    ]
    assert store.calls == [("removed", "q", 2), ("removed", "q", 1), ("declared", "q", None)]
    assert "q" not in b.queues and b._conns[B].unacked == 0 and b.parked(B) == 0


def test_peek_counts_origin_and_reason_in_bytes_of_utf_8() -> None:
    import msgspec

    from pigeon.protocol import Nack, Peek

    b = Broker(limits=Limits(max_frame_size=200_000))
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"x"] * 400))
    (got,) = replies(b.handle(B, Get(2, "q", 400, 0, True)), B)
    b.handle(B, Nack(3, "q", [d.id for d in got.messages], False, 0.0, "🔥" * 125))
    (peeked,) = replies(b.handle(A, Peek(4, "q.dead", 400)), A)
    assert 0 < len(peeked.value) < 400
    assert len(msgspec.msgpack.encode(peeked.value)) <= 200_000


def test_peek_does_not_list_the_whole_queue(monkeypatch: Any) -> None:
    from pigeon.protocol import Peek
    from pigeon.server.core.model import Ready

    b = Broker()
    b.connection_made(A)
    b.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(1000)]))

    def listed(self: Ready) -> Any:
        raise AssertionError("PEEK listed every message of the queue")

    monkeypatch.setattr(Ready, "__iter__", listed)
    (peeked,) = replies(b.handle(A, Peek(2, "q", 2)), A)
    assert [m["payload"] for m in peeked.value] == [b"0", b"1"]
