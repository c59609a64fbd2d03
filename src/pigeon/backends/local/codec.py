"""Records that carry more than an item: its headers, and its priority, delay or ttl
(an envelope around the item's own record)."""

from __future__ import annotations

from typing import Any

from pigeon.backends.local.layout import (
    COPY_AS_BYTES,
    ENVELOPE,
    K_HEADERS,
    K_OPTIONS,
    OPTS,
    decode_headers,
    encode_headers,
)
from pigeon.protocol.messages import PutOptions


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
