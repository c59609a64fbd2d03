"""PUT: stored now, parked for room within the parked-bytes limits, or refused."""

from __future__ import annotations

from pigeon.protocol import Ack, Declare, Error, Get, Put, PutBatch
from pigeon.protocol.messages import Confirmed, PutOptions
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, replies


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


def test_a_put_that_no_reply_could_carry_is_refused_and_nothing_is_stored() -> None:
    small = Broker(limits=Limits(max_frame_size=100))
    (reply,) = replies(small.handle(A, Put(1, "q", b"x" * 500)), A)
    assert reply.code == "too_large" and "500 bytes" in reply.message
    assert "nothing was stored" in reply.message
    with_headers = Put(2, "q", b"x", options=PutOptions(headers={"k": "v" * 90}))
    (reply,) = replies(small.handle(A, with_headers), A)
    assert reply.code == "too_large"  # headers count too
    assert small.handle(A, Put(3, "q", b"x" * 60)) == [(A, Confirmed(3, 1))]


def test_parked_put_payloads_are_limited_per_connection_and_in_total() -> None:
    small = Broker(limits=Limits(max_parked_bytes_per_connection=2500, max_parked_bytes=3500))
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


def test_a_parked_put_counts_framing_and_headers_per_message() -> None:
    # 100,000 empty payloads are not free to hold: each counts its framing and headers.
    b = Broker(limits=Limits(max_parked_bytes_per_connection=1_000_000))
    b.connection_made(A)
    b.handle(A, Declare(1, "q", maxsize=100_000))
    b.handle(A, PutBatch(2, "q", [b""] * 100_000))
    ((_, refused),) = b.handle(A, PutBatch(3, "q", [b""] * 40_000, None))
    assert isinstance(refused, Error) and refused.code == "limit"
    headers = PutOptions(headers={"h": "v" * 100})
    assert b.handle(A, PutBatch(4, "q", [b""] * 1000, None, headers)) == []
    assert b.parked_bytes == 1000 * (32 + 1 + 2 + 2 + 100)  # framing, the map of headers


def test_a_batch_of_dedup_repeats_fits_a_full_bounded_queue() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Declare(1, "q", maxsize=1))
    b.handle(A, PutBatch(2, "q", [b"a"], dedup_ids=["a"]))
    outs = b.handle(A, PutBatch(3, "q", [b"a", b"a"], 0.0, dedup_ids=["a", "a"]))
    assert outs == [(A, Confirmed(3, 2))]  # two repeats store nothing: maxsize is no bar
    ((_, refused),) = b.handle(A, PutBatch(4, "q", [b"b", b"c"], 0.0, dedup_ids=["b", "c"]))
    assert isinstance(refused, Error) and "batch of 2 new messages" in refused.message


def test_a_batch_repeating_an_id_with_no_dedup_window_counts_every_payload() -> None:
    # With dedup_window 0 nothing is remembered, so every payload is stored: maxsize and
    # room count them all, not the distinct ids.
    from pigeon.protocol import Declare, Error, PutBatch
    from pigeon.server.core import Broker

    b = Broker()
    b.connection_made(1)
    b.handle(1, Declare(1, "q", maxsize=1, dedup_window=0.0))
    ((_, refused),) = b.handle(1, PutBatch(2, "q", [b"one", b"two"], 0.0, dedup_ids=["x", "x"]))
    assert isinstance(refused, Error) and refused.code == "bad_request"
    assert b.queues["q"].depth == 0


def test_an_id_remembered_before_the_window_was_set_to_zero_is_still_a_repeat() -> None:
    from pigeon.protocol import Declare, Put
    from pigeon.protocol.messages import Confirmed, PutOptions
    from pigeon.server.core import Broker

    b = Broker()
    b.connection_made(1)
    b.handle(1, Put(1, "q", b"x", 0.0, PutOptions(dedup_id="x")))
    b.handle(1, Declare(2, "q", maxsize=1, dedup_window=0.0))
    assert b.handle(1, Put(3, "q", b"x", 0.0, PutOptions(dedup_id="x"))) == [(1, Confirmed(3, 1))]
