"""The settings of a broker; ``pigeon serve``'s options take their defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pigeon._net import DEFAULT_PEER_TIMEOUT
from pigeon.options import DEFAULT_LEASE, DEFAULT_MAX_DELIVERIES, DEFAULT_PORT

if TYPE_CHECKING:  # `pigeon serve`'s options read the defaults without loading the broker
    from pigeon.server.core import Store

__all__ = ["ServerConfig"]

_REPLY_OVERHEAD = 64 * 1024  # output kept free beside one reply (PINGs, other replies)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    max_frame_size: int = 16 * 2**20
    heartbeat: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # seconds without a byte from a client before closing it
    peer_timeout: float = DEFAULT_PEER_TIMEOUT  # a peer acknowledging nothing this long: gone
    max_pending_output: int = 64 * 2**20  # bytes of replies waiting for a slow client
    max_unacked_bytes: int = 64 * 2**20  # per connection: unacked deliveries it may hold
    max_connections: int = 10_000
    max_queues: int = 10_000
    max_dedup_ids: int = 1_000_000  # remembered across all queues, each for its window
    max_parked_bytes_per_connection: int = 64 * 2**20
    max_parked_bytes: int = 256 * 2**20
    max_parked_gets_per_connection: int = 65_536
    max_parked_gets: int = 262_144
    auth_failure_delay: float = 1.0
    max_unauthenticated: int = 64  # per address: connections that have not logged in
    store_timeout: float = 5.0  # seconds a reply may wait for the store before it is refused
    http: str | None = None  # HOST:PORT of the HTTP side door (metrics, health, dashboard)
    name: str = "pigeon"
    default_lease: float = DEFAULT_LEASE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    store: Store | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
