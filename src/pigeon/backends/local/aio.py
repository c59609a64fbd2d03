"""The asyncio face of a local queue (``pigeon.AsyncQueue(q)``).

# Strategy:
# Operations are tried without blocking on the event loop (they take microseconds). When
# one must wait (empty, full, join, a delayed message not due yet), the coroutine parks on
# an asyncio future and a watcher thread, one per queue and condition, sleeps on the
# queue's futex word for everyone. A put from any thread or process changes the word, the
# watcher wakes and resolves every parked future whose snapshot of the word is stale: no
# polling, and the loop never blocks. A cancelled coroutine just leaves; the watcher
# takes nothing from the queue, so nothing is lost. A put with dedup ids does not wait for
# the table of ids either: if another put holds it (for microseconds: it never waits for
# room while holding it), the coroutine sleeps a moment and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from pigeon._queue_base import Message, Queue, deadline_from
from pigeon.backends.local.dedup import DedupBusy
from pigeon.backends.local.layout import GET_SEQ, JOIN_SEQ, PUT_SEQ
from pigeon.backends.local.queue import LocalQueue
from pigeon.errors import ClosedResourceError, Empty, Full

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["AsyncLocalMessage", "AsyncLocalQueue", "Watcher"]

# seconds a put with dedup ids sleeps while another put holds the table of ids (doubling)
_BUSY_FIRST = 0.001
_BUSY_MAX = 0.05


class Watcher:
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
                    loop.call_soon_threadsafe(resolve, fut)
            if current is None:
                return
            if not ready:
                try:
                    queue._wait_change(self._word, current, 1.0)
                except (ClosedResourceError, ValueError):
                    continue


def resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncLocalMessage(Generic[T]):
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


class AsyncLocalQueue(Generic[T]):
    """AsyncQueue over a local queue: futex watcher threads, the loop never blocks."""

    def __init__(self, queue: LocalQueue[T], owned: bool) -> None:
        self._q: Queue[T] = queue
        self._owned = owned
        self._local: LocalQueue[T] = queue
        self._watchers = {w: Watcher(self._local, w) for w in (PUT_SEQ, GET_SEQ, JOIN_SEQ)}
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
        busy = _BUSY_FIRST
        while True:
            seq = self._local._seq(word)  # read before trying: no wake-up can slip between
            self._local._due = None
            try:
                return attempt()
            except DedupBusy:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                left = _BUSY_MAX if deadline is None else deadline - time.monotonic()
                await asyncio.sleep(max(0.0, min(busy, left)))
                busy = min(2 * busy, _BUSY_MAX)
                continue
            except wait_out:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            due = self._local._next_due()  # a delayed message: try again when it comes due
            until = deadline if due is None or (deadline is not None and deadline < due) else due
            await self._park(word, seq, until)

    async def put(self, item: T, timeout: float | None = None, **options: Any) -> None:
        await self._until(GET_SEQ, Full, lambda: self._local._try_put(item, **options), timeout)

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
            GET_SEQ, Full, lambda: self._local._try_put_many(batch, **options), timeout
        )

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        return await self._until(
            PUT_SEQ, Empty, lambda: self._q.get_many(max_items, block=False), timeout
        )

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncLocalMessage[T]:
        return await self._until(
            PUT_SEQ, Empty, lambda: AsyncLocalMessage(self._local.get_message(timeout=0)), timeout
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
