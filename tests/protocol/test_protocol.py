"""Hypothesis: every message round-trips; garbage is a RemoteProtocolError, never a crash."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pigeon.protocol
from pigeon.errors import RemoteProtocolError
from pigeon.protocol import messages as m
from pigeon.protocol.wire import ClientCodec, ServerCodec, encode_message

names = st.text(min_size=1, max_size=20)
ints = st.integers(min_value=0, max_value=2**53)
waits = st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False)
blobs = st.binary(max_size=64)
options = st.builds(
    m.PutOptions,
    st.floats(0, 1e6),
    st.floats(0, 1e6),
    st.text(max_size=10),
    st.integers(0, 9),
    st.dictionaries(names, st.text(max_size=10), max_size=3),
)

client_messages = st.one_of(
    st.builds(m.Hello, st.just(m.MAGIC), st.integers(0, 9), names, st.none() | names),
    st.builds(m.Put, ints, names, blobs, waits),
    st.builds(m.Put, ints, names, blobs, waits, st.none() | options),
    st.builds(m.PutBatch, ints, names, st.lists(blobs, max_size=5), waits),
    st.builds(
        m.PutBatch,
        ints,
        names,
        st.lists(blobs, max_size=5),
        waits,
        st.none() | options,
        st.none() | st.lists(names, max_size=5),
    ),
    st.builds(m.Get, ints, names, st.integers(1, 1000), waits, st.booleans(), waits),
    st.builds(m.Cancel, ints),
    st.builds(m.Ack, ints, names, st.lists(ints, max_size=5)),
    st.builds(m.Nack, ints, names, st.lists(ints, max_size=5), st.booleans(), st.floats(0, 1e3)),
    st.builds(m.Extend, ints, names, st.lists(ints, max_size=5), st.floats(0, 1e3)),
    st.builds(m.Declare, ints, names, st.none() | ints, waits, st.none() | ints),
    st.builds(m.Info, ints, names),
    st.builds(m.TaskDone, ints, names, ints),
    st.builds(m.Join, ints, names, waits),
    st.builds(m.Shutdown, ints, names, st.booleans()),
    st.builds(m.Stats, ints),
    st.builds(m.Ping, ints),
    st.builds(m.Pong, ints),
    st.builds(m.Goodbye, names),
)
server_messages = st.one_of(
    st.builds(m.Welcome, st.integers(0, 9), names, st.floats(0, 60), ints),
    st.builds(m.Ok, ints, st.none() | ints | st.dictionaries(names, ints, max_size=3)),
    st.builds(
        m.Deliver,
        ints,
        st.lists(st.builds(m.Delivery, ints, st.integers(0, 99), blobs), max_size=4),
    ),
    st.builds(m.Error, ints, names, names),
    st.builds(m.QueueShutdown, names, st.booleans()),
    st.builds(m.Ping, ints),
    st.builds(m.Goodbye, names),
)


@given(client_messages)
def test_client_messages_round_trip(msg: Any) -> None:
    assert ServerCodec().decode(encode_message(msg)) == msg


@given(server_messages)
def test_server_messages_round_trip(msg: Any) -> None:
    assert ClientCodec().decode(encode_message(msg)) == msg


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_is_a_remote_protocol_error(body: bytes) -> None:
    for codec in (ServerCodec(), ClientCodec()):
        try:
            codec.decode(body)
        except RemoteProtocolError:
            pass


@given(
    st.lists(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.binary(max_size=5), st.none()
        )
    )
)
def test_arrays_of_wrong_shape_are_refused(values: list[Any]) -> None:
    body = msgspec.msgpack.encode([0x10, *values])
    try:
        msg = ServerCodec().decode(body)
    except RemoteProtocolError:
        return
    assert isinstance(msg, m.Put)


def test_protocol_imports_no_io_modules() -> None:
    forbidden = {"socket", "asyncio", "threading", "selectors", "select"}
    for path in Path(pigeon.protocol.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for mod in mods:
                    assert mod.split(".")[0] not in forbidden, f"{path.name} imports {mod}"


@pytest.mark.parametrize(
    "body",
    [
        b"\x96\x10\x07\xa4jobs\xc4\x02hi\x00\x81\xa1x" + b"\x91" * 100_000 + b"\x01",  # in options
        b"\x96\x10\x07\xa4jobs\xc4\x02hi\x00\x82\x01\x02\xa1x" + b"\x91" * 100_000 + b"\x01",
        b"\x93\xcc\x80\x01" + b"\x91" * 100_000 + b"\x01",  # an OK's value
    ],
)
def test_values_nested_too_deeply_are_a_remote_protocol_error(body: bytes) -> None:
    """msgspec raises RecursionError past ~1,000 levels (~10,000 on 3.13): it must not
    escape the codecs (the broker closed the connection without an ERROR, a client broke
    with a traceback)."""
    for codec in (ServerCodec(), ClientCodec()):
        with pytest.raises(RemoteProtocolError, match="malformed message"):
            codec.decode(body)
