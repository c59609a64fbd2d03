from __future__ import annotations

import struct

import pytest

import pigeon
from pigeon.framing import (
    Codec,
    Delimited,
    FixedLength,
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
    LengthPrefixed,
)

PAYLOADS = [b"hello", b"", b"x" * 1000, bytes(range(256)), b"world"]


def _codecs() -> list[tuple[Codec, list[bytes]]]:
    return [
        (LengthPrefixed(), PAYLOADS),
        (LengthPrefixed(header_size=1), PAYLOADS[:2]),
        (LengthPrefixed(header_size=2, byteorder="little"), PAYLOADS),
        (LengthPrefixed(header_size=8), PAYLOADS),
        (Delimited(), [b"hello", b"", b"x" * 1000, b"a\rb\nc", b"world"]),
        (Delimited(b"\x00"), [b"a", b"bc", b"", b"\r\n"]),
        (FixedLength(5), [b"hello", b"world", b"\x00" * 5]),
    ]


@pytest.fixture(params=_codecs(), ids=lambda c: repr(c[0]))
def codec_payloads(request: pytest.FixtureRequest) -> tuple[Codec, list[bytes]]:
    return request.param  # type: ignore[no-any-return]


def test_decode_whole_stream(codec_payloads: tuple[Codec, list[bytes]]) -> None:
    codec, payloads = codec_payloads
    dec = codec.decoder()
    assert dec.feed(codec.encode_many(payloads)) == payloads
    dec.close()
    assert dec.buffered == 0


def test_decode_byte_by_byte(codec_payloads: tuple[Codec, list[bytes]]) -> None:
    codec, payloads = codec_payloads
    dec = codec.decoder()
    wire = b"".join(codec.encode(p) for p in payloads)
    frames: list[bytes] = []
    for i in range(len(wire)):
        frames += dec.feed(wire[i : i + 1])
    assert frames == payloads
    dec.close()


def test_decode_with_trailing_bytes_keeps_the_tail(
    codec_payloads: tuple[Codec, list[bytes]],
) -> None:
    codec, payloads = codec_payloads
    dec = codec.decoder()
    wire = codec.encode_many(payloads)
    nxt = codec.encode(payloads[0])
    frames = dec.feed(wire + nxt[:-1])
    assert frames == payloads
    assert dec.buffered > 0
    with pytest.raises(IncompleteFrame):
        dec.close()
    assert dec.feed(nxt[-1:]) == [payloads[0]]
    dec.close()


def test_feed_accepts_bytearray_and_memoryview() -> None:
    codec = LengthPrefixed()
    wire = codec.encode_many([b"ab", b"cd"])
    dec = codec.decoder()
    assert dec.feed(bytearray(wire[:3])) + dec.feed(memoryview(wire)[3:]) == [b"ab", b"cd"]


def test_encode_parts_matches_encode(codec_payloads: tuple[Codec, list[bytes]]) -> None:
    codec, payloads = codec_payloads
    for p in payloads:
        assert b"".join(map(bytes, codec.encode_parts(p))) == codec.encode(p)


# --- LengthPrefixed ---------------------------------------------------------------------


def test_length_prefixed_header_is_big_endian_by_default() -> None:
    assert LengthPrefixed().encode(b"abc") == b"\x00\x00\x00\x03abc"
    assert LengthPrefixed(header_size=2, byteorder="little").encode(b"a") == b"\x01\x00a"


@pytest.mark.parametrize("size", [0, 3, 5, 16])
def test_length_prefixed_rejects_bad_header_size(size: int) -> None:
    with pytest.raises(ValueError, match="header_size must be 1, 2, 4 or 8"):
        LengthPrefixed(header_size=size)


def test_length_prefixed_refuses_2gib_header_before_buffering_the_body() -> None:
    dec = LengthPrefixed().decoder()
    with pytest.raises(FrameTooLarge, match=r"frame of 2147483648 bytes exceeds") as info:
        dec.feed(struct.pack(">I", 2**31) + b"xy")
    assert info.value.size == 2**31
    assert info.value.limit == 16 * 2**20
    assert dec.buffered < 8


def test_length_prefixed_refuses_large_header_split_across_reads() -> None:
    dec = LengthPrefixed().decoder()
    assert dec.feed(b"\xff\xff") == []
    with pytest.raises(FrameTooLarge, match="frame of 4294967295 bytes exceeds max_frame_size"):
        dec.feed(b"\xff\xff")
    assert dec.buffered <= 4


def test_length_prefixed_limit_checked_after_good_frames_in_the_same_chunk() -> None:
    codec = LengthPrefixed(max_frame_size=10)
    dec = codec.decoder()
    wire = codec.encode(b"ok") + struct.pack(">I", 11) + b"x" * 11
    # the good frame before the bad one is still delivered; the error waits for the next call
    assert dec.feed(wire) == [b"ok"]
    assert isinstance(dec.error, FrameTooLarge)
    assert dec.buffered == 0
    with pytest.raises(FrameTooLarge, match="frame of 11 bytes exceeds max_frame_size=10"):
        dec.feed(b"")


