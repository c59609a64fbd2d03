"""asyncio framed stream.

# Strategy:
# A ``BufferedProtocol`` lends the event loop one reusable ``bytearray`` (``get_buffer``),
# so the kernel writes straight into it (``recv_into``); ``buffer_updated`` feeds the
# filled part to the codec's decoder and queues whole frames. When more than
# ``max_pending`` frames wait unread, reading is paused (TCP flow control pushes back on
# the sender) and resumed as ``recv`` takes them. Writes go to the transport with
# ``writelines`` (vectored, no join) and ``send`` waits for the transport's buffer to
# drain below its high-water mark, like ``StreamWriter.drain``.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, cast

from pigeon.errors import BrokenResourceError, ClosedResourceError, FrameError
from pigeon.framing import Codec, LengthPrefixed
from pigeon.framing._base import Buffer
from pigeon.streams._common import RECV_SIZE, tune

__all__ = ["FramedStream", "open_framed_connection", "start_framed_server"]


class _FramedProtocol(asyncio.BufferedProtocol):
    def __init__(self, codec: Codec, max_pending: int) -> None:
        self.codec = codec
        self.decoder = codec.decoder()
        self.frames: deque[bytes] = deque()
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        self.max_pending = max_pending
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self.readable: asyncio.Event = asyncio.Event()
        self.writable: asyncio.Event = asyncio.Event()
        self.writable.set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune(sock)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        try:
            self.frames.extend(self.decoder.feed(self.view[:nbytes]))
        except FrameError as exc:
            self._fail(exc)
            return
        if self.decoder.error is not None:
            self._fail(self.decoder.error)
            return
        if self.frames:
            self.readable.set()
            if len(self.frames) >= self.max_pending and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        try:
            self.decoder.close()
        except FrameError as exc:
            self.error = exc
        self.readable.set()
        return True  # keep our write side open: this is a half-close

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.readable.set()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None and not self.eof:
            self.error = BrokenResourceError(f"connection lost: {exc}")
            self.error.__cause__ = exc
        self.eof = True
        self.readable.set()
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class FramedStream:
    """Frames over an asyncio transport.

    Make one with ``open_framed_connection`` or receive them from
    ``start_framed_server``. ``recv()`` returns ``None`` at a clean end of stream and
    raises ``IncompleteFrame`` if the peer stopped mid-frame, ``FrameTooLarge`` if a
    header passed the codec's limit (the connection is then aborted), and
    ``BrokenResourceError`` if the connection broke.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _FramedProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    @property
    def codec(self) -> Codec:
        return self._protocol.codec

    @property
    def bytes_received(self) -> int:
        return self._protocol.bytes_received

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)

    async def __aenter__(self) -> FramedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedResourceError("this FramedStream was closed")
        if self._transport.is_closing():
            raise BrokenResourceError("the connection is closed; cannot send")

    async def send(self, payload: Buffer) -> None:
        """Send one frame; waits while the transport's write buffer is full."""
        self._check_writable()
        self._transport.writelines(self.codec.encode_parts(payload))
        await self._drain()

    async def send_many(self, payloads: Iterable[Buffer]) -> None:
        """Send many frames in one vectored write."""
        self._check_writable()
        parts: list[Buffer] = []
        encode = self.codec.encode_parts
        for p in payloads:
            parts += encode(p)
        self._transport.writelines(parts)
        await self._drain()

    def send_nowait(self, payload: Buffer) -> None:
        """Queue one frame for sending without waiting for the buffer to drain."""
        self._check_writable()
        self._transport.writelines(self.codec.encode_parts(payload))

    async def _drain(self) -> None:
        p = self._protocol
        if not p.writable.is_set():
            await p.writable.wait()
        if p.error is not None and isinstance(p.error, BrokenResourceError):
            raise p.error

    async def recv(self) -> bytes | None:
        """The next frame, or ``None`` once the peer has finished sending."""
        if self._closed:
            raise ClosedResourceError("this FramedStream was closed")
        p = self._protocol
        while not p.frames:
            if p.error is not None:
                raise p.error
            if p.eof:
                return None
            p.readable.clear()
            await p.readable.wait()
        frame = p.frames.popleft()
        if p.reading_paused and len(p.frames) < p.max_pending // 2:
            p.reading_paused = False
            self._transport.resume_reading()
        return frame

    def __aiter__(self) -> FramedStream:
        return self

    async def __anext__(self) -> bytes:
        frame = await self.recv()
        if frame is None:
            raise StopAsyncIteration
        return frame

    async def shutdown_write(self) -> None:
        """Half-close: flush, then send FIN. ``recv`` keeps working until the peer closes."""
        self._check_writable()
        await self._drain()
        if self._transport.can_write_eof():
            self._transport.write_eof()

    async def aclose(self) -> None:
        """Close the connection and wait until the transport has let go of the socket."""
        if not self._closed:
            self._closed = True
            self._transport.close()
        await self._protocol.closed

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data (RST)."""
        self._closed = True
        self._transport.abort()


async def open_framed_connection(
    host: str | None = None,
    port: int | None = None,
    codec: Codec | None = None,
    *,
    path: str | None = None,
    sock: socket.socket | None = None,
    max_pending: int = 4096,
    ssl: Any = None,
) -> FramedStream:
    """Connect over TCP (``host``, ``port``), a Unix socket (``path``) or a given ``sock``.

    ``ssl``: an ``ssl.SSLContext`` for TLS over TCP.
    """
    loop = asyncio.get_running_loop()
    the_codec = codec if codec is not None else LengthPrefixed()

    def factory() -> _FramedProtocol:
        return _FramedProtocol(the_codec, max_pending)

    try:
        if path is not None:
            transport, protocol = await loop.create_unix_connection(factory, path)
        elif sock is not None:
            transport, protocol = await loop.create_connection(factory, sock=sock)
        else:
            if host is None or port is None:
                raise ValueError("give host and port, path, or sock")
            transport, protocol = await loop.create_connection(factory, host, port, ssl=ssl)
    except OSError as exc:
        where = path or f"{host}:{port}"
        raise BrokenResourceError(f"cannot connect to {where}: {exc}") from exc
    return FramedStream(transport, protocol)


async def start_framed_server(
    handler: Callable[[FramedStream], Awaitable[None]],
    host: str | None = "127.0.0.1",
    port: int = 0,
    codec: Codec | None = None,
    *,
    path: str | None = None,
    max_pending: int = 4096,
    reuse_address: bool = True,
) -> asyncio.Server:
    """Serve framed connections; ``handler`` runs as a task for each one.

    The connection is closed when ``handler`` returns (or raises).
    """
    loop = asyncio.get_running_loop()
    the_codec = codec if codec is not None else LengthPrefixed()
    tasks: set[asyncio.Task[None]] = set()

    async def run(stream: FramedStream) -> None:
        try:
            await handler(stream)
        finally:
            await stream.aclose()

    class _ServerProtocol(_FramedProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transport = cast(asyncio.Transport, transport)
            task = loop.create_task(run(FramedStream(transport, self)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def factory() -> _FramedProtocol:
        return _ServerProtocol(the_codec, max_pending)

    if path is not None:
        return await loop.create_unix_server(factory, path)
    return await loop.create_server(factory, host, port, reuse_address=reuse_address)
