"""Fixed-length frames: every payload is exactly ``size`` bytes, with nothing around it.

Only fits records whose size never changes (sensor samples, fixed binary structs): there
is no padding, so ``encode`` refuses a payload of any other size instead of silently
padding or cutting it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pigeon.errors import FrameError, IncompleteFrame
from pigeon.framing._base import Buffer

__all__ = ["FixedLength"]


class FixedLength:
    """Frames of exactly ``size`` bytes each."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, not {size!r}")
        self.size = size

    def __repr__(self) -> str:
        return f"FixedLength({self.size})"

    def _check(self, payload: Buffer) -> bytes:
        data = bytes(payload)
        if len(data) != self.size:
            raise FrameError(
                f"payload of {len(data)} bytes does not fit FixedLength({self.size}); "
                "pad it yourself or use LengthPrefixed for variable sizes"
            )
        return data

    def encode(self, payload: Buffer) -> bytes:
        return self._check(payload)

    def encode_parts(self, payload: Buffer) -> list[Buffer]:
        return [self._check(payload)]

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        return b"".join([self._check(p) for p in payloads])

    def decoder(self) -> FixedLengthDecoder:
        return FixedLengthDecoder(self)


class FixedLengthDecoder:
    """Decoder state for one stream of fixed-length frames."""

    __slots__ = ("_size", "_tail", "error")

    def __init__(self, codec: FixedLength) -> None:
        self._size = codec.size
        self._tail = b""
        self.error: FrameError | None = None  # fixed-length streams cannot be malformed

    @property
    def buffered(self) -> int:
        return len(self._tail)

    def feed(self, data: Buffer) -> list[bytes]:
        buf = bytes(data)
        if self._tail:
            buf = self._tail + buf
        size = self._size
        whole = len(buf) - len(buf) % size
        frames = [buf[i : i + size] for i in range(0, whole, size)]
        self._tail = buf[whole:]
        return frames

    def close(self) -> None:
        if self._tail:
            raise IncompleteFrame(
                f"stream ended mid-frame ({len(self._tail)} of {self._size} bytes received)"
            )
