"""A Dramatiq ``Consumer`` over one pigeon queue: prefetch, late acks, dead letters, leases.

# Strategy:
# Each consumer has a queue handle of its own, so its connections (the consumer thread's,
# which takes the messages, and each worker thread's, which settle them: pigeon's delivery
# ids are broker-wide) close together in ``close()``, and everything it still holds goes
# back to the queue at once - as when its process dies and the broker sees the connection
# drop. ``__next__`` takes one message at a time while fewer than ``prefetch`` are held
# (taken, not yet acked or nacked); the worker threads ack and nack directly. A message is
# taken with a lease, and the consumer thread, which Dramatiq wakes at least every
# ``worker_timeout`` (1 s), extends the lease of every message it holds once a third of it
# has passed (two thirds are left for a late renewal: a busy machine, a long pause). So a
# task may run as long as it needs while its process lives, and a process that stops
# (SIGSTOP, a GIL held for longer than the lease) gives its messages back when their
# lease ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dramatiq import Consumer, Message, MessageProxy
from dramatiq.errors import DecodeError as DramatiqDecodeError

from pigeon._queue_base import Message as PigeonMessage
from pigeon.errors import (
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Indeterminate,
    LocalProtocolError,
)
from pigeon.integrations.dramatiq._errors import connection_closed
from pigeon.integrations.dramatiq._mapping import dead_reason

if TYPE_CHECKING:
    from pigeon.backends.pigeon import BrokerQueue

__all__ = ["PigeonConsumer", "PigeonMessageProxy"]

logger = logging.getLogger("pigeon.integrations.dramatiq")


class PigeonMessageProxy(MessageProxy):
    """A Dramatiq message taken from pigeon: ``delivery_count`` (1 the first time) and
    ``redelivered`` tell whether it ran before (a worker died or gave it back)."""

    def __init__(
        self, message: Message[Any], delivered: PigeonMessage[bytes], consumer: PigeonConsumer
    ) -> None:
        super().__init__(message)
        self.delivery_count = delivered.delivery_count
        self.redelivered = delivered.delivery_count > 1
        self._delivered = delivered
        self._consumer = consumer


class _Held:
    """A message this consumer holds, and when its lease next needs extending."""

    __slots__ = ("delivered", "renew_at")

    def __init__(self, delivered: PigeonMessage[bytes], renew_at: float) -> None:
        self.delivered = delivered
        self.renew_at = renew_at


class PigeonConsumer(Consumer):
    """Takes messages from one pigeon queue for a Dramatiq worker (see the module's
    strategy). Made by ``PigeonBroker.consume``."""

    def __init__(
        self, queue: BrokerQueue[bytes], prefetch: int, timeout_ms: int, lease: float
    ) -> None:
        self._queue = queue
        self._prefetch = max(1, prefetch)
        self._timeout = max(timeout_ms, 1) / 1000
        self._lease = lease
        self._held: dict[int, _Held] = {}  # id() of each message held -> its lease renewal
        self._room = threading.Condition()

    # --- taking --------------------------------------------------------------------------

    def __next__(self) -> MessageProxy | None:
        """The next message, or None when none came within the consumer's timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            wait = min(self._keep_leases(), deadline - time.monotonic())
            if wait <= 0:
                return None
            with self._room:
                if len(self._held) >= self._prefetch:
                    self._room.wait(wait)
                    continue
            try:
                delivered = self._queue.get_message(timeout=wait, lease=self._lease)
            except Empty:
                continue
            except BrokenResourceError as exc:
                raise connection_closed(exc) from exc
            proxy = self._proxy(delivered)
            if proxy is not None:
                return proxy

    def _proxy(self, delivered: PigeonMessage[bytes]) -> MessageProxy | None:
        try:
            message = Message.decode(delivered.body)
        except DramatiqDecodeError as exc:
            logger.error("a message on %r does not decode; dead-lettered: %s", self._name, exc)
            self._settle(delivered, "nack", False, f"undecodable: {exc}"[:500])
            return None
        if delivered.headers:
            message.options["headers"] = dict(delivered.headers)
        with self._room:
            self._held[id(delivered)] = _Held(delivered, time.monotonic() + self._lease / 3)
        return PigeonMessageProxy(message, delivered, self)

    def _keep_leases(self) -> float:
        """Extend the leases a third over; seconds until the next one will be."""
        now = time.monotonic()
        with self._room:
            due = [h for h in self._held.values() if h.renew_at <= now]
            for h in due:
                h.renew_at = now + self._lease / 3
            soonest = min((h.renew_at for h in self._held.values()), default=now + self._lease)
        for h in due:
            try:
                h.delivered.extend(self._lease)
            except (LocalProtocolError, ClosedResourceError):
                pass  # settled meanwhile by its worker thread (or already given back)
            except BrokenResourceError as exc:
                raise connection_closed(exc) from exc
        return max(soonest - now, 0.001)

    # --- settling (from the worker threads) ------------------------------------------------

    def ack(self, message: MessageProxy) -> None:
        """The task is done: ack it, and mark it done for ``PigeonBroker.join``."""
        taken = self._release(message)
        if not self._settle(taken._delivered, "ack"):
            return
        try:
            taken._consumer._queue.task_done()
        except (BrokenResourceError, ClosedResourceError, ValueError) as exc:
            # ValueError: the queue was deleted or purged meanwhile (nothing unfinished)
            logger.error(
                "message %s was acked but not marked done (%s): a join() on %r waits for it",
                taken.message_id,
                exc,
                self._name,
            )

    def nack(self, message: MessageProxy) -> None:
        """The task failed for good: move it to ``NAME.dead``, with why."""
        taken = self._release(message)
        self._settle(taken._delivered, "nack", False, dead_reason(taken._exception))

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Give back messages taken but not started (the worker is stopping)."""
        for message in messages:
            self._settle(self._release(message)._delivered, "nack", True, "")

    @staticmethod
    def _release(message: MessageProxy) -> PigeonMessageProxy:
        """Stop holding ``message`` (for the consumer that took it, maybe not this one:
        Dramatiq settles through the queue's current consumer)."""
        if not isinstance(message, PigeonMessageProxy):
            raise TypeError(f"{message!r} was not taken from a pigeon broker")
        owner = message._consumer
        with owner._room:
            if owner._held.pop(id(message._delivered), None) is not None:
                owner._room.notify()
        return message

    def _settle(self, delivered: PigeonMessage[bytes], what: str, *args: Any) -> bool:
        """Ack or nack; False if the broker no longer held it for us (it was given back,
        so it runs again); ``ConnectionClosed`` if the broker cannot be reached. A settle
        whose outcome is unknown (``Indeterminate``: its reply was lost, the broker has
        the delivery no more) counts as done: most likely it took; if not, it runs again."""
        try:
            if what == "ack":
                delivered.ack()
            else:
                requeue, reason = args
                delivered.nack(requeue=requeue, reason=reason)
        except Indeterminate as exc:
            logger.warning("a %s of a message of %r may not have taken effect (if it did "
                           "not, it runs again): %s", what, self._name, exc)  # fmt: skip
            return True
        except (LocalProtocolError, ClosedResourceError) as exc:
            logger.warning("could not %s a message of %r, it runs again: %s", what, self._name, exc)
            return False
        except BrokenResourceError as exc:
            raise connection_closed(exc) from exc
        return True

    @property
    def _name(self) -> str:
        return self._queue.name

    def close(self) -> None:
        """Close the handle: what it still holds goes back to the queue at once."""
        self._queue.close()
