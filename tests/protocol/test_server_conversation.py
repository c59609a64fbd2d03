"""The broker's side of the conversation, bytes in and events out, without a socket
(``pigeon.protocol.server.ServerConnection``)."""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol import (
    Ack,
    Get,
    Goodbye,
    Hello,
    Ok,
    Ping,
    Put,
    Stats,
)
from pigeon.protocol.server import (
    DrainRequested,
    HelloReceived,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    State,
    Violation,
)
from pigeon.protocol.wire import encode_message
from tests._chunks import split

_LENGTH = struct.Struct(">I")


def frame(msg: Any) -> bytes:
    body = encode_message(msg)
    return _LENGTH.pack(len(body)) + body


HELLO = frame(Hello("PGN", 1, "test", "secret"))
REQUESTS = [
    Put(1, "q", b"x" * 10),
    Get(2, "q", 5, 0.5, True, None),
    Ack(3, "q", [7, 8]),
    Stats(4),
    Ping(99),
]
STREAM = HELLO + b"".join(frame(m) for m in REQUESTS) + frame(Goodbye("done"))


def run(chunks: list[bytes], *, max_frame_size: int = 1 << 20) -> tuple[list[Any], bytes]:
    """Feed ``chunks``; welcome the HELLO when it comes; return the events and the bytes
    the conversation queued."""
    conv = ServerConnection(max_frame_size=max_frame_size)
    events: list[Any] = []
    out = b""
    for chunk in chunks:
        for ev in conv.receive_data(chunk):
            events.append(ev)
            if isinstance(ev, HelloReceived):
                events += conv.welcome("pigeon", 5.0)
        out += conv.data_to_send()
    return events, out


EXPECTED = [
    HelloReceived("test", "secret"),
    *[RequestReceived(m) for m in REQUESTS],
    DrainRequested("GOODBYE done"),
]


def test_a_whole_conversation_in_one_read() -> None:
    events, out = run([STREAM])
    assert events == EXPECTED
    assert msgspec.msgpack.decode(out[4:])[:2] == [0x02, 1]  # WELCOME, version 1


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@settings(max_examples=300)
def test_any_split_of_the_stream_gives_the_same_events(cuts: list[int]) -> None:
    events, _ = run(split(STREAM, cuts))
    assert events == EXPECTED


@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=400)
def test_garbage_after_the_handshake_ends_in_one_violation_at_most(
    garbage: bytes, cuts: list[int]
) -> None:
    """Any bytes after WELCOME: requests that decode, then at most one violation (with
    its ERROR queued), and nothing at all after it."""
    conv = ServerConnection(max_frame_size=1024)
    conv.receive_data(HELLO)
    conv.welcome("pigeon", 5.0)
    conv.data_to_send()
    events: list[Any] = []
    for chunk in split(garbage, cuts):
        events += conv.receive_data(chunk)
    violations = [i for i, e in enumerate(events) if isinstance(e, Violation)]
    assert len(violations) <= 1
    if violations:
        assert violations[0] == len(events) - 1  # nothing after it
        assert conv.state is State.DRAINING
        error = msgspec.msgpack.decode(conv.data_to_send()[4:])
        assert error[:3] == [0x8F, 0, "protocol"]
        assert conv.receive_data(STREAM) == []


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=300)
def test_garbage_before_hello_is_never_taken_for_a_client(garbage: bytes) -> None:
    """Bytes that are no HELLO: nothing while a frame is incomplete, else exactly one
    violation - never a HelloReceived, never a request."""
    data = b"\x00" + garbage
    conv = ServerConnection()
    events = conv.receive_data(data)
    complete = len(data) >= 4 and (
        _LENGTH.unpack_from(data)[0] > 64 * 1024 or len(data) >= 4 + _LENGTH.unpack_from(data)[0]
    )
    if not complete:
        assert events == [] and conv.state is State.HANDSHAKE
        return
    (event,) = events
    assert isinstance(event, Violation), event
    assert conv.state is State.DRAINING


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (_LENGTH.pack(64 * 1024 + 1), "before HELLO"),
        (frame(Put(1, "q", b"x")), "expected HELLO first"),
        (frame(Hello("XYZ", 1, "c")), "unsupported protocol"),
        (frame(Hello("PGN", 2, "c")), "version 2"),
    ],
)
def test_a_bad_first_frame_is_a_violation(first: bytes, why: str) -> None:
    conv = ServerConnection()
    (ev,) = conv.receive_data(first)
    assert isinstance(ev, Violation) and why in ev.reason
    assert conv.state is State.DRAINING


def test_bytes_behind_hello_wait_for_the_decision() -> None:
    conv = ServerConnection()
    (hello,) = conv.receive_data(HELLO + frame(Stats(5)))
    assert hello == HelloReceived("test", "secret") and conv.state is State.DECIDING
    assert conv.receive_data(frame(Stats(6))) == []  # still deciding: held
    assert conv.welcome("pigeon", 5.0) == [RequestReceived(Stats(5)), RequestReceived(Stats(6))]


def test_a_refused_client_gets_one_error_and_nothing_more_is_read() -> None:
    conv = ServerConnection()
    conv.receive_data(HELLO + frame(Stats(5)))
    conv.refuse("auth", "authentication failed")
    error = msgspec.msgpack.decode(conv.data_to_send()[4:])
    assert error == [0x8F, 0, "auth", "authentication failed"]
    assert conv.receive_data(frame(Stats(6))) == [] and conv.state is State.DRAINING


def test_a_second_hello_and_a_frame_too_large_are_violations() -> None:
    events, _ = run([HELLO, frame(Hello("PGN", 1, "again"))])
    assert isinstance(events[-1], Violation) and "HELLO sent twice" in events[-1].reason
    events, _ = run([HELLO, _LENGTH.pack(2000) + b"x" * 10], max_frame_size=1000)
    assert isinstance(events[-1], Violation) and "1000" in events[-1].reason


def test_a_half_close_asks_to_drain_and_replies_are_framed_in_two_buffers() -> None:
    conv = ServerConnection()
    conv.receive_data(HELLO)
    conv.welcome("pigeon", 5.0)
    assert conv.receive_data(b"") == [DrainRequested("the client half-closed")]
    header, body = conv.send(Ok(1, 1))
    assert _LENGTH.unpack(header)[0] == len(body) and msgspec.msgpack.decode(body) == [0x80, 1, 1]


def test_an_option_of_the_wrong_type_refuses_that_put_and_the_conversation_goes_on() -> None:
    """docs/protocol.md section 4.3: an options entry is not a field of the message; a
    wrong one is a bad request for that PUT, never a violation."""
    bad = msgspec.msgpack.encode([0x10, 1, "q", b"x", 0.0, {"priority": 5.0}])
    events, out = run([HELLO, _LENGTH.pack(len(bad)) + bad + frame(Stats(2))])
    assert events[1:] == [
        RequestRefused(1, "bad_request", "priority must be an integer from 0 to 9, not 5.0"),
        RequestReceived(Stats(2)),
    ]
    assert msgspec.msgpack.decode(out[4:])[0] == 0x02  # the WELCOME, and no ERROR(0)
