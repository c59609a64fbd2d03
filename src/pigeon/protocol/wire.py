"""Bodies <-> messages, with every field validated; garbage is a RemoteProtocolError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from pigeon.errors import RemoteProtocolError
from pigeon.framing import LengthPrefixed
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import (
    ClientMessage,
    Put,
    PutBatch,
    RawPut,
    RawPutBatch,
    ServerMessage,
)
from pigeon.protocol.option_map import read_options

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()
_HEADER = LengthPrefixed(header_size=4, max_frame_size=2**32 - 1)


def encode_message(msg: msgspec.Struct) -> bytes:
    """The body of a frame carrying ``msg`` (no length header)."""
    return _encoder.encode(msg)


def encode_frame(msg: msgspec.Struct) -> bytes:
    """A whole frame: 4-byte big-endian length, then the body."""
    return _HEADER.encode(_encoder.encode(msg))


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A request that decoded but holds a value refused before the broker sees it (an
    options entry of the wrong type): the answer is ``ERROR(req, code, message)``, and
    the connection stays usable."""

    req: int
    code: str
    message: str


class _Codec(Generic[M]):
    def __init__(self, kind: object) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(kind)

    def decode(self, body: bytes) -> M:
        """Parse one frame body.

        Raises:
            RemoteProtocolError: not a valid message (bad MessagePack, unknown code, a
                field of the wrong type or a missing field).
        """
        try:
            return self._decoder.decode(body)
        except _UNDECODABLE as exc:
            raise _malformed(body, exc) from None


# What msgspec raises for bytes that are not a message. RecursionError: values nested
# too deeply (from about a thousand levels on Python 3.11-3.12, ten thousand on 3.13; no
# message nests more than three), which must not escape as anything but a protocol error -
# the connection would close without a word.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def _malformed(body: bytes, exc: Exception) -> RemoteProtocolError:
    if isinstance(exc, RecursionError):
        return RemoteProtocolError(f"malformed message ({len(body)} bytes): nested too deeply")
    return RemoteProtocolError(f"malformed message ({len(body)} bytes): {exc}")


_RAW_PUTS: msgspec.msgpack.Decoder[RawPut | RawPutBatch] = msgspec.msgpack.Decoder(
    RawPut | RawPutBatch
)


def _is_put(body: bytes) -> bool:
    """Whether ``body`` starts like a PUT or PUT_BATCH (an array whose first element is
    0x10 or 0x11)."""
    skip = {0xDC: 3, 0xDD: 5}.get(body[0], 1) if body else 0
    return 0 < skip < len(body) and body[skip] in (0x10, 0x11)


class ServerCodec:
    """What a broker uses: decodes client messages.

    A PUT or PUT_BATCH whose ``options`` map does not decode as ``PutOptions`` (an entry
    of the wrong type, a key that is not a str, nil for a key) is read again with its
    options an entry at a time (``option_map``): unknown entries are ignored, nil is the
    default, and a known entry of the wrong type gives ``RequestRefused`` (bad_request),
    not a protocol error. A well-formed request costs the first decode only.
    """

    def __init__(self) -> None:
        self._decoder: msgspec.msgpack.Decoder[ClientMessage] = msgspec.msgpack.Decoder(
            ClientMessage
        )

    def decode(self, body: bytes) -> ClientMessage | RequestRefused:
        """Parse one frame body.

        Raises:
            RemoteProtocolError: not a valid message (bad MessagePack, unknown code, a
                field of the wrong type or a missing field; the entries of an options
                map are not fields).
        """
        try:
            return self._decoder.decode(body)
        except _UNDECODABLE as exc:
            if not _is_put(body) or isinstance(exc, RecursionError):
                raise _malformed(body, exc) from None
        try:
            raw = _RAW_PUTS.decode(body)
            options = read_options(bytes(raw.options))
        except (*_UNDECODABLE, RemoteProtocolError) as exc:
            raise _malformed(body, exc) from None
        if isinstance(options, str):
            return RequestRefused(raw.req, Code.BAD_REQUEST, options)
        if isinstance(raw, RawPut):
            return Put(raw.req, raw.queue, raw.payload, raw.wait, options)
        return PutBatch(raw.req, raw.queue, raw.payloads, raw.wait, options, raw.dedup_ids)


class ClientCodec(_Codec[ServerMessage]):
    """What a client uses: decodes server messages."""

    def __init__(self) -> None:
        super().__init__(ServerMessage)
