"""The range of every number and name on the wire, checked once, for broker and clients.

A message can decode (the right types) and still be nonsense: a NaN lease, a wait of
minus one second, ``max_items`` of 2**40. The broker answers such a request with
``ERROR bad_request`` naming the field and its range, and keeps the connection; the
clients check the same rules before sending (and on URL options), so a mistake is a
``ValueError`` at the call that made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from typing import Any

__all__ = [
    "DEDUP_ID_BYTES",
    "DEFAULT_DEDUP_WINDOW",
    "HEADERS_BYTES",
    "HEADER_KEY_BYTES",
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_HEADERS",
    "MAX_ITEMS",
    "MAX_PRIORITY",
    "MAX_QUEUE_NAME",
    "MAX_REASON",
    "MAX_REQ",
    "MAX_SECONDS",
    "check_seconds",
    "options_problem",
    "problem",
    "queue_name_problem",
]

MAX_SECONDS = 366 * 86400.0  # a wait, lease or delay longer than a year is a mistake
MAX_ITEMS = 10_000  # messages one GET may ask for
MAX_BATCH = 100_000  # payloads in one PUT_BATCH, ids in one ACK/NACK/EXTEND
MAX_COUNT = 2**31 - 1  # TASK_DONE count, max_deliveries
MAX_REQ = 2**63 - 1  # request ids: 1 .. 2**63 - 1
MAX_ID = 2**64 - 1  # delivery ids: unsigned 64-bit
MAX_QUEUE_NAME = 200  # code points
MAX_PRIORITY = 9  # priorities are 0 (the default) to 9, higher first
DEDUP_ID_BYTES = 256  # a dedup id: 1 to 256 bytes of UTF-8
MAX_HEADERS = 64  # entries in a message's headers
HEADER_KEY_BYTES = 256  # bytes of UTF-8 in a header's name
HEADERS_BYTES = 16 * 1024  # bytes of names and values in a message's headers
DEFAULT_DEDUP_WINDOW = 300.0  # seconds a queue remembers a dedup id
MAX_REASON = 500  # characters in a NACK's reason (kept with each dead letter it makes)


def seconds_problem(
    name: str, value: Any, *, nil: bool, positive: bool = False, zero: str = ""
) -> str | None:
    """Why ``value`` is not a usable number of seconds for field ``name`` (or None).
    ``zero``: what 0 means, when it means something else than no time (a ttl's none)."""
    if value is None:
        return None if nil else f"{name} must be a number of seconds, not nil"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number of seconds, not {value!r}"
    low = "more than 0" if positive else f"from 0 ({zero})" if zero else "from 0"
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok or value > MAX_SECONDS:
        return (
            f"{name} must be a finite number of seconds {low} to {MAX_SECONDS:.0f}"
            f"{' or nil' if nil else ''}, not {value!r}"
        )
    return None


def int_problem(name: str, value: Any, low: int, high: int, *, nil: bool = False) -> str | None:
    if value is None:
        return None if nil else f"{name} must be an integer, not nil"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer from {low} to {high}, not {value!r}"
    if not low <= value <= high:
        return f"{name} must be an integer from {low} to {high}, not {value}"
    return None


def queue_name_problem(name: str) -> str | None:
    if (
        0 < len(name) <= MAX_QUEUE_NAME
        and name.isprintable()
        and not any(c.isspace() for c in name)
    ):
        return None
    return (
        f"invalid queue name {name[:40]!r}: 1 to {MAX_QUEUE_NAME} printable characters "
        "(code points), no whitespace"
    )


def _ids_problem(ids: list[int]) -> str | None:
    if not 1 <= len(ids) <= MAX_BATCH:
        return f"ids must hold 1 to {MAX_BATCH} delivery ids, not {len(ids)}"
    if min(ids) >= 1 and max(ids) <= MAX_ID:
        return None
    for i in ids:
        if not 1 <= i <= MAX_ID:
            return f"delivery ids are integers from 1 to {MAX_ID}, not {i}"
    return None


def _dedup_problem(name: str, value: str) -> str | None:
    if 0 < len(value.encode("utf-8", "surrogatepass")) <= DEDUP_ID_BYTES:
        return None
    return f"{name} must be 1 to {DEDUP_ID_BYTES} bytes of UTF-8, not {len(value.encode())}"


def options_problem(o: Any) -> str | None:
    """What is out of range in a PUT's options (or None)."""
    if o.delay and (bad := seconds_problem("delay", o.delay, nil=False)):
        return bad
    # On the wire a ttl of 0 is none (the default); pigeon's put() takes None for none
    # and refuses 0 (DESIGN.md: ttl > 0), before anything is sent.
    if o.ttl and (bad := seconds_problem("ttl", o.ttl, nil=False, zero="none")):
        return bad
    if o.dedup_id and (bad := _dedup_problem("dedup_id", o.dedup_id)):
        return bad
    if o.priority and (bad := int_problem("priority", o.priority, 0, MAX_PRIORITY)):
        return bad
    if o.headers:
        if len(o.headers) > MAX_HEADERS:
            return f"headers may hold at most {MAX_HEADERS} entries, not {len(o.headers)}"
        total = 0
        for k, v in o.headers.items():
            n = len(k.encode("utf-8", "surrogatepass"))
            if not 0 < n <= HEADER_KEY_BYTES:
                return f"headers: a name must be 1 to {HEADER_KEY_BYTES} bytes of UTF-8, not {n}"
            total += n + len(v.encode("utf-8", "surrogatepass"))
        if total > HEADERS_BYTES:
            return f"headers must hold at most {HEADERS_BYTES} bytes, not {total}"
    return None


def _put(m: Any) -> str | None:
    if m.wait and (bad := seconds_problem("wait", m.wait, nil=True)):
        return bad
    return options_problem(m.options) if m.options is not None else None


def _put_batch(m: Any) -> str | None:
    if not 1 <= len(m.payloads) <= MAX_BATCH:
        return f"payloads must hold 1 to {MAX_BATCH} items, not {len(m.payloads)}"
    if m.dedup_ids is not None:
        if len(m.dedup_ids) != len(m.payloads):
            return (f"dedup_ids must hold one id per payload: {len(m.dedup_ids)} for "
                    f"{len(m.payloads)}")  # fmt: skip
        for d in m.dedup_ids:
            if bad := _dedup_problem("dedup_ids[]", d):
                return bad
    if m.options is not None and m.options.dedup_id:
        return "a PUT_BATCH's options carry no dedup_id: send dedup_ids, one per payload"
    return _put(m)


def _get(m: Any) -> str | None:
    return (
        int_problem("max_items", m.max_items, 1, MAX_ITEMS)
        or (seconds_problem("wait", m.wait, nil=True) if m.wait else None)
        or (
            seconds_problem("lease", m.lease, nil=True, positive=True)
            if m.lease is not None
            else None
        )
    )


# message type name -> the checks of its fields (each returns a problem or None)
_RULES: dict[str, Callable[[Any], str | None]] = {
    "Put": _put,
    "PutBatch": _put_batch,
    "Get": _get,
    "Ack": lambda m: _ids_problem(m.ids),
    "Nack": lambda m: (
        _ids_problem(m.ids)
        or seconds_problem("delay", m.delay, nil=False)
        or (
            f"reason must be at most {MAX_REASON} characters, not {len(m.reason)}"
            if len(m.reason) > MAX_REASON
            else None
        )
    ),
    "Extend": lambda m: _ids_problem(m.ids) or seconds_problem("seconds", m.seconds, nil=False),
    "Declare": lambda m: (
        int_problem("maxsize", m.maxsize, 0, 2**63 - 1, nil=True)
        or seconds_problem("lease", m.lease, nil=True, positive=True)
        or int_problem("max_deliveries", m.max_deliveries, 1, MAX_COUNT, nil=True)
        or seconds_problem("dedup_window", m.dedup_window, nil=True)
    ),
    "TaskDone": lambda m: int_problem("count", m.count, 1, MAX_COUNT),
    "Peek": lambda m: int_problem("max_items", m.max_items, 1, MAX_ITEMS),
    "Move": lambda m: (
        queue_name_problem(m.to)
        or ("to must name another queue" if m.to == m.queue else None)
        or int_problem("limit", m.limit, 1, MAX_COUNT, nil=True)
    ),
    "Join": lambda m: seconds_problem("wait", m.wait, nil=True),
}


def problem(msg: Any, known: Container[str] = ()) -> str | None:
    """What is out of range in a decoded request (req, queue name, numbers), or None.
    Names in ``known`` (queues that exist) were checked when they were made."""
    req = getattr(msg, "req", None)
    if req is not None and not 1 <= req <= MAX_REQ:
        return f"req must be an integer from 1 to {MAX_REQ}, not {req}"
    name = getattr(msg, "queue", None)
    if name is not None and name not in known and (bad := queue_name_problem(name)):
        return bad
    rule = _RULES.get(type(msg).__name__)
    return rule(msg) if rule is not None else None


def check_seconds(name: str, value: float | None, *, positive: bool = False) -> float | None:
    """``value`` as a client option, or ValueError naming the option and the range."""
    bad = seconds_problem(name, value, nil=True, positive=positive)
    if bad:
        raise ValueError(bad)
    return None if value is None else float(value)
