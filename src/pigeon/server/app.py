"""The broker's I/O shell: one asyncio event loop around the sans-IO ``Broker``.

# Strategy:
# Connections (``server/connection.py``) decode requests and hand them to ``apply``,
# which runs them through the broker (``server/core/``) and sends the replies - at
# once, or, for changes the durable store must keep, once the store has committed them
# (a confirmed put is a stored put). Time enters the broker through one timer set to its
# next deadline. A connection that is draining closes when it owes no reply: none held
# for the store, none parked in the broker, no text reply waiting for its turn. Nothing
# here blocks: the loop only parses, applies and writes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, final

from pigeon import _compiled
from pigeon._net import is_loopback, peer_silence, tcp_state
from pigeon.options import DEFAULT_PORT
from pigeon.protocol import ClientMessage, Error, Get, Ok, Ping, Put, PutBatch, Stats
from pigeon.protocol.codes import Code
from pigeon.server.auth import Authenticator
from pigeon.server.commit_gate import CommitGate
from pigeon.server.config import ServerConfig
from pigeon.server.connection import Connection
from pigeon.server.core import Broker, Out, Store
from pigeon.server.listener import close_listener

__all__ = [
    "DEFAULT_PORT", "BrokerServer", "ServerConfig", "is_loopback", "raise_descriptor_limit", "run",
    "tcp_state",
]  # fmt: skip

log = logging.getLogger("pigeon.server")

_PUTS = (Put, PutBatch)
_TRIM_EVERY = 512  # closed connections between two malloc_trim calls (and every heartbeat)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


_malloc_trim = _find_malloc_trim()


@final  # compiled (pigeon/_compiled.py): Python code cannot subclass it
class BrokerServer:
    """``pigeon serve``: accept connections and run the broker on this event loop."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = cfg = config or ServerConfig()
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.broker = Broker(cfg.store, clock=loop.time, limits=cfg)
        self.auth = Authenticator(cfg.token, cfg.auth_failure_delay, cfg.max_unauthenticated)
        self.connections: dict[int, Connection] = {}
        # Every accepted connection until it is lost (TLS: until its handshake fails too).
        self._live: set[Connection] = set()
        self.gate = CommitGate(self.broker.store, time.monotonic)
        self._draining: set[Connection] = set()
        self._ids = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.started = time.time()
        self._closed_since_trim = 0
        self.http: Any = None  # the HttpSideDoor, with --http

    def now(self) -> float:
        return self.loop.time()

    # --- listening --------------------------------------------------------------------------

    def _check_exposure(self, token: str | None) -> None:
        """A broker reachable from other hosts needs a token: at start and at each reload.

        Raises:
            PermissionError: a non-loopback address and no token (nor --insecure-no-auth).
        """
        cfg = self.config
        if not is_loopback(cfg.host) and not token and not cfg.extra.get("insecure_no_auth"):
            raise PermissionError(
                f"refusing to listen on {cfg.host}, which is not a loopback address, without "
                "a token: pass --token (clients then need it too), or --insecure-no-auth if "
                "the network is trusted"
            )

    async def start(self) -> None:
        cfg = self.config
        self._check_exposure(cfg.token)
        loop = self.loop

        loop_thread = threading.get_ident()

        def committed(batch: int) -> None:
            if threading.get_ident() == loop_thread:
                self._committed(batch)
            else:
                loop.call_soon_threadsafe(self._committed, batch)

        store = self.broker.store
        if hasattr(store, "attach"):
            store.attach(loop)  # commits in this thread, once per turn of the loop
        store.start(committed)
        ssl = cfg.extra.get("ssl")
        factory: Callable[[], asyncio.BaseProtocol] = self._accept
        if ssl is not None:  # our own TLS layer: it keeps the half-close (server/tls.py)
            from pigeon.server.tls import TLSProtocol

            def factory() -> asyncio.BaseProtocol:
                c = self._accept()
                c.tls = TLSProtocol(ssl, c, cfg.handshake_timeout)
                return c.tls

        self._server = await loop.create_server(
            factory, cfg.host, cfg.port, reuse_address=True, backlog=1024
        )
        self._tasks = [loop.create_task(self._heartbeats()), loop.create_task(self._watch_store())]
        if cfg.peer_timeout > 0:
            self._tasks.append(loop.create_task(self._watch_peers()))
        self._arm()  # what came due while the broker was down (delays, ttls) is due now
        if cfg.http:
            from pigeon.server.http import HttpSideDoor, parse_address

            self.http = HttpSideDoor(self, *parse_address(cfg.http), cfg.token)
            await self.http.start()
        log.info(
            "pigeon broker listening on %s (%s)", ", ".join(self.addresses), _compiled.describe()
        )

    def _accept(self) -> Connection:
        """Made at accept, before any TLS handshake: the handshake timeout and the
        connection count start now."""
        self._ids += 1
        c = Connection(self, self._ids)
        cfg = self.config
        if len(self._live) >= cfg.max_connections:
            log.warning("refusing a connection: max_connections=%d reached", cfg.max_connections)
            c.refused = f"too many connections (max_connections={cfg.max_connections}); try later"
        self._live.add(c)
        # a TLS handshake that fails never reaches connection_made nor connection_lost
        c.start_timer(self.config.handshake_timeout + 1.0, lambda: self._live.discard(c))
        return c

    @property
    def addresses(self) -> list[str]:
        assert self._server is not None
        out = []
        # (typeshed says a tuple; uvloop gives a list, which a compiled build would refuse)
        sockets: Iterable[socket.socket] = getattr(self._server, "sockets")  # noqa: B009
        for s in sockets:
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    # --- connections ------------------------------------------------------------------------

    def connection_made(self, c: Connection) -> None:
        cfg = self.config
        if self.stopping:
            c.refused = "the broker is stopping; try again later"
        elif not c.refused and not c.admitted():
            c.refused = (
                f"{c.host} has {cfg.max_unauthenticated} connections that have not logged in "
                "yet; log in on those first"
            )
        if c.refused:  # told at its first byte, in its own mode; silence closes it
            c.start_timer(min(1.0, cfg.handshake_timeout), c.finish)
            return
        self.connections[c.id] = c
        self.broker.connection_made(c.id)
        c.start_timer(cfg.handshake_timeout, c.handshake_expired)

    def connection_lost(self, c: Connection) -> None:
        self._live.discard(c)
        self._draining.discard(c)
        self._closed_since_trim += 1
        if self._closed_since_trim >= _TRIM_EVERY:
            self._trim()
        if self.connections.pop(c.id, None) is not None:
            self.apply(lambda: self.broker.connection_lost(c.id))

    def drain(self, c: Connection) -> None:
        """``c`` sends nothing more: answer what it asked, then close it."""
        self._draining.add(c)
        if c.id in self.connections:
            self.apply(lambda: self.broker.drain(c.id))
        self.check_drained()

    def _owes(self, c: Connection) -> bool:
        """Does ``c`` still wait for a reply (held for the store, parked, or text)?"""
        return bool(self.broker.parked(c.id) or c.unanswered or self.gate.owes(c.id))

    def check_drained(self) -> None:
        """Close the draining connections that owe no reply any more."""
        for c in [c for c in self._draining if not self._owes(c)]:
            self._draining.discard(c)
            c.finish()

    # --- applying requests ------------------------------------------------------------------

    def refuse_writes(self) -> str | None:
        """Why new puts are refused now (the store has not committed for a while, or its
        disk is full and what room is left is for settles), or None."""
        store = self.broker.store
        if store.disk_full is not None:
            return store.disk_full
        stalled = store.stalled_for
        if stalled == float("inf"):  # broken: nothing is written any more
            why = getattr(store, "unwritten", lambda: None)() or "it broke"
            return (
                f"the broker's store failed ({why}); nothing was stored; the broker must be "
                "restarted once its disk is checked"
            )
        if stalled > 1.0:
            return (
                f"the broker's store has not been able to commit for {stalled:.0f} s (a busy or "
                "failing disk); nothing was stored; retry later"
            )
        return None

    def _no_room(self, msg: Put | PutBatch) -> str | None:
        """Why the disk has no room for this put (asked only while its room is low): a write
        larger than the disk's room would fail even in the reserve's, and every ack behind
        it would wait (review 7b #1)."""
        store = self.broker.store
        size = len(msg.payload) if isinstance(msg, Put) else sum(map(len, msg.payloads))
        return store.no_room_for(size)

    def _no_room_to_deliver(self) -> str | None:
        """Why a GET is refused on a full disk (review 7b #2): a delivery and its NACK
        free nothing, and the ack of a message smaller than its record frees less than it
        takes, so a loop of them would spend the room left and the next write would find
        none (a store retrying for ever); the room is kept for settling what is out."""
        out = sum(len(q.in_flight) for q in self.broker.queues.values())
        return self.broker.store.no_room_to_deliver(out)

    def read_begins(self) -> None:
        """A connection is about to handle what one read brought; ``read_done`` follows."""
        self.broker.store.flush_follows()

    def read_done(self) -> None:
        """A connection has handled what one read brought: the store writes the changes
        now, so the replies that wait for them go out in this turn of the loop (a turn
        later costs a sequential client ~60 us a put)."""
        self.broker.store.flush()

    def request(self, conn: int, msg: ClientMessage) -> None:
        """The one way in for a client's request (binary or text): applied by the broker,
        its replies sent now, or once the store has committed the changes they report (a
        confirmed put is a durable put)."""
        if isinstance(msg, Stats):  # the server's, not only the broker's
            self.dispatch([(conn, Ok(msg.req, self.stats()))])
        elif (
            isinstance(msg, _PUTS)
            and (why := self.refuse_writes() or (self.broker.store.room_low and self._no_room(msg)))
        ) or (
            self.broker.store.disk_full is not None
            and isinstance(msg, Get)
            and (why := self._no_room_to_deliver())
        ):
            self.dispatch([(conn, Error(msg.req, Code.UNAVAILABLE, why))])
        else:
            broker = self.broker
            before = broker.store.changes
            self._send_or_hold(before, broker.handle(conn, msg, self.loop.time()))

    def apply(self, fn: Callable[[], list[Out]]) -> None:
        """Run a broker call of the server's own (time, a connection lost or draining, a
        stop) and send its replies as ``request`` does."""
        before = self.broker.store.changes
        self._send_or_hold(before, fn())

    def _send_or_hold(self, changes_before: int, outs: list[Out]) -> None:
        if self.gate.hold(changes_before, outs):
            self._arm()
            return
        self.dispatch(outs)

    def _committed(self, batch: int) -> None:
        outs = self.gate.committed(batch)
        if outs:
            self.dispatch(outs)

    async def _watch_store(self) -> None:
        """Replies held longer than ``store_timeout`` for a store that cannot commit go out:
        confirmations of puts as ``unavailable`` (stored or not, nobody can say), the rest
        as they are (they lose nothing if the store never keeps them)."""
        limit = self.config.store_timeout
        while True:
            await asyncio.sleep(min(0.5, limit / 4))
            # What the store did commit first: after a pause of the whole process
            # (SIGSTOP, a suspended VM) this can run before the commit's own callback.
            outs = self.gate.committed(self.broker.store.committed)
            late = self.gate.overdue(limit)
            if late:
                log.error("store has not committed for %.1f s; answering held replies", limit)
            if outs or late:
                self.dispatch(outs + late)

    def dispatch(self, outs: list[Out]) -> None:
        """Send the broker's replies, and re-arm the timer for its next deadline."""
        connections = self.connections
        for conn_id, msg in outs:
            c = connections.get(conn_id)
            if c is not None:
                c.send(msg)  # a text connection renders it in its command's turn
        self._arm()
        if self._draining:
            self.check_drained()

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
        cfg = self.config
        idle = cfg.idle_timeout  # 0: never close an idle client
        while True:
            await asyncio.sleep(cfg.heartbeat)
            nonce += 1
            now = time.monotonic()
            if self._closed_since_trim:
                self._trim()
            for c in list(self.connections.values()):
                if c.draining:
                    continue
                if idle and now - c.last_rx > idle and not self.broker.busy(c.id):
                    log.info("closing %s: idle for %.0f s", c.peer, now - c.last_rx)
                    c.refuse(Code.IDLE, f"no request for more than {idle:.0f} s")
                elif c.welcomed and c.mode == "binary":
                    c.send(Ping(nonce))

    async def _watch_peers(self) -> None:
        """Drop a connection whose peer's TCP stack has stopped acknowledging anything for
        ``peer_timeout`` (a pulled cable, a frozen host): what it held goes back at once.
        A peer that only keeps its window closed - a consumer busy elsewhere - still
        acknowledges, and keeps its connection (see ``pigeon._net``)."""
        limit = self.config.peer_timeout
        while True:
            await asyncio.sleep(min(self.config.heartbeat, limit / 4))
            for c in list(self._live):
                silent = peer_silence(c.sock)
                if silent > limit and c.transport is not None:
                    log.warning("dropping %s: its TCP stack has acknowledged nothing for %.1f s "
                                "(peer_timeout=%.1f s)", c.peer, silent, limit)  # fmt: skip
                    c.transport.abort()

    def _trim(self) -> None:
        """Hand freed memory back to the system after connections closed: a burst of
        short connections (hostile or not) leaves the C heap full of free holes that
        glibc keeps (a flood of 2,000 left 24 MiB of RSS; trimmed, 2)."""
        self._closed_since_trim = 0
        if _malloc_trim is not None:
            _malloc_trim(0)

    # --- reporting --------------------------------------------------------------------------

    def reload(self, token: str | None, tls: tuple[str, str] | None) -> None:
        """New credentials, for new connections (SIGHUP): the token, and the TLS certificate
        and key (loaded into the listening socket's context). The checks of a start apply:
        a broker on a non-loopback address keeps its old token rather than run without one.

        Raises:
            PermissionError: the new settings would open a non-loopback broker to anyone
                (nothing is changed).
        """
        token = token or None  # an empty token in a config file is no token
        self._check_exposure(token)
        if self.http is not None and self.http.token is not None and not token:
            raise PermissionError(
                "refusing to drop the token of the HTTP side door at "
                f"{self.http.url}: it is not on a loopback address; keep a token"
            )
        self.config.token = token
        self.auth.token = token
        if self.http is not None and self.http.token is not None:
            self.http.token = token
        ctx = self.config.extra.get("ssl")
        if tls is not None and ctx is not None:
            ctx.load_cert_chain(*tls)
        log.warning("reloaded the token%s", " and the TLS certificate" if tls else "")

    def stats(self) -> dict[str, Any]:
        out = self.broker.stats()
        out["server"] = {
            "name": self.config.name,
            "addresses": self.addresses if self._server else [],
            "uptime": round(time.time() - self.started, 3),
            "connections": len(self.connections),
            "failed_auth": self.auth.failures,
            "store": "memory"
            if type(self.broker.store) is Store
            else type(self.broker.store).__name__,
            "store_stalled_for": round(min(self.broker.store.stalled_for, 1e9), 3),
        }
        out["connections"] = [
            {
                "id": c.id,
                "peer": c.peer,
                "client": c.client_name,
                "mode": c.mode,
                "state": c.state,
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

    # --- stopping ---------------------------------------------------------------------------

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; every connection drains (parked requests are answered
        ``unavailable``, held confirmations wait for the store), says GOODBYE, closes."""
        self.stopping = True
        if self._server is not None:
            await close_listener(self._server)
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        self.apply(self.broker.stop)
        for c in list(self.connections.values()):
            c.begin_drain()
        deadline = time.monotonic() + grace
        while self._draining and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for c in list(self._live):
            if c.transport is None and c.tls is not None:
                # still in its TLS handshake: its connection was never made (it owes no
                # connection_lost either), so nothing else would ever close its socket
                c.tls.abort()
                self._live.discard(c)
            else:
                c.finish()  # what did not drain in time, and connections turned away
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self._live):
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)  # let the aborted transports release their sockets
        if self._server is not None:
            await self._server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
        self.broker.store.close()


def raise_descriptor_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (each client
    and each HTTP connection costs one), say what it got, and warn when it is below what
    ``max_connections`` needs. Returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    log.info("open-files limit: %d", soft)
    if soft < max_connections + 256:
        log.warning(
            "open-files limit %d is below max_connections=%d (+256 for the store and HTTP): "
            "past it new connections fail; raise it (ulimit -n, LimitNOFILE=) or lower "
            "--max-connections", soft, max_connections,
        )  # fmt: skip
    return soft


def run(
    config: ServerConfig,
    ready: Callable[[BrokerServer], None] | None = None,
    on_hangup: Callable[[BrokerServer], None] | None = None,
) -> None:
    """Run a broker until SIGINT or SIGTERM; then stop gracefully and return (exit 0).
    SIGHUP calls ``on_hangup(server)`` (the CLI reloads the token, TLS and log level)."""
    import signal

    raise_descriptor_limit(config.max_connections)

    async def main() -> None:
        server = BrokerServer(config)
        await server.start()
        if ready is not None:
            ready(server)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_hangup is not None and hasattr(signal, "SIGHUP"):

            def hangup() -> None:
                try:
                    on_hangup(server)
                except Exception:
                    log.exception("SIGHUP: reload failed; the old settings stay")

            loop.add_signal_handler(signal.SIGHUP, hangup)
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
