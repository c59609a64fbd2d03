"""What a Dramatiq message becomes on pigeon's broker, and back: pure functions, no I/O.

# Strategy:
# Dramatiq keeps everything about a message in its body (``Message.options``); pigeon's
# broker keeps what it acts on beside the body: a delay, a priority, a dedup id, headers.
# ``put_args`` splits a message into the body to store and the put's options; the options
# that are instructions to the broker (``dedup_id``) or travel beside the body
# (``headers``) leave the body, so the broker's copy is the only one (a retry, which
# re-enqueues the body it received, is not taken for a repeat of its dedup id, and the
# headers a consumer sees are those the broker delivered).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pigeon.errors import InvalidURL
from pigeon.protocol.rules import MAX_SECONDS

__all__ = [
    "BODY_FREE_OPTIONS",
    "PRIORITY_LEVELS",
    "PutArgs",
    "broker_url",
    "dead_reason",
    "delay_seconds",
    "pigeon_priority",
    "put_args",
    "queue_url",
]

PRIORITY_LEVELS = 10  # pigeon's priorities: 0 (lowest) to 9 (highest), higher first
# Message options that go to the broker beside the body, never inside it.
BODY_FREE_OPTIONS = ("dedup_id", "headers")
_SCHEMES = ("pigeon", "pigeon+tls")


def pigeon_priority(actor_priority: int, broker_priority: object = None) -> int:
    """pigeon's priority (0-9, higher first) for a message.

    ``broker_priority`` (a message option, as on Dramatiq's RabbitMQ broker: higher first)
    is taken as it is, and checked by ``put`` (an int from 0 to 9, else ``ValueError``).
    Otherwise the actor's ``priority`` (Dramatiq's: lower first, 0 by default) maps to
    ``9 - priority``, held within the ten levels: 0 -> 9, 1 -> 8, ..., 9 and above -> 0;
    a negative priority -> 9, as 0.
    """
    if broker_priority is not None:
        return broker_priority  # type: ignore[return-value]  # put() checks it
    return PRIORITY_LEVELS - 1 - min(max(actor_priority, 0), PRIORITY_LEVELS - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class PutArgs:
    """A message as pigeon stores it: the body's options, and the put's own."""

    options: dict[str, Any]
    delay: float | None
    priority: int
    dedup_id: str | None
    headers: dict[str, str] | None


def put_args(options: dict[str, Any], delay_ms: int | float | None, actor_priority: int) -> PutArgs:
    """Split a message's ``options`` and ``enqueue``'s ``delay`` (milliseconds) into the
    options its stored body keeps and the options of the put (``delay`` in seconds)."""
    body = {k: v for k, v in options.items() if k not in BODY_FREE_OPTIONS}
    return PutArgs(
        options=body,
        delay=delay_seconds(delay_ms),
        priority=pigeon_priority(actor_priority, options.get("broker_priority")),
        dedup_id=options.get("dedup_id"),
        headers=options.get("headers") or None,
    )


def delay_seconds(delay_ms: object) -> float | None:
    """``enqueue``'s ``delay`` (milliseconds) as the broker holds it (seconds; None: none).

    Raises:
        TypeError, ValueError: not a number of milliseconds from 0 to 366 days (the
            longest delay pigeon's broker holds).
    """
    if delay_ms is None:
        return None
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float):
        raise TypeError(f"delay must be a number of milliseconds, not {type(delay_ms).__name__}")
    if not 0 <= delay_ms <= MAX_SECONDS * 1000:  # NaN fails too
        raise ValueError(
            f"delay must be from 0 to {MAX_SECONDS * 1000:.0f} milliseconds (366 days, the "
            f"longest delay pigeon's broker holds), not {delay_ms!r}"
        )
    return delay_ms / 1000 if delay_ms else None


def broker_url(url: str) -> tuple[str, str, str]:
    """``(scheme, netloc, query)`` of a broker URL, ``pigeon://[TOKEN@]HOST[:PORT][?...]``.

    Raises:
        InvalidURL: another scheme, or a path (the queue names come from the actors).
    """
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise InvalidURL(
            f"{url!r} is not a pigeon:// or pigeon+tls:// URL; for Redis or RabbitMQ use "
            "dramatiq's own RedisBroker or RabbitmqBroker"
        )
    if parts.path not in ("", "/"):
        raise InvalidURL(
            f"{url!r} names a queue ({parts.path!r}): the broker URL is "
            f"{parts.scheme}://HOST:PORT, and each actor's queue_name names its queue"
        )
    return parts.scheme, parts.netloc, parts.query


def queue_url(scheme: str, netloc: str, query: str, name: str) -> str:
    """The URL of pigeon queue ``name`` on the broker ``scheme://netloc?query``."""
    params = urlencode(parse_qsl(query))
    return urlunsplit((scheme, netloc, "/" + quote(name, safe=":.-_"), params, ""))


def dead_reason(exc: BaseException | None) -> str:
    """Why a message was dead-lettered, as ``pigeon peek NAME.dead`` shows it."""
    if exc is None:
        return "rejected"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]
