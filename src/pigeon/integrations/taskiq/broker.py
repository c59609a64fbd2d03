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

import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from pigeon.aio import AsyncQueue
from pigeon.errors import InvalidURL, ShutDown
from pigeon.integrations.taskiq.labels import LabelNames, placement
from pigeon.integrations.taskiq.leases import LeaseKeeper
from pigeon.options import DEFAULT_LEASE

__all__ = ["DEFAULT_QUEUE", "PigeonBroker"]

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
    them back at once). ``labels``: other label names (``LabelNames``). Other keyword
    arguments are ``pigeon.AsyncQueue``'s (``maxsize``, ``max_deliveries``, ...).
    """

    def __init__(
        self,
        url: str = f"pigeon://127.0.0.1:7878/{DEFAULT_QUEUE}",
        *,
        lease: float = DEFAULT_LEASE,
        labels: LabelNames | None = None,
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
        self.label_names = labels or LabelNames()
        self._options = {**queue_options, "serializer": "raw"}
        self._queues: dict[str, AsyncQueue[bytes]] = {}
        self._keeper = LeaseKeeper(self.lease)

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
        until taskiq acks it. Ends when the queue is shut down and drained."""
        q = self._queue()
        while True:
            try:
                msg = await q.get_message(lease=self.lease)
            except ShutDown:
                return
            self._keeper.hold(msg)
            yield AckableMessage(data=msg.body, ack=self._acker(msg))

    def _acker(self, msg: Any) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            self._keeper.release(msg)
            await msg.ack()

        return ack
