"""The wire's error vocabulary: every ERROR code, what it means, and the exception a
client raises for it. Server and clients use this one table (docs/protocol.md §5).

A code is never renamed or given a new meaning (protocol version 1 stays compatible);
new codes may be added, and a client that meets a code it does not know raises
``PigeonError`` with the broker's message.
"""

from __future__ import annotations

from enum import StrEnum

from pigeon.errors import (
    AuthError,
    BrokenResourceError,
    Empty,
    Full,
    PigeonError,
    RemoteProtocolError,
    ShutDown,
    TooLarge,
    Unavailable,
)

__all__ = ["CONNECTION_CODES", "Code", "exception_for"]


class Code(StrEnum):
    EMPTY = "empty"  # GET: nothing before its wait ran out
    FULL = "full"  # PUT: no room before its wait ran out
    SHUTDOWN = "shutdown"  # the queue was shut down (PUT), and is drained (GET)
    TIMEOUT = "timeout"  # JOIN: unfinished tasks remained when its wait ran out
    AUTH = "auth"  # wrong or missing token (connection-level, then closed)
    # Never sent by this broker (an earlier one locked an address out after failed logins,
    # which let a stranger lock out a client with the token); kept, as every code is.
    COOLDOWN = "cooldown"
    PROTOCOL = "protocol"  # malformed bytes or messages (connection-level, then closed)
    BAD_REQUEST = "bad_request"  # a field out of range, a bad queue name, a batch too big
    VALUE = "value"  # TASK_DONE beyond the unfinished count
    LIMIT = "limit"  # a broker limit was reached (connections, parked bytes, queues)
    UNACKED = "unacked"  # GET: this connection holds max_unacked_bytes; settle some first
    TOO_LARGE = "too_large"  # a message no reply could carry: PUT refused, or GET of one
    UNAVAILABLE = "unavailable"  # the store cannot commit now, or the broker is stopping
    IDLE = "idle"  # nothing received for idle_timeout (connection-level, then closed)


# Codes sent with req 0: about the connection, which the broker closes after them.
CONNECTION_CODES = frozenset({Code.AUTH, Code.COOLDOWN, Code.PROTOCOL, Code.IDLE, Code.LIMIT})

_EXCEPTIONS: dict[str, type[BaseException]] = {
    Code.EMPTY: Empty,
    Code.FULL: Full,
    Code.SHUTDOWN: ShutDown,
    Code.TIMEOUT: TimeoutError,
    Code.AUTH: AuthError,
    Code.COOLDOWN: AuthError,
    Code.PROTOCOL: RemoteProtocolError,
    Code.BAD_REQUEST: ValueError,
    Code.VALUE: ValueError,
    Code.LIMIT: Unavailable,
    Code.UNACKED: Empty,
    Code.TOO_LARGE: TooLarge,
    Code.UNAVAILABLE: Unavailable,
    Code.IDLE: BrokenResourceError,
}


def exception_for(code: str, message: str) -> BaseException:
    """The exception a client raises for ``ERROR(code, message)``."""
    return _EXCEPTIONS.get(code, PigeonError)(message)
