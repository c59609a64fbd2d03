"""Socket options both ends of a pigeon connection set, and the kernel's view of a socket.

# Strategy:
# A peer that vanishes without a FIN or RST (a pulled cable, a frozen VM, a dead NAT
# entry) must be noticed in seconds. The broker PINGs every heartbeat, so its side of a
# connection is never idle and TCP keepalive alone would never probe: data that is not
# acknowledged is retransmitted instead, for about 15 minutes (``tcp_retries2``).
# ``TCP_USER_TIMEOUT`` bounds that: once sent data has gone unacknowledged for
# ``peer_timeout`` seconds the kernel closes the socket. The peer's *kernel* acknowledges
# even when its application does not read, so a slow consumer is never mistaken for a
# dead one. Keepalive covers the idle direction (a client blocked in a get sends
# nothing; its probes go unanswered and the same timeout closes it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

__all__ = ["DEFAULT_PEER_TIMEOUT", "is_loopback", "tcp_state", "tune_tcp"]

DEFAULT_PEER_TIMEOUT = 10.0  # seconds of unacknowledged data before a peer counts as gone
KEEPALIVE_IDLE = 5  # seconds without a packet before the first probe
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3

_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip


def tune_tcp(sock: socket.socket, peer_timeout: float = DEFAULT_PEER_TIMEOUT) -> None:
    """TCP_NODELAY, keepalive (probe after 5 s idle, 3 probes 2 s apart) and
    TCP_USER_TIMEOUT of ``peer_timeout`` seconds (0: the kernel's default) on a TCP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if peer_timeout > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(peer_timeout * 1000))


def tcp_state(sock: socket.socket | None) -> str:
    """The kernel's TCP state of ``sock`` (Linux TCP_INFO), or '-' where unknown."""
    if sock is None or not hasattr(socket, "TCP_INFO") or sock.family == socket.AF_UNIX:
        return "-"
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return "-"
    return _TCP_STATES.get(info[0], str(info[0]))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
