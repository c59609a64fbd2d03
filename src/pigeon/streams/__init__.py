"""Where bytes meet sockets: framed streams over any ``pigeon.framing`` codec.

* ``FramedSocket``: blocking, over a ``socket.socket`` (TCP, Unix, socketpair).
* ``FramedStream``: asyncio, over a transport, with ``recv_into`` buffers.

Both share one shape: ``send(payload)``, ``send_many(payloads)`` (one syscall for many
small frames), ``recv()`` returning the next payload or ``None`` at a clean end of
stream (``IncompleteFrame`` if the stream ended mid-frame), ``shutdown_write()`` for a
half-close after which ``recv()`` keeps working until the peer closes, and ``close()``.
"""

from __future__ import annotations

from pigeon.streams.aio import FramedStream, open_framed_connection, start_framed_server
from pigeon.streams.sync import FramedSocket, connect

__all__ = [
    "FramedSocket",
    "FramedStream",
    "connect",
    "open_framed_connection",
    "start_framed_server",
]
