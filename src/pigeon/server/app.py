"""The broker's I/O shell: one asyncio event loop around ``server.state.Broker``.

# Strategy:
# Each connection is a ``BufferedProtocol``: the kernel writes into one reusable buffer,
# the first byte picks the mode (0x00, the top byte of a binary frame's length header:
# binary; anything else: the text mode for humans), and a framing decoder cuts frames.
# Binary frames are decoded by ``pigeon.protocol`` and applied to the sans-IO broker; its
# replies are encoded and written to whichever connections they are for. Before HELLO a
# connection may only send small frames and must finish within ``handshake_timeout``.
# Time enters the broker through one timer set to its next deadline. Nothing here
# blocks: the loop only parses, applies and writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pigeon.errors import FrameError, FrameTooLarge, RemoteProtocolError
from pigeon.framing import Delimited, LengthPrefixed
from pigeon.protocol import (
    MAGIC,
    VERSION,
    Error,
    Get,
    Goodbye,
    Hello,
    Info,
    Ok,
    Ping,
    Put,
    ServerCodec,
    Shutdown,
    Stats,
    Welcome,
)
from pigeon.protocol.wire import encode_frame, encode_message
from pigeon.server.state import Broker, Out, Store

log = logging.getLogger("pigeon.server")
_LENGTH = struct.Struct(">I")

DEFAULT_PORT = 7878
HANDSHAKE_MAX_FRAME = 64 * 1024
_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    max_frame_size: int = 16 * 2**20
    heartbeat: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # seconds without a byte from a client before closing it
    max_pending_output: int = 64 * 2**20  # bytes of replies waiting for a slow client
    max_auth_failures: int = 10  # per peer address and minute, then refused for a minute
    max_unacked_bytes: int = 64 * 2**20  # per connection: unacked deliveries it may hold
    max_connections: int = 10_000
    name: str = "pigeon"
    default_lease: float = 30.0
    max_deliveries: int = 20
    store: Store | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tcp_state(sock: socket.socket | None) -> str:
    """The kernel's TCP state of ``sock`` (Linux TCP_INFO), or '-' where unknown."""
    if sock is None or not hasattr(socket, "TCP_INFO") or sock.family == socket.AF_UNIX:
        return "-"
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return "-"
    return _TCP_STATES.get(info[0], str(info[0]))


