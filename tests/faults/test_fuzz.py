"""Fuzz targets for the frame and protocol decoders, bounded in time (Hypothesis).

Run longer with PIGEON_FUZZ_EXAMPLES=200000. Any input must give frames, a FrameError,
or a RemoteProtocolError; never another exception, a hang, or a buffer past the limit.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.errors import FrameError, RemoteProtocolError
from pigeon.framing import Delimited, LengthPrefixed
from pigeon.protocol.wire import ClientCodec, ServerCodec

EXAMPLES = int(os.environ.get("PIGEON_FUZZ_EXAMPLES", "3000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=16))
def test_fuzz_length_prefixed_into_protocol(chunks: list[bytes]) -> None:
    limit = 4096
    decoder = LengthPrefixed(max_frame_size=limit).decoder()
    server, client = ServerCodec(), ClientCodec()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert len(frame) <= limit
                for codec in (server, client):
                    try:
                        codec.decode(frame)
                    except RemoteProtocolError:
                        pass
            assert decoder.buffered <= limit + 4
    except FrameError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=16))
def test_fuzz_text_mode_lines(chunks: list[bytes]) -> None:
    decoder = Delimited(b"\n", max_length=1024).decoder()
    try:
        for chunk in chunks:
            for line in decoder.feed(chunk):
                assert len(line) <= 1024
            assert decoder.buffered <= 1025
    except FrameError:
        pass
