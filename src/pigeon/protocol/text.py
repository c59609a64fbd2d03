"""The broker's side of a text-mode conversation, sans-IO: people with ``nc`` or telnet.

    conv = TextConnection(token_required=False)
    for event in conv.receive_data(sock.recv(65536)):
        ...                       # RequestReceived, LoginRequested, DrainRequested, Violation
    conv.reply(req, Ok(req, 3))   # the broker's reply to a RequestReceived, rendered in its turn
    sock.sendall(conv.data_to_send())                  # the reply lines now ready, in order

# Strategy:
# One command per line (``\\n``, a ``\\r`` before it ignored, the line stripped); lines
# up to 64 KiB; UTF-8. Each command takes a slot in the reply queue when it is read,
# and slots leave in order, so replies come back in command order even when one waits
# for the store's commit (PUT) or for an item (GET with a wait). Commands that need
# nothing but their turn (PING, HELP, usage errors) are answered here; those that need
# the broker become ``RequestReceived`` with a req this conversation assigns, and the
# server answers them with ``reply(req, message)`` (STATS too: the server's numbers are
# the server's). Bytes that can never be text close the conversation as they arrive:
# garbage does not get to sit on a slot until a newline that never comes; the lines
# before the bad byte are still run, so any split of the stream gives the same events.
#
# With a token, nothing but AUTH, HELP and QUIT until logged in. AUTH asks the server
# (``LoginRequested``) and holds every later byte, unread, until the server answers
# ``logged_in()`` (at once) or ``login_failed()`` (after its delay: guessing is slow);
# the third failure ends the conversation. The held bytes are bounded: a server that
# keeps feeding while it holds is refused, not buffered for. This is h11's PAUSED: the
# bytes wait in the conversation, the shell only stops reading.
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pigeon.errors import FrameError
from pigeon.framing import Delimited
from pigeon.protocol.messages import Error, Get, Info, Put, PutOptions, Shutdown, Stats
from pigeon.protocol.server import DrainRequested, RequestReceived, Violation

__all__ = [
    "MAX_HELD",
    "MAX_LINE",
    "MAX_WAITING",
    "NOT_TEXT",
    "TEXT_FIRST_BYTES",
    "DrainRequested",
    "Event",
    "LoginRequested",
    "RequestReceived",
    "State",
    "TextConnection",
    "Violation",
]

MAX_LINE = 64 * 1024
# Bytes a conversation holds, unread, while an AUTH waits for its answer. The shell stops
# reading then; over TLS one decrypted read (64 KiB) may still arrive in pieces.
MAX_HELD = 2 * MAX_LINE
# Commands read whose replies are not out yet (a GET that waits holds every reply behind
# it in its turn): past this the conversation runs no more lines, and the shell stops
# reading, until the first of them is answered.
MAX_WAITING = 1024
# Bytes that never occur in UTF-8 text a person types: C0 controls but tab, LF and CR,
# DEL, and bytes that are never valid in UTF-8 (0xC0, 0xC1, 0xF5-0xFF).
NOT_TEXT = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\xc0\xc1\xf5-\xff]")
# A first byte that may start a line of text (anything else, but 0x00, is garbage).
TEXT_FIRST_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D} | set(range(0xC2, 0xF5))

WRONG_TOKEN = "-ERR auth: wrong token"
MAX_FAILURES = 3  # wrong tokens before the conversation ends


class State(Enum):
    GREETING = "greeting"  # no token needed: until the first whole line
    LOGIN = "login"  # a token is needed: nothing but AUTH, HELP, QUIT
    CHECKING = "checking"  # an AUTH waits for the server's answer; later bytes are held
    OPEN = "open"
    DRAINING = "draining"  # nothing more is read; replies still go out
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LoginRequested:
    """``AUTH <token>``: check it, then call ``logged_in()`` or, after the failure
    delay, ``login_failed()``. Nothing behind it is read until then."""

    token: str


# RequestReceived (a Put, Get, Info, Shutdown or Stats with the req this conversation
# assigned: answer with ``reply``), DrainRequested and Violation (its ``-ERR protocol``
# line is queued) are the binary conversation's, with the same meaning.
Event = RequestReceived | LoginRequested | DrainRequested | Violation

Render = Callable[[Any], str]


class _Slot:
    __slots__ = ("data", "render")

    def __init__(self, render: Render | None = None) -> None:
        self.render = render  # how the broker's success reply reads
        self.data: bytes | None = None  # the reply's lines, once known


class TextConnection:
    """The state of one text-mode connection at the broker; bytes in, events out."""

    def __init__(self, *, token_required: bool, max_line: int = MAX_LINE) -> None:
        self.state = State.LOGIN if token_required else State.GREETING
        self.token_required = token_required
        self.failures = 0  # wrong tokens so far
        self._lines_codec = Delimited(b"\n", max_length=max_line)
        self._decoder = self._lines_codec.decoder()
        self._lines: deque[bytes] = deque()  # read, not yet run (behind a pending AUTH)
        self._held = bytearray()  # bytes that came while an AUTH was pending
        self._eof = False  # the client half-closed (behind the held bytes)
        self._broken: str | None = None  # a violation, once the lines before it have run
        self._welcomed = False
        self._slots: deque[_Slot] = deque()
        self._auth: _Slot | None = None  # the pending AUTH's slot
        self._waiting: dict[int, _Slot] = {}  # req -> slot, for the broker's replies
        self._req = 0
        self._out: list[bytes] = []

    @property
    def handshake_done(self) -> bool:
        """Logged in, or (no token) sent a whole line: the handshake deadline is over."""
        return self._welcomed

    @property
    def auth_pending(self) -> bool:
        """An AUTH waits for ``logged_in()`` or ``login_failed()``."""
        return self._auth is not None

    @property
    def buffered(self) -> int:
        """Bytes read and not yet run: an unterminated line, and what waits behind a
        pending AUTH (at most ``max_line`` + ``MAX_HELD`` and one read)."""
        return self._decoder.buffered + len(self._held) + sum(map(len, self._lines))

    @property
    def unanswered(self) -> int:
        """Commands read whose reply has not been released yet."""
        return len(self._slots)

    @property
    def backlogged(self) -> bool:
        """``MAX_WAITING`` commands wait for their replies: stop reading; ``resume()``
        runs the lines behind them once some are answered."""
        return len(self._slots) >= MAX_WAITING

    def resume(self) -> list[Event]:
        """Run the lines read behind a backlog that has shrunk since."""
        return self._advance()

    # --- what the shell tells -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the client (``b""``: it half-closed); return what happened."""
        if self.state in (State.DRAINING, State.CLOSED) or self._eof:
            return []
        if not data:
            self._eof = True
        elif self.state is State.CHECKING:
            self._held += data
            if len(self._held) > MAX_HELD:
                return [self._violation(
                    f"more than {MAX_HELD} bytes sent while an AUTH waits for its answer"
                )]  # fmt: skip
            return []
        else:
            self._decode(data)
        return self._advance()

    def logged_in(self) -> list[Event]:
        """The token of the pending AUTH is right: ``+OK``; return the events of what
        came behind it."""
        self._answer_auth("+OK")
        if self.state is not State.CHECKING:
            return []
        self._welcome()
        return self._advance()

    def login_failed(self) -> list[Event]:
        """The token of the pending AUTH is wrong (answer after the failure delay):
        ``-ERR auth: wrong token``; the third ends the conversation. Return the events of
        what came behind it."""
        self._answer_auth(WRONG_TOKEN)
        if self.state is not State.CHECKING:
            return []
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            self._drop_input()
            self.state = State.DRAINING
            return [DrainRequested(f"{self.failures} wrong tokens")]
        self.state = State.LOGIN
        return self._advance()

    def reply(self, req: int, message: Any) -> None:
        """The broker's reply to the request ``req``: rendered into its slot. A reply
        to no request of this conversation (a notice) is not for text clients."""
        slot = self._waiting.pop(req, None)
        if slot is None or slot.render is None:
            return  # a notice (QUEUE_SHUTDOWN), or no request of this conversation
        if isinstance(message, Error):
            self._fill(slot, f"-{message.code.upper()} {message.message}")
        else:
            self._fill(slot, slot.render(message))

    def refuse(self, code: str, message: str) -> None:
        """Turn the client away: ``-ERR code: message`` in its turn; nothing more is read."""
        self._say(f"-ERR {code}: {message}")
        self.drain()

    def goodbye(self, reason: str) -> None:
        """The broker's last word (``-ERR broker stopping``), behind every reply owed."""
        self._say(f"-ERR {reason}")
        self.drain()

    def drain(self) -> None:
        """Read nothing more (QUIT, a half-close, the server is stopping); bytes held
        behind a pending AUTH are dropped."""
        if self.state is not State.CLOSED:
            self._drop_input()
            self.state = State.DRAINING

    def closed(self) -> None:
        self.drain()
        self.state = State.CLOSED

    def data_to_send(self) -> bytes:
        """The reply lines ready to go, in command order."""
        out, self._out = b"".join(self._out), []
        return out

    # --- reading ----------------------------------------------------------------------------

    def _decode(self, data: bytes | bytearray | memoryview) -> None:
        """Cut ``data`` into lines; a bad byte or a line too long breaks the conversation
        once the lines before it have run."""
        bad = NOT_TEXT.search(data)
        try:
            self._lines.extend(self._decoder.feed(data if bad is None else data[: bad.start()]))
        except FrameError as exc:
            self._broken = str(exc)
            return
        if self._decoder.error is not None:
            self._broken = str(self._decoder.error)
        elif bad is not None:
            self._broken = f"byte 0x{bad.group()[0]:02x} is not text"

    def _advance(self) -> list[Event]:
        events: list[Event] = []
        while self.state in (State.GREETING, State.LOGIN, State.OPEN):
            if self._lines and len(self._slots) >= MAX_WAITING:
                break  # the rest waits for replies to go out (backlogged)
            if self._lines:
                events += self._line(self._lines.popleft())
            elif self._broken is not None:
                events.append(self._violation(self._broken))
            elif self._held:
                held, self._held = bytes(self._held), bytearray()
                self._decode(held)
            elif self._eof:
                self.state = State.DRAINING
                events.append(DrainRequested("the client half-closed"))
            else:
                break
        return events

    def _line(self, raw: bytes) -> list[Event]:
        if self.state is State.GREETING:
            self._welcome()
        try:
            text = raw.rstrip(b"\r").decode()
        except UnicodeDecodeError:
            return [self._violation("lines must be UTF-8 text")]
        word, _, rest = text.strip().partition(" ")
        cmd = word.upper()
        if not cmd:
            return []
        if self.state is State.LOGIN:
            if cmd == "AUTH":
                self._auth = self._reserve()
                self.state = State.CHECKING
                return [LoginRequested(rest.strip())]
            if cmd not in ("HELP", "QUIT"):
                self._say("-ERR auth: this broker needs a token; send AUTH <token> first")
                return []
        command = _COMMANDS.get(cmd)
        if command is None:
            self._say(f"-ERR unknown command {cmd!r}; try HELP")
            return []
        return command(self, rest)

    # --- writing ----------------------------------------------------------------------------

    def _reserve(self, render: Render | None = None) -> _Slot:
        slot = _Slot(render)
        self._slots.append(slot)
        return slot

    def _fill(self, slot: _Slot, *lines: str) -> None:
        slot.data = b"".join(line.encode() + b"\r\n" for line in lines)
        slots = self._slots
        while slots and slots[0].data is not None:
            self._out.append(slots.popleft().data or b"")

    def _say(self, *lines: str) -> None:
        """A reply that needs nothing but its turn."""
        self._fill(self._reserve(), *lines)

    def _request(self, message: Any, render: Render) -> list[Event]:
        self._waiting[message.req] = self._reserve(render)
        return [RequestReceived(message)]

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    def _answer_auth(self, line: str) -> None:
        slot, self._auth = self._auth, None
        if slot is not None:
            self._fill(slot, line)

    def _welcome(self) -> None:
        self._welcomed = True
        self.state = State.OPEN

    def _drop_input(self) -> None:
        self._decoder = self._lines_codec.decoder()
        self._lines.clear()
        self._held = bytearray()
        self._broken = None

    def _violation(self, reason: str) -> Violation:
        self._say(f"-ERR protocol: {reason}")
        self.drain()
        return Violation(reason)

    # --- the commands -----------------------------------------------------------------------

    def _put(self, rest: str) -> list[Event]:
        queue, _, data = rest.partition(" ")
        if not queue:
            self._say("-ERR usage: PUT <queue> <text> [delay=S] [ttl=S] [priority=0-9] "
                      "[dedup_id=ID] [header.NAME=VALUE]")  # fmt: skip
            return []
        try:
            data, opts = put_options(data)
        except ValueError as exc:
            self._say(f"-BAD_REQUEST {exc}")
            return []
        return self._request(Put(self._next_req(), queue, data.encode(), 0.0, opts), _ok)

    def _get(self, rest: str) -> list[Event]:
        parts = rest.split()
        if not parts:
            self._say("-ERR usage: GET <queue> [wait seconds]")
            return []
        try:
            wait = float(parts[1]) if len(parts) > 1 else 0.0
        except ValueError:
            self._say(f"-ERR wait must be a number of seconds, not {parts[1]!r}")
            return []
        return self._request(Get(self._next_req(), parts[0], 1, wait), _first_item)

    def _qsize(self, rest: str) -> list[Event]:
        return self._request(Info(self._next_req(), rest.strip() or "-"), _depth)

    def _shutdown(self, rest: str) -> list[Event]:
        return self._request(Shutdown(self._next_req(), rest.strip() or "-"), _ok)

    def _stats(self, rest: str) -> list[Event]:
        return self._request(Stats(self._next_req()), _json)

    def _ping(self, rest: str) -> list[Event]:
        self._say("+PONG")
        return []

    def _quit(self, rest: str) -> list[Event]:
        self._say("+BYE")
        self.drain()
        return [DrainRequested("QUIT")]

    def _auth_again(self, rest: str) -> list[Event]:
        self._say("+OK" if self.token_required else "-ERR this broker needs no AUTH")
        return []

    def _help(self, rest: str) -> list[Event]:
        self._say(*HELP)
        return []