def keepalive(sock: socket.socket) -> None:
    """Notice an unplugged peer within about 11 s: probe after 5 s idle, 3 probes 2 s apart."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class Connection(asyncio.BufferedProtocol):
    """One client connection, binary or text."""

    def __init__(self, server: BrokerServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        # Small until the client proves itself: 10,000 silent connections cost 40 MiB.
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.last_rx = time.monotonic()
        self.mode = "?"  # "binary", "text", or "?" until the first byte
        self.pending = bytearray()  # an unfinished HELLO
        self.decoder: Any = None
        self.codec = ServerCodec()
        self.welcomed = False
        self.opened = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer = "-"
        self.client_name = ""
        self.closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
        if len(self.server.connections) >= self.server.config.max_connections:
            log.warning(
                "refusing %s: max_connections=%d reached",
                self.peer,
                self.server.config.max_connections,
            )
            transport.write(encode_frame(Error(0, "limit", "too many connections; try later")))
            transport.close()
            return
        self.server.connections[self.id] = self
        self.server.broker.connection_made(self.id)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.server.config.handshake_timeout, self._handshake_expired
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        self.last_rx = time.monotonic()
        data: Any = self.view[:nbytes]
        if self.mode == "?":
            self._pick_mode(data[0])
        if self.mode == "binary" and not self.welcomed:
            data = self._handshake(data)
            if not data:
                return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._protocol_error(str(exc))
            return
        for frame in frames:
            if self.closing:
                return
            if self.mode == "binary":
                self._binary(frame)
            else:
                self._text(frame.rstrip(b"\r"))
        if self.decoder.error is not None and not self.closing:
            self._protocol_error(str(self.decoder.error))

    def eof_received(self) -> bool:
        # The client half-closed: it sends nothing more. Answer what it sent, then close.
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.view.release()
        server = self.server
        if server.connections.pop(self.id, None) is not None:
            server.apply(lambda: server.broker.connection_lost(self.id))
        self.server.closed_connection(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests (backpressure).
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- modes ----------------------------------------------------------------------------

    def _pick_mode(self, first: int) -> None:
        if first == 0:
            self.mode = "binary"
            self.pending = bytearray()
            limit = self.server.config.max_frame_size
            self.decoder = LengthPrefixed(4, max_frame_size=limit).decoder()
        else:
            self.mode = "text"
            self.decoder = Delimited(b"\n", max_length=64 * 1024).decoder()
            if self._handshake_timer is not None and not self.server.config.token:
                self._handshake_timer.cancel()
                self.welcomed = True
                self._grow_buffer()

    def _handshake(self, data: memoryview) -> bytes | None:
        """Cut out the HELLO frame (at most 64 KiB, checked on its header); return the bytes
        that followed it, for the full decoder, once the client is welcomed."""
        pending = self.pending
        pending += data
        if len(pending) < 4:
            return None
        (size,) = _LENGTH.unpack_from(pending)
        if size > HANDSHAKE_MAX_FRAME:
            self._protocol_error(str(FrameTooLarge(size, HANDSHAKE_MAX_FRAME)) + " before HELLO")
            return None
        if len(pending) < 4 + size:
            return None
        body, rest = bytes(pending[4 : 4 + size]), bytes(pending[4 + size :])
        self.pending = bytearray()
        self._binary(body)
        return rest if self.welcomed and not self.closing else None

    def _grow_buffer(self) -> None:
        """A welcomed client gets a 64 KiB receive buffer (takes effect at the next read)."""
        if len(self.buf) < 65536:
            self.buf = bytearray(65536)
            self.view = memoryview(self.buf)

    def send(self, message: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        # Header and body go out as two buffers: a large delivery is not copied just to
        # put four bytes in front of it (uvloop writes them with one writev).
        body = encode_message(message)
        self.bytes_out += 4 + len(body)
        self.transport.writelines((_LENGTH.pack(len(body)), body))
        limit = self.server.config.max_pending_output
        if limit and self.transport.get_write_buffer_size() > limit:
            # A consumer that does not read: drop it rather than buffer without bound.
            # Its unacked messages go back to the queue when the connection is lost.
            log.warning("dropping %s: %d bytes wait to be sent (max_pending_output=%d)",
                        self.peer, self.transport.get_write_buffer_size(), limit)  # fmt: skip
            self.transport.abort()

    def write_text(self, line: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = (line.encode() if isinstance(line, str) else line) + b"\r\n"
        self.bytes_out += len(data)
        self.transport.write(data)

    def _protocol_error(self, message: str) -> None:
        log.warning("closing %s: protocol error: %s", self.peer, message)
        if self.mode == "text":
            self.write_text(f"-ERR protocol: {message}")
        else:
            self.send(Error(0, "protocol", message))
        self.close_gracefully()

    def close_gracefully(self) -> None:
        """Stop reading, flush what is queued, half-close, then close."""
        self.closing = True
        t = self.transport
        if t is None or t.is_closing():
            return
        t.pause_reading()
        if t.can_write_eof():
            t.write_eof()
        t.close()

    def _handshake_expired(self) -> None:
        if not self.welcomed:
            log.warning(
                "closing %s: no HELLO within %.0f s",
                self.peer,
                self.server.config.handshake_timeout,
            )
            self._protocol_error("handshake not completed in time")

    # --- binary ---------------------------------------------------------------------------

    def _binary(self, body: bytes) -> None:
        try:
            msg = self.codec.decode(body)
        except RemoteProtocolError as exc:
            self._protocol_error(str(exc))
            return
        if not self.welcomed:
            self._hello(msg)
            return
        if isinstance(msg, Goodbye):
            self.close_gracefully()
            return
        if isinstance(msg, Hello):
            self._protocol_error("HELLO sent twice")
            return
        if isinstance(msg, Stats):
            self.send(Ok(msg.req, self.server.stats()))
            return
        server = self.server
        server.apply(lambda: server.broker.handle(self.id, msg, server.now()))

    def _hello(self, msg: Any) -> None:
        if not isinstance(msg, Hello):
            self._protocol_error(f"expected HELLO first, got {type(msg).__name__}")
            return
        if msg.magic != MAGIC or msg.version != VERSION:
            self._protocol_error(
                f"unsupported protocol {msg.magic!r} version {msg.version}; "
                f"this broker speaks {MAGIC!r} version {VERSION}"
            )
            return
        if not self.server.check_token(msg.token, self.peer):
            self.send(Error(0, "auth", "authentication failed: wrong or missing token"))
            self.close_gracefully()
            return
        self.welcomed = True
        self._grow_buffer()
        self.client_name = msg.client[:100]
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        cfg = self.server.config
        self.send(Welcome(VERSION, cfg.name, cfg.heartbeat, cfg.max_frame_size))

    # --- text -----------------------------------------------------------------------------

    def _text(self, line: bytes) -> None:
        try:
            text = line.decode()
        except UnicodeDecodeError:
            self._protocol_error("lines must be UTF-8 text")
            return
        cmd, _, rest = text.strip().partition(" ")
        cmd = cmd.upper()
        if not cmd:
            return
        if not self.welcomed:
            if self.server.check_token(rest.strip() if cmd == "AUTH" else None, self.peer):
                self.welcomed = True
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                self.write_text("+OK")
            else:
                self.write_text("-ERR auth: send AUTH <token> first")
            return
        handler = _TEXT_COMMANDS.get(cmd)
        if handler is None:
            self.write_text(f"-ERR unknown command {cmd!r}; try HELP")
            return
        handler(self, rest)

    def _text_request(self, msg: Any, reply: Callable[[Any], None]) -> None:
        server = self.server
        server.text_waiters[(self.id, msg.req)] = reply
        server.apply(lambda: server.broker.handle(self.id, msg, server.now()))


def _text_put(c: Connection, rest: str) -> None:
    queue, _, data = rest.partition(" ")
    if not queue:
        c.write_text("-ERR usage: PUT <queue> <text>")
        return
    c._text_request(Put(c.server.next_req(), queue, data.encode()), lambda r: c.write_text("+OK"))


def _text_get(c: Connection, rest: str) -> None:
    parts = rest.split()
    if not parts:
        c.write_text("-ERR usage: GET <queue> [wait seconds]")
        return
    try:
        wait = float(parts[1]) if len(parts) > 1 else 0.0
    except ValueError:
        c.write_text(f"-ERR wait must be a number of seconds, not {parts[1]!r}")
        return

    def reply(r: Any) -> None:
        payload: bytes = r.messages[0].payload
        try:
            text = payload.decode()
            if text.isprintable():
                c.write_text("+" + text)
                return
        except UnicodeDecodeError:
            pass
        c.write_text("$" + base64.b64encode(payload).decode())

    c._text_request(Get(c.server.next_req(), parts[0], 1, wait), reply)


def _text_qsize(c: Connection, rest: str) -> None:
    c._text_request(
        Info(c.server.next_req(), rest.strip() or "-"),
        lambda r: c.write_text(f":{r.value['depth']}"),
    )


def _text_shutdown(c: Connection, rest: str) -> None:
    c._text_request(
        Shutdown(c.server.next_req(), rest.strip() or "-"), lambda r: c.write_text("+OK")
    )


def _text_stats(c: Connection, rest: str) -> None:
    c.write_text("+" + json.dumps(c.server.stats(), separators=(",", ":")))


def _text_ping(c: Connection, rest: str) -> None:
    c.write_text("+PONG")


def _text_quit(c: Connection, rest: str) -> None:
    c.write_text("+BYE")
    c.close_gracefully()


def _text_help(c: Connection, rest: str) -> None:
    for line in (
        "+commands (one per line, \\r\\n or \\n):",
        "+  PUT <queue> <text>       put the text as one item",
        "+  GET <queue> [seconds]    take one item (+text, or $base64 for binary)",
        "+  QSIZE <queue>            items waiting",
        "+  SHUTDOWN <queue>         shut the queue down",
        "+  STATS                    broker statistics as JSON",
        "+  PING | HELP | QUIT",
    ):
        c.write_text(line)


_TEXT_COMMANDS: dict[str, Callable[[Connection, str], None]] = {
    "PUT": _text_put,
    "GET": _text_get,
    "QSIZE": _text_qsize,
    "SHUTDOWN": _text_shutdown,
    "STATS": _text_stats,
    "PING": _text_ping,
    "QUIT": _text_quit,
    "HELP": _text_help,
}


class BrokerServer:
    """``pigeon serve``: accept connections and run the broker on this event loop."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.broker = Broker(
            self.config.store,
            clock=loop.time,
            default_lease=self.config.default_lease,
            default_max_deliveries=self.config.max_deliveries,
            max_unacked_bytes=self.config.max_unacked_bytes,
        )
        self.connections: dict[int, Connection] = {}
        self.text_waiters: dict[tuple[int, int], Callable[[Any], None]] = {}
        self._held: deque[tuple[int, list[Out]]] = deque()
        self._ids = 0
        self._req = 1 << 40  # request ids the server makes for text-mode commands
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.Server | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.failed_auth = 0
        self._auth_failures: dict[str, list[float]] = {}
        self.started = time.time()

    def now(self) -> float:
        return self.loop.time()

    def next_req(self) -> int:
        self._req += 1
        return self._req

    async def start(self) -> None:
        cfg = self.config
        if not is_loopback(cfg.host) and not cfg.token and not cfg.extra.get("insecure_no_auth"):
            raise PermissionError(
                f"refusing to listen on {cfg.host}, which is not a loopback address, without "
                "a token: pass --token (clients then need it too), or --insecure-no-auth if "
                "the network is trusted"
            )

        def factory() -> Connection:
            self._ids += 1
            return Connection(self, self._ids)

        loop = self.loop

        def committed(batch: int) -> None:
            loop.call_soon_threadsafe(self._committed, batch)

        self.broker.store.start(committed)
        self._server = await self.loop.create_server(
            factory,
            cfg.host,
            cfg.port,
            reuse_address=True,
            backlog=1024,
            ssl=cfg.extra.get("ssl"),
        )
        self._heartbeat_task = self.loop.create_task(self._heartbeats())
        log.info("pigeon broker listening on %s", ", ".join(self.addresses))

    @property
    def addresses(self) -> list[str]:
        assert self._server is not None
        out = []
        for s in self._server.sockets:
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def check_token(self, token: str | None, peer: str) -> bool:
        expected = self.config.token
        if not expected:
            return True
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        recent = [t for t in self._auth_failures.get(host, []) if now - t < 60]
        if len(recent) >= self.config.max_auth_failures:
            log.warning("refusing %s: %d failed authentications in the last minute",
                        peer, len(recent))  # fmt: skip
            self.failed_auth += 1
            return False  # even the right token: the address is cooling down
        ok = token is not None and hmac.compare_digest(token.encode(), expected.encode())
        if not ok:
            self.failed_auth += 1
            recent.append(now)
            log.warning("failed authentication from %s (%d so far)", peer, self.failed_auth)
        self._auth_failures[host] = recent
        if len(self._auth_failures) > 10_000:
            self._auth_failures.clear()
        return ok

    def apply(self, fn: Callable[[], list[Out]]) -> None:
        """Run a broker call; send its replies now, or once the store has committed the
        changes they report (a confirmed put is a durable put)."""
        store = self.broker.store
        before = store.changes
        outs = fn()
        # Compare change counts, not batch tags: changes that join a batch already
        # pending leave the tag as it was, and their replies must wait all the same.
        if store.holds_replies and store.changes != before and store.committed < store.last_tag:
            self._held.append((store.last_tag, outs))
            self._arm()
            return
        self.dispatch(outs)

    def _committed(self, batch: int) -> None:
        held = self._held
        while held and held[0][0] <= batch:
            self.dispatch(held.popleft()[1])

    def dispatch(self, outs: list[Out]) -> None:
        """Send the broker's replies, and re-arm the timer for its next deadline."""
        for conn_id, msg in outs:
            waiter = self.text_waiters.pop((conn_id, getattr(msg, "req", -1)), None)
            c = self.connections.get(conn_id)
            if c is None:
                continue
            if waiter is not None:
                if isinstance(msg, Error):
                    c.write_text(f"-{msg.code.upper()} {msg.message}")
                else:
                    waiter(msg)
            elif c.mode == "binary":
                c.send(msg)
        self._arm()

    def _arm(self) -> None:
        deadline = self.broker.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = None
        self.apply(lambda: self.broker.tick(self.now()))

    async def _heartbeats(self) -> None:
        nonce = 0
        idle = self.config.idle_timeout
        while True:
            await asyncio.sleep(min(self.config.heartbeat, idle))
            nonce += 1
            now = time.monotonic()
            for c in list(self.connections.values()):
                if idle and now - c.last_rx > idle and not c.closing:
                    log.info("closing %s: idle for %.0f s", c.peer, now - c.last_rx)
                    if c.mode == "text":
                        c.write_text(f"-ERR idle for more than {idle:.0f} s")
                    else:
                        c.send(Error(0, "idle", f"no request for more than {idle:.0f} s"))
                    c.close_gracefully()
                elif c.welcomed and c.mode == "binary":
                    c.send(Ping(nonce))

    def stats(self) -> dict[str, Any]:
        out = self.broker.stats()
        out["server"] = {
            "name": self.config.name,
            "addresses": self.addresses if self._server else [],
            "uptime": round(time.time() - self.started, 3),
            "connections": len(self.connections),
            "failed_auth": self.failed_auth,
            "store": type(self.broker.store).__name__,
        }
        out["connections"] = [
            {
                "id": c.id,
                "peer": c.peer,
                "client": c.client_name,
                "mode": c.mode,
                "age": round(time.time() - c.opened, 3),
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "tcp_state": tcp_state(
                    c.transport.get_extra_info("socket") if c.transport else None
                ),
            }
            for c in self.connections.values()
        ]
        return out

    def closed_connection(self, c: Connection) -> None:
        for key in [k for k in self.text_waiters if k[0] == c.id]:
            del self.text_waiters[key]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, say GOODBYE and half-close every connection, wait, then close."""
        if self._server is not None:
            self._server.close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        deadline = time.monotonic() + grace
        while self._held and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # confirmations waiting for the store's commit
        for c in list(self.connections.values()):
            if c.mode == "binary" and c.welcomed:
                c.send(Goodbye("broker stopping"))
            elif c.mode == "text":
                c.write_text("-ERR broker stopping")
            c.close_gracefully()
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections.values()):
            if c.transport is not None:
                c.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
        self.broker.store.close()


def run(config: ServerConfig, ready: Callable[[BrokerServer], None] | None = None) -> None:
    """Run a broker until SIGINT or SIGTERM; then stop gracefully and return (exit 0)."""
    import signal

    async def main() -> None:
        server = BrokerServer(config)
        await server.start()
        if ready is not None:
            ready(server)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: finishing in-flight requests and closing connections")
        await server.stop()

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if sys.platform == "win32":  # pragma: no cover
        runner = asyncio.run
    runner(main())
