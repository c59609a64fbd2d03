"""Socket options both ends of a pigeon connection set, and the kernel's view of a socket.

# Strategy:
# A peer that vanishes without a FIN or RST (a pulled cable, a frozen VM, a dead NAT
# entry) must be noticed in seconds. The broker PINGs every heartbeat, so its side of a
# connection is never idle and TCP keepalive alone would never probe: data that is not
# acknowledged is retransmitted instead, for about 15 minutes (``tcp_retries2``).
# A client sets ``TCP_USER_TIMEOUT``: once data it sent has gone unacknowledged for
# ``peer_timeout`` seconds its kernel closes the socket. The broker cannot: since Linux
# 5.x that timeout also ends a connection whose peer keeps its receive window closed
# (a consumer that is only slow to read: its kernel answers every window probe), so a
# busy consumer would lose its connection and its messages. The broker asks the kernel
# instead (``peer_silence``, TCP_INFO) how long its data has waited for any
# acknowledgement, and drops the peer itself past ``peer_timeout``. Keepalive covers the
# idle direction (a client blocked in a get sends nothing; its probes go unanswered).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

__all__ = ["DEFAULT_PEER_TIMEOUT", "is_loopback", "peer_silence", "tcp_state", "tune_tcp"]

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
    TCP_USER_TIMEOUT of ``peer_timeout`` seconds (0: none, the kernel's default) on a TCP
    socket."""
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


# struct tcp_info (linux/tcp.h): u8 tcpi_probes (window or keepalive probes unanswered)
# at 3, u32 tcpi_unacked (segments in flight) at 24, u32 tcpi_last_ack_recv (milliseconds
# since the peer last acknowledged anything) at 56.
_TCP_INFO_LEN = 60


def peer_silence(sock: socket.socket | None) -> float:
    """Seconds the peer's TCP stack has left this side's data (or window probes)
    unanswered: 0 while anything is acknowledged - a peer that does not read but keeps
    its window closed still answers - or while nothing waits for an answer. 0 where the
    kernel does not say (not Linux, not TCP)."""
    if sock is None or not hasattr(socket, "TCP_INFO") or sock.family == socket.AF_UNIX:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0.0
    if len(info) < _TCP_INFO_LEN:
        return 0.0
    (unacked,) = struct.unpack_from("=I", info, 24)
    # Data in flight is retransmitted until acknowledged: the time since the last
    # acknowledgement is the silence. With nothing in flight (a closed window, or idle),
    # probes are sent with a growing back-off (up to two minutes apart) and a live peer
    # answers each: one unanswered probe may just be on its way, two in a row are not.
    if not unacked and info[3] < 2:
        return 0.0
    (last_ack,) = struct.unpack_from("=I", info, 56)
    return float(last_ack) / 1000.0


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
