"""Bodies <-> messages, with every field validated; garbage is a RemoteProtocolError."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from pigeon.errors import RemoteProtocolError
from pigeon.framing import LengthPrefixed
from pigeon.protocol.messages import ClientMessage, ServerMessage

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()
_HEADER = LengthPrefixed(header_size=4, max_frame_size=2**32 - 1)


def encode_message(msg: msgspec.Struct) -> bytes:
    """The body of a frame carrying ``msg`` (no length header)."""
    return _encoder.encode(msg)


def encode_frame(msg: msgspec.Struct) -> bytes:
    """A whole frame: 4-byte big-endian length, then the body."""
    return _HEADER.encode(_encoder.encode(msg))


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
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RemoteProtocolError(f"malformed message ({len(body)} bytes): {exc}") from None


class ServerCodec(_Codec[ClientMessage]):
    """What a broker uses: decodes client messages."""

    def __init__(self) -> None:
        super().__init__(ClientMessage)


class ClientCodec(_Codec[ServerMessage]):
    """What a client uses: decodes server messages."""

    def __init__(self) -> None:
        super().__init__(ServerMessage)
