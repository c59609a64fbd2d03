"""Length-prefixed frames: a big-endian (by default) unsigned header, then that many bytes.

# Strategy:
# Frames are cut straight out of each received chunk with one ``unpack_from`` and one
# slice per frame; only the unfinished tail of a chunk is kept. A small unfinished frame is
# kept as bytes and prepended to the next chunk (one copy, bounded by ``_SMALL``). A large
# unfinished frame is kept as a list of the chunks that carry its body, joined once when
# the last byte arrives, so a 1 MiB frame fed in 64 KiB chunks is copied once, not
# sixteen times. The header is checked against ``max_frame_size`` the moment it is
# complete, before a single body byte is kept (every parsing CVE in this field trusted a
# length the peer declared).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Literal

from pigeon.errors import FrameError, FrameTooLarge, IncompleteFrame
from pigeon.framing._base import Buffer

__all__ = ["LengthPrefixed"]

_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
# Above this many bytes an unfinished body is kept as a list of chunks instead of being
# copied into the tail on every feed.
_SMALL = 16 * 1024


class LengthPrefixed:
    """Frames carried as ``header_size`` bytes of length followed by the payload.

    Args:
        header_size: 1, 2, 4 or 8 bytes of length header.
        max_frame_size: the largest payload accepted, in bytes; checked on the header,
            before the body is read. Defaults to 16 MiB.
        byteorder: ``"big"`` (network order, the default) or ``"little"``.
    """

    __slots__ = ("_struct", "byteorder", "header_size", "max_frame_size")

    def __init__(
        self,
        header_size: int = 4,
        max_frame_size: int = 16 * 2**20,
        byteorder: Literal["big", "little"] = "big",
    ) -> None:
        if header_size not in _FORMATS:
            raise ValueError(f"header_size must be 1, 2, 4 or 8, not {header_size!r}")
        if byteorder not in ("big", "little"):
            raise ValueError(f"byteorder must be 'big' or 'little', not {byteorder!r}")
        ceiling = 2 ** (8 * header_size) - 1
        if max_frame_size < 0:
            raise ValueError(f"max_frame_size must be >= 0, not {max_frame_size}")
        self.header_size = header_size
        self.max_frame_size = min(max_frame_size, ceiling)
        self.byteorder = byteorder
        self._struct = struct.Struct((">" if byteorder == "big" else "<") + _FORMATS[header_size])

    def __repr__(self) -> str:
        return (
            f"LengthPrefixed(header_size={self.header_size}, "
            f"max_frame_size={self.max_frame_size}, byteorder={self.byteorder!r})"
        )

    def _check(self, size: int) -> None:
        if size > self.max_frame_size:
            raise FrameTooLarge(size, self.max_frame_size)

    def encode(self, payload: Buffer) -> bytes:
        size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        self._check(size)
        return self._struct.pack(size) + payload

    def encode_parts(self, payload: Buffer) -> list[Buffer]:
        size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        self._check(size)
        return [self._struct.pack(size), payload]

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        pack = self._struct.pack
        limit = self.max_frame_size
        parts: list[Buffer] = []
        append = parts.append
        for p in payloads:
            size = len(p) if not isinstance(p, memoryview) else p.nbytes
            if size > limit:
                raise FrameTooLarge(size, limit)
            append(pack(size))
            append(p)
        return b"".join(parts)

    def decoder(self) -> LengthPrefixedDecoder:
        return LengthPrefixedDecoder(self)


class LengthPrefixedDecoder:
    """Decoder state for one stream of length-prefixed frames."""

    __slots__ = ("_hs", "_max", "_need", "_parts", "_tail", "_unpack", "error")

    def __init__(self, codec: LengthPrefixed) -> None:
        self._unpack = codec._struct.unpack_from
        self._hs = codec.header_size
        self._max = codec.max_frame_size
        self._tail = b""  # an unfinished small frame, header included
        self._parts: list[bytes] = []  # body chunks of an unfinished large frame
        self._need = 0  # body bytes still missing for the frame in _parts
        self.error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._tail) + sum(map(len, self._parts))

    @property
    def max_frame_size(self) -> int:
        """The largest frame this decoder accepts from now on (a handshake may start
        small and widen it once the peer has proved itself)."""
        return int(self._max)

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max = value

    def feed(self, data: Buffer) -> list[bytes]:
        if self.error is not None:
            raise self.error
        frames: list[bytes] = []
        buf = bytes(data)
        if self._need:
            buf = self._continue_large(buf, frames)
            if not buf:
                return frames
        if self._tail:
            buf = self._tail + buf
            self._tail = b""
        hs = self._hs
        unpack = self._unpack
        append = frames.append
        end = len(buf)
        last = end - hs
        pos = 0
        if self._max >= end:
            # Fast path: a frame that ends inside ``buf`` is shorter than ``buf`` and so
            # within the limit; only the unfinished one is checked, in ``_keep``.
            while pos <= last:
                start = pos + hs
                pos = start + unpack(buf, pos)[0]
                if pos > end:
                    pos = start - hs
                    break
                append(buf[start:pos])
        else:
            limit = self._max
            while pos <= last:
                size = unpack(buf, pos)[0]
                if size > limit:
                    return self._fail(FrameTooLarge(size, limit), frames)
                start = pos + hs
                if start + size > end:
                    break
                pos = start + size
                append(buf[start:pos])
        if pos < end:
            return self._keep(buf, pos, frames)
        return frames

    def _fail(self, exc: FrameError, frames: list[bytes]) -> list[bytes]:
        """Break the decoder; hand out the frames decoded before the bad one first."""
        self.error = exc
        self._tail = b""
        self._parts = []
        self._need = 0
        if frames:
            return frames
        raise exc

    def _keep(self, buf: bytes, pos: int, frames: list[bytes]) -> list[bytes]:
        """Keep the unfinished frame that starts at ``pos``."""
        hs = self._hs
        if len(buf) - pos >= hs:
            (size,) = self._unpack(buf, pos)
            if size > self._max:
                return self._fail(FrameTooLarge(size, self._max), frames)
            if size > _SMALL:
                body = buf[pos + hs :]
                self._parts = [body]
                self._need = size - len(body)
                return frames
        self._tail = buf[pos:]
        return frames

    def _continue_large(self, buf: bytes, frames: list[bytes]) -> bytes:
        """Add ``buf`` to the large frame in progress; return what follows its end."""
        need = self._need
        if len(buf) < need:
            self._parts.append(buf)
            self._need = need - len(buf)
            return b""
        self._parts.append(buf[:need])
        frames.append(b"".join(self._parts))
        self._parts = []
        self._need = 0
        return buf[need:]

    def close(self) -> None:
        if self.error is not None:
            return
        if self._need:
            got = sum(map(len, self._parts))
            raise IncompleteFrame(
                f"stream ended mid-frame ({got} of {got + self._need} body bytes received)"
            )
        if self._tail:
            hs = self._hs
            if len(self._tail) < hs:
                raise IncompleteFrame(
                    f"stream ended mid-frame ({len(self._tail)} of {hs} header bytes received)"
                )
            (size,) = self._unpack(self._tail, 0)
            raise IncompleteFrame(
                f"stream ended mid-frame ({len(self._tail) - hs} of {size} body bytes received)"
            )
