"""The facade: ``Queue``, ``AsyncQueue`` and ``Message``, backends chosen by URL scheme."""

from __future__ import annotations

from pigeon._queue_base import SCHEMES, Message, Queue
from pigeon.aio import AsyncQueue

__all__ = ["SCHEMES", "AsyncQueue", "Message", "Queue"]
