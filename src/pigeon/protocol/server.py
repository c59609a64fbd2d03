"""The broker's side of a binary conversation, sans-IO (the mirror of ``ClientConnection``).

    conv = ServerConnection(max_frame_size=16 * 2**20)
    for event in conv.receive_data(sock.recv(65536)):
        ...                       # HelloReceived, RequestReceived, DrainRequested, Violation
    conv.welcome("pigeon", heartbeat=5.0)     # after checking HelloReceived.token
    sock.sendall(conv.data_to_send())          # WELCOME
    header, body = conv.send(Ok(req, 1))       # a reply, as two buffers (no copy of a body)

# Strategy:
# The rules of the conversation live here, once, and are tested bytes in, events out
# (tests/protocol/test_server_conversation.py): the first frame may be at most 64 KiB
# (checked on its header, before the body is buffered) and must be HELLO with the right
# magic and version; bytes behind HELLO wait until the server decides (``welcome`` or
# ``refuse``: the token check may take a second); after WELCOME frames up to
# ``max_frame_size``; a second HELLO, an undecodable frame or a frame too large is a
# violation (one ERROR(0, "protocol") queued, then nothing more is read); a request that
# decodes but holds an options entry of the wrong type is refused on its own
# (``RequestRefused``: ERROR(req, "bad_request"), the connection stays open, as for a
# value out of range); GOODBYE asks to drain. What to do with a request - the broker,
# STATS, refused writes - and when to close is the server's (``server/connection.py``,
# the asyncio shell, which keeps the timers; the text mode is ``protocol/text.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, final

from pigeon.errors import FrameError, FrameTooLarge, RemoteProtocolError
from pigeon.framing import LengthPrefixed
from pigeon.protocol.client import HANDSHAKE_MAX_FRAME
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import (
    FEATURES,
    MAGIC,
    VERSION,
    Error,
    Goodbye,
    Hello,
    Welcome,
)
from pigeon.protocol.wire import RequestRefused, ServerCodec, encode_message

__all__ = [
    "DrainRequested",
    "Event",
    "HelloReceived",
    "RequestReceived",
    "RequestRefused",
    "ServerConnection",
    "State",
    "Violation",
]

_LENGTH = struct.Struct(">I")
_CODEC = ServerCodec()  # stateless: one for every connection


class State(Enum):
    HANDSHAKE = "handshake"  # waiting for HELLO
    DECIDING = "deciding"  # HELLO received: the server checks it (welcome or refuse)
    OPEN = "open"
    DRAINING = "draining"  # nothing more is read; replies still go out
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """A well-formed HELLO: answer with ``welcome()`` or ``refuse()``."""

    client: str  # the first 100 code points of the client's name
    token: str | None


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request for the server (anything but HELLO and GOODBYE), after WELCOME."""

    message: Any


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """The client is done sending (GOODBYE, or its FIN): answer what it asked, then close."""

    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol: an ERROR(0, "protocol") is queued, nothing more
    will be read; close once what was asked before is answered."""

    reason: str


# RequestRefused (from ``wire``): a request answered ERROR(req, code, message) at once,
# without the broker (an options entry of the wrong type); the conversation goes on.
Event = HelloReceived | RequestReceived | RequestRefused | DrainRequested | Violation


@final  # compiled (pigeon/_compiled.py): Python code cannot subclass it
class ServerConnection:
    """The state of one binary connection at the broker; bytes in, events out."""

    def __init__(self, *, max_frame_size: int = 16 * 2**20) -> None:
        self.state = State.HANDSHAKE
        self.max_frame_size = max_frame_size
        self.client = ""
        self._pending = bytearray()  # before WELCOME: the HELLO, then what follows it
        self._decoder: Any = None  # after WELCOME
        self._out: list[bytes] = []

    # --- what the shell tells -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the client (``b""``: it half-closed); return what happened."""
        if self.state in (State.DRAINING, State.CLOSED):
            return []
        if not data:
            self.state = State.DRAINING
            return [DrainRequested("the client half-closed")]
        if self.state is not State.OPEN:
            self._pending += data
            return self._hello() if self.state is State.HANDSHAKE else []
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            return [self._violation(str(exc))]
        events = self._frames(frames)
        if self._decoder.error is not None and self.state is State.OPEN:
            events.append(self._violation(str(self._decoder.error)))
        return events

    def welcome(
        self, server: str, heartbeat: float, features: list[str] | None = None
    ) -> list[Event]:
        """Accept the HELLO: queue WELCOME; return the events of what came behind it."""
        if self.state is not State.DECIDING:
            raise RuntimeError(f"welcome() in state {self.state.value}")
        self.state = State.OPEN
        self._out.append(self._frame(
            Welcome(VERSION, server, heartbeat, self.max_frame_size,
                    list(FEATURES if features is None else features))
        ))  # fmt: skip
        self._decoder = LengthPrefixed(4, max_frame_size=self.max_frame_size).decoder()
        rest, self._pending = bytes(self._pending), bytearray()
        return self.receive_data(rest) if rest else []

    def refuse(self, code: str, message: str) -> None:
        """Turn the client away: queue ``ERROR(0, code, message)``; nothing more is read."""
        self._out.append(self._frame(Error(0, code, message)))
        self._pending = bytearray()
        self.state = State.DRAINING

    def drain(self) -> None:
        """Read nothing more (the server is stopping, or the client went quiet)."""
        if self.state is not State.CLOSED:
            self.state = State.DRAINING

    def closed(self) -> None:
        self.state = State.CLOSED

    def send(self, message: Any) -> tuple[bytes, bytes]:
        """``message`` framed, as (length header, body): two buffers for one writev, so a
        large delivery is not copied to put four bytes in front of it."""
        body = encode_message(message)
        return _LENGTH.pack(len(body)), body

    def data_to_send(self) -> bytes:
        """What this object queued itself (WELCOME, ERROR), to write now."""
        out, self._out = b"".join(self._out), []
        return out

    # --- the rules ------------------------------------------------------------------------

    def _hello(self) -> list[Event]:
        pending = self._pending
        if len(pending) < 4:
            return []
        (size,) = _LENGTH.unpack_from(pending)
        if size > HANDSHAKE_MAX_FRAME:
            return [
                self._violation(str(FrameTooLarge(size, HANDSHAKE_MAX_FRAME)) + " before HELLO")
            ]
        if len(pending) < 4 + size:
            return []
        body = bytes(pending[4 : 4 + size])
        del pending[: 4 + size]  # what follows waits for welcome()
        try:
            msg = _CODEC.decode(body)
        except RemoteProtocolError as exc:
            return [self._violation(str(exc))]
        if not isinstance(msg, Hello):
            got = "a PUT" if isinstance(msg, RequestRefused) else type(msg).__name__
            return [self._violation(f"expected HELLO first, got {got}")]
        if msg.magic != MAGIC or msg.version != VERSION:
            return [self._violation(
                f"unsupported protocol {msg.magic!r} version {msg.version}; "
                f"this broker speaks {MAGIC!r} version {VERSION}"
            )]  # fmt: skip
        self.state = State.DECIDING
        self.client = msg.client[:100]
        return [HelloReceived(self.client, msg.token)]

    def _frames(self, frames: list[Any]) -> list[Event]:
        events: list[Event] = []
        for body in frames:
            if self.state is not State.OPEN:
                break
            try:
                msg = _CODEC.decode(body)
            except RemoteProtocolError as exc:
                events.append(self._violation(str(exc)))
                break
            if isinstance(msg, Goodbye):
                self.state = State.DRAINING
                events.append(DrainRequested(f"GOODBYE {msg.reason}".strip()))
            elif isinstance(msg, Hello):
                events.append(self._violation("HELLO sent twice"))
            elif isinstance(msg, RequestRefused):
                events.append(msg)
            else:
                events.append(RequestReceived(msg))
        return events

    def _violation(self, reason: str) -> Violation:
        self._out.append(self._frame(Error(0, Code.PROTOCOL, reason)))
        self._pending = bytearray()
        self.state = State.DRAINING
        return Violation(reason)

    @staticmethod
    def _frame(message: Any) -> bytes:
        body = encode_message(message)
        return _LENGTH.pack(len(body)) + body
