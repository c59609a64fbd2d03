"""Item <-> bytes.

``"pickle"`` (default for local queues: any Python object), ``"msgpack"`` (msgspec; default
over the network), ``"json"`` (msgspec), ``"raw"`` (bytes only, no encoding at all), or any
object with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``.

Nothing here unpickles data unless ``"pickle"`` (or a custom object that does) was chosen:
pickle runs arbitrary code on load, so it must only read bytes you trust.
"""

from __future__ import annotations

import pickle
from typing import Any, Protocol, runtime_checkable

import msgspec

__all__ = ["JSON", "Msgpack", "Pickle", "Raw", "Serializer", "SerializerLike", "get_serializer"]


@runtime_checkable
class Serializer(Protocol):
    """Anything with ``dumps`` and ``loads``."""

    def dumps(self, obj: Any, /) -> bytes: ...

    def loads(self, data: bytes, /) -> Any: ...


class Pickle:
    """pickle, protocol 5. Trusted data only: loading runs arbitrary code."""

    name = "pickle"

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=5)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class Msgpack:
    """MessagePack via msgspec: safe on untrusted data; dicts, lists, str, bytes, numbers."""

    name = "msgpack"

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()

    def dumps(self, obj: Any) -> bytes:
        return self._enc.encode(obj)

    def loads(self, data: bytes) -> Any:
        return self._dec.decode(data)


class JSON:
    """JSON via msgspec: safe on untrusted data, readable on the wire."""

    name = "json"

    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()

    def dumps(self, obj: Any) -> bytes:
        return self._enc.encode(obj)

    def loads(self, data: bytes) -> Any:
        return self._dec.decode(data)


class Raw:
    """No encoding: items must be bytes-like and come back as ``bytes``."""

    name = "raw"

    def dumps(self, obj: Any) -> bytes:
        if type(obj) is bytes:
            return obj
        if not isinstance(obj, bytes | bytearray | memoryview):
            raise TypeError(
                f"serializer='raw' carries bytes only, not {type(obj).__name__}; "
                "encode it yourself or choose serializer='msgpack'"
            )
        return bytes(obj)

    def loads(self, data: bytes) -> Any:
        return data if type(data) is bytes else bytes(data)


SerializerLike = str | Serializer

_BUILTIN: dict[str, type[Pickle | Msgpack | JSON | Raw]] = {
    "pickle": Pickle,
    "msgpack": Msgpack,
    "json": JSON,
    "raw": Raw,
}


def get_serializer(spec: SerializerLike) -> Serializer:
    """Resolve a name or an object with ``dumps``/``loads``."""
    if isinstance(spec, str):
        try:
            return _BUILTIN[spec]()
        except KeyError:
            known = ", ".join(_BUILTIN)
            raise ValueError(f"unknown serializer {spec!r}; known: {known}") from None
    if isinstance(spec, Serializer):
        return spec
    raise TypeError(
        f"serializer must be a name ({', '.join(_BUILTIN)}) or an object with dumps and "
        f"loads, not {type(spec).__name__}"
    )
