"""One client connection to the broker: bytes in, requests to the server, replies out.

# Strategy:
# A ``BufferedProtocol``: the kernel writes into one reusable buffer, 4 KiB until the
# client has logged in (10,000 silent connections cost 40 MiB, not 640). The first byte
# picks the conversation: 0x00 (the top byte of a binary frame's length) is binary
# (``protocol/server.py``), a byte that may start text is text mode (``protocol/text.py``),
# anything else is garbage and closes the connection at once. Both conversations are
# sans-IO and speak in the same events; this shell keeps only what needs I/O: the
# handshake deadline and the wrong-token delay (timers), pausing reads, writing what a
# conversation has ready, and handing requests to the server.
#
# The connection's life: open -> draining -> closed. It starts draining when the client
# half-closes (FIN), says GOODBYE or QUIT, or the broker stops: it reads nothing more,
# and closes only once every request it already received has its reply written - held
# confirmations that wait for the store's commit, and parked requests (served, or their
# wait ran out; those without a deadline are answered at once). Only then does the
# broker send its FIN. Nothing taken for a client is ever dropped because its connection
# began closing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast, final

from pigeon._net import tune_tcp
from pigeon.protocol import (
    FEATURES,
    Error,
    Goodbye,
)
from pigeon.protocol.codes import Code
from pigeon.protocol.server import (
    DrainRequested,
    HelloReceived,
    RequestReceived,
    RequestRefused,
    ServerConnection,
)
from pigeon.protocol.server import Event as BinaryEvent
from pigeon.protocol.text import TEXT_FIRST_BYTES, LoginRequested, TextConnection
from pigeon.protocol.text import Event as TextEvent
from pigeon.server.interfaces import Server

if TYPE_CHECKING:
    from pigeon.server.tls import TLSProtocol

log = logging.getLogger("pigeon.server")


@final  # compiled (pigeon/_compiled.py): Python code cannot subclass it
class Connection(asyncio.BufferedProtocol):
    """One client connection, binary or text."""

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.tls: TLSProtocol | None = None  # the TLS layer under it (its handshake first)
        self.sock: socket.socket | None = None  # the TCP socket, for the kernel's view
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.last_rx = time.monotonic()
        self.state = "open"  # open -> draining -> closed
        self.refused = ""  # why this connection is turned away at its first byte
        self.conv: ServerConnection | None = None  # binary mode: the conversation's rules
        self.text: TextConnection | None = None  # text mode: the conversation's rules
        self.welcomed = False  # the handshake is done: no deadline, the larger buffer
        self.opened = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer = "-"
        self.host = "-"
        self.client_name = ""
        self._admitted = False  # counted by the authenticator until it logs in
        self._timer: asyncio.TimerHandle | None = None
        self._output_full = False  # the transport asked us to stop (pause_writing)

    @property
    def draining(self) -> bool:
        return self.state != "open"

    @property
    def mode(self) -> str:
        """``binary``, ``text``, or ``?`` until the first byte."""
        return "binary" if self.conv is not None else "text" if self.text is not None else "?"

    @property
    def unanswered(self) -> int:
        """Text commands read whose reply has not been written yet (binary replies are
        written as they come)."""
        return self.text.unanswered if self.text is not None else 0

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
        self.host = peer[0] if isinstance(peer, tuple) else self.peer
        sock = self.sock = transport.get_extra_info("socket")
        if sock is not None:  # no TCP_USER_TIMEOUT: the server checks peer_silence itself
            tune_tcp(sock, 0)
        self.server.connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.state != "open":
            return  # draining: a client that said goodbye is not read any more
        self.bytes_in += nbytes
        self.last_rx = time.monotonic()
        data = self.view[:nbytes]
        if self.conv is None and self.text is None:
            self._pick_mode(data[0])
            if self.state != "open":
                return
        conv = self.conv or self.text
        assert conv is not None
        self._read(lambda: conv.receive_data(data))

    def _read(self, receive: Callable[[], list[BinaryEvent] | list[TextEvent]]) -> None:
        """Act on what the conversation makes of what was read; the store writes what
        that changed at the end."""
        self.server.read_begins()
        try:
            self._act(receive())
        finally:
            self.server.read_done()
        if self.text is not None and self.text.backlogged:
            self._update_reading()

    def eof_received(self) -> bool:
        # The client half-closed: it sends nothing more. Answer what it sent, then close.
        self.begin_drain()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        if self._timer is not None:
            self._timer.cancel()
        self.view.release()
        for conv in (self.conv, self.text):
            if conv is not None:
                conv.closed()
        self._settle_admission()
        self.server.connection_lost(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests (backpressure).
        self._output_full = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._output_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Read while nothing holds reading back: replies the client does not read, an
        AUTH waiting for its answer, or (text) too many commands waiting for theirs."""
        t = self.transport
        if t is None or t.is_closing() or self.state != "open":
            return
        text = self.text
        if self._output_full or (text is not None and (text.auth_pending or text.backlogged)):
            t.pause_reading()
        else:
            t.resume_reading()

    # --- life -------------------------------------------------------------------------------

    def start_timer(self, seconds: float, then: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, then)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def begin_drain(self) -> None:
        """Read nothing more; close once every request received has its reply."""
        if self.state != "open":
            return
        self.state = "draining"
        if self.conv is not None:
            self.conv.drain()
        if self.text is not None:
            self.text.drain()
        if not (self.text is not None and self.text.auth_pending):
            self._cancel_timer()  # a wrong AUTH is still answered after its delay
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.server.drain(self)

    def finish(self) -> None:
        """Everything is answered: half-close (our FIN after the last reply), then close."""
        self._write_conv()  # what the conversation answered itself (+BYE) goes first
        self.state = "closed"
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.server.stopping:
            if self.conv is not None and self.welcomed:
                self.send(Goodbye("broker stopping"))
            elif self.text is not None:
                self.text.goodbye("broker stopping")
                self._write_conv()
        try:
            if t.can_write_eof():
                t.write_eof()
        except OSError:  # the peer already reset the connection: nothing left to say
            t.abort()
            return
        t.close()

    def protocol_error(self, message: str) -> None:
        """The peer broke the protocol: say so in its mode, then close (after draining
        what was already asked)."""
        log.warning("closing %s: protocol error: %s", self.peer, message)
        self.refuse(Code.PROTOCOL, message)

    def refuse(self, code: str, message: str) -> None:
        """Turn the connection away with one error in its mode (after its first byte)."""
        if self.conv is not None:
            self.conv.refuse(code, message)
        elif self.text is not None:
            self.text.refuse(code, message)
        self._write_conv()
        self.begin_drain()

    # --- modes ----------------------------------------------------------------------------

    def _pick_mode(self, first: int) -> None:
        cfg = self.server.config
        if first in TEXT_FIRST_BYTES:
            self.text = TextConnection(token_required=self.server.auth.required)
        else:
            self.conv = ServerConnection(max_frame_size=cfg.max_frame_size)
            if first != 0:  # neither: answer as binary, which a client expects
                self.refuse(Code.PROTOCOL, f"first byte 0x{first:02x} is neither a frame nor text")
                return
        if self.refused:
            self.refuse(Code.LIMIT, self.refused)

    def _grow_buffer(self) -> None:
        """A welcomed client gets a 64 KiB receive buffer (takes effect at the next read)."""
        if len(self.buf) < 65536:
            self.buf = bytearray(65536)
            self.view = memoryview(self.buf)

    def _settle_admission(self) -> None:
        if self._admitted:
            self._admitted = False
            self.server.auth.settled(self.host)

    def logged_in(self) -> None:
        """The handshake is done (WELCOME, a right AUTH, or a text client's first whole
        line when no token is needed): no deadline, the larger buffer."""
        self.welcomed = True
        self._cancel_timer()
        self._settle_admission()
        self._grow_buffer()

    # --- writing ----------------------------------------------------------------------------

    def _write_raw(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self.bytes_out += len(data)
        t.write(data)
        self._check_output(t)

    def _check_output(self, t: asyncio.Transport) -> None:
        limit = self.server.config.max_pending_output
        if limit and t.get_write_buffer_size() > limit:
            # A client that does not read: drop it rather than buffer without bound.
            # Its unacked messages go back to the queue when the connection is lost.
            log.warning("dropping %s: %d bytes wait to be sent (max_pending_output=%d)",
                        self.peer, t.get_write_buffer_size(), limit)  # fmt: skip
            t.abort()

    def _write_conv(self) -> None:
        """Write what the conversation has ready (WELCOME, ERROR, text reply lines)."""
        conv = self.conv or self.text
        if conv is not None and (data := conv.data_to_send()):
            self._write_raw(data)

    def send(self, message: Any) -> None:
        """A reply, or a message of the broker's own, in this connection's mode."""
        text = self.text
        if text is not None:  # a reply takes its command's turn; notices are not for text
            if (req := getattr(message, "req", None)) is not None:
                backlogged = text.backlogged
                text.reply(req, message)
                self._write_conv()
                if backlogged and not text.backlogged:  # the lines behind it may run
                    asyncio.get_running_loop().call_soon(self._resume_text)
            return
        t = self.transport
        if self.conv is None or t is None or t.is_closing():
            return
        # Header and body go out as two buffers: a large delivery is not copied just to
        # put four bytes in front of it (uvloop writes them with one writev).
        header, body = self.conv.send(message)
        self.bytes_out += 4 + len(body)
        t.writelines((header, body))
        self._check_output(t)

    def _resume_text(self) -> None:
        """Run the text lines read behind a backlog, and read again."""
        if self.text is None or self.state != "open" or self.text.backlogged:
            return
        self._read(self.text.resume)
        self._update_reading()

    # --- events -----------------------------------------------------------------------------

    def _act(self, events: list[BinaryEvent] | list[TextEvent]) -> None:
        """Act on what the conversation (binary or text) says happened."""
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.server.request(self.id, ev.message)
            elif isinstance(ev, RequestRefused):  # e.g. an options entry of the wrong type
                self.send(Error(ev.req, ev.code, ev.message))
            elif isinstance(ev, HelloReceived):
                self._hello(ev)
            elif isinstance(ev, LoginRequested):
                self._login(ev.token)
            elif isinstance(ev, DrainRequested):
                self.begin_drain()
            else:  # a Violation: its error is queued
                log.warning("closing %s: protocol error: %s", self.peer, ev.reason)
                self._write_conv()
                self.begin_drain()
        self._write_conv()  # what the text conversation answered itself (PING, HELP, ...)
        if not self.welcomed and self.text is not None and self.text.handshake_done:
            self.logged_in()

    def _hello(self, ev: HelloReceived) -> None:
        conv = self.conv
        assert conv is not None
        if not self.server.auth.check(ev.token, self.peer):

            def turn_away() -> None:
                conv.refuse(Code.AUTH, "authentication failed: wrong or missing token")
                self._write_conv()
                self.begin_drain()

            self._reject_login(turn_away)
            return
        self.logged_in()
        self.client_name = ev.client
        cfg = self.server.config
        behind = conv.welcome(cfg.name, cfg.heartbeat, FEATURES)
        self._write_conv()
        self._act(behind)

    def _login(self, token: str) -> None:
        """A text client's AUTH: the right token is answered at once, a wrong one after
        ``failure_delay``; what it sent behind the AUTH waits in the conversation."""
        text = self.text
        assert text is not None
        if self.server.auth.check(token, self.peer):
            self._act(text.logged_in())
            return

        def answer() -> None:
            self._timer = None
            if self.state != "open":  # draining: answer, then let the server close it
                text.login_failed()
                self._write_conv()
                self.server.check_drained()  # it may owe nothing more now
                return
            self.start_timer(self.server.config.handshake_timeout, self.handshake_expired)
            self._read(text.login_failed)
            self._update_reading()

        self._reject_login(answer)

    def _reject_login(self, then: Callable[[], None]) -> None:
        """Answer a wrong token only after ``failure_delay``: guessing is slow."""
        self.transport.pause_reading() if self.transport else None
        self.start_timer(self.server.auth.failure_delay, then)

    def handshake_expired(self) -> None:
        self._timer = None
        if self.state != "open" or self.welcomed:
            return
        log.warning(
            "closing %s: no login within %.0f s", self.peer, self.server.config.handshake_timeout
        )
        if self.mode == "?":
            self.begin_drain()  # not a byte: we cannot know which language it speaks
        else:
            self.protocol_error("handshake not completed in time")

    def admitted(self) -> bool:
        """Count this connection against its host's unauthenticated ones."""
        if self.server.auth.admit(self.host):
            self._admitted = True
            return True
        return False
