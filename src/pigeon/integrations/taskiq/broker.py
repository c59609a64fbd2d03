"""``PigeonBroker``: taskiq's ``AsyncBroker`` on a pigeon queue (``pigeon serve``).

# Strategy:
# ``kick`` is one put of the formatted message's bytes (``serializer="raw"``) with the
# options its labels ask for (``labels.placement``); ``listen`` takes one message at a
# time with ``get_message`` and yields it as an ``AckableMessage`` whose ``ack`` is the
# pigeon ack. Nothing is acked before taskiq says so (``--ack-type``, when_saved by
# default), the lease keeper extends what the worker holds while its tasks run, and
# whatever it holds when it dies comes back to the queue when its connection drops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from pigeon.aio import AsyncQueue
from pigeon.errors import (
    ClosedResourceError,
    Indeterminate,
    InvalidURL,
    LocalProtocolError,
    PigeonError,
    ShutDown,
)
from pigeon.integrations.taskiq.labels import LabelNames, placement
from pigeon.integrations.taskiq.leases import LeaseKeeper
from pigeon.options import DEFAULT_LEASE

__all__ = ["DEFAULT_QUEUE", "PigeonBroker"]

log = logging.getLogger("pigeon.integrations.taskiq")

DEFAULT_QUEUE = "taskiq"  # the queue of a URL without one (taskiq-redis's and aio-pika's name)


class PigeonBroker(AsyncBroker):
    """taskiq's broker on a pigeon queue: ``PigeonBroker("pigeon://127.0.0.1:7878/taskiq")``.

    The URL is any ``pigeon.AsyncQueue`` URL; its path names the queue (``taskiq`` when it
    has none). Labels: ``delay`` (seconds) becomes a broker-held delay, ``priority`` (0-9)
    a real priority, ``dedup_id`` a unique put, ``queue_name`` the queue it goes to - a
    value the broker cannot honour as written makes ``kiq()`` raise ``SendTaskError``.

    ``lease``: seconds a worker holds a task before the broker may give it to another
    worker if this one neither acks nor extends it; the worker extends it while the task
    runs, so it bounds only how long a stuck worker keeps its tasks (a dead one gives
    them back at once). ``labels``: other label names (``LabelNames``).
    ``unknown_task_delay``: seconds a message naming a task this worker does not know
    waits before it is offered again (5; a rolling deploy: a worker that knows it takes
    it). Other keyword arguments are ``pigeon.AsyncQueue``'s (``maxsize``,
    ``max_deliveries``, ``reconnect_timeout``: how long a ``kiq()`` retries a broker that
    is down before it raises ``SendTaskError``, 30 s; 0 fails at once).
    """

    def __init__(
        self,
        url: str = f"pigeon://127.0.0.1:7878/{DEFAULT_QUEUE}",
        *,
        lease: float = DEFAULT_LEASE,
        labels: LabelNames | None = None,
        unknown_task_delay: float = 5.0,
        **queue_options: Any,
    ) -> None:
        super().__init__()
        if "serializer" in queue_options:
            raise TypeError(
                "PigeonBroker carries taskiq's bytes as they are (serializer='raw'); "
                "choose the serializer with broker.with_serializer(...) instead"
            )
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            raise InvalidURL(f"PigeonBroker needs a networked queue URL, not {url!r} "
                             "(e.g. 'pigeon://127.0.0.1:7878/taskiq')")  # fmt: skip
        self.queue_name = unquote(parts.path.lstrip("/")) or DEFAULT_QUEUE
        self.url = parts._replace(path="/" + quote(self.queue_name, safe="")).geturl()
        self.lease = float(lease)
        if not math.isfinite(self.lease) or self.lease <= 0:
            raise ValueError(f"lease must be a number of seconds more than 0, not {lease!r}")
        self.unknown_task_delay = float(unknown_task_delay)
        if not math.isfinite(self.unknown_task_delay) or self.unknown_task_delay < 0:
            raise ValueError(
                f"unknown_task_delay must be a number of seconds from 0, not {unknown_task_delay!r}"
            )
        self.label_names = labels or LabelNames()
        self._options = {**queue_options, "serializer": "raw"}
        self._queues: dict[str, AsyncQueue[bytes]] = {}
        self._keeper = LeaseKeeper(self.lease)
        self._nacks: set[asyncio.Task[None]] = set()  # give-backs of dropped messages

    def _queue(self, name: str | None = None) -> AsyncQueue[bytes]:
        """The handle of queue ``name`` on the same broker (the broker's own queue: None),
        opened on first use."""
        name = name or self.queue_name
        q = self._queues.get(name)
        if q is None:
            url = urlsplit(self.url)._replace(path="/" + quote(name, safe="")).geturl()
            q = self._queues[name] = AsyncQueue(url, **self._options)
        return q

    async def startup(self) -> None:
        """Connect now, so a worker or client without its broker fails at startup."""
        await super().startup()
        await self._queue().qsize()

    async def shutdown(self) -> None:
        """Close every handle: what this worker still holds goes back to its queue."""
        await super().shutdown()
        await self._keeper.aclose()
        queues, self._queues = list(self._queues.values()), {}
        for q in queues:
            await q.aclose()

    async def kick(self, message: BrokerMessage) -> None:
        """Put one task. Raises ``ValueError`` for a label it cannot honour,
        ``pigeon.Unsupported`` for an option the URL's backend cannot (taskiq's kicker
        turns both into ``SendTaskError``)."""
        p = placement(message.task_id, message.task_name, message.labels, self.label_names)
        await self._queue(p.queue).put(
            message.message,
            delay=p.delay,
            priority=p.priority,
            dedup_id=p.dedup_id,
            headers=p.headers,
        )

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield the broker's queue's tasks, one at a time, each held (its lease kept)
        until taskiq acks it. Ends when the queue is shut down and drained.

        A message this worker would skip is not yielded: one that does not parse goes to
        ``QUEUE.dead`` (reason ``undecodable``), one naming a task this worker does not
        know goes back to the queue after ``unknown_task_delay`` seconds (for a worker
        that knows it; after ``max_deliveries`` it goes to ``QUEUE.dead``)."""
        q = self._queue()
        while True:
            try:
                msg = await q.get_message(lease=self.lease)
            except ShutDown:
                return
            if not await self._runnable(msg):
                continue
            self._keeper.hold(msg)
            yield AckableMessage(data=msg.body, ack=self._acker(msg))

    async def _runnable(self, msg: Any) -> bool:
        """Would taskiq's receiver run ``msg``? If not, settle it as ``listen`` says."""
        try:
            task = self.formatter.loads(message=msg.body)
            task.parse_labels()
        except Exception as exc:  # the receiver skips whatever its formatter refuses
            why = f"undecodable: {type(exc).__name__}: {exc}"[:500]
            log.error("a message on %r does not parse; dead-lettered: %s", self.queue_name, why)
            await self._settle(msg, False, 0.0, why)
            return False
        if self.find_task(task.task_name) is None:
            log.warning(
                "task %r is not known to this worker; message %s goes back to %r for %g s "
                "(delivery %d)",
                task.task_name,
                task.task_id,
                self.queue_name,
                self.unknown_task_delay,
                msg.delivery_count,
            )
            await self._settle(msg, True, self.unknown_task_delay, "")
            return False
        return True

    @staticmethod
    async def _settle(msg: Any, requeue: bool, delay: float, reason: str) -> None:
        try:
            await msg.nack(requeue, delay, reason=reason)
        except PigeonError as exc:  # given back already: it comes again
            log.warning("could not nack a message: %s", exc)

    def _acker(self, msg: Any) -> Callable[[], Awaitable[None]]:
        acked = [False]

        async def ack() -> None:
            acked[0] = True
            self._keeper.release(msg)
            try:
                await msg.ack()
            except Indeterminate as exc:  # sent, its reply lost: most likely it took
                log.warning("an ack of a message of %r may not have taken effect (if it did "
                            "not, the task runs again): %s", self.queue_name, exc)  # fmt: skip
            except (LocalProtocolError, ClosedResourceError) as exc:
                # The broker holds it for this worker no more (its lease ran out and it
                # went to another): taskiq's receiver cannot do anything with the error.
                log.warning("could not ack a message of %r; the task runs again: %s",
                            self.queue_name, exc)  # fmt: skip

        # taskiq drops a message it will not run without a word (its receiver returns
        # early, or the run fails before the ack): when the ack function is gone, so is
        # every reference to the message. Stop extending it, and give it back.
        weakref.finalize(ack, self._dropped, msg, acked)
        return ack

    def _dropped(self, msg: Any, acked: list[bool]) -> None:
        if acked[0] or not self._keeper.release(msg):
            return
        log.warning(
            "taskiq dropped a message of %r without acking it (delivery %d); it goes back "
            "to the queue",
            self.queue_name,
            msg.delivery_count,
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to nack on: the lease, no longer extended, gives it back
        task = loop.create_task(self._settle(msg, True, 0.0, ""))
        self._nacks.add(task)
        task.add_done_callback(self._nacks.discard)
