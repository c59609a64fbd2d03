"""A message as the broker holds it: its payload and options (``Stored``, ``Extra``) and a
delivery in flight (``InFlight``). msgspec Structs, kept in a module of their own because the
broker's other modules may be compiled by mypyc (hatch_build.py), and a compiled module
keeps a class's annotations only as plain types, which msgspec cannot decode by.
"""

from __future__ import annotations

import msgspec

__all__ = ["Extra", "InFlight", "Stored"]


class Extra(msgspec.Struct, array_like=True, gc=False):
    """What a message put with options carries besides its payload (kept by the stores
    as it is; the times are wall-clock seconds since the epoch, so they survive a
    restart)."""

    priority: int = 0
    due: float = 0.0  # not to be taken before (0: at once)
    expires: float = 0.0  # dead-lettered as ``expired`` if still waiting then (0: never)
    headers: dict[str, str] | None = None


class Stored(msgspec.Struct, gc=False):
    """A message the broker holds (a msgspec Struct, like ``InFlight``: one is made per
    message put). Never tracked by the garbage collector (``gc=False``; msgspec already
    leaves out one whose fields are all atomic, this covers those with an ``Extra``): bytes,
    numbers, strings and an ``Extra`` make no reference cycle."""

    id: int
    payload: bytes
    deliveries: int = 0  # how many times it was handed out (from this queue)
    enqueued: float = 0.0  # broker clock when it entered its queue (for its age)
    origin: str = ""  # a dead letter: the queue it died in
    reason: str = ""  # a dead letter: max_deliveries, rejected, undecodable, expired
    extra: Extra | None = None  # priority, delay, expiry, headers (None: a plain message)

    @property
    def priority(self) -> int:
        return self.extra.priority if self.extra is not None else 0


class InFlight(msgspec.Struct, gc=False):
    """A message handed out with manual ack, until it is settled or its lease ends. A
    msgspec Struct, not a dataclass: one is made per message delivered, and a Struct is
    made about four times faster (70 ns against 280 ns here). Untracked by the garbage
    collector, like ``Stored``: it refers to a ``Stored`` and numbers, no cycle (tracked,
    the hundred made per batch GET set off a young-generation collection every few batches)."""

    msg: Stored
    conn: int
    deadline: float