def test_length_prefixed_decoder_stays_broken_after_an_error() -> None:
    dec = LengthPrefixed(max_frame_size=1).decoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x00\x00\x00\x02")
    with pytest.raises(FrameTooLarge):
        dec.feed(b"")


def test_length_prefixed_encode_refuses_oversized_payload() -> None:
    with pytest.raises(FrameTooLarge, match="frame of 4 bytes exceeds max_frame_size=3"):
        LengthPrefixed(max_frame_size=3).encode(b"abcd")


def test_length_prefixed_limit_capped_by_header_size() -> None:
    assert LengthPrefixed(header_size=1).max_frame_size == 255


def test_length_prefixed_large_frame_in_chunks() -> None:
    codec = LengthPrefixed()
    big = bytes(range(256)) * 4096  # 1 MiB
    wire = codec.encode_many([b"a", big, b"b"])
    dec = codec.decoder()
    frames: list[bytes] = []
    for i in range(0, len(wire), 65536):
        frames += dec.feed(wire[i : i + 65536])
        assert dec.buffered <= len(big)
    assert frames == [b"a", big, b"b"]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x00\x00", r"2 of 4 header bytes received"),
        (b"\x00\x00\x00\x05ab", r"2 of 5 body bytes received"),
        (b"\x00\x10\x00\x00" + b"x" * 70000, r"70000 of 1048576 body bytes received"),
    ],
)
def test_length_prefixed_close_mid_frame(wire: bytes, message: str) -> None:
    dec = LengthPrefixed().decoder()
    dec.feed(wire)
    with pytest.raises(IncompleteFrame, match=message):
        dec.close()


# --- Delimited ---------------------------------------------------------------------------


def test_delimited_encode_refuses_payload_containing_delimiter() -> None:
    with pytest.raises(FrameError, match=r"payload contains the delimiter b'\\r\\n' at offset 1"):
        Delimited().encode(b"a\r\nb")


def test_delimited_finds_delimiter_split_across_reads() -> None:
    dec = Delimited(b"\r\n").decoder()
    assert dec.feed(b"hello\r") == []
    assert dec.feed(b"\nworld\r") == [b"hello"]
    assert dec.feed(b"\n") == [b"world"]


def test_delimited_long_delimiter_split_three_ways() -> None:
    dec = Delimited(b"<END>").decoder()
    assert dec.feed(b"abc<E") == []
    assert dec.feed(b"N") == []
    assert dec.feed(b"D>x<END><E") == [b"abc", b"x"]
    assert dec.feed(b"ND>") == [b""]


def test_delimited_unterminated_line_past_limit_is_refused_at_once() -> None:
    dec = Delimited(max_length=10).decoder()
    assert dec.feed(b"x" * 10) == []
    with pytest.raises(FrameTooLarge, match=r"line of 11 bytes exceeds max_length=10"):
        dec.feed(b"x")
    assert dec.buffered == 0


def test_delimited_line_of_exactly_the_limit_is_accepted() -> None:
    dec = Delimited(max_length=4).decoder()
    assert dec.feed(b"abcd\r") == []
    assert dec.feed(b"\n") == [b"abcd"]


def test_delimited_terminated_line_past_limit_is_refused() -> None:
    with pytest.raises(FrameTooLarge, match="line of 5 bytes exceeds max_length=4"):
        Delimited(max_length=4).decoder().feed(b"abcde\r\n")


def test_delimited_does_not_rescan_the_whole_line() -> None:
    # A 60 KiB line fed byte by byte: rescanning would be quadratic (1.8 G comparisons);
    # remembering the scan position keeps it linear. Bounded by the per-test timeout.
    dec = Delimited(max_length=64 * 1024).decoder()
    for _ in range(60_000):
        dec.feed(b"x")
    assert dec.feed(b"\r\n") == [b"x" * 60_000]


def test_delimited_close_mid_line() -> None:
    dec = Delimited().decoder()
    dec.feed(b"abc\r")
    with pytest.raises(IncompleteFrame, match=r"4 bytes without a b'\\r\\n' delimiter"):
        dec.close()


def test_delimited_rejects_empty_delimiter() -> None:
    with pytest.raises(ValueError, match="delimiter must be non-empty bytes"):
        Delimited(b"")


# --- FixedLength -------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"abc", b"abcdef", b""])
def test_fixed_length_refuses_wrong_size(payload: bytes) -> None:
    with pytest.raises(FrameError, match=rf"payload of {len(payload)} bytes does not fit"):
        FixedLength(5).encode(payload)


def test_fixed_length_close_mid_frame() -> None:
    dec = FixedLength(4).decoder()
    assert dec.feed(b"abcdef") == [b"abcd"]
    with pytest.raises(IncompleteFrame, match=r"2 of 4 bytes received"):
        dec.close()


@pytest.mark.parametrize("size", [0, -1])
def test_fixed_length_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="size must be a positive int"):
        FixedLength(size)


# --- vocabulary --------------------------------------------------------------------------


def test_errors_importable_from_pigeon() -> None:
    assert pigeon.FrameError is FrameError
    assert issubclass(pigeon.FrameTooLarge, pigeon.FrameError)
    assert issubclass(pigeon.IncompleteFrame, pigeon.FrameError)
    assert issubclass(pigeon.FrameError, pigeon.PigeonError)
