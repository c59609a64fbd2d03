"""A PUT's options map, read an entry at a time (``pigeon.protocol.option_map``, through
``ServerCodec``): a known entry of the wrong type is a bad request naming it, anything
else in the map is ignored, and only a frame that is not a message is a protocol error
(docs/protocol.md sections 2 and 4.3)."""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.errors import RemoteProtocolError
from pigeon.protocol.messages import Put, PutBatch, PutOptions, RawPut, RawPutBatch
from pigeon.protocol.wire import RequestRefused, ServerCodec

KNOWN = ("delay", "ttl", "dedup_id", "priority", "headers")
encode = msgspec.msgpack.encode


def put_with(options: bytes) -> bytes:
    """A PUT body whose options field is the MessagePack bytes ``options``."""
    return b"\x96\x10\x07\xa4jobs\xc4\x02hi\x00" + options


def a_map(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A MessagePack map of already encoded keys and values (any type, even a map as a
    key, which no Python dict can hold)."""
    n = len(entries)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in entries)


def decode(body: bytes) -> Any:
    return ServerCodec().decode(body)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": 5.0}, "priority must be an integer from 0 to 9, not 5.0"),
        ({"priority": True}, "priority must be an integer from 0 to 9, not true"),
        ({"delay": "3"}, "delay must be a number of seconds, not '3'"),
        ({"ttl": [1]}, "ttl must be a number of seconds, not an array of 1"),
        ({"dedup_id": b"abc"}, "dedup_id must be a str, not bin of 3 bytes"),
        ({"dedup_id": 7}, "dedup_id must be a str, not 7"),
        ({"headers": {"k": 1}}, "headers must be a map of str to str: headers['k'] is 1"),
        ({"headers": {1: "v"}}, "headers must be a map of str to str: a name is 1"),
        ({"headers": ["k", "v"]}, "headers must be a map of str to str, not an array of 2"),
        ({"headers": "k=v"}, "headers must be a map of str to str, not 'k=v'"),
    ],
)
def test_an_option_of_the_wrong_type_is_refused_naming_it(
    options: dict[Any, Any], message: str
) -> None:
    got = decode(put_with(encode(options)))
    assert got == RequestRefused(7, "bad_request", message)


def test_a_batch_with_an_option_of_the_wrong_type_is_refused_with_its_req() -> None:
    body = encode([0x11, 9, "jobs", [b"a", b"b"], 0.0, {"priority": "9"}])
    assert decode(body) == RequestRefused(
        9, "bad_request", "priority must be an integer from 0 to 9, not '9'"
    )


def test_nil_for_an_option_is_its_default() -> None:
    nils = {name: None for name in KNOWN}
    assert decode(put_with(encode(nils))) == Put(7, "jobs", b"hi", 0, PutOptions())
    got = decode(put_with(encode({"headers": None, "priority": 4})))
    assert got == Put(7, "jobs", b"hi", 0, PutOptions(priority=4))


@pytest.mark.parametrize(
    "key",
    [
        encode(1),
        encode(None),
        encode(2.5),
        encode(b"priority"),  # bin, not str
        encode([1, 2]),
        a_map([(encode(1), encode(2))]),
        a_map([(a_map([]), encode(0))]),  # a map whose key is a map
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        encode(msgspec.msgpack.Ext(5, b"x")),
    ],
)
def test_an_unknown_key_of_any_type_is_ignored(key: bytes) -> None:
    options = a_map([(key, a_map([(a_map([]), encode(1))])), (encode("priority"), encode(3))])
    assert decode(put_with(options)) == Put(7, "jobs", b"hi", 0, PutOptions(priority=3))


def test_unknown_str_keys_are_ignored_whatever_their_values() -> None:
    options = {"color": {"r": [1, None]}, "delay": 2, "x": b"\x00"}
    assert decode(put_with(encode(options))) == Put(7, "jobs", b"hi", 0, PutOptions(delay=2.0))


def test_a_known_value_that_does_not_decode_is_refused_naming_it() -> None:
    headers = a_map([(encode("k"), b"\xa2\xff\xfe")])  # a value that is not UTF-8
    got = decode(put_with(a_map([(encode("headers"), headers)])))
    assert isinstance(got, RequestRefused) and got.message.startswith("headers must be a map")
    headers = a_map([(a_map([]), encode("v"))])  # no Python dict can hold a map as a key
    got = decode(put_with(a_map([(encode("headers"), headers)])))
    assert isinstance(got, RequestRefused) and got.message.startswith("headers must be a map")


def test_a_repeated_key_counts_once_the_last() -> None:
    options = a_map([(encode("priority"), encode(1)), (encode(1), b"\xc0"),
                     (encode("priority"), encode(2))])  # fmt: skip
    assert decode(put_with(options)) == Put(7, "jobs", b"hi", 0, PutOptions(priority=2))


@pytest.mark.parametrize("options", [encode(5), encode("delay=1"), encode([]), encode(b"")])
def test_options_that_are_not_a_map_are_a_protocol_error(options: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"malformed message \(\d+ bytes\)"):
        decode(put_with(options))


def test_a_wrong_field_outside_the_options_stays_a_protocol_error() -> None:
    body = encode([0x11, 1, "jobs", [b"a"], 0.0, {1: 2}, [None]])  # a nil dedup id
    with pytest.raises(
        RemoteProtocolError, match=r"Expected `str`, got `None` - at `\$\[6\]\[0\]`"
    ):
        decode(body)
    with pytest.raises(RemoteProtocolError, match="malformed message"):
        decode(encode([0x20, 1, "jobs", 1.5, 0.0]))  # max_items a float


def test_the_raw_puts_have_the_fields_of_the_puts() -> None:
    assert RawPut.__struct_fields__ == Put.__struct_fields__
    assert RawPutBatch.__struct_fields__ == PutBatch.__struct_fields__
    assert (RawPut.__struct_config__.tag, RawPutBatch.__struct_config__.tag) == (0x10, 0x11)


# --- Hypothesis: any map of any MessagePack values ------------------------------------------


def _str_header(n: int) -> bytes:
    return bytes([0xA0 | n]) if n < 32 else b"\xd9" + bytes([n])


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
).map(encode) | st.binary(max_size=6).map(lambda b: _str_header(len(b)) + b)  # not UTF-8
exts = st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)).map(encode)
values = st.recursive(
    scalars | exts,
    lambda kids: (
        st.lists(kids, max_size=4).map(lambda xs: bytes([0x90 | len(xs)]) + b"".join(xs))
        | st.lists(st.tuples(kids, kids), max_size=4).map(a_map)
    ),
    max_leaves=12,
)
well_typed = st.one_of(
    st.fixed_dictionaries({"delay": st.floats(0, 10) | st.integers(0, 10)}),
    st.fixed_dictionaries({"ttl": st.floats(0, 100)}),
    st.fixed_dictionaries({"dedup_id": st.text(max_size=20)}),
    st.fixed_dictionaries({"priority": st.integers(-2, 12)}),
    st.fixed_dictionaries({"headers": st.dictionaries(st.text(max_size=8), st.text(max_size=8))}),
).map(lambda d: [(encode(k), encode(v)) for k, v in d.items()])
keys = st.sampled_from(KNOWN).map(encode) | values
option_maps = st.tuples(well_typed, st.lists(st.tuples(keys, values), max_size=5)).map(
    lambda parts: a_map(parts[0] + parts[1])
)


@settings(max_examples=400)
@given(option_maps)
def test_any_options_map_is_accepted_or_refused_naming_a_known_field(options: bytes) -> None:
    got = decode(put_with(options))
    if isinstance(got, RequestRefused):
        assert got.req == 7 and got.code == "bad_request"
        assert got.message.split(" ")[0].rstrip(":") in KNOWN, got.message
    else:
        assert isinstance(got, Put) and isinstance(got.options, PutOptions)
        o = got.options
        assert type(o.delay) is float and type(o.ttl) is float and type(o.dedup_id) is str
        assert type(o.priority) is int
        assert all(type(k) is str and type(v) is str for k, v in o.headers.items())
