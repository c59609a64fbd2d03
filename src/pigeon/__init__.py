"""pigeon: one queue API for threads, processes, asyncio coroutines and hosts."""

from __future__ import annotations

from pigeon import _compiled  # noqa: F401  (first: compiled modules or their source)
from pigeon._queue_base import Message, Queue
from pigeon.aio import AsyncQueue
from pigeon.consume import ConsumeReport, DeadLetter, Retry, consume
from pigeon.errors import (
    AuthError,
    BrokenResourceError,
    ClosedResourceError,
    DecodeError,
    Empty,
    FrameError,
    FrameTooLarge,
    Full,
    IncompleteFrame,
    Indeterminate,
    InvalidURL,
    LocalProtocolError,
    PigeonError,
    ProtocolError,
    RemoteProtocolError,
    ShutDown,
    StoreCorrupted,
    StoreInUse,
    TooLarge,
    Unavailable,
    Unsupported,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncQueue",
    "AuthError",
    "BrokenResourceError",
    "ClosedResourceError",
    "ConsumeReport",
    "DeadLetter",
    "DecodeError",
    "Empty",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "IncompleteFrame",
    "Indeterminate",
    "InvalidURL",
    "LocalProtocolError",
    "Message",
    "PigeonError",
    "ProtocolError",
    "Queue",
    "RemoteProtocolError",
    "Retry",
    "ShutDown",
    "StoreCorrupted",
    "StoreInUse",
    "TooLarge",
    "Unavailable",
    "Unsupported",
    "__version__",
    "consume",
]
