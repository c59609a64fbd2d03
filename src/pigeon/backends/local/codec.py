"""An item as a record of the ring and back: bytes and bytearrays as they are, anything
else pickled (protocol 5, large buffers out of band) or through the queue's serializer;
and the envelope of a record that carries more than an item - its headers, and its
priority, delay or ttl."""

from __future__ import annotations

import pickle
import struct
from typing import Any

from pigeon.backends.local.layout import (
    COPY_AS_BYTES,
    ENVELOPE,
    K_BYTEARRAY,
    K_BYTES,
    K_HEADERS,
    K_OPTIONS,
    K_PICKLE,
    K_PICKLE_OOB,
    K_SERIALIZED,
    OPTS,
    decode_headers,
    encode_headers,
)
from pigeon.protocol.messages import PutOptions
from pigeon.serializers import Serializer

OOB_MIN = 64 * 1024  # pickle buffers at least this large go out of band


def encode(item: Any, ser: Serializer, pickled: bool) -> tuple[int, list[Any]]:
    """``item`` as a record: (kind, parts). ``pickled``: ``ser`` is the default pickle,
    which this does itself (bytes and bytearrays skip it; large buffers go out of band)."""
    if not pickled:
        return K_SERIALIZED, [ser.dumps(item)]
    cls = type(item)
    if cls is bytes:
        return K_BYTES, [item]
    if cls is bytearray:
        return K_BYTEARRAY, [item]
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= OOB_MIN:
            buffers.append(buf)
            return False
        return True

    data = pickle.dumps(item, protocol=5, buffer_callback=out_of_band)
    if not buffers:
        return K_PICKLE, [data]
    raws = [b.raw() for b in buffers]
    head = struct.pack(f"<IQ{len(raws)}Q", len(raws), len(data), *(r.nbytes for r in raws))
    return K_PICKLE_OOB, [head, data, *raws]


def decode(kind: int, payload: Any, ser: Serializer) -> Any:
    """The item of a record (any exception of the serializer's passes through)."""
    if kind in (K_HEADERS, K_OPTIONS):
        kind, payload, _, _ = unwrap(kind, payload)
    if kind == K_BYTES:
        return bytes(payload)
    if kind == K_BYTEARRAY:
        return payload if isinstance(payload, bytearray) else bytearray(payload)
    if kind == K_PICKLE:
        return pickle.loads(payload)
    if kind == K_PICKLE_OOB:
        view = memoryview(payload)
        n, plen = struct.unpack_from("<IQ", view, 0)
        sizes = struct.unpack_from(f"<{n}Q", view, 12)
        at = 12 + 8 * n
        data = view[at : at + plen]
        at += plen
        bufs = []
        for size in sizes:
            bufs.append(view[at : at + size])
            at += size
        return pickle.loads(data, buffers=bufs)
    return ser.loads(bytes(payload))


def wrap(record: tuple[int, list[Any]], headers: dict[str, str]) -> tuple[int, list[Any]]:
    """``record`` with ``headers`` (one part: the C fast path writes single parts)."""
    kind, parts = record
    meta = encode_headers(headers)
    return K_HEADERS, [b"".join([ENVELOPE.pack(len(meta), kind, 0), meta, *parts])]


def with_options(
    record: tuple[int, list[Any]], opts: PutOptions, now: float
) -> tuple[int, list[Any]]:
    """``record`` with a priority, delay or ttl (and headers), as one part."""
    kind, parts = record
    meta = encode_headers(opts.headers) if opts.headers else b""
    due = now + opts.delay if opts.delay else 0.0
    expires = (due or now) + opts.ttl if opts.ttl else 0.0
    head = OPTS.pack(len(meta), kind, opts.priority, due, expires)
    return K_OPTIONS, [b"".join([head, meta, *parts])]


def unwrap(kind: int, payload: Any) -> tuple[int, Any, dict[str, str], int]:
    """(the item's kind, its payload, its headers, its priority) of a ``K_HEADERS`` or
    ``K_OPTIONS`` record."""
    with memoryview(payload) as view:
        if kind == K_HEADERS:
            n, kind, _ = ENVELOPE.unpack_from(view, 0)
            start, priority = ENVELOPE.size, 0
        else:
            n, kind, priority, _, _ = OPTS.unpack_from(view, 0)
            start = OPTS.size
        headers = decode_headers(view[start : start + n]) if n else {}
        start += n
        inner: Any = bytes(view[start:]) if kind in COPY_AS_BYTES else bytearray(view[start:])
    return kind, inner, headers, priority
