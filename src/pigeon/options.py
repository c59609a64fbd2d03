"""The options of a queue handle (``QueueOptions``) and of one put (``PutOptions``),
and every default, defined once for every backend.

Queue options: ``pigeon.Queue(url, maxsize=0, serializer=None, *, lease=None,
max_deliveries=None, dedup_window=None, reconnect_timeout=30, connect_timeout=10)``;
each backend keeps them as one ``QueueOptions`` (``q.options``).

Per-message options - ``delay``, ``ttl``, ``dedup_id``, ``priority``, ``headers`` -
checked once for every backend, before anything is sent.

``put(item, *, delay=None, ttl=None, dedup_id=None, priority=None, headers=None)``:

- ``delay``: seconds (>= 0) before the message can be taken; never a lease (a delayed
  message is not in flight and is never redelivered because of its delay).
- ``ttl``: seconds (> 0): a message not taken within ``ttl`` of its put (its delay
  excluded) moves to ``NAME.dead`` with reason ``expired``.
- ``dedup_id``: a non-empty str of at most 256 bytes: a second put with the same id within
  the queue's ``dedup_window`` is confirmed but not stored again.
- ``priority``: an int from 0 to 9 (default 0): higher first, FIFO within one priority.
- ``headers``: ``dict[str, str]``, at most 64 entries and 16 KiB in all; they travel with
  the message (``Message.headers``) through nack, redelivery, dead letters and ``move``.

A bad value raises ``ValueError`` (out of range) or ``TypeError`` (wrong type) naming the
option. With the ``otel`` extra installed and a span current, ``put`` adds the W3C trace
context (``traceparent``, ``tracestate``) to the headers (``pigeon._otel``): the limits
are the caller's, checked before it is added; it goes in the room they leave (a header
the caller set wins), and when there is none the put goes untraced - tracing never makes
a valid put fail, and the headers never exceed what every backend carries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from pigeon import _otel
from pigeon.protocol.messages import PutOptions
from pigeon.protocol.rules import (
    DEDUP_ID_BYTES,
    DEFAULT_DEDUP_WINDOW,
    HEADER_KEY_BYTES,
    HEADERS_BYTES,
    MAX_HEADERS,
    MAX_PRIORITY,
    MAX_SECONDS,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_PORT",
    "DEFAULT_RECONNECT_TIMEOUT",
    "PutOptions",
    "QueueOptions",
    "check_dedup_ids",
    "put_options",
]

log = logging.getLogger("pigeon.options")

DEFAULT_PORT = 7878  # the broker's
DEFAULT_LEASE = 30.0  # seconds before an unsettled message is redelivered
DEFAULT_MAX_DELIVERIES = 20  # deliveries before a message goes to NAME.dead
DEFAULT_RECONNECT_TIMEOUT = 30.0  # seconds a networked handle retries a lost connection
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect and be welcomed


@dataclasses.dataclass(frozen=True, slots=True)
class QueueOptions:
    """What a queue handle was opened with, as every backend keeps it. ``None``: the
    queue's own setting (declared earlier, or the default above)."""

    maxsize: int = 0
    serializer: Any = None  # a name ("msgpack", "json", "raw", "pickle") or a serializer
    lease: float | None = None
    max_deliveries: int | None = None
    dedup_window: float | None = None
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments that open the same queue again (pickling, AsyncQueue(q))."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok or value > MAX_SECONDS:
        low = "more than 0" if positive else "from 0"
        raise ValueError(
            f"{name} must be a finite number of seconds {low} to {MAX_SECONDS:.0f}, not {value!r}"
        )
    return float(value)


def check_dedup_id(value: Any, name: str = "dedup_id") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    n = len(value.encode("utf-8", "surrogatepass"))
    if not 0 < n <= DEDUP_ID_BYTES:
        raise ValueError(f"{name} must be a non-empty str of at most {DEDUP_ID_BYTES} bytes "
                         f"(UTF-8), not {n} bytes")  # fmt: skip
    return value


def check_headers(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"headers must be a dict of str to str, not {type(value).__name__}")
    if len(value) > MAX_HEADERS:
        raise ValueError(f"headers may hold at most {MAX_HEADERS} entries, not {len(value)}")
    total = 0
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise TypeError(f"headers: names must be str, not {type(k).__name__} ({k!r})")
        if not isinstance(v, str):
            raise TypeError(
                f"headers: values must be str, not {type(v).__name__} (headers[{k!r}]); "
                "convert it first, e.g. str(value)"
            )
        nk = len(k.encode("utf-8", "surrogatepass"))
        if not 0 < nk <= HEADER_KEY_BYTES:
            raise ValueError(
                f"headers: a name must be 1 to {HEADER_KEY_BYTES} bytes (UTF-8), "
                f"not {nk} ({k[:40]!r})"
            )
        total += nk + len(v.encode("utf-8", "surrogatepass"))
        out[k] = v
    if total > HEADERS_BYTES:
        raise ValueError(
            f"headers hold {total} bytes of names and values, more than {HEADERS_BYTES}; "
            "carry large data in the message body"
        )
    return out


def put_options(
    delay: Any = None,
    ttl: Any = None,
    dedup_id: Any = None,
    priority: Any = None,
    headers: Any = None,
) -> PutOptions | None:
    """The options of one put, checked; None when none is given (the plain put)."""
    if headers is not None:
        headers = check_headers(headers)
    if _otel.tracing():
        headers = _with_trace_context(headers)
    if delay is None and ttl is None and dedup_id is None and priority is None and not headers:
        return None
    opts = PutOptions()
    if delay is not None:
        opts.delay = _seconds("delay", delay, positive=False)
    if ttl is not None:
        opts.ttl = _seconds("ttl", ttl, positive=True)
    if dedup_id is not None:
        opts.dedup_id = check_dedup_id(dedup_id)
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int from 0 to {MAX_PRIORITY}, "
                            f"not {type(priority).__name__}")  # fmt: skip
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be an int from 0 to {MAX_PRIORITY}, not {priority}")
        opts.priority = priority
    if headers is not None:
        opts.headers = headers
    return opts


def _with_trace_context(headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` (checked) plus the current trace context, entry by entry while it
    fits under the limits; a header the caller set wins."""
    out = dict(headers) if headers else {}
    entries = len(out)
    size = sum(_utf8(k) + _utf8(v) for k, v in out.items())
    for k, v in _otel.trace_context().items():
        n = _utf8(k) + _utf8(v)
        if k in out or entries >= MAX_HEADERS or size + n > HEADERS_BYTES:
            if k not in out:
                log.debug("no room for %r among the put's headers: that put goes untraced", k)
            continue
        out[k] = v
        entries += 1
        size += n
    return out


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_dedup_ids(dedup_ids: Any, count: int) -> list[str] | None:
    """``put_many``'s ``dedup_ids``: one id per item, or None."""
    if dedup_ids is None:
        return None
    if isinstance(dedup_ids, str | bytes) or not hasattr(dedup_ids, "__iter__"):
        raise TypeError(f"dedup_ids must be a list of str, not {type(dedup_ids).__name__}")
    ids = [check_dedup_id(d, "dedup_ids[]") for d in dedup_ids]
    if len(ids) != count:
        raise ValueError(f"dedup_ids must hold one id per item: {len(ids)} ids for {count} items")
    return ids
