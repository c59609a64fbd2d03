"""The options of a queue handle (``QueueOptions``) and of one put (``PutOptions``),
and every default, defined once for every backend.

Queue options: ``pigeon.Queue(url, maxsize=0, serializer=None, *, lease=None,
max_deliveries=None, dedup_window=None, reconnect_timeout=30, connect_timeout=10)``;
every backend builds them with ``QueueOptions.from_url`` - the one place that reads
``?lease=``, ``?max_deliveries=`` and ``?dedup_window=`` from the URL (a keyword given
wins over the URL) and checks every value - and keeps them as ``q.options``.

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
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pigeon import _otel
from pigeon.errors import InvalidURL
from pigeon.protocol.messages import PutOptions
from pigeon.protocol.rules import (
    DEDUP_ID_BYTES,
    DEFAULT_DEDUP_WINDOW,
    HEADER_KEY_BYTES,
    HEADERS_BYTES,
    MAX_COUNT,
    MAX_HEADERS,
    MAX_PRIORITY,
    check_seconds,
    int_problem,
    seconds_problem,
)
from pigeon.serializers import get_serializer

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_PORT",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_SERIALIZER",
    "LOCAL_SERIALIZER",
    "PutOptions",
    "QueueOptions",
    "check_dedup_ids",
    "check_maxsize",
    "count_option",
    "number_option",
    "put_options",
    "seconds_option",
    "url_query",
]

log = logging.getLogger("pigeon.options")

DEFAULT_PORT = 7878  # the broker's
DEFAULT_LEASE = 30.0  # seconds before an unsettled message is redelivered
DEFAULT_MAX_DELIVERIES = 20  # deliveries before a message goes to NAME.dead
DEFAULT_RECONNECT_TIMEOUT = 30.0  # seconds a networked handle retries a lost connection
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect and be welcomed
DEFAULT_SERIALIZER = "msgpack"  # of a networked queue: any language can read it
LOCAL_SERIALIZER = "pickle"  # of a local queue: Python on both sides


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

    @classmethod
    def from_url(
        cls,
        url: str | None,
        maxsize: int = 0,
        serializer: Any = None,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        dedup_window: float | None = None,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    ) -> QueueOptions:
        """The options of a handle on ``url`` (None: a local queue), as ``pigeon.Queue``
        takes them, checked. ``lease``, ``max_deliveries`` and ``dedup_window`` come from
        the keyword, else from the URL's ``?lease=``, ``?max_deliveries=``,
        ``?dedup_window=``, else None (the queue's own setting); other URL options are
        the backend's (``?db=``, ``?wait=``, ...) and left to it. ``serializer`` None is
        ``"msgpack"`` (``"pickle"`` for a local queue). ``reconnect_timeout`` None is 0
        (no retry), ``connect_timeout`` None its default.

        Raises:
            ValueError: a keyword out of range or of the wrong type (naming it and its
                range); ``TypeError`` for a serializer that is neither a name nor an
                object with ``dumps`` and ``loads``.
            InvalidURL: a URL option that is not a number or out of range.
        """
        query = url_query(url)
        if serializer is None:
            serializer = LOCAL_SERIALIZER if url is None else DEFAULT_SERIALIZER
        get_serializer(serializer)  # a name it knows, or an object with dumps and loads
        return cls(
            check_maxsize(maxsize),
            serializer,
            seconds_option("lease", lease, query, url),
            count_option("max_deliveries", max_deliveries, query, url),
            seconds_option("dedup_window", dedup_window, query, url, positive=False),
            check_seconds("reconnect_timeout", reconnect_timeout) or 0.0,
            check_seconds("connect_timeout", connect_timeout, positive=True)
            or DEFAULT_CONNECT_TIMEOUT,
        )


def check_maxsize(maxsize: object) -> int:
    """``maxsize`` as every backend takes it: an int >= 0 (0: unbounded)."""
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
        raise ValueError(f"maxsize must be an int >= 0 (0 for no limit), not {maxsize!r}")
    return maxsize


# --- one option, from a keyword or a URL ---------------------------------------------------
# A keyword given wins; a bad one is a ValueError. A URL's is text: a bad one is
# InvalidURL, naming the URL. Backends read their own URL options (``?db=``,
# ``?wait_timeout=``, ``?replicas=``) through the same functions (``QueueURL``).


def url_query(url: str | None) -> dict[str, str]:
    """A URL's ``?NAME=VALUE`` options, the last of each name ({} for no URL)."""
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()} if url else {}


def number_option(
    name: str, query: Mapping[str, str], url: str | None, default: float | None = None
) -> float | None:
    """The URL's ``?name=`` as a number, else ``default``."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidURL(f"{name}={raw!r} in {url!r} is not a number") from None


def seconds_option(
    name: str, given: Any, query: Mapping[str, str], url: str | None,
    default: float | None = None, *, positive: bool = True,
) -> float | None:  # fmt: skip
    """A duration: ``given``, else ``?name=``, else ``default``; finite, from 0 (above 0
    if ``positive``) to a year."""
    if given is not None:
        if bad := seconds_problem(name, given, nil=False, positive=positive):
            raise ValueError(bad)
        return float(given)
    value = number_option(name, query, url)
    if value is None:
        return default
    if bad := seconds_problem(name, value, nil=False, positive=positive):
        raise InvalidURL(f"{bad} (in {url!r})")
    return value


def count_option(
    name: str, given: Any, query: Mapping[str, str], url: str | None, default: int | None = None
) -> int | None:
    """A count (1 to 2**31 - 1): ``given``, else ``?name=``, else ``default``."""
    if given is not None:
        if bad := int_problem(name, given, 1, MAX_COUNT):
            raise ValueError(bad)
        return int(given)
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value: int | None = int(raw)
    except ValueError:
        value = None
    if value is None or int_problem(name, value, 1, MAX_COUNT):
        raise InvalidURL(
            f"{name} must be an integer from 1 to {MAX_COUNT}, not {raw!r} (in {url!r})"
        )
    return value


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    """A put's duration: TypeError for a wrong type, ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if bad := seconds_problem(name, value, nil=False, positive=positive):
        raise ValueError(bad)
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
