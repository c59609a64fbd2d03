"""A client's side of a conversation with a pigeon broker, sans-IO (in the manner of h11).

    conn = ClientConnection("my-client", token=None)
    sock.sendall(conn.data_to_send())              # HELLO
    for event in conn.receive_data(sock.recv(65536)):
        ...                                        # Welcomed, Reply, Notice, Closed
    req = conn.request(Put(0, "jobs", b"hi", 0.0))   # the req is assigned here
    sock.sendall(conn.data_to_send())

# Strategy:
# Everything a pigeon:// client must get right about the conversation lives here, once:
# the handshake (the first frame may be at most 64 KiB, so a peer that is not a pigeon
# broker - Redis answering "-ERR", NATS greeting with "INFO" - is recognised at once
# instead of being read as a 760 MB frame); PING answered with PONG; request ids and
# matching replies to them; requests whose caller stopped waiting (CANCEL sent; if the
# reply still comes, delivered messages are handed back with NACK, so nothing is
# stranded until its lease ends); settles whose reply nobody waits for; requests larger
# than the broker's ``max_frame_size`` (WELCOME) refused before they are sent, since the
# broker would close the connection on their header; connection-level errors turned into
# exceptions (``protocol.codes``), those a new connection would meet again marked
# ``Unretryable``; and the graceful close (GOODBYE, then the shell half-closes and reads
# until EOF: every reply still arrives). The blocking and asyncio clients
# (``backends/pigeon/sync.py``, ``pigeon/aio.py``) only move bytes between a socket and
# this object.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from pigeon.errors import (
    AuthError,
    BrokenResourceError,
    FrameError,
    PigeonError,
    TooLarge,
    Unsupported,
)
from pigeon.framing import LengthPrefixed
from pigeon.protocol.codes import Code, exception_for
from pigeon.protocol.messages import (
    MAGIC,
    VERSION,
    Cancel,
    Deliver,
    Error,
    Goodbye,
    Hello,
    Nack,
    Ok,
    Ping,
    PlainPut,
    Pong,
    Put,
    PutBatch,
    QueueShutdown,
    Welcome,
)
from pigeon.protocol.wire import ClientCodec, encode_frame

_WITH_OPTIONS = (Put, PutBatch)

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "HEARTBEAT_MISSES",
    "ClientConnection",
    "Closed",
    "Event",
    "NotABroker",
    "Notice",
    "Refused",
    "Reply",
    "State",
    "Unretryable",
    "Welcomed",
]

HANDSHAKE_MAX_FRAME = 64 * 1024  # the largest frame before WELCOME, either way
HEARTBEAT_MISSES = 3  # heartbeats without a byte from the broker before it counts as gone
_HEADER_SIZE = 4  # a frame's length header; max_frame_size counts the body after it
CLIENT_MAX_FRAME = 2**31 - 1


class State(Enum):
    HANDSHAKE = "handshake"  # HELLO sent, waiting for WELCOME
    OPEN = "open"
    CLOSING = "closing"  # GOODBYE sent: replies still arrive, then the broker closes
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Welcomed:
    server: str
    heartbeat: float
    max_frame_size: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer (OK, DELIVER or ERROR) to the request ``req``."""

    req: int
    message: Ok | Deliver | Error
    queue: str = ""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the broker tells every connection (QUEUE_SHUTDOWN)."""

    message: QueueShutdown


@dataclass(frozen=True, slots=True)
class Closed:
    """The conversation is over. ``error`` is None when we closed it gracefully; otherwise
    it is the exception every request still waiting must fail with."""

    error: BaseException | None


Event = Welcomed | Reply | Notice | Closed


class Unretryable(BrokenResourceError):
    """The connection ended for a reason a new connection would meet again: the call that
    met it is not retried."""


class NotABroker(Unretryable):
    """The peer answered the handshake, but not as a pigeon broker."""


class Refused(Unretryable):
    """The broker closed the connection over what we sent (``ERROR(0, "protocol")``): the
    same request on a new connection would be refused the same way."""


class ClientConnection:
    """The state of one connection to a broker; bytes in, events out, bytes to send."""

    def __init__(self, client: str, token: str | None = None, *, peer: str = "the broker") -> None:
        self.state = State.HANDSHAKE
        self.peer = peer
        self.heartbeat = 5.0
        self.server = ""
        self.max_frame_size = 16 * 2**20  # what the broker accepts from us (WELCOME)
        self.features: frozenset[str] = frozenset()  # what the broker adds to version 1
        self._decoder = LengthPrefixed(4, max_frame_size=HANDSHAKE_MAX_FRAME).decoder()
        self._codec = ClientCodec()
        self._out: list[bytes] = [encode_frame(Hello(MAGIC, VERSION, client, token))]
        self._req = 0
        self._pending: dict[int, str] = {}  # req -> queue, for requests someone awaits
        self._unheeded: dict[int, str] = {}  # req -> queue: cancelled, or sent without waiting
        self.shutdown_queues: set[str] = set()
        self.bytes_received = 0

    # --- what the shell asks ----------------------------------------------------------------

    @property
    def silence_limit(self) -> float:
        """Seconds without a byte from the broker after which it counts as gone."""
        return self.heartbeat * HEARTBEAT_MISSES

    @property
    def pending(self) -> int:
        """Requests sent whose reply has not arrived yet."""
        return len(self._pending) + len(self._unheeded)

    def data_to_send(self) -> bytes:
        """The bytes to write now (and forget here)."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        return out

    # --- what the shell tells -----------------------------------------------------------------

    def request(self, msg: Any) -> int:
        """Queue ``msg`` (its ``req`` is set here) and return the req its reply will carry.

        Raises:
            Unsupported: a PUT with options to a broker that did not announce them (an
                older broker would store the message and ignore them).
            TooLarge: its frame is larger than the broker's ``max_frame_size`` (WELCOME):
                the broker would close the connection on its header. Nothing is sent.
        """
        if (
            type(msg) in _WITH_OPTIONS
            and (msg.options is not None or getattr(msg, "dedup_ids", None))
            and "options" not in self.features
        ):
            raise Unsupported(
                f"{self.peer} ({self.server or 'an older pigeon'}) does not support "
                "per-message options (delay, ttl, dedup_id, priority, headers); upgrade it"
            )
        req = self._send(msg)
        self._pending[req] = getattr(msg, "queue", "")
        return req

    def post(self, msg: Any) -> int:
        """Queue a request whose reply nobody will wait for (an ACK after a get). ACK and
        NACK go ``quiet``: the broker sends no OK for them (an older broker that does is
        ignored). Raises ``TooLarge`` as ``request`` does."""
        if hasattr(msg, "quiet"):
            msg.quiet = True
            return self._send(msg)
        req = self._send(msg)
        self._unheeded[req] = getattr(msg, "queue", "")
        return req

    def cancel(self, req: int) -> None:
        """The caller of ``req`` stopped waiting: withdraw it. If its reply comes anyway
        (CANCEL lost the race), delivered messages are handed back, never stranded."""
        queue = self._pending.pop(req, None)
        if queue is None:
            return
        self._unheeded[req] = queue
        if self.state is State.OPEN:
            self._out.append(encode_frame(Cancel(req)))

    def give_back(self, reply: Reply) -> None:
        """A reply arrived but its caller will not use it: hand its messages back."""
        if isinstance(reply.message, Deliver) and self.state is State.OPEN:
            self._give_back(reply.message, reply.queue)

    def close(self) -> None:
        """Say GOODBYE. The shell then half-closes and reads until the broker closes."""
        if self.state in (State.OPEN, State.HANDSHAKE):
            self._out.append(encode_frame(Goodbye("client closing")))
        self.state = State.CLOSING

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the broker (``b""`` at end of stream); return what happened."""
        if self.state is State.CLOSED:
            return []
        if not data:
            return [self._eof()]
        self.bytes_received += len(data)
        events: list[Event] = []
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            return [self._broken(exc)]
        for frame in frames:
            try:
                msg = self._codec.decode(frame)
            except PigeonError as exc:
                events.append(self._broken(exc))
                return events
            event = self._receive(msg)
            if event is not None:
                events.append(event)
                if isinstance(event, Closed):
                    return events
        if self._decoder.error is not None:
            events.append(self._broken(self._decoder.error))
        return events

    # --- inside -------------------------------------------------------------------------------

    def _send(self, msg: Any) -> int:
        if self.state is State.CLOSED or self.state is State.CLOSING:
            raise BrokenResourceError(f"the connection to {self.peer} is closed")
        msg.req = req = self._req + 1
        frame = encode_frame(msg)
        if len(frame) - _HEADER_SIZE > self.max_frame_size:
            raise _too_large(msg, len(frame) - _HEADER_SIZE, self.max_frame_size, self.peer)
        self._req = req
        self._out.append(frame)
        return req

    def _give_back(self, deliver: Deliver, queue: str) -> None:
        ids = [d.id for d in deliver.messages if d.id]
        if ids:
            self.post(Nack(0, queue, ids, True, 0.0))

    def _receive(self, msg: Any) -> Event | None:
        if self.state is State.HANDSHAKE:
            return self._handshake(msg)
        if isinstance(msg, Ok | Deliver) or (isinstance(msg, Error) and msg.req):
            req = msg.req
            queue = self._pending.pop(req, None)
            if queue is not None:
                return Reply(req, msg, queue)
            queue = self._unheeded.pop(req, None)
            if queue is not None and isinstance(msg, Deliver):
                self._give_back(msg, queue)
            return None  # a reply nobody waits for
        if isinstance(msg, Ping):
            if self.state is State.OPEN:
                self._out.append(encode_frame(Pong(msg.nonce)))
            return None
        if isinstance(msg, Pong):
            return None
        if isinstance(msg, QueueShutdown):
            self.shutdown_queues.add(msg.queue)
            return Notice(msg)
        if isinstance(msg, Goodbye):
            # Every reply to what we sent came before it (the broker drains first).
            return self._closed(BrokenResourceError(f"{self.peer} said goodbye: {msg.reason}"))
        if isinstance(msg, Error):  # req 0: about the connection
            return self._closed(_connection_error(msg, self.peer))
        return self._broken(
            PigeonError(f"unexpected {type(msg).__name__} from {self.peer} after the handshake")
        )

    def _handshake(self, msg: Any) -> Event:
        if isinstance(msg, Welcome):
            self.state = State.OPEN
            self.server = msg.server
            self.heartbeat = msg.heartbeat
            self.max_frame_size = msg.max_frame_size
            self.features = frozenset(msg.features)
            self._decoder.max_frame_size = CLIENT_MAX_FRAME
            return Welcomed(msg.server, msg.heartbeat, msg.max_frame_size)
        if isinstance(msg, Error):
            return self._closed(_connection_error(msg, self.peer))
        return self._broken(PigeonError(f"expected WELCOME, got {type(msg).__name__}"))

    def _eof(self) -> Closed:
        if self.state is State.CLOSING and not self._pending:
            return self._closed(None)
        try:
            self._decoder.close()
        except FrameError as exc:
            return self._broken(exc)
        if self.state is State.HANDSHAKE:
            return self._closed(
                BrokenResourceError(f"{self.peer} closed the connection during the handshake")
            )
        return self._closed(BrokenResourceError(f"{self.peer} closed the connection"))

    def _broken(self, cause: BaseException) -> Closed:
        if self.state is State.HANDSHAKE:
            text = (
                f"{self.peer} does not speak the pigeon protocol (is it a pigeon broker? "
                f"its first bytes made no WELCOME: {cause})"
            )
        else:
            text = f"{self.peer} sent bytes that break the protocol: {cause}"
        err = (NotABroker if self.state is State.HANDSHAKE else BrokenResourceError)(text)
        err.__cause__ = cause
        return self._closed(err)

    def _closed(self, error: BaseException | None) -> Closed:
        self.state = State.CLOSED
        self._pending.clear()
        self._unheeded.clear()
        self._out = []
        return Closed(error)


def _too_large(msg: Any, size: int, limit: int, peer: str) -> TooLarge:
    if isinstance(msg, PutBatch):
        what = f"a put_many of {len(msg.payloads)} items"
        advice = "put fewer items per call"
    elif isinstance(msg, Put | PlainPut):
        what = f"a put of a {len(msg.payload)}-byte item"
        advice = "put a smaller item (or a reference to where it is stored)"
    else:
        what = f"a {type(msg).__name__} request"
        advice = "send less per request"
    return TooLarge(
        f"frame of {size} bytes exceeds max_frame_size={limit} of {peer} ({what}); "
        f"nothing was sent: {advice}, or raise the broker's --max-frame-size"
    )


def _connection_error(msg: Error, peer: str) -> BaseException:
    if msg.code in (Code.AUTH, Code.COOLDOWN):
        return AuthError(msg.message)
    # A protocol error is about the bytes we sent (a frame over max_frame_size, a malformed
    # request): sending them again on a new connection would end the same way.
    kind = Refused if msg.code == Code.PROTOCOL else BrokenResourceError
    err = kind(f"{peer} closed the connection: {msg.message} ({msg.code})")
    err.__cause__ = exception_for(msg.code, msg.message)
    return err
