"""Text mode: the broker's protocol for humans with ``nc`` or telnet.

# Strategy:
# One command per line (``\\n``, a preceding ``\\r`` ignored). Each command takes a slot in
# the connection's reply queue when it arrives, and replies leave in slot order, so they
# come back in command order even when one waits for the store's commit (PUT) or for an
# item (GET with a wait): what a person types is answered in the order typed. A command
# that needs the broker is applied through the same sans-IO broker as binary requests,
# with request ids the server makes. Bytes that can never be text (invalid UTF-8 lead
# bytes, control characters other than tab, CR and LF) close the connection as soon as
# they arrive: garbage does not get to sit on a slot until a newline that never comes.
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from pigeon.protocol import Error, Get, Info, Put, PutOptions, Shutdown
from pigeon.server.interfaces import TextSession

__all__ = ["NOT_TEXT", "TEXT_FIRST_BYTES", "TextReplies", "run_command"]

MAX_LINE = 64 * 1024
# Bytes that never occur in UTF-8 text a person types: C0 controls but tab, LF and CR,
# DEL, and bytes that are never valid in UTF-8 (0xC0, 0xC1, 0xF5-0xFF).
NOT_TEXT = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\xc0\xc1\xf5-\xff]")
# A first byte that may start a line of text (anything else, but 0x00, is garbage).
TEXT_FIRST_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D} | set(range(0xC2, 0xF5))


class Slot:
    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[bytes] | None = None


class TextReplies:
    """Replies of one text connection, released in the order their commands came."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._slots: deque[Slot] = deque()

    def __len__(self) -> int:
        return len(self._slots)

    def reserve(self) -> Slot:
        slot = Slot()
        self._slots.append(slot)
        return slot

    def fill(self, slot: Slot, *lines: str | bytes) -> None:
        slot.lines = [(ln.encode() if isinstance(ln, str) else ln) + b"\r\n" for ln in lines]
        slots = self._slots
        while slots and slots[0].lines is not None:
            self._write(b"".join(slots.popleft().lines or ()))

    def now(self, *lines: str | bytes) -> None:
        """A reply that needs nothing but its turn."""
        self.fill(self.reserve(), *lines)


def _item(payload: bytes) -> str:
    """``+text`` for printable UTF-8, ``$base64`` for anything else."""
    try:
        text = payload.decode()
        if text.isprintable():
            return "+" + text
    except UnicodeDecodeError:
        pass
    return "$" + base64.b64encode(payload).decode()


_OPTION = re.compile(r"(delay|ttl|priority|dedup_id|header\.[^\s=]+)=(\S*)")


def _options(data: str) -> tuple[str, PutOptions | None]:
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
    for name, value in found.items():
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


def _put(c: TextSession, rest: str) -> None:
    queue, _, data = rest.partition(" ")
    if not queue:
        c.replies.now("-ERR usage: PUT <queue> <text> [delay=S] [ttl=S] [priority=0-9] "
                      "[dedup_id=ID] [header.NAME=VALUE]")  # fmt: skip
        return
    try:
        data, opts = _options(data)
    except ValueError as exc:
        c.replies.now(f"-BAD_REQUEST {exc}")
        return
    c.text_request(Put(0, queue, data.encode(), 0.0, opts), lambda r: "+OK")


def _get(c: TextSession, rest: str) -> None:
    parts = rest.split()
    if not parts:
        c.replies.now("-ERR usage: GET <queue> [wait seconds]")
        return
    try:
        wait = float(parts[1]) if len(parts) > 1 else 0.0
    except ValueError:
        c.replies.now(f"-ERR wait must be a number of seconds, not {parts[1]!r}")
        return
    c.text_request(Get(0, parts[0], 1, wait), lambda r: _item(r.messages[0].payload))


def _qsize(c: TextSession, rest: str) -> None:
    c.text_request(Info(0, rest.strip() or "-"), lambda r: f":{r.value['depth']}")


def _shutdown(c: TextSession, rest: str) -> None:
    c.text_request(Shutdown(0, rest.strip() or "-"), lambda r: "+OK")


def _stats(c: TextSession, rest: str) -> None:
    c.replies.now("+" + json.dumps(c.server.stats(), separators=(",", ":")))


def _ping(c: TextSession, rest: str) -> None:
    c.replies.now("+PONG")


def _quit(c: TextSession, rest: str) -> None:
    c.replies.now("+BYE")
    c.begin_drain()


def _auth(c: TextSession, rest: str) -> None:
    c.replies.now("-ERR this broker needs no AUTH" if not c.server.auth.required else "+OK")


def _help(c: TextSession, rest: str) -> None:
    c.replies.now(
        "+commands (one per line, \\r\\n or \\n; replies come back in command order):",
        "+  PUT <queue> <text>       put the text (UTF-8 bytes) as one item; options at the",
        "+                           end: delay=S ttl=S priority=0-9 dedup_id=ID header.K=V",
        "+  GET <queue> [seconds]    take one item (+text, or $base64 for binary)",
        "+  QSIZE <queue>            items waiting",
        "+  SHUTDOWN <queue>         shut the queue down",
        "+  STATS                    broker statistics as JSON",
        "+  PING | HELP | QUIT",
    )


COMMANDS: dict[str, Callable[[TextSession, str], None]] = {
    "PUT": _put,
    "GET": _get,
    "QSIZE": _qsize,
    "SHUTDOWN": _shutdown,
    "STATS": _stats,
    "PING": _ping,
    "QUIT": _quit,
    "HELP": _help,
    "AUTH": _auth,
}


def run_command(c: TextSession, line: bytes) -> None:
    """Apply one line typed by a person."""
    try:
        text = line.decode()
    except UnicodeDecodeError:
        c.protocol_error("lines must be UTF-8 text")
        return
    cmd, _, rest = text.strip().partition(" ")
    cmd = cmd.upper()
    if not cmd:
        return
    if not c.welcomed:  # the broker has a token: nothing but AUTH (and HELP, QUIT) yet
        if cmd == "AUTH":
            c.text_login(rest.strip())
        elif cmd in ("HELP", "QUIT"):
            COMMANDS[cmd](c, rest)
        else:
            c.replies.now("-ERR auth: this broker needs a token; send AUTH <token> first")
        return
    handler = COMMANDS.get(cmd)
    if handler is None:
        c.replies.now(f"-ERR unknown command {cmd!r}; try HELP")
        return
    handler(c, rest)


def format_error(msg: Error) -> str:
    return f"-{msg.code.upper()} {msg.message}"


def reply_line(msg: Any, ok: Callable[[Any], str]) -> str:
    return format_error(msg) if isinstance(msg, Error) else ok(msg)
