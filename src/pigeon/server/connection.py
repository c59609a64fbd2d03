"""One client connection to the broker: bytes in, requests to the server, replies out.

# Strategy:
# A ``BufferedProtocol``: the kernel writes into one reusable buffer, 4 KiB until the
# client has logged in (10,000 silent connections cost 40 MiB, not 640). The first byte
# picks the mode: 0x00 (the top byte of a binary frame's length) is binary, a byte that
# may start text is text mode (``server/text.py``), anything else is garbage and closes
# the connection at once. Before HELLO a binary frame may be at most 64 KiB (checked on
# its header) and the whole handshake must finish within ``handshake_timeout``.
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
import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from pigeon._net import tune_tcp
from pigeon.errors import FrameError
from pigeon.framing import Delimited
from pigeon.protocol import (
    FEATURES,
    Error,
    Goodbye,
    Ok,
    Put,
    PutBatch,
    Stats,
)
from pigeon.protocol.codes import Code
from pigeon.protocol.server import (
    DrainRequested,
    Event,
    HelloReceived,
    RequestReceived,
    RequestRefused,
    ServerConnection,
)
from pigeon.protocol.wire import encode_message
from pigeon.server.interfaces import Server
from pigeon.server.text import MAX_LINE, NOT_TEXT, TEXT_FIRST_BYTES, TextReplies, run_command

log = logging.getLogger("pigeon.server")
_LENGTH = struct.Struct(">I")


class Connection(asyncio.BufferedProtocol):
    """One client connection, binary or text."""

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None  # the TCP socket, for the kernel's view
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.last_rx = time.monotonic()
        self.mode = "?"  # "binary", "text", or "?" until the first byte
        self.state = "open"  # open -> draining -> closed
        self.refused = ""  # why this connection is turned away at its first byte
        self.conv: ServerConnection | None = None  # binary mode: the conversation's rules
        self.decoder: Any = None  # text mode: lines
        self.welcomed = False
        self.spoke = False  # a text client sent its first whole line
        self.replies = TextReplies(self._write_raw)
        self.text_failures = 0
        self.login_pending = False  # a wrong AUTH waits for its delayed answer
        self.backlog: list[Any] = []  # lines read behind it, run after the answer
        self.opened = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer = "-"
        self.host = "-"
        self.client_name = ""
        self._admitted = False  # counted by the authenticator until it logs in
        self._timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.state != "open"

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
        data: Any = self.view[:nbytes]
        if self.mode == "?":
            self._pick_mode(data[0])
            if self.state != "open":
                return
        if self.conv is not None:
            self.server.read_begins()
            try:
                self._binary(self.conv.receive_data(data))
            finally:
                self.server.read_done()  # the store writes what the read changed
            return
        if bad := NOT_TEXT.search(data):
            self.protocol_error(f"byte 0x{bad.group()[0]:02x} is not text")
            return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self.protocol_error(str(exc))
            return
        self._run_frames(frames)
        self.server.read_done()
        if self.decoder.error is not None and self.state == "open":
            self.protocol_error(str(self.decoder.error))

    def eof_received(self) -> bool:
        # The client half-closed: it sends nothing more. Answer what it sent, then close.
        self.begin_drain()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        if self._timer is not None:
            self._timer.cancel()
        self.view.release()
        self._settle_admission()
        self.server.connection_lost(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests (backpressure).
        if self.transport is not None and self.state == "open":
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.state == "open" and not self.transport.is_closing():
            self.transport.resume_reading()

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
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.server.drain(self)

    def finish(self) -> None:
        """Everything is answered: half-close (our FIN after the last reply), then close."""
        self.state = "closed"
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.server.stopping:
            if self.mode == "binary" and self.welcomed:
                self.send(Goodbye("broker stopping"))
            elif self.mode == "text":
                self.replies.now("-ERR broker stopping")
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
        if self.mode == "text":
            self.replies.now(f"-ERR protocol: {message}")
        else:
            self.send(Error(0, Code.PROTOCOL, message))
        self.begin_drain()

    def refuse(self, code: str, message: str) -> None:
        """Turn the connection away with one error in its mode (after its first byte)."""
        if self.mode == "text":
            self.replies.now(f"-ERR {code}: {message}")
        elif self.mode == "binary":
            self.send(Error(0, code, message))
        self.begin_drain()

    # --- modes ----------------------------------------------------------------------------

    def _pick_mode(self, first: int) -> None:
        cfg = self.server.config
        if first == 0:
            self.mode = "binary"
            self.conv = ServerConnection(max_frame_size=cfg.max_frame_size)
        elif first in TEXT_FIRST_BYTES:
            self.mode = "text"
            self.decoder = Delimited(b"\n", max_length=MAX_LINE).decoder()
        else:
            self.mode = "binary"  # neither: answer as binary, which a client expects
            self.refuse(Code.PROTOCOL, f"first byte 0x{first:02x} is neither a frame nor text")
            return
        if self.refused:
            self.refuse(Code.LIMIT, self.refused)
            return
        if self.mode == "text" and not self.server.auth.required:
            self.welcomed = True  # its buffer grows once it sent a whole line

    def _run_frames(self, frames: list[Any]) -> None:
        """Run the lines of a text client."""
        for i, frame in enumerate(frames):
            if self.state != "open":
                return
            if not self.spoke:
                self._first_line()
            run_command(self, frame.rstrip(b"\r"))
            if self.login_pending:  # the rest waits for the answer to a wrong AUTH
                self.backlog = list(frames[i + 1 :])
                return

    def _first_line(self) -> None:
        """A text client sent a whole line: the handshake deadline no longer applies
        (with a token, AUTH ends it instead). Until then, bytes without a newline are
        not a person typing a command."""
        self.spoke = True
        if self.welcomed:
            self._cancel_timer()
            self._grow_buffer()

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

    def send(self, message: Any) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        # Header and body go out as two buffers: a large delivery is not copied just to
        # put four bytes in front of it (uvloop writes them with one writev).
        if self.conv is not None:
            header, body = self.conv.send(message)
        else:  # turned away at the first byte, in binary
            body = encode_message(message)
            header = _LENGTH.pack(len(body))
        self.bytes_out += 4 + len(body)
        t.writelines((header, body))
        limit = self.server.config.max_pending_output
        if limit and t.get_write_buffer_size() > limit:
            # A consumer that does not read: drop it rather than buffer without bound.
            # Its unacked messages go back to the queue when the connection is lost.
            log.warning("dropping %s: %d bytes wait to be sent (max_pending_output=%d)",
                        self.peer, t.get_write_buffer_size(), limit)  # fmt: skip
            t.abort()

    # --- binary ---------------------------------------------------------------------------

    def _binary(self, events: list[Event]) -> None:
        """Act on what the conversation (``protocol/server.py``) says happened."""
        server = self.server
        for ev in events:
            if isinstance(ev, RequestReceived):
                msg = ev.message
                if isinstance(msg, Stats):
                    self.send(Ok(msg.req, server.stats()))
                elif isinstance(msg, Put | PutBatch) and (why := server.refuse_writes()):
                    self.send(Error(msg.req, Code.UNAVAILABLE, why))
                else:
                    server.apply(functools.partial(self._handle, msg))
            elif isinstance(ev, RequestRefused):  # e.g. an options entry of the wrong type
                self.send(Error(ev.req, ev.code, ev.message))
            elif isinstance(ev, HelloReceived):
                self._hello(ev)
            elif isinstance(ev, DrainRequested):
                self.begin_drain()
            else:  # a Violation: its ERROR is queued
                log.warning("closing %s: protocol error: %s", self.peer, ev.reason)
                self._write_conv()
                self.begin_drain()

    def _handle(self, msg: Any) -> list[Any]:
        return self.server.broker.handle(self.id, msg, self.server.now())

    def _write_conv(self) -> None:
        if self.conv is not None and (data := self.conv.data_to_send()):
            self._write_raw(data)

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
        self._binary(behind)

    def _reject_login(self, then: Callable[[], None]) -> None:
        """Answer a wrong token only after ``failure_delay``: guessing is slow."""
        self.transport.pause_reading() if self.transport else None
        self.start_timer(self.server.auth.failure_delay, then)

    # --- text -------------------------------------------------------------------------------

    def text_login(self, token: str) -> None:
        if self.server.auth.check(token, self.peer):
            self.logged_in()
            self.replies.now("+OK")
            return
        self.text_failures += 1
        slot = self.replies.reserve()
        # Lines that came in the same read as this AUTH wait for its answer, in order:
        # pausing the transport stops only the reads to come.
        self.login_pending = True

        def answer() -> None:
            self._timer = None
            self.login_pending = False
            self.replies.fill(slot, "-ERR auth: wrong token")
            backlog, self.backlog = self.backlog, []
            if self.text_failures >= 3:
                self.begin_drain()
            elif self.transport is not None and self.state == "open":
                self.transport.resume_reading()
                self.start_timer(self.server.config.handshake_timeout, self.handshake_expired)
                self._run_frames(backlog)
                self.server.read_done()

        self._reject_login(answer)

    def text_request(self, msg: Any, ok: Callable[[Any], str]) -> None:
        """Apply a text command through the broker; its reply takes its turn."""
        server = self.server
        msg.req = server.next_req()
        server.text_waiters[(self.id, msg.req)] = (self.replies.reserve(), ok)
        if isinstance(msg, Put) and (why := server.refuse_writes()):
            server.dispatch([(self.id, Error(msg.req, Code.UNAVAILABLE, why))])
            return
        server.apply(lambda: server.broker.handle(self.id, msg, server.now()))

    def handshake_expired(self) -> None:
        self._timer = None
        if self.state != "open" or (self.welcomed and (self.mode == "binary" or self.spoke)):
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
