"""``pigeon.AsyncQueue``: the asyncio face of a queue.

``AsyncQueue(q)`` wraps a local ``pigeon.Queue`` that threads and processes share;
``AsyncQueue()`` (or ``AsyncQueue(maxsize=N)``) makes a new local one. Every method of
``Queue`` is here as a coroutine (``await aq.put(x)``, ``await aq.qsize()``, ...), plus
``async for`` and ``async with``; ``aclose()`` closes.

# Strategy:
# A local queue's face is ``backends/local/aio.py`` (futex watcher threads: the loop never
# blocks); a networked one is its backend's asyncio class (``BACKENDS``). This class only
# picks one and forwards to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from pigeon._queue_base import Queue, backend_for
from pigeon.backends.local import LocalQueue
from pigeon.backends.local.aio import AsyncLocalQueue
from pigeon.errors import ShutDown, Unsupported
from pigeon.serializers import SerializerLike

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["AsyncQueue"]


class AsyncQueue(Generic[T]):
    """The asyncio face of a queue: the methods of ``pigeon.Queue``, awaitable.

    ``AsyncQueue(q)`` wraps a ``pigeon.Queue`` (local: shared with threads and processes;
    it stays open when this one closes); ``AsyncQueue(url)`` opens a networked queue;
    ``AsyncQueue()`` makes a new local queue. Every method is a coroutine (``await
    aq.put(x)``, ``await aq.qsize()``), with ``async for`` until shut down and drained and
    ``async with``. Messages from ``get_message`` settle with ``await msg.ack()`` (or
    ``msg.ack()`` without waiting for the confirmation).
    """

    def __init__(
        self,
        queue: Queue[T] | str | None = None,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
        **options: Any,
    ) -> None:
        impl: Any
        if isinstance(queue, LocalQueue):
            impl = AsyncLocalQueue(queue, owned=False)
        elif isinstance(queue, Queue):
            impl = _network(queue.url, queue, options)
        elif queue is None:
            impl = AsyncLocalQueue(LocalQueue(maxsize=maxsize, serializer=serializer), owned=True)
        elif isinstance(queue, str):
            impl = _network(queue, None, {"maxsize": maxsize, "serializer": serializer, **options})
        else:
            raise TypeError(f"AsyncQueue takes a pigeon.Queue, a URL or nothing, not {queue!r}")
        self._impl = impl
        self._source = queue if isinstance(queue, Queue) else None

    @property
    def queue(self) -> Queue[T] | None:
        """The ``pigeon.Queue`` this wraps, if it was made from one."""
        return self._source

    @property
    def url(self) -> str | None:
        return self._impl.url  # type: ignore[no-any-return]

    @property
    def maxsize(self) -> int:
        return self._impl.maxsize  # type: ignore[no-any-return]

    async def put(
        self,
        item: T,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Put ``item``; wait (never blocking the loop) while the queue is full. The
        message options are ``pigeon.Queue.put``'s.

        Raises ``Full`` after ``timeout`` seconds, ``ShutDown`` if shut down.
        """
        if delay is None and ttl is None and dedup_id is None and priority is None and not headers:
            await self._impl.put(item, timeout)
        else:
            await self._impl.put(item, timeout, delay=delay, ttl=ttl, dedup_id=dedup_id,
                                 priority=priority, headers=headers)  # fmt: skip

    async def put_nowait(self, item: T) -> None:
        await self._impl.put_nowait(item)

    async def put_many(
        self,
        items: Iterable[T],
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str] | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Put all ``items`` at once (all or none), each with the options given
        (``dedup_ids``: one per item)."""
        if delay is None and ttl is None and dedup_ids is None and priority is None and not headers:
            await self._impl.put_many(items, timeout)
        else:
            await self._impl.put_many(items, timeout, delay=delay, ttl=ttl, dedup_ids=dedup_ids,
                                      priority=priority, headers=headers)  # fmt: skip

    async def get(self, timeout: float | None = None) -> T:
        """Remove and return the next item; ``Empty`` after ``timeout``, ``ShutDown`` once
        shut down and drained."""
        return await self._impl.get(timeout)  # type: ignore[no-any-return]

    async def get_nowait(self) -> T:
        return await self._impl.get_nowait()  # type: ignore[no-any-return]

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Wait for at least one item, then return up to ``max_items``."""
        return await self._impl.get_many(max_items, timeout)  # type: ignore[no-any-return]

    async def get_message(self, timeout: float | None = None, lease: float | None = None) -> Any:
        """Take the next item as a message to ``ack``/``nack``/``extend`` (awaitable).

        ``lease``: seconds before an unsettled message is redelivered (networked queues;
        the queue's lease when None)."""
        return await self._impl.get_message(timeout, lease)

    async def qsize(self) -> int:
        return await self._impl.qsize()  # type: ignore[no-any-return]

    async def empty(self) -> bool:
        return await self._impl.empty()  # type: ignore[no-any-return]

    async def full(self) -> bool:
        return await self._impl.full()  # type: ignore[no-any-return]

    async def task_done(self) -> None:
        await self._impl.task_done()

    async def join(self, timeout: float | None = None) -> None:
        await self._impl.join(timeout)

    async def shutdown(self, immediate: bool = False) -> None:
        await self._impl.shutdown(immediate)

    async def aclose(self) -> None:
        """Release this handle (and the queue, if this AsyncQueue opened it)."""
        await self._impl.aclose()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.get()
            except ShutDown:
                return

    async def __aenter__(self) -> AsyncQueue[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _network(url: str | None, queue: Queue[Any] | None, options: dict[str, Any]) -> Any:
    if url is None:
        raise Unsupported(f"AsyncQueue cannot wrap {type(queue).__name__}: it has no URL")
    cls = backend_for(url, "async")  # raises InvalidURL / Unsupported, naming the schemes
    if queue is not None:
        options = queue.async_options()  # type: ignore[attr-defined]
    return cls(url, **options)
