"""Blocking framed socket.

# Strategy:
# One reusable ``bytearray`` per socket receives with ``recv_into``; each chunk goes to the
# codec's decoder, which returns whole frames; frames wait in a deque until ``recv``
# takes them. ``send_many`` hands header and payload buffers to ``sendmsg`` together, so
# many small frames leave in one syscall without joining them first (and the Nagle
# delay CPython's multiprocessing.connection hit, issue 20540, cannot happen).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable
from types import TracebackType

from pigeon.errors import BrokenResourceError, ClosedResourceError
from pigeon.framing import Codec, LengthPrefixed
from pigeon.framing._base import Buffer
from pigeon.streams._common import IOV_MAX, RECV_SIZE, tune

__all__ = ["FramedSocket", "connect"]


def _is_tls(sock: socket.socket) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)


class FramedSocket:
    """Frames over a connected blocking socket.

    Args:
        sock: a connected stream socket; the ``FramedSocket`` owns it from now on.
            Its timeout (``sock.settimeout``) applies to ``send`` and ``recv``.
        codec: how frames are cut; ``LengthPrefixed()`` by default.

    ``recv()`` returns ``None`` at a clean end of stream. It raises ``IncompleteFrame`` if
    the peer closed mid-frame, ``BrokenResourceError`` if the connection broke (reset),
    ``TimeoutError`` if the socket's timeout ran out.
    """

    def __init__(self, sock: socket.socket, codec: Codec | None = None) -> None:
        self.sock = sock
        self.codec: Codec = codec if codec is not None else LengthPrefixed()
        self._decoder = self.codec.decoder()
        self._frames: deque[bytes] = deque()
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._eof = False
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.recv_calls = 0
        # TLS sockets have no sendmsg: their frames are joined and sent with sendall.
        self._vectored = hasattr(sock, "sendmsg") and not _is_tls(sock)
        tune(sock)

    def __enter__(self) -> FramedSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("this FramedSocket was closed")

    def send(self, payload: Buffer) -> None:
        """Send one frame; returns when the kernel has taken all of it."""
        self._sendv(self.codec.encode_parts(payload))

    def send_many(self, payloads: Iterable[Buffer]) -> None:
        """Send many frames with as few syscalls as the kernel allows (one, usually)."""
        parts: list[Buffer] = []
        encode = self.codec.encode_parts
        for p in payloads:
            parts += encode(p)
        self._sendv(parts)

    def _sendv(self, parts: list[Buffer]) -> None:
        self._check_open()
        if not self._vectored:
            data = b"".join(parts)
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise BrokenResourceError(
                    f"peer closed the connection while sending: {exc}"
                ) from exc
            self.bytes_sent += len(data)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        i = 0
        try:
            while i < len(views):
                sent = self.sock.sendmsg(views[i : i + IOV_MAX])
                self.bytes_sent += sent
                while sent:
                    n = views[i].nbytes
                    if sent >= n:
                        sent -= n
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BrokenResourceError(f"peer closed the connection while sending: {exc}") from exc

    def recv(self) -> bytes | None:
        """The next frame, or ``None`` once the peer has finished sending (clean EOF)."""
        self._check_open()
        frames = self._frames
        while not frames:
            if self._decoder.error is not None:
                raise self._decoder.error
            if self._eof:
                return None
            try:
                n = self.sock.recv_into(self._buf)
                self.recv_calls += 1
            except ConnectionResetError as exc:
                raise BrokenResourceError(f"connection reset by peer: {exc}") from exc
            if n == 0:
                self._eof = True
                self._decoder.close()  # IncompleteFrame if the peer stopped mid-frame
                return None
            self.bytes_received += n
            frames.extend(self._decoder.feed(self._view[:n]))
        return frames.popleft()

    def __iter__(self) -> FramedSocket:
        return self

    def __next__(self) -> bytes:
        frame = self.recv()
        if frame is None:
            raise StopIteration
        return frame

    def shutdown_write(self) -> None:
        """Half-close: send FIN. The peer's ``recv`` sees EOF; ours keeps working."""
        self._check_open()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # already reset by the peer
            raise BrokenResourceError(f"cannot half-close: {exc}") from exc

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self._view.release()
            self.sock.close()


def connect(
    host: str, port: int, codec: Codec | None = None, timeout: float | None = None
) -> FramedSocket:
    """Open a TCP connection and wrap it in a ``FramedSocket``."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise BrokenResourceError(f"cannot connect to {host}:{port}: {exc}") from exc
    return FramedSocket(sock, codec)
