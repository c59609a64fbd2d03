"""A message taken from a local queue (``get_message``): settled in this process, given
back to the shared ring by a nack."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from pigeon._queue_base import Message
from pigeon.errors import LocalProtocolError
from pigeon.protocol.rules import seconds_problem

if TYPE_CHECKING:
    from pigeon.backends.local.queue import LocalQueue

T = TypeVar("T")

__all__ = ["LocalMessage"]


class LocalMessage(Message[T]):
    """A message taken from a local queue.

    The item has left the queue when you get it. ``ack()`` just marks it settled;
    ``nack(requeue=True, delay=0)`` puts it back at the tail with ``delivery_count + 1``,
    at once: with a ``delay`` it waits in the shared ring until it comes due, seen by
    every process (``qsize`` counts it) and kept when this process exits. ``extend()``
    does nothing: local messages have no lease.
    """

    def __init__(
        self,
        queue: LocalQueue[T],
        body: T,
        delivery_count: int,
        headers: dict[str, str] | None = None,
        priority: int = 0,
    ) -> None:
        self._queue = queue
        self.body = body
        self.delivery_count = delivery_count
        self.headers: dict[str, str] = headers if headers is not None else {}
        self._priority = priority
        self._settled = False

    def _settle(self) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        self._settled = True

    def ack(self) -> None:
        self._settle()

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> None:
        bad = seconds_problem("delay", delay, nil=False)
        if bad:
            raise ValueError(bad)
        self._settle()
        if requeue:
            self._queue._requeue(
                self.body, self.delivery_count + 1, self.headers, self._priority, float(delay)
            )

    def extend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
