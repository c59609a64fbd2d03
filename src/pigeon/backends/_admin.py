"""What the engine backends' administration shares (``pigeon peek | purge | delete |
move`` on redis:// and nats://): the checks of its arguments and the shape of a peeked
message, the same as ``BrokerQueue.peek``'s."""

from __future__ import annotations

from typing import Any

from pigeon.protocol.rules import MAX_ITEMS

__all__ = ["ADMIN_BATCH", "PEEK_BYTES", "check_move", "check_peek", "shown_message"]

ADMIN_BATCH = 1000  # messages one purge or move step handles (one script, one round)
PEEK_BYTES = 16 * 2**20  # payload bytes one peek returns at most (at least one message)


def check_peek(max_items: Any) -> int:
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
    if not 1 <= max_items <= MAX_ITEMS:
        raise ValueError(f"max_items must be from 1 to {MAX_ITEMS}, not {max_items}")
    return max_items


def check_move(source: str, queue: Any, limit: Any) -> int | None:
    """``move_to``'s target (a queue name) and ``limit`` (None: all, else an int >= 1)."""
    if not isinstance(queue, str) or not queue or "/" in queue:
        raise ValueError(f"move_to needs a queue name on the same server, not {queue!r}")
    if queue == source:
        raise ValueError(f"cannot move the messages of {source!r} to itself")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None (all), not {limit!r}")
    return limit


def shown_message(
    ser: Any,
    mid: Any,
    delivery_count: int,
    payload: bytes,
    age: float,
    origin: str,
    reason: str,
    priority: int,
    headers: dict[str, str],
) -> dict[str, Any]:
    """One peeked message: the keys of ``BrokerQueue.peek`` (``body`` None when the
    payload does not decode)."""
    try:
        body = ser.loads(payload)
    except Exception:
        body = None
    return {
        "id": mid,
        "delivery_count": delivery_count,
        "payload": payload,
        "body": body,
        "age": round(age, 3),
        "origin": origin,
        "reason": reason,
        "priority": priority,
        "headers": headers,
    }
