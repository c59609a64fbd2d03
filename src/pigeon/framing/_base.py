"""The two shapes every codec has: an encoder (stateless) and a decoder (one per stream)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from pigeon.errors import FrameError

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Decoder(Protocol):
    """Turns chunks of a byte stream into complete frames; keeps the partial tail.

    When a chunk holds good frames followed by a bad one, ``feed`` returns the good
    frames and sets ``error``; the next ``feed`` raises it. A stream adapter checks
    ``error`` after each feed so the error surfaces without waiting for more bytes.
    """

    error: FrameError | None

    def feed(self, data: Buffer) -> list[bytes]:
        """Add ``data`` and return every frame it completes, in order (maybe none).

        Raises:
            FrameTooLarge: a frame passes the codec's limit (and no good frame came
                before it in ``data``); the decoder is then broken.
            FrameError: the bytes cannot be frames in this codec.
        """
        ...

    def close(self) -> None:
        """Declare the end of the stream.

        Raises:
            IncompleteFrame: bytes of an unfinished frame were left over.
        """
        ...

    @property
    def buffered(self) -> int:
        """How many bytes of an unfinished frame the decoder holds right now."""
        ...


@runtime_checkable
class Codec(Protocol):
    """A framing method: stateless encoding, and a factory of decoders."""

    def encode(self, payload: Buffer) -> bytes:
        """Return the bytes that carry ``payload`` as one frame."""
        ...

    def encode_parts(self, payload: Buffer) -> list[Buffer]:
        """The same frame as a list of buffers, for vectored I/O (no copy of the payload)."""
        ...

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        """Return the frames of all ``payloads``, joined, for one send."""
        ...

    def decoder(self) -> Decoder:
        """A fresh decoder for one stream."""
        ...
