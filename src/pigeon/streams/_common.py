"""Socket details shared by the blocking and asyncio streams."""

from __future__ import annotations

import socket

# recv_into this many bytes at a time; one buffer per stream, reused.
RECV_SIZE = 256 * 1024
# sendmsg takes at most IOV_MAX buffers per call on Linux.
IOV_MAX = 1024


def tune(sock: socket.socket) -> None:
    """Set TCP_NODELAY on TCP sockets: frames are already coalesced by ``send_many``."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
