"""Sans-IO framing: turn a byte stream into frames and frames into bytes.

TCP delivers bytes, not messages: one ``send`` may arrive in several ``recv`` calls and
several sends may arrive in one (the "sticky packet" problem). A codec restores the
boundaries. Three methods, one interface::

    codec = LengthPrefixed(header_size=4, max_frame_size=16 * 2**20)  # general
    codec = Delimited(b"\\r\\n", max_length=64 * 2**10)                  # text lines
    codec = FixedLength(16)                                            # fixed records
    wire = codec.encode(b"hello")       # bytes, ready to send
    dec = codec.decoder()               # one per connection
    frames = dec.feed(chunk)            # complete payloads; the partial tail is kept
    dec.close()                         # at EOF: IncompleteFrame if a frame was cut short

This package imports no socket, asyncio, threading or selectors module: it only
computes. ``pigeon.streams`` moves the bytes.
"""

from __future__ import annotations

from pigeon.errors import FrameError, FrameTooLarge, IncompleteFrame
from pigeon.framing._base import Codec, Decoder
from pigeon.framing.delimited import Delimited
from pigeon.framing.fixed_length import FixedLength
from pigeon.framing.length_prefixed import LengthPrefixed

__all__ = [
    "Codec",
    "Decoder",
    "Delimited",
    "FixedLength",
    "FrameError",
    "FrameTooLarge",
    "IncompleteFrame",
    "LengthPrefixed",
]