HELP = (
    "+commands (one per line, \\r\\n or \\n; replies come back in command order):",
    "+  PUT <queue> <text>       put the text (UTF-8 bytes) as one item; options at the",
    "+                           end: delay=S ttl=S priority=0-9 dedup_id=ID header.K=V",
    "+  GET <queue> [seconds]    take one item (+text, or $base64 for binary)",
    "+  QSIZE <queue>            items waiting",
    "+  SHUTDOWN <queue>         shut the queue down",
    "+  STATS                    broker statistics as JSON",
    "+  PING | HELP | QUIT",
)

_COMMANDS: dict[str, Callable[[TextConnection, str], list[Event]]] = {
    "PUT": TextConnection._put,
    "GET": TextConnection._get,
    "QSIZE": TextConnection._qsize,
    "SHUTDOWN": TextConnection._shutdown,
    "STATS": TextConnection._stats,
    "PING": TextConnection._ping,
    "QUIT": TextConnection._quit,
    "HELP": TextConnection._help,
    "AUTH": TextConnection._auth_again,  # once logged in (or when no token is needed)
}


# --- how replies read ---------------------------------------------------------------------


def _ok(reply: Any) -> str:
    return "+OK"


def _depth(reply: Any) -> str:
    return f":{reply.value['depth']}"


