"""How many worker processes each message killed: ``poison_after`` in process mode.

# Strategy:
# The count belongs to one message, not to its bytes: identical messages (a periodic job
# put three times, tasks without arguments) each have their own, so three twins that each
# killed one worker are not "an item that killed three". A message is named by what its
# backend tells (``Message._identity``: the broker's message id on pigeon://, the stream
# entry on redis://, the stream sequence on nats://); the local queue tells nothing, so
# there its bytes stand in. Either way a count carries over only to a *later* delivery -
# a higher delivery count - of what it names: a message that killed a worker comes back
# at its next delivery, while a twin with the same bytes, or a message that took the id
# of one lost with a broker's memory, comes at its first.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from typing import Any

from pigeon._queue_base import Message

__all__ = ["Crashes"]


class Crashes:
    """The worker processes each message killed, while it is not settled for good."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kills: dict[Hashable, tuple[int, int]] = {}  # key -> (kills, delivery count)

    @staticmethod
    def key(msg: Message[Any], payload: bytes) -> Hashable:
        """What names ``msg`` (``payload``: its item as sent to a worker process)."""
        identity = msg._identity
        if identity is not None:
            return ("id", identity)
        return ("bytes", hashlib.blake2b(payload, digest_size=16).digest())

    def of(self, key: Hashable, msg: Message[Any]) -> int:
        """The worker processes ``msg`` killed in its earlier deliveries."""
        with self._lock:
            kills, seen = self._kills.get(key, (0, 0))
        return kills if msg.delivery_count > seen else 0

    def killed(self, key: Hashable, msg: Message[Any]) -> int:
        """This delivery of ``msg`` killed its worker process: the count, this one in."""
        with self._lock:
            kills, seen = self._kills.get(key, (0, 0))
            kills = (kills if msg.delivery_count > seen else 0) + 1
            self._kills[key] = (kills, msg.delivery_count)
        return kills

    def forget(self, key: Hashable) -> None:
        """The message is settled for good (acked, dead-lettered)."""
        with self._lock:
            self._kills.pop(key, None)
