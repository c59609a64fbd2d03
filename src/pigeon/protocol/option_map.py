"""A PUT's ``options`` map as the broker reads it: entry by entry, never as a whole.

# Strategy:
# ``options`` is one field of PUT and PUT_BATCH (a map, or nil); its entries are not
# fields of the message, and a newer client may send keys this broker does not know, of
# any type. So a wrong entry must not make the whole frame "malformed" (a protocol error
# closes the connection and gives back every message it held): an entry whose key is not
# one of the five names is ignored, whatever the type of its key or value; a known key
# with nil takes its default, as if absent; a known key with a value of the wrong type is
# a bad request naming it (docs/protocol.md section 4.3). Ranges are checked afterwards,
# with every other field (``rules.options_problem``).
#
# The common case costs one decode in C (``_Loose``: each known key as ``Any``). A map
# that msgspec cannot decode that way (a key that is not a str; a value holding a map
# with an unhashable key, or a str that is not UTF-8) is read again an entry at a time:
# its map header turned into an array header of twice the length gives each key and
# value as raw bytes, decoded alone.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from pigeon.errors import RemoteProtocolError
from pigeon.protocol.messages import PutOptions

__all__ = ["read_options"]

# What each option must be, as the error names it.
_WANT = {
    "delay": "a number of seconds",
    "ttl": "a number of seconds",
    "dedup_id": "a str",
    "priority": "an integer from 0 to 9",
    "headers": "a map of str to str",
}


class _Loose(msgspec.Struct):
    """The known keys of an options map, whatever their values (nil: absent)."""

    delay: Any = None
    ttl: Any = None
    dedup_id: Any = None
    priority: Any = None
    headers: Any = None


_LOOSE = msgspec.msgpack.Decoder(_Loose)
_ENTRIES = msgspec.msgpack.Decoder(list[msgspec.Raw])
_KEY = msgspec.msgpack.Decoder(str)
_VALUE = msgspec.msgpack.Decoder()


def read_options(raw: bytes) -> PutOptions | str | None:
    """The options that a PUT's ``options`` field holds (``raw``: its MessagePack bytes,
    empty when the field was left out): None for none, else the options, or - a str -
    what is wrong with one of them, naming it.

    Raises:
        RemoteProtocolError: the field is neither a map nor nil.
        RecursionError: a value nested too deeply (about a thousand levels; more on
            3.13): the codec's to report.
    """
    if not raw or raw == b"\xc0":
        return None
    if not (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)):
        raise RemoteProtocolError(f"options must be a map or nil, not {_kind(raw[0])}")
    try:
        loose: _Loose | str = _LOOSE.decode(raw)
    except msgspec.DecodeError:  # ValidationError too: a key that is not a str
        loose = _entries(raw)
    return loose if isinstance(loose, str) else _typed(loose)


def _entries(raw: bytes) -> _Loose | str:
    """The known entries of the map ``raw``, one at a time (a repeated key: the last)."""
    first = raw[0]
    if first <= 0x8F:
        n, body = first & 0x0F, raw[1:]
    elif first == 0xDE:
        n, body = struct.unpack_from(">H", raw, 1)[0], raw[3:]
    else:
        n, body = struct.unpack_from(">I", raw, 1)[0], raw[5:]
    items = _ENTRIES.decode(struct.pack(">BI", 0xDD, 2 * n) + body)
    loose = _Loose()
    for key, value in zip(items[::2], items[1::2], strict=True):
        try:
            name = _KEY.decode(key)
        except msgspec.DecodeError:  # not a str, or not UTF-8: not a key we know
            continue
        if name not in _WANT:
            continue
        try:
            setattr(loose, name, _VALUE.decode(value))
        except msgspec.DecodeError as exc:
            return f"{name} must be {_WANT[name]}, not {_kind(memoryview(value)[0])} ({exc})"
    return loose


def _typed(o: _Loose) -> PutOptions | str:
    """``o`` as PutOptions, or the first entry of the wrong type."""
    opts = PutOptions()
    if o.delay is not None:
        if type(o.delay) not in (int, float):
            return _wrong("delay", o.delay)
        opts.delay = float(o.delay)
    if o.ttl is not None:
        if type(o.ttl) not in (int, float):
            return _wrong("ttl", o.ttl)
        opts.ttl = float(o.ttl)
    if o.dedup_id is not None:
        if type(o.dedup_id) is not str:
            return _wrong("dedup_id", o.dedup_id)
        opts.dedup_id = o.dedup_id
    if o.priority is not None:
        if type(o.priority) is not int:
            return _wrong("priority", o.priority)
        opts.priority = o.priority
    if o.headers is not None:
        headers = o.headers
        if type(headers) is not dict:
            return _wrong("headers", headers)
        for k, v in headers.items():
            if type(k) is not str:
                return f"headers must be {_WANT['headers']}: a name is {_show(k)}"
            if type(v) is not str:
                return f"headers must be {_WANT['headers']}: headers[{k[:40]!r}] is {_show(v)}"
        opts.headers = headers
    return opts


def _wrong(name: str, value: Any) -> str:
    return f"{name} must be {_WANT[name]}, not {_show(value)}"


def _show(value: Any) -> str:
    """A wrong value, short, in MessagePack's terms (never a 16 MB repr)."""
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) in (int, float):
        return repr(value)
    if type(value) is str:
        return repr(value) if len(value) <= 40 else f"a str of {len(value)} characters"
    if type(value) is bytes:
        return f"bin of {len(value)} bytes"
    if type(value) in (list, tuple):
        return f"an array of {len(value)}"
    if type(value) is dict:
        return f"a map of {len(value)}"
    return f"an ext ({type(value).__name__})"


def _kind(first: int) -> str:
    """The MessagePack type of a value that starts with the byte ``first``."""
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        return "an integer"
    if first <= 0x8F or first in (0xDE, 0xDF):
        return "a map"
    if first <= 0x9F or first in (0xDC, 0xDD):
        return "an array"
    if first <= 0xBF or 0xD9 <= first <= 0xDB:
        return "a str"
    kinds = {0xC0: "nil", 0xC2: "false", 0xC3: "true", 0xCA: "a float", 0xCB: "a float"}
    return kinds.get(first, "bin" if 0xC4 <= first <= 0xC6 else "an ext")
