"""What a kombu message asks of pigeon's broker, sans-IO: no socket, no thread, no kombu.

# Strategy:
# The transport stores kombu's whole message envelope (body, headers, properties) as one
# opaque payload, so every header round-trips exactly, whatever its type. What the broker
# must act on is read from the envelope once, at the put: Celery's ``eta`` header (a
# countdown becomes one too) is a broker-held ``delay``, the ``priority`` property a pigeon
# priority, a ``dedup_id`` property (``apply_async(dedup_id=...)``) the put's ``dedup_id``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pigeon.protocol.rules import MAX_PRIORITY, MAX_SECONDS

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_RECONNECT_TIMEOUT",
    "MAX_SECONDS",
    "check_lease",
    "check_reconnect_timeout",
    "eta_delay",
    "pigeon_priority",
    "put_options",
    "queue_name",
    "queue_url",
]

# The lease each delivery is taken with; the transport extends it every third of it
# while the worker holds the message, so it bounds only how long a frozen worker (its
# process stopped, its TCP connection still answered by the kernel) keeps a task.
DEFAULT_LEASE = 60.0

# How long the transport's own calls retry a lost connection: not at all (one new
# connection at once), so kombu's and Celery's retry policies decide, as on kombu's
# other transports (a put: task_publish_retry_policy; a worker: broker_connection_retry).
DEFAULT_RECONNECT_TIMEOUT = 0.0


def check_lease(value: object) -> float:
    """The ``lease`` transport option, checked: seconds, > 0, at most 366 days."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_SECONDS
    ):
        raise ValueError(
            f"the pigeon transport's lease must be a number of seconds from more than 0 to "
            f"{MAX_SECONDS:.0f}, not {value!r}"
        )
    return float(value)


def check_reconnect_timeout(value: object) -> float:
    """The ``reconnect_timeout`` transport option, checked: seconds, >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_SECONDS
    ):
        raise ValueError(
            f"the pigeon transport's reconnect_timeout must be a number of seconds from 0 "
            f"to {MAX_SECONDS:.0f}, not {value!r}"
        )
    return float(value)


def eta_delay(eta: object, now: float) -> float | None:
    """Seconds from ``now`` (a Unix time) to Celery's ``eta`` header, or None when it is
    absent, unreadable or already due.

    An eta without a UTC offset is read both ways, as UTC and as local time, and the
    earlier wins: the broker never holds a task past the time the worker would run it
    (the worker waits out the rest, as it always did). A delay beyond the broker's range
    (366 days) is held for that long, and the worker holds the rest.
    """
    if not isinstance(eta, str) or not eta:
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None  # Celery itself refuses it when the task arrives
    if when.tzinfo is None:
        due = min(when.replace(tzinfo=UTC).timestamp(), when.timestamp())
    else:
        due = when.timestamp()
    delay = due - now
    if not math.isfinite(delay) or delay <= 0:
        return None
    return min(delay, float(MAX_SECONDS))


def pigeon_priority(priority: object, top: int | None) -> int | None:
    """Celery's ``priority`` on a queue whose scale is 0 … ``top`` (its ``x-max-priority``,
    9 when the queue declares none) as pigeon's 0 … 9, higher first (as on RabbitMQ).

    The scale is cut in ten equal bands, so 0 … 9 maps to itself and 0 … 255 maps
    0-25 to 0, 26-51 to 1, ..., 231-255 to 9. Values outside the scale are clamped to it; None,
    non-numbers and 0 are no priority (pigeon's default, 0).
    """
    if isinstance(priority, bool) or not isinstance(priority, int | float):
        return None
    if not math.isfinite(priority):
        return None
    scale = top if top and top > 0 else MAX_PRIORITY
    p = min(max(int(priority), 0), scale)
    mapped = p * (MAX_PRIORITY + 1) // (scale + 1)
    return mapped or None


def put_options(
    message: Mapping[str, Any], now: float, top: int | None
) -> dict[str, float | int | str]:
    """The ``put`` keyword arguments a kombu message envelope asks for."""
    opts: dict[str, float | int | str] = {}
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    if isinstance(headers, Mapping) and (delay := eta_delay(headers.get("eta"), now)):
        opts["delay"] = delay
    if isinstance(properties, Mapping):
        if (priority := pigeon_priority(properties.get("priority"), top)) is not None:
            opts["priority"] = priority
        dedup_id = properties.get("dedup_id")
        if dedup_id is not None:
            if not isinstance(dedup_id, str) or not dedup_id:
                raise TypeError(f"dedup_id must be a non-empty str, not {dedup_id!r}")
            opts["dedup_id"] = dedup_id
    return opts


def queue_name(queue: str, virtual_host: str | None) -> str:
    """The pigeon queue for kombu's ``queue``: a virtual host other than ``/`` prefixes
    the name (``pigeon://host:7878/app1`` puts queue ``celery`` in ``app1:celery``)."""
    vhost = (virtual_host or "/").strip("/")
    return f"{vhost}:{queue}" if vhost else queue


def queue_url(
    host: str,
    port: int,
    queue: str,
    *,
    token: str | None = None,
    tls: bool = False,
    cafile: str | None = None,
    insecure: bool = False,
) -> str:
    """The ``pigeon://`` URL of one queue (the token and the name quoted)."""
    auth = f":{quote(token, safe='')}@" if token else ""
    params = []
    if cafile:
        params.append(f"cafile={quote(cafile, safe='')}")
    if insecure:
        params.append("insecure=1")
    query = f"?{'&'.join(params)}" if params else ""
    scheme = "pigeon+tls" if tls else "pigeon"
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{auth}{netloc}:{port}/{quote(queue, safe='')}{query}"
