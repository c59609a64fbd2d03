"""Hypothesis: any chunking of any frames decodes the same; garbage never hangs or bloats."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.framing import Codec, Delimited, FixedLength, FrameError, LengthPrefixed
from tests._chunks import split


def _decode(codec: Codec, chunks: list[bytes]) -> list[bytes]:
    dec = codec.decoder()
    frames: list[bytes] = []
    for c in chunks:
        frames += dec.feed(c)
    dec.close()
    return frames


payloads = st.lists(st.binary(max_size=300), max_size=30)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=40)


@given(payloads, cuts, st.sampled_from([1, 2, 4, 8]), st.sampled_from(["big", "little"]))
def test_length_prefixed_any_chunking(
    frames: list[bytes], cut: list[int], hs: int, order: str
) -> None:
    codec = LengthPrefixed(header_size=hs, byteorder=order)  # type: ignore[arg-type]
    frames = [f[: codec.max_frame_size] for f in frames]
    assert _decode(codec, split(codec.encode_many(frames), cut, keep_empty=True)) == frames


@given(
    st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\r\n", b"")), max_size=30),
    cuts,
    st.sampled_from([b"\r\n", b"\n", b"\x00", b"<EOF>"]),
)
def test_delimited_any_chunking(frames: list[bytes], cut: list[int], delim: bytes) -> None:
    frames = [f.replace(delim, b"") for f in frames]
    # A frame ending with a prefix of a multi-byte delimiter followed by the delimiter is
    # still unambiguous: the search finds the first complete delimiter.
    codec = Delimited(delim)
    wire = codec.encode_many(frames)
    expected = wire.split(delim)[:-1]
    assert _decode(codec, split(wire, cut, keep_empty=True)) == expected


@given(st.integers(min_value=1, max_value=64), st.data())
def test_fixed_length_any_chunking(size: int, data: st.DataObject) -> None:
    frames = data.draw(st.lists(st.binary(min_size=size, max_size=size), max_size=30))
    codec = FixedLength(size)
    chunks = split(codec.encode_many(frames), data.draw(cuts), keep_empty=True)
    assert _decode(codec, chunks) == frames


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=512), max_size=20), st.sampled_from([1, 2, 4, 8]))
def test_length_prefixed_garbage_errors_or_waits_within_the_limit(
    chunks: list[bytes], hs: int
) -> None:
    limit = 1000
    dec = LengthPrefixed(header_size=hs, max_frame_size=limit).decoder()
    try:
        for c in chunks:
            for frame in dec.feed(c):
                assert len(frame) <= limit
            assert dec.buffered <= limit + hs
    except FrameError:
        pass


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=512), max_size=20))
def test_delimited_garbage_errors_or_waits_within_the_limit(chunks: list[bytes]) -> None:
    limit = 100
    dec = Delimited(b"\r\n", max_length=limit).decoder()
    try:
        for c in chunks:
            for frame in dec.feed(c):
                assert len(frame) <= limit
            assert dec.buffered <= limit + 1
    except FrameError:
        pass
