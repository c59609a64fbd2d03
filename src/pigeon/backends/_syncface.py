"""A blocking ``pigeon.Queue`` over any asyncio implementation of the queue methods.

The Redis and NATS backends are written once, for asyncio; this class is their blocking
face. For request/response clients (redis-py) each thread gets its own client on its own
private event loop, driven with ``run_until_complete`` in the calling thread: no hop to
another thread per call. Clients that need their loop running between calls (nats-py
answers pings and reconnects in the background), and any call made from a thread that is
already running an event loop, use pigeon's shared I/O thread (``_loopthread``) instead,
never the caller's loop. After a
fork the child opens its own clients: connections belong to the process that made them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from pigeon._queue_base import Message, Queue
from pigeon.backends import _loopthread
from pigeon.errors import ClosedResourceError
from pigeon.options import DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_TIMEOUT, QueueOptions

T = TypeVar("T")


class _Lane:
    """One client and the loop it lives on.

    ``close()`` may come from any thread (``SyncFace.close``, a finalizer) while another
    is inside a call on this lane, its private loop running. Then the calls running are
    cancelled (each raises ``ClosedResourceError``) and the thread of the last one closes
    the client once nothing runs on its loop - never a client closed under a running
    call, never a client left open because its loop was busy.
    """

    def __init__(self, impl: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.impl = impl
        self.loop = loop  # None: the shared I/O thread's loop
        self.pid = os.getpid()
        self._guard = threading.Lock()
        self._running: set[Any] = set()  # the calls running now (tasks or futures)
        self._closing = False  # close() came while calls ran: the last one closes
        self.closed = False

    def run(self, coro: Any) -> Any:
        with self._guard:
            if self.closed or self._closing:
                coro.close()
                raise ClosedResourceError("this queue handle was closed")
            if self.loop is None:
                call: Any = asyncio.run_coroutine_threadsafe(coro, _loopthread.loop())
            else:
                call = self.loop.create_task(coro)
            self._running.add(call)
        try:
            return call.result() if self.loop is None else self.loop.run_until_complete(call)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            if self._closed_under_call():
                raise ClosedResourceError("this queue handle was closed during the call") from None
            raise
        finally:
            with self._guard:
                self._running.discard(call)
                last = self._closed_under_call() and not self._running and not self.closed
                self.closed = self.closed or last
            if last:
                self._close_here()

    def _closed_under_call(self) -> bool:
        return self._closing  # set by close() from another thread meanwhile

    def close(self) -> None:
        """Close the client, then its private loop - never from a thread whose own event
        loop is running (a finalizer may run anywhere): then from a helper thread."""
        if self.pid != os.getpid():
            return  # a fork child: the parent's client is not ours to close
        with self._guard:
            if self.closed or self._closing:
                return
            if self._running:  # calls under way: see the class
                self._closing = True
                for call in self._running:
                    if self.loop is None:
                        call.cancel()  # a concurrent future: cancels its task, thread-safe
                    else:
                        self.loop.call_soon_threadsafe(call.cancel)
                return
            self.closed = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._close_here()
            return
        helper = threading.Thread(target=self._close_here, name="pigeon-close")
        helper.start()
        helper.join()

    def _close_here(self) -> None:
        loop = self.loop
        try:
            if loop is None:
                _loopthread.run(self.impl.aclose())
            else:
                loop.run_until_complete(self.impl.aclose())
        except Exception:  # closing a client that already broke: nothing more to lose
            pass
        finally:
            if loop is not None:
                _cancel_leftovers(loop)
                loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks a cancelled call left on its private loop (a fetch it shielded): they end
    now, as ``asyncio.run`` ends its leftovers, instead of dying pending with the loop."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class _ThreadLane:
    """Holds a thread's lane; when the thread ends its locals go, and this closes it."""

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane
        self.finalizer = weakref.finalize(self, lane.close)


