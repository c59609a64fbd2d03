"""The settings of a broker; ``pigeon serve``'s options take their defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pigeon._net import DEFAULT_PEER_TIMEOUT
from pigeon.options import DEFAULT_PORT
from pigeon.server.limits import Limits

if TYPE_CHECKING:  # `pigeon serve`'s options read the defaults without loading the broker
    from pigeon.server.core import Store

__all__ = ["ServerConfig"]


@dataclass
class ServerConfig(Limits):
    """The broker's limits (``Limits``: the broker itself takes them from this object)
    and the settings of its shell: where it listens, who may connect, its timers."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    heartbeat: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # seconds without a byte from a client before closing it
    peer_timeout: float = DEFAULT_PEER_TIMEOUT  # a peer acknowledging nothing this long: gone
    max_connections: int = 10_000
    auth_failure_delay: float = 1.0
    max_unauthenticated: int = 64  # per address: connections that have not logged in
    store_timeout: float = 5.0  # seconds a reply may wait for the store before it is refused
    http: str | None = None  # HOST:PORT of the HTTP side door (metrics, health, dashboard)
    name: str = "pigeon"
    store: Store | None = None
    extra: dict[str, Any] = field(default_factory=dict)
