"""Delimited frames: each payload is followed by a delimiter, ``b"\\r\\n"`` by default.

# Strategy:
# Frames are cut out of each chunk with ``bytes.find`` from the end of the previous frame.
# An unterminated line is kept in a ``bytearray`` that grows in place, and the decoder
# remembers how far it has searched: a delimiter split across two reads is found by
# searching only the last ``len(delimiter) - 1`` old bytes plus the new ones, never by
# rescanning the whole line (h11's receive buffer, asyncio's ``readuntil``). A line that
# passes ``max_length`` without a delimiter is refused at once, before more is buffered.
"""

from __future__ import annotations

from collections.abc import Iterable

from pigeon.errors import FrameError, FrameTooLarge, IncompleteFrame
from pigeon.framing._base import Buffer

__all__ = ["Delimited"]


class Delimited:
    """Frames terminated by ``delimiter``; the payload must not contain it.

    Args:
        delimiter: the non-empty byte string that ends each frame.
        max_length: the longest payload accepted, in bytes, delimiter excluded. A line
            that grows past it without a delimiter raises ``FrameTooLarge`` at once.
    """

    __slots__ = ("delimiter", "max_length")

    def __init__(self, delimiter: bytes = b"\r\n", max_length: int = 64 * 2**10) -> None:
        if not isinstance(delimiter, bytes) or not delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, not {delimiter!r}")
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, not {max_length}")
        self.delimiter = delimiter
        self.max_length = max_length

    def __repr__(self) -> str:
        return f"Delimited({self.delimiter!r}, max_length={self.max_length})"

    def _check(self, payload: Buffer) -> bytes:
        data = bytes(payload)
        if len(data) > self.max_length:
            raise FrameTooLarge(len(data), self.max_length, "line", "max_length")
        at = data.find(self.delimiter)
        if at >= 0:
            raise FrameError(
                f"payload contains the delimiter {self.delimiter!r} at offset {at}; "
                "escape it, or use LengthPrefixed for arbitrary bytes"
            )
        return data

    def encode(self, payload: Buffer) -> bytes:
        return self._check(payload) + self.delimiter

    def encode_parts(self, payload: Buffer) -> list[Buffer]:
        return [self._check(payload), self.delimiter]

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        d = self.delimiter
        return b"".join([self._check(p) + d for p in payloads])

    def decoder(self) -> DelimitedDecoder:
        return DelimitedDecoder(self)


class DelimitedDecoder:
    """Decoder state for one stream of delimited frames."""

    __slots__ = ("_delim", "_max", "_scanned", "_tail", "error")

    def __init__(self, codec: Delimited) -> None:
        self._delim = codec.delimiter
        self._max = codec.max_length
        self._tail = bytearray()  # an unterminated line
        self._scanned = 0  # no delimiter starts before this offset of _tail
        self.error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._tail)

    def feed(self, data: Buffer) -> list[bytes]:
        if self.error is not None:
            raise self.error
        frames: list[bytes] = []
        buf = bytes(data)
        delim = self._delim
        dlen = len(delim)
        limit = self._max
        pos = 0
        tail = self._tail
        if tail:
            old = len(tail)
            tail += buf
            at = tail.find(delim, self._scanned)
            if at < 0:
                self._scanned = max(0, len(tail) - dlen + 1)
                return self._check_unterminated(frames)
            if at > limit:
                return self._fail(at, frames)
            frames.append(bytes(tail[:at]))
            # The delimiter ends inside the new chunk: everything before was searched.
            pos = at + dlen - old
            tail.clear()
            self._scanned = 0
        find = buf.find
        append = frames.append
        while True:
            at = find(delim, pos)
            if at < 0:
                break
            if at - pos > limit:
                return self._fail(at - pos, frames)
            append(buf[pos:at])
            pos = at + dlen
        if pos < len(buf):
            tail += memoryview(buf)[pos:]
            self._scanned = max(0, len(tail) - dlen + 1)
            return self._check_unterminated(frames)
        return frames

    def _check_unterminated(self, frames: list[bytes]) -> list[bytes]:
        # The tail may end with the first bytes of a delimiter; the rest is surely payload.
        tail = self._tail
        size = len(tail)
        if size <= self._max:
            return frames
        delim = self._delim
        for j in range(min(len(delim) - 1, size), 0, -1):
            if tail.endswith(delim[:j]):
                size -= j
                break
        if size > self._max:
            return self._fail(size, frames)
        return frames

    def _fail(self, size: int, frames: list[bytes]) -> list[bytes]:
        """Break the decoder; hand out the frames decoded before the bad one first."""
        self.error = FrameTooLarge(size, self._max, "line", "max_length")
        self._tail = bytearray()
        if frames:
            return frames
        raise self.error

    def close(self) -> None:
        if self.error is None and self._tail:
            raise IncompleteFrame(
                f"stream ended mid-line ({len(self._tail)} bytes without a "
                f"{self._delim!r} delimiter)"
            )
