"""``pigeon.AsyncQueue``: the asyncio face of a queue.

``AsyncQueue(q)`` wraps a local ``pigeon.Queue`` that threads and processes share;
``AsyncQueue()`` (or ``AsyncQueue(maxsize=N)``) makes a new local one. Every method of
``Queue`` is here as a coroutine (``await aq.put(x)``, ``await aq.qsize()``, ...), plus
``async for`` and ``async with``; ``aclose()`` closes.

# Strategy:
# Operations are tried without blocking on the event loop (they take microseconds). When
# one must wait (empty, full, join), the coroutine parks on an asyncio future and a
# watcher thread, one per queue and condition, sleeps on the queue's futex word for
# everyone. A put from any thread or process changes the word, the watcher wakes and
# resolves every parked future whose snapshot of the word is stale: no polling, and the
# loop never blocks. A cancelled coroutine just leaves; the watcher takes nothing from
# the queue, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from pigeon._queue_base import Message, Queue, backend_for, deadline_from
from pigeon.backends.local import GET_SEQ, JOIN_SEQ, PUT_SEQ, LocalQueue
from pigeon.errors import ClosedResourceError, Empty, Full, ShutDown, Unsupported
from pigeon.serializers import SerializerLike

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["AsyncQueue"]


class _Watcher:
    """One thread that waits on one futex word for all the coroutines parked on it."""

    def __init__(self, queue: LocalQueue[Any], word: int) -> None:
        self._queue = queue
        self._word = word
        self._lock = threading.Lock()
        self._parked: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int]] = []
        self._thread: threading.Thread | None = None
        self.stopped = False

    async def wait(self, seq: int, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut, seq)
        with self._lock:
            self._parked.append(entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pigeon-aio-watcher", daemon=True
                )
                self._thread.start()
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._parked.remove(entry)

    def _run(self) -> None:
        queue = self._queue
        while not self.stopped:
            try:
                current = queue._seq(self._word)
            except (ClosedResourceError, ValueError):
                current = None
            with self._lock:
                if not self._parked:
                    self._thread = None
                    return
                ready = [e for e in self._parked if e[2] != current or current is None]
                for e in ready:
                    self._parked.remove(e)
            for loop, fut, _ in ready:
                with contextlib.suppress(RuntimeError):  # the loop was closed
                    loop.call_soon_threadsafe(_resolve, fut)
            if current is None:
                return
            if not ready:
                try:
                    queue._wait_change(self._word, current, 1.0)
                except (ClosedResourceError, ValueError):
                    continue


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _LocalMessage(Generic[T]):
    """A local message in the asyncio face: ``await msg.ack()`` works, as on the network."""

    def __init__(self, msg: Message[T]) -> None:
        self._msg = msg
        self.body = msg.body
        self.delivery_count = msg.delivery_count
        self.headers: dict[str, str] = msg.headers

    @staticmethod
    def _done(fn: Callable[[], None]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fn()
        fut.set_result(None)
        return fut

    def ack(self) -> asyncio.Future[None]:
        return self._done(self._msg.ack)

    def nack(
        self, requeue: bool = True, delay: float = 0, *, reason: str = ""
    ) -> asyncio.Future[None]:
        return self._done(lambda: self._msg.nack(requeue, delay, reason=reason))

    def extend(self, seconds: float) -> asyncio.Future[None]:
        return self._done(lambda: self._msg.extend(seconds))


class _LocalAsync(Generic[T]):
    """AsyncQueue over a local queue: futex watcher threads, the loop never blocks."""

    def __init__(self, queue: LocalQueue[T], owned: bool) -> None:
        self._q: Queue[T] = queue
        self._owned = owned
        self._local: LocalQueue[T] = queue
        self._watchers = {w: _Watcher(self._local, w) for w in (PUT_SEQ, GET_SEQ, JOIN_SEQ)}
        self._closed = False

    @property
    def url(self) -> str | None:
        return None

    @property
    def maxsize(self) -> int:
        return self._q.maxsize

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("this AsyncQueue was closed")

    async def _park(self, word: int, seq: int, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        await self._watchers[word].wait(seq, timeout)

    async def _until(
        self, word: int, wait_out: type[Exception], attempt: Callable[[], R], timeout: float | None
    ) -> R:
        """Try ``attempt`` without blocking; while it raises ``wait_out`` (Empty, Full,
        TimeoutError), park until ``word`` moves, then try again, up to ``timeout``."""
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(word)  # read before trying: no wake-up can slip between
            self._local._due = None
            try:
                return attempt()
            except wait_out:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            due = self._local._next_due()  # a delayed message: try again when it comes due
            until = deadline if due is None or (deadline is not None and deadline < due) else due
            await self._park(word, seq, until)

    async def put(self, item: T, timeout: float | None = None, **options: Any) -> None:
        await self._until(GET_SEQ, Full, lambda: self._q.put(item, block=False, **options), timeout)

    async def get(self, timeout: float | None = None) -> T:
        return await self._until(PUT_SEQ, Empty, lambda: self._q.get(block=False), timeout)

    async def put_nowait(self, item: T) -> None:
        self._check()
        self._q.put(item, block=False)

    async def get_nowait(self) -> T:
        self._check()
        return self._q.get(block=False)

    async def put_many(
        self, items: Iterable[T], timeout: float | None = None, **options: Any
    ) -> None:
        batch = list(items)
        await self._until(
            GET_SEQ, Full, lambda: self._q.put_many(batch, block=False, **options), timeout
        )

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        return await self._until(
            PUT_SEQ, Empty, lambda: self._q.get_many(max_items, block=False), timeout
        )

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> _LocalMessage[T]:
        return await self._until(
            PUT_SEQ, Empty, lambda: _LocalMessage(self._local.get_message(timeout=0)), timeout
        )

    async def qsize(self) -> int:
        self._check()
        return self._q.qsize()

    async def empty(self) -> bool:
        self._check()
        return self._q.empty()

    async def full(self) -> bool:
        self._check()
        return self._q.full()

    async def task_done(self) -> None:
        self._check()
        self._q.task_done()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every item put has been marked ``task_done``."""
        await self._until(JOIN_SEQ, TimeoutError, lambda: self._q.join(timeout=0), timeout)

    async def shutdown(self, immediate: bool = False) -> None:
        self._check()
        self._q.shutdown(immediate=immediate)

    async def aclose(self) -> None:
        """Stop the watchers; close the queue too if this AsyncQueue made it."""
        if self._closed:
            return
        self._closed = True
        for w in self._watchers.values():
            w.stopped = True
        if self._owned:
            self._q.close()


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
            impl = _LocalAsync(queue, owned=False)
        elif isinstance(queue, Queue):
            impl = _network(queue.url, queue, options)
        elif queue is None:
            impl = _LocalAsync(LocalQueue(maxsize=maxsize, serializer=serializer), owned=True)
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
