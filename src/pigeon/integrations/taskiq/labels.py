"""What a taskiq message's labels ask of the broker: sans-IO, no taskiq import.

taskiq carries everything about one call in its labels (``task.kicker().with_labels(...)``,
``@broker.task(**labels)``), stringified on the way (``taskiq.labels.prepare_label``).
``placement(task_id, task_name, labels, names)`` reads the few that pigeon's broker acts
on and returns the options of the put.

# Strategy:
# The label names are the ones taskiq's own brokers read - ``delay`` (taskiq-aio-pika;
# what SmartRetryMiddleware sets on a retry), ``priority`` (taskiq-aio-pika's
# ``label_for_priority``), ``queue_name`` (taskiq-redis and taskiq-aio-pika route by it) -
# plus ``dedup_id`` for pigeon's unique puts; each name can be changed (``LabelNames``).
# A label the broker cannot honour as written raises ``ValueError`` naming it: taskiq's
# kicker turns that into ``SendTaskError``. taskiq-aio-pika's ``parse_val`` turns an
# unparsable delay into no delay at all; a silent immediate run is what this refuses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pigeon.protocol.rules import (
    DEDUP_ID_BYTES,
    HEADER_KEY_BYTES,
    HEADERS_BYTES,
    MAX_HEADERS,
    MAX_PRIORITY,
    MAX_SECONDS,
)

__all__ = ["RETRY_LABELS", "LabelNames", "Placement", "placement"]

# The labels taskiq sets on a message it sends again: SimpleRetryMiddleware and
# SmartRetryMiddleware count ``_retries``, ``Context.requeue()`` counts ``X-Taskiq-requeue``.
# Each keeps every other label, a dedup id included: the attempt number goes into the
# pigeon dedup id, or the broker would take the retry for a repeat and store nothing.
RETRY_LABELS = ("_retries", "X-Taskiq-requeue")

# Room kept in the headers for what pigeon adds (the W3C trace context, pigeon._otel).
_HEADER_ROOM_ENTRIES = 4
_HEADER_ROOM_BYTES = 1024


@dataclass(frozen=True, slots=True)
class LabelNames:
    """The labels the broker reads; change one where an app already uses the name."""

    delay: str = "delay"
    priority: str = "priority"
    dedup_id: str = "dedup_id"
    queue: str = "queue_name"


@dataclass(frozen=True, slots=True)
class Placement:
    """The put one message asks for. ``queue`` None: the broker's own queue."""

    queue: str | None = None
    delay: float | None = None
    priority: int | None = None
    dedup_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def placement(
    task_id: str, task_name: str, labels: Mapping[str, Any], names: LabelNames = LabelNames()
) -> Placement:
    """The put that ``labels`` ask for. Raises ``ValueError`` for a label the broker
    cannot honour as written (the message names the label and its value)."""
    return Placement(
        queue=_queue(labels.get(names.queue), names.queue),
        delay=_delay(labels.get(names.delay), names.delay),
        priority=_priority(labels.get(names.priority), names.priority),
        dedup_id=_dedup_id(labels, names.dedup_id),
        headers=mirror(task_id, task_name, labels),
    )


def mirror(task_id: str, task_name: str, labels: Mapping[str, Any]) -> dict[str, str]:
    """The message's headers, for tools that never decode the body (``pigeon peek``, a
    dead letter): ``task_id``, ``task_name`` and, when they fit the broker's header
    bounds, the labels as strings. The task always reads its labels from the body."""
    ids = {"task_id": str(task_id), "task_name": str(task_name)}
    rest = {str(k): str(v) for k, v in labels.items() if str(k) not in ids and v is not None}
    if _fits({**rest, **ids}):
        return {**rest, **ids}
    return ids


def _fits(headers: dict[str, str]) -> bool:
    if len(headers) > MAX_HEADERS - _HEADER_ROOM_ENTRIES:
        return False
    size = 0
    for k, v in headers.items():
        nk = len(k.encode("utf-8", "surrogatepass"))
        if not 0 < nk <= HEADER_KEY_BYTES:
            return False
        size += nk + len(v.encode("utf-8", "surrogatepass"))
    return size <= HEADERS_BYTES - _HEADER_ROOM_BYTES


def _number(value: Any, label: str, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"label {label!r} must be {what}, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label {label!r} must be {what}, not {value!r}") from None
    return number


def _delay(value: Any, label: str) -> float | None:
    if value is None or value == "":
        return None
    what = f"a number of seconds from 0 to {MAX_SECONDS:.0f}"
    seconds = _number(value, label, what)
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"label {label!r} must be {what}, not {value!r}")
    return seconds or None


def _priority(value: Any, label: str) -> int | None:
    if value is None or value == "":
        return None
    what = f"an integer from 0 to {MAX_PRIORITY} (pigeon's priorities; higher runs first)"
    number = _number(value, label, what)
    if not number.is_integer() or not 0 <= number <= MAX_PRIORITY:
        raise ValueError(f"label {label!r} must be {what}, not {value!r}")
    return int(number)


def _dedup_id(labels: Mapping[str, Any], label: str) -> str | None:
    value = labels.get(label)
    if value is None or value == "":
        return None
    parts = [str(value)]
    for name in RETRY_LABELS:
        count = labels.get(name)
        if count not in (None, "", "0", 0):
            parts.append(f"{name}={count}")
    key = "/".join(parts)
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > DEDUP_ID_BYTES:
        raise ValueError(
            f"label {label!r} makes a dedup id of {size} bytes (UTF-8, attempt number "
            f"included), more than {DEDUP_ID_BYTES}; use a shorter id, e.g. a hash"
        )
    return key


def _queue(value: Any, label: str) -> str | None:
    if value is None or value == "":
        return None
    return str(value)
