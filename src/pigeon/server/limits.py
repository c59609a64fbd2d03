"""The broker's limits, each defined once: what a queue gets when it declares nothing,
and how much one connection or the whole broker may hold. ``ServerConfig`` extends this
(``pigeon serve``'s options take their defaults from it); ``BrokerState`` reads it. Here,
not in ``server/core``: the CLI reads the defaults without loading the broker."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pigeon.options import DEFAULT_LEASE, DEFAULT_MAX_DELIVERIES

__all__ = ["Limits"]

_REPLY_OVERHEAD = 64 * 1024  # output kept free beside one reply (PINGs, other replies)


@dataclass
class Limits:
    default_lease: float = DEFAULT_LEASE  # of a queue that declares none
    max_deliveries: int = DEFAULT_MAX_DELIVERIES  # of a queue that declares none
    max_frame_size: int = 16 * 2**20
    max_pending_output: int = 64 * 2**20  # bytes of replies waiting for a slow client
    # Bytes delivered to one connection and not yet settled: beyond this a consumer gets
    # no more until it acks (its GETs wait), so one slow consumer cannot hoard the queue
    # or make the broker hold unbounded unacked payloads for it.
    max_unacked_bytes: int = 64 * 2**20
    max_queues: int = 10_000
    # Dedup ids remembered, across all queues: each costs memory and a live entry in the
    # store for its whole window (up to a year): a put with new ones beyond this is
    # refused, as a full queue is, never stored with its id forgotten early.
    max_dedup_ids: int = 1_000_000
    max_parked_bytes_per_connection: int = 64 * 2**20  # PUTs waiting for room
    max_parked_bytes: int = 256 * 2**20
    # GETs waiting for a message: each costs memory and a place in its queue's line
    max_parked_gets_per_connection: int = 65_536
    max_parked_gets: int = 262_144

    def __post_init__(self) -> None:
        """Each number made the type it is declared (the settings of ``ServerConfig`` too),
        so a broker configured from Python with ``64e6`` or ``20.0`` gets what ``pigeon
        serve`` would: the broker's modules may be compiled, and compiled code refuses a
        float where it reads an int. A count that is not whole is an error, said here."""
        for f in fields(self):
            if f.type in ("int", "float"):
                setattr(self, f.name, _number(f.name, getattr(self, f.name), f.type == "int"))

    @property
    def max_reply_bytes(self) -> int:
        """Bytes one DELIVER may carry - payloads, headers and per-message framing: no more
        than a frame the broker would accept, and no more than the output a slow client
        may leave waiting, less room for what else is on its way to it. A put of a message
        larger than this is refused (``too_large``): no reply could carry it."""
        limit = self.max_frame_size
        if self.max_pending_output:
            room = max(self.max_pending_output - _REPLY_OVERHEAD, self.max_pending_output // 2)
            limit = min(limit, room)
        return limit


def _number(name: str, value: Any, whole: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"the broker setting {name} must be a number, not {value!r}")
    if not whole:
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"the broker setting {name} must be a whole number, not {value!r}")
        return int(value)
    return value