def _json(reply: Any) -> str:
    return "+" + json.dumps(reply.value, separators=(",", ":"))


def _first_item(reply: Any) -> str:
    return item_line(reply.messages[0].payload)


def item_line(payload: bytes) -> str:
    """``+text`` for printable UTF-8, ``$base64`` for anything else."""
    try:
        text = payload.decode()
        if text.isprintable():
            return "+" + text
    except UnicodeDecodeError:
        pass
    return "$" + base64.b64encode(payload).decode()


_OPTION = re.compile(r"(delay|ttl|priority|dedup_id|header\.[^\s=]+)=(\S*)")


def put_options(data: str) -> tuple[str, PutOptions | None]:
    """The text of a PUT and the options at its end (``delay=5 ttl=60 priority=9
    dedup_id=abc header.NAME=value``). Raises ValueError for a bad value."""
    words = data.split(" ")
    found: dict[str, str] = {}
    while words and (m := _OPTION.fullmatch(words[-1])):
        words.pop()
        found.setdefault(m.group(1), m.group(2))
    if not found:
        return data, None
    opts = PutOptions()
    headers: dict[str, str] = {}
    for name, value in reversed(found.items()):  # in line order (read from the end)
        if name.startswith("header."):
            headers[name[7:]] = value
            continue
        try:
            number = int(value) if name == "priority" else float(value)
        except ValueError:
            if name != "dedup_id":
                kind = "an integer from 0 to 9" if name == "priority" else "a number of seconds"
                raise ValueError(f"{name} must be {kind}, not {value!r}") from None
        if name == "delay":
            opts.delay = number
        elif name == "ttl":
            opts.ttl = number
        elif name == "priority":
            opts.priority = int(number)
        else:
            if not value:
                raise ValueError("dedup_id must not be empty")
            opts.dedup_id = value
    if headers:
        opts.headers = headers
    return " ".join(words), opts
