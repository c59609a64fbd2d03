"""Every exception pigeon raises, in one tree.

```
PigeonError
├── FrameError                 malformed bytes on the wire
│   ├── FrameTooLarge          .size, .limit
│   └── IncompleteFrame        EOF mid-frame
├── ProtocolError
│   ├── LocalProtocolError     we did wrong
│   └── RemoteProtocolError    the peer did
├── Empty(PigeonError, queue.Empty)
├── Full(PigeonError, queue.Full)
├── ShutDown                   put/get on a shut-down queue (Python 3.13 semantics)
├── ClosedResourceError        your code closed it
├── BrokenResourceError        the peer or backend went away (see __cause__)
│   ├── Unavailable            the broker cannot take the request now (its store, a limit)
│   └── Indeterminate          sent, then the connection broke: it may or may not have taken
├── AuthError
├── Unsupported                this backend cannot offer the call; the message says why
├── InvalidURL
├── DecodeError                a payload the serializer cannot decode; .raw, .queue, .serializer
├── TooLarge                   an item is larger than the backend or the reply limit accepts
├── StoreCorrupted             the broker's data directory holds a damaged store
└── StoreInUse                 another broker has the data directory open
```

Foreign errors (OSError from a socket, a client library's exceptions) are translated at
the boundary with ``raise BrokenResourceError(...) from exc``: the original stays in
``__cause__``. Messages are lower case and carry the facts and the numbers.
"""

from __future__ import annotations

import queue as _stdlib_queue

__all__ = [
    "AuthError",
    "BrokenResourceError",
    "ClosedResourceError",
    "DecodeError",
    "Empty",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "IncompleteFrame",
    "Indeterminate",
    "InvalidURL",
    "LocalProtocolError",
    "PigeonError",
    "ProtocolError",
    "RemoteProtocolError",
    "ShutDown",
    "StoreCorrupted",
    "StoreInUse",
    "TooLarge",
    "Unavailable",
    "Unsupported",
]


class PigeonError(Exception):
    """Base class of every error pigeon raises on purpose."""


class FrameError(PigeonError):
    """The byte stream does not hold valid frames."""


class FrameTooLarge(FrameError):
    """A frame (announced by a header, or an unterminated line) passed the configured limit.

    Raised as soon as the size is known, before the body is buffered.
    """

    def __init__(self, size: int, limit: int, what: str = "frame", option: str = "") -> None:
        self.size = size
        self.limit = limit
        opt = option or "max_frame_size"
        super().__init__(f"{what} of {size} bytes exceeds {opt}={limit}")


class IncompleteFrame(FrameError):
    """The stream ended in the middle of a frame."""


class ProtocolError(PigeonError):
    """A message broke the rules of a protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class Empty(PigeonError, _stdlib_queue.Empty):
    """Nothing to get before the timeout ran out (or at once, for ``get_nowait``)."""


class Full(PigeonError, _stdlib_queue.Full):
    """No room to put before the timeout ran out (or at once, for ``put_nowait``)."""


class ShutDown(PigeonError):
    """The queue was shut down: puts fail at once; gets fail once it is drained."""


class ClosedResourceError(PigeonError):
    """This handle was closed by your code and cannot be used any more."""


class BrokenResourceError(PigeonError):
    """The peer or the backend went away; ``__cause__`` holds the original error."""


class AuthError(PigeonError):
    """The peer refused the credentials (or none were given where some are required)."""


class Unsupported(PigeonError):
    """This backend cannot offer the call; the message says why and what to use instead."""


class InvalidURL(PigeonError):
    """A queue URL could not be understood."""


class DecodeError(PigeonError):
    """A payload the queue's serializer cannot decode.

    The message was not acknowledged as received-and-fine: on the networked backends it
    went to the dead-letter queue (``<queue>.dead``) with the reason ``undecodable``.
    ``raw`` holds the bytes as they arrived, ``queue`` and ``serializer`` name where and how.
    """

    def __init__(
        self, message: str, *, raw: bytes = b"", queue: str = "", serializer: str = ""
    ) -> None:
        super().__init__(message)
        self.raw = raw
        self.queue = queue
        self.serializer = serializer


class TooLarge(PigeonError):
    """An item is larger than the backend (or the broker's reply limit) accepts.

    Nothing was sent (for a put) or taken (for a get); the message names the limit and
    the setting that raises it.
    """


class Unavailable(BrokenResourceError):
    """The broker refused the request for now (its store cannot commit, or a limit is
    reached); retrying later may succeed."""


class Indeterminate(BrokenResourceError):
    """A request was sent, the connection broke before its reply came, and what the
    request did cannot be known.

    Raised by an ack, or a nack that dead-letters, re-sent on a new connection after the
    first one's reply was lost, when the broker (or Redis) answers the repeat that it no
    longer holds the delivery: either the first send settled it (the usual case: only its
    reply was lost) or the delivery had ended otherwise (on pigeon://, taken back to be
    delivered again; on redis://, settled by a later delivery of it). Nothing needs
    settling again; handlers must be idempotent (at-least-once delivery).
    """


class StoreCorrupted(PigeonError):
    """The data directory holds a damaged store; the message names the file."""


class StoreInUse(PigeonError):
    """Another broker (another process, or another store object) has the data directory
    open: two writers would interleave their changes. The message names the directory and
    the holder's pid."""
