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
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

from pigeon._queue_base import Message, Queue, deadline_from
from pigeon.backends.local import GET_SEQ, JOIN_SEQ, PUT_SEQ, LocalQueue
from pigeon.errors import ClosedResourceError, Empty, Full, ShutDown, Unsupported
from pigeon.serializers import SerializerLike

T = TypeVar("T")

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


class AsyncQueue(Generic[T]):
    """The asyncio face of a queue shared with threads and processes.

    Args:
        queue: a local ``pigeon.Queue`` to wrap (it stays open when this one closes), or
            None to make a new local queue with ``maxsize`` and ``serializer``.
    """

    def __init__(
        self,
        queue: Queue[T] | str | None = None,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
    ) -> None:
        if isinstance(queue, Queue):
            self._q: Queue[T] = queue
            self._owned = False
        elif queue is None:
            self._q = Queue(maxsize=maxsize, serializer=serializer)
            self._owned = True
        else:
            self._q = Queue(queue, maxsize=maxsize, serializer=serializer)
            self._owned = True
        if not isinstance(self._q, LocalQueue):
            raise Unsupported(f"AsyncQueue does not support {type(self._q).__name__} yet")
        self._local: LocalQueue[T] = self._q
        self._watchers = {w: _Watcher(self._local, w) for w in (PUT_SEQ, GET_SEQ, JOIN_SEQ)}
        self._closed = False

    @property
    def queue(self) -> Queue[T]:
        """The synchronous queue this wraps (to hand to threads or processes)."""
        return self._q

    @property
    def url(self) -> str | None:
        return self._q.url

    @property
    def maxsize(self) -> int:
        return self._q.maxsize

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("this AsyncQueue was closed")

    async def _park(self, word: int, seq: int, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        await self._watchers[word].wait(seq, timeout)

    async def put(self, item: T, timeout: float | None = None) -> None:
        """Put ``item``; wait (without blocking the loop) while the queue is full.

        Raises ``Full`` after ``timeout`` seconds, ``ShutDown`` if shut down.
        """
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(GET_SEQ)
            try:
                return self._q.put(item, block=False)
            except Full:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(GET_SEQ, seq, deadline)

    async def get(self, timeout: float | None = None) -> T:
        """Remove and return the next item; wait while the queue is empty.

        Raises ``Empty`` after ``timeout`` seconds, ``ShutDown`` once shut down and drained.
        """
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(PUT_SEQ)
            try:
                return self._q.get(block=False)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(PUT_SEQ, seq, deadline)

    async def put_nowait(self, item: T) -> None:
        self._check()
        self._q.put(item, block=False)

    async def get_nowait(self) -> T:
        self._check()
        return self._q.get(block=False)

    async def put_many(self, items: Iterable[T], timeout: float | None = None) -> None:
        """Put all ``items`` at once (all or none), waiting for room."""
        self._check()
        batch = list(items)
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(GET_SEQ)
            try:
                return self._q.put_many(batch, block=False)
            except Full:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(GET_SEQ, seq, deadline)

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Wait for at least one item, then return up to ``max_items``."""
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(PUT_SEQ)
            try:
                return self._q.get_many(max_items, block=False)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(PUT_SEQ, seq, deadline)

    async def get_message(self, timeout: float | None = None) -> Message[T]:
        """Take the next item as a ``Message`` (see ``pigeon.Queue.get_message``)."""
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(PUT_SEQ)
            try:
                return self._local.get_message(timeout=0)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(PUT_SEQ, seq, deadline)

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
        self._check()
        deadline = deadline_from(True, timeout)
        while True:
            seq = self._local._seq(JOIN_SEQ)
            try:
                return self._q.join(timeout=0)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await self._park(JOIN_SEQ, seq, deadline)

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