class SyncFace(Queue[T]):
    """Blocking face; subclasses name their asyncio implementation in ``impl_class``."""

    impl_class: ClassVar[Callable[..., Any]]
    # A client that needs its loop running between calls (background reads, pings,
    # reconnects: nats-py) sets this to False and lives on the shared I/O thread.
    own_loops: ClassVar[bool] = True
    # keywords only this engine takes (nats: max_item_size), handed to its implementation
    engine_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        url: str,
        maxsize: int = 0,
        serializer: Any = None,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        dedup_window: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **engine: Any,
    ) -> None:
        for name in set(engine) - self.engine_options:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
        self.options = QueueOptions.from_url(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        # what each lane's implementation is opened with: the options as read, checked
        self._options = self.options.kwargs()
        self._options.update({k: v for k, v in engine.items() if v is not None})
        self._url = url
        self._local = threading.local()
        self._lanes: weakref.WeakSet[_ThreadLane] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._maxsize = self.options.maxsize
        try:
            self._call("connect")
        except BaseException:
            self.close()  # the loop and client made for the attempt
            raise

    def _lane(self) -> _Lane:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        if self._pid != os.getpid():  # crossed a fork: every lane is the parent's
            self._local = threading.local()
            self._lanes = weakref.WeakSet()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        try:
            asyncio.get_running_loop()
            in_async = True
        except RuntimeError:
            in_async = False
        shared = in_async or not self.own_loops
        key = "shared" if shared else "own"
        holder: _ThreadLane | None = getattr(self._local, key, None)
        if holder is None:
            loop = None if shared else _loopthread.new_loop()
            holder = _ThreadLane(_Lane(self.impl_class(self._url, **self._options), loop))
            setattr(self._local, key, holder)
            with self._lock:
                self._lanes.add(holder)
        return holder.lane

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        lane = self._lane()
        result = lane.run(getattr(lane.impl, method)(*args, **kwargs))
        self._maxsize = int(lane.impl.maxsize)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (type(self), self._url, self._options))

    def async_options(self) -> dict[str, Any]:
        """How ``pigeon.AsyncQueue(q)`` opens the same queue on asyncio."""
        return dict(self._options)

    @property
    def url(self) -> str:
        return self._url

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def put(
        self, item: T, block: bool = True, timeout: float | None = None, **options: Any
    ) -> None:
        self._call("put", item, timeout, block=block, **options)

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None, **options: Any
    ) -> None:
        self._call("put_many", list(items), timeout, block=block, **options)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        return self._call("get", timeout, block=block)  # type: ignore[no-any-return]

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        return self._call("get_many", max_items, timeout, block=block)  # type: ignore[no-any-return]

    def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> SyncMessage[T]:
        lane = self._lane()
        return SyncMessage(lane, lane.run(lane.impl.get_message(timeout, lease)), self)

    def qsize(self) -> int:
        return int(self._call("qsize"))

    def _queue_lease(self, timeout: float) -> float:
        """The queue's lease as the server holds it (``pigeon.consume``'s lease keeper)."""
        return float(self._call("queue_lease", timeout))

    def full(self) -> bool:
        return bool(self._call("full"))

    # --- administration (``pigeon peek | purge | delete | move``) -----------------------

    def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        """Up to ``max_items`` waiting messages, taking nothing (their delivery counts do
        not change): dicts with ``id``, ``delivery_count``, ``payload`` (bytes), ``body``
        (decoded, or None), ``age`` (seconds), ``origin`` and ``reason`` (a dead letter's),
        ``priority``, ``headers``, and for a delayed message ``due`` (seconds from now).
        Those a get would take now come first, in that order, then the delayed ones."""
        return self._call("peek", max_items)  # type: ignore[no-any-return]

    def purge(self) -> int:
        """Drop every waiting message, delayed ones too (not those held); how many."""
        return int(self._call("purge"))

    def delete(self) -> int:
        """Delete the queue: its messages (held ones too) and settings; how many
        messages went."""
        return int(self._call("delete"))

    def move_to(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` waiting messages (all by default) to the tail of
        ``queue`` on the same server, delivery counts afresh, priority and headers kept:
        replays dead letters. How many moved (no more than ``queue`` has room for)."""
        return int(self._call("move_to", queue, limit))

    def task_done(self) -> None:
        self._call("task_done")

    def join(self, timeout: float | None = None) -> None:
        self._call("join", timeout)

    def shutdown(self, immediate: bool = False) -> None:
        self._call("shutdown", immediate)

    def close(self) -> None:
        """Close every client this handle opened (in any thread of this process)."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return
        with self._lock:
            holders = list(self._lanes)
            self._lanes = weakref.WeakSet()

        def close_all() -> None:
            # In a thread of its own: no event loop runs there, whatever runs in ours.
            for holder in holders:
                holder.finalizer()

        closer = threading.Thread(target=close_all, name="pigeon-close")
        closer.start()
        closer.join()

    def __repr__(self) -> str:
        return f"<pigeon.Queue {self._url}>"


def _reopen(cls: type[SyncFace[Any]], url: str, options: dict[str, Any]) -> SyncFace[Any]:
    return cls(url, **options)


class SyncMessage(Message[T]):
    """The blocking face of an asyncio message, settled on the client that took it."""

    def __init__(self, lane: _Lane, inner: Any, face: SyncFace[T]) -> None:
        self._lane = lane
        self._face = face
        self._owner = threading.get_ident()
        self._inner = inner
        self.body = inner.body
        self.delivery_count = inner.delivery_count
        self.headers: dict[str, str] = inner.headers
        self._identity = getattr(inner, "_identity", None)

    def _wait(self, make: Callable[[], Any]) -> None:
        async def go() -> None:
            await make()

        self._lane.run(go())

    def ack(self) -> None:
        self._wait(self._inner.ack)

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> None:
        self._wait(lambda: self._inner.nack(requeue, delay, reason=reason))

    def extend(self, seconds: float) -> None:
        """Safe from any thread (``pigeon.consume`` extends leases from a keeper thread):
        a client on a private loop is only driven by the thread that owns it."""
        if self._lane.loop is None or threading.get_ident() == self._owner:
            self._wait(lambda: self._inner.extend(seconds))
            return
        lane = self._face._lane()
        lane.run(lane.impl.extend_held(self._inner, seconds))
