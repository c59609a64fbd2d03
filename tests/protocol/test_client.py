"""The sans-IO client conversation, bytes in and events out: no socket anywhere."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.errors import AuthError, BrokenResourceError, IncompleteFrame, TooLarge
from pigeon.framing import LengthPrefixed
from pigeon.protocol import (
    Ack,
    Cancel,
    ClientCodec,
    Deliver,
    Delivery,
    Error,
    Get,
    Goodbye,
    Hello,
    Nack,
    Ok,
    Ping,
    Pong,
    Put,
    PutBatch,
    QueueShutdown,
    ServerCodec,
    Welcome,
    client,
)
from pigeon.protocol.client import ClientConnection, Closed, Notice, Reply, State, Welcomed
from pigeon.protocol.wire import encode_frame, encode_message

WELCOME = encode_frame(Welcome(1, "pigeon", 5.0, 16 * 2**20))


def sent(conn: ClientConnection) -> list[Any]:
    """The messages the client wants to send now, decoded as the broker would."""
    dec = LengthPrefixed(max_frame_size=2**31).decoder()
    codec = ServerCodec()
    return [codec.decode(f) for f in dec.feed(conn.data_to_send())]


def open_conn() -> ClientConnection:
    conn = ClientConnection("test", "tok", peer="the broker at test:1")
    assert sent(conn) == [Hello("PGN", 1, "test", "tok")]
    assert conn.receive_data(WELCOME) == [Welcomed("pigeon", 5.0, 16 * 2**20)]
    assert conn.state is State.OPEN
    return conn


def test_handshake_then_request_and_its_reply() -> None:
    conn = open_conn()
    req = conn.request(Put(0, "jobs", b"hi", 0.0))
    assert sent(conn) == [Put(req, "jobs", b"hi", 0.0)]
    assert conn.receive_data(encode_frame(Ok(req, 1))) == [Reply(req, Ok(req, 1), "jobs")]
    assert conn.pending == 0


def test_request_ids_start_at_one_and_grow() -> None:
    conn = open_conn()
    assert [conn.request(Put(0, "q", b"", 0.0)) for _ in range(3)] == [1, 2, 3]


def test_ping_is_answered_with_pong() -> None:
    conn = open_conn()
    assert conn.receive_data(encode_frame(Ping(7))) == []
    assert sent(conn) == [Pong(7)]


def test_heartbeat_from_welcome_sets_the_silence_limit() -> None:
    conn = ClientConnection("t")
    conn.receive_data(encode_frame(Welcome(1, "b", 0.5, 1024)))
    assert conn.silence_limit == 1.5


def test_a_cancelled_get_whose_delivery_comes_anyway_is_handed_back() -> None:
    conn = open_conn()
    req = conn.request(Get(0, "jobs", 5, None, True))
    sent(conn)
    conn.cancel(req)
    assert sent(conn) == [Cancel(req)]
    late = Deliver(req, [Delivery(11, 1, b"a"), Delivery(12, 1, b"b")])
    assert conn.receive_data(encode_frame(late)) == []  # nobody waits: no event
    (nack,) = sent(conn)
    assert isinstance(nack, Nack) and nack.ids == [11, 12] and nack.requeue and nack.quiet


def test_a_reply_that_arrived_but_was_not_used_is_handed_back() -> None:
    conn = open_conn()
    req = conn.request(Get(0, "jobs", 1, None, True))
    sent(conn)
    (reply,) = conn.receive_data(encode_frame(Deliver(req, [Delivery(9, 1, b"x")])))
    assert isinstance(reply, Reply)
    conn.give_back(reply)
    (nack,) = sent(conn)
    assert isinstance(nack, Nack) and nack.queue == "jobs" and nack.ids == [9]


def test_posted_acks_ask_for_no_reply() -> None:
    conn = open_conn()
    conn.post(Ack(0, "jobs", [5]))
    (ack,) = sent(conn)
    assert ack == Ack(1, "jobs", [5], True)
    # an older broker answers anyway: the reply is dropped, nobody waits for it
    assert conn.receive_data(encode_frame(Ok(1, {"settled": 1, "unknown": []}))) == []


def test_queue_shutdown_is_a_notice() -> None:
    conn = open_conn()
    (ev,) = conn.receive_data(encode_frame(QueueShutdown("jobs", False)))
    assert ev == Notice(QueueShutdown("jobs", False))
    assert conn.shutdown_queues == {"jobs"}


def test_wrong_token_is_an_auth_error() -> None:
    conn = ClientConnection("t", "bad")
    (ev,) = conn.receive_data(encode_frame(Error(0, "auth", "authentication failed: wrong")))
    assert isinstance(ev, Closed) and isinstance(ev.error, AuthError)
    assert conn.state is State.CLOSED


def test_connection_error_from_the_broker_is_broken_resource_with_the_cause() -> None:
    conn = open_conn()
    (ev,) = conn.receive_data(encode_frame(Error(0, "idle", "no request for more than 300 s")))
    assert isinstance(ev, Closed) and isinstance(ev.error, BrokenResourceError)
    assert "no request for more than 300 s" in str(ev.error)


def test_a_protocol_error_from_the_broker_is_refused_and_not_retryable() -> None:
    # The broker closes over the bytes we sent (here a frame over its limit): the same
    # request on a new connection would end the same way.
    conn = open_conn()
    text = "frame of 2097169 bytes exceeds max_frame_size=1048576"
    (ev,) = conn.receive_data(encode_frame(Error(0, "protocol", text)))
    assert isinstance(ev, Closed) and isinstance(ev.error, client.Refused)
    assert isinstance(ev.error, client.Unretryable) and isinstance(ev.error, BrokenResourceError)
    assert text in str(ev.error)


def test_an_idle_close_from_the_broker_may_be_retried() -> None:
    conn = open_conn()
    (ev,) = conn.receive_data(encode_frame(Error(0, "idle", "no request for more than 2 s")))
    assert isinstance(ev, Closed) and not isinstance(ev.error, client.Unretryable)


def _welcomed_with_limit(limit: int) -> ClientConnection:
    conn = ClientConnection("test", peer="the broker at test:1")
    sent(conn)
    conn.receive_data(encode_frame(Welcome(1, "pigeon", 5.0, limit, ["options"])))
    return conn


def test_a_request_over_the_brokers_max_frame_size_is_too_large_and_nothing_is_sent() -> None:
    conn = _welcomed_with_limit(1000)
    with pytest.raises(
        TooLarge,
        match=r"^frame of 1\d{3} bytes exceeds max_frame_size=1000 of the broker at test:1 "
        r"\(a put of a 1500-byte item\); nothing was sent: put a smaller item",
    ):
        conn.request(Put(0, "q", b"x" * 1500, None))
    with pytest.raises(TooLarge, match=r"\(a put_many of 3 items\); nothing was sent: put fewer"):
        conn.request(PutBatch(0, "q", [b"x" * 400] * 3, None))
    assert conn.data_to_send() == b"" and conn.pending == 0
    # the conversation goes on, its request ids unspent
    assert conn.request(Put(0, "q", b"small", None)) == 1
    assert sent(conn) == [Put(1, "q", b"small", None)]


def test_a_request_of_exactly_max_frame_size_is_sent() -> None:
    conn = _welcomed_with_limit(1000)
    n = 1000 - len(encode_message(Put(1, "q", b"x" * 900, 0.0))) + 900
    fits = Put(0, "q", b"x" * n, 0.0)
    assert len(encode_message(Put(1, "q", fits.payload, 0.0))) == 1000
    req = conn.request(fits)
    assert sent(conn) == [Put(req, "q", fits.payload, 0.0)]
    with pytest.raises(TooLarge, match="frame of 1001 bytes exceeds max_frame_size=1000"):
        conn.request(Put(0, "q", fits.payload + b"x", 0.0))


def test_goodbye_closes_after_the_replies_before_it() -> None:
    conn = open_conn()
    req = conn.request(Put(0, "q", b"x", 0.0))
    data = encode_frame(Ok(req, 1)) + encode_frame(Goodbye("broker stopping"))
    reply, closed = conn.receive_data(data)
    assert reply == Reply(req, Ok(req, 1), "q")
    assert isinstance(closed, Closed) and "said goodbye: broker stopping" in str(closed.error)


def test_graceful_close_ends_without_an_error() -> None:
    conn = open_conn()
    conn.close()
    assert sent(conn) == [Goodbye("client closing")]
    assert conn.receive_data(b"") == [Closed(None)]


def test_eof_mid_frame_is_broken_resource_caused_by_incomplete_frame() -> None:
    conn = open_conn()
    conn.receive_data(encode_frame(Ok(1, 1))[:5])
    (ev,) = conn.receive_data(b"")
    assert isinstance(ev, Closed) and isinstance(ev.error, BrokenResourceError)
    assert isinstance(ev.error.__cause__, IncompleteFrame)


def test_redis_answering_hello_is_recognised_at_once() -> None:
    conn = ClientConnection("t", peer="the broker at 127.0.0.1:6379")
    (ev,) = conn.receive_data(b"-ERR unknown command '\\x00\\x00', with args beginning with:\r\n")
    assert isinstance(ev, Closed) and isinstance(ev.error, BrokenResourceError)
    assert "does not speak the pigeon protocol" in str(ev.error)


def test_nats_greeting_is_recognised_at_once() -> None:
    conn = ClientConnection("t")
    (ev,) = conn.receive_data(b'INFO {"server_id":"x","version":"2.10"}\r\n')
    assert isinstance(ev, Closed) and "does not speak the pigeon protocol" in str(ev.error)


def test_large_deliveries_are_accepted_after_the_handshake() -> None:
    conn = open_conn()
    req = conn.request(Get(0, "q", 1, 0.0, True))
    big = Deliver(req, [Delivery(1, 1, b"x" * 200_000)])  # larger than the handshake limit
    (ev,) = conn.receive_data(encode_frame(big))
    assert isinstance(ev, Reply) and ev.message == big


def test_requests_after_close_are_refused() -> None:
    conn = open_conn()
    conn.receive_data(b"")
    try:
        conn.request(Put(0, "q", b"x", 0.0))
    except BrokenResourceError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed conversation took a request")


server_frames = st.lists(
    st.one_of(
        st.builds(Ping, st.integers(0, 2**32)),
        st.builds(QueueShutdown, st.text(min_size=1, max_size=8), st.booleans()),
        st.builds(Ok, st.integers(1, 3), st.integers(0, 9)),
    ),
    max_size=20,
)


@given(server_frames, st.lists(st.integers(0, 4000), max_size=30))
def test_any_split_of_the_broker_stream_gives_the_same_events(
    frames: list[Any], cuts: list[int]
) -> None:
    wire = WELCOME + b"".join(encode_frame(f) for f in frames)
    whole = ClientConnection("t")
    for _req in (1, 2, 3):
        whole.request(Put(0, "q", b"", 0.0))
    expected = whole.receive_data(wire)
    split = ClientConnection("t")
    for _req in (1, 2, 3):
        split.request(Put(0, "q", b"", 0.0))
    points = sorted({c % (len(wire) + 1) for c in cuts})
    got: list[Any] = []
    for a, b in itertools.pairwise([0, *points, len(wire)]):
        if b > a:
            got += split.receive_data(wire[a:b])
    assert got == expected
    assert split.data_to_send() == whole.data_to_send()


@given(st.binary(max_size=3000))
def test_garbage_from_the_peer_ends_in_closed_or_waits_never_raises(data: bytes) -> None:
    conn = ClientConnection("t")
    events = conn.receive_data(data) + conn.receive_data(b"")
    closes = [e for e in events if isinstance(e, Closed)]
    assert len(closes) == 1 and isinstance(closes[0].error, BrokenResourceError | AuthError)


def test_codec_symmetry_for_the_messages_used_here() -> None:
    assert ClientCodec().decode(encode_frame(Ok(1, 1))[4:]) == Ok(1, 1)
