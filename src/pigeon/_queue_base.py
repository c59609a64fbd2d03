"""``pigeon.Queue`` and ``pigeon.Message``: the contract every backend fulfils.

``pigeon.Queue(url=None, maxsize=0, serializer=None, **options)`` picks a backend by the
URL's scheme and returns an instance of that backend's ``Queue`` subclass, so
``isinstance(q, pigeon.Queue)`` always holds and the methods cost no extra indirection.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from pigeon.errors import InvalidURL, ShutDown, Unsupported

T = TypeVar("T")

__all__ = ["BACKENDS", "SCHEMES", "Message", "Queue", "backend_for", "deadline_from"]

# One registry: a scheme names a backend module and its two faces, the blocking queue and
# the asyncio one (anyio's backend-module pattern). Modules are imported only when used, so
# optional clients (redis-py, nats-py) stay optional.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "pigeon": ("pigeon.backends.pigeon", "BrokerQueue", "AsyncBrokerQueue"),
    "pigeon+tls": ("pigeon.backends.pigeon", "BrokerQueue", "AsyncBrokerQueue"),
    "redis": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "rediss": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "redis+cluster": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "rediss+cluster": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "redis+sentinel": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "rediss+sentinel": ("pigeon.backends.redis", "RedisQueue", "AsyncRedisQueue"),
    "nats": ("pigeon.backends.nats", "NatsQueue", "AsyncNatsQueue"),
    "nats+tls": ("pigeon.backends.nats", "NatsQueue", "AsyncNatsQueue"),
}
# scheme -> "module:Class" of the blocking face (as earlier versions published it)
SCHEMES: dict[str, str] = {s: f"{m}:{cls}" for s, (m, cls, _) in BACKENDS.items()}
# schemes pigeon knows of but does not ship yet in this version
_PLANNED: tuple[str, ...] = ()


def deadline_from(block: bool, timeout: float | None) -> float | None:
    """Monotonic deadline for ``block``/``timeout`` as ``queue.Queue`` reads them.

    ``block=False`` means "now" whatever the timeout; a negative timeout is an error.
    """
    if not block:
        return time.monotonic()
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number, not {timeout!r}")
    return time.monotonic() + timeout


def backend_for(url: str, face: str = "blocking") -> Any:
    """The class of ``url``'s backend for ``face`` (``"blocking"`` or ``"async"``).

    Raises:
        InvalidURL: no scheme, or one no backend serves (the message lists the known ones).
        Unsupported: a scheme pigeon knows of but does not ship in this version.
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise InvalidURL(f"queue URL {url!r} has no scheme; e.g. pigeon://127.0.0.1:7878/jobs")
    entry = BACKENDS.get(scheme)
    if entry is None:
        if scheme in _PLANNED:
            raise Unsupported(
                f"the {scheme}:// backend is not available in this version of pigeon; "
                "use pigeon.Queue() for a local queue"
            )
        known = ", ".join(sorted(BACKENDS)) or "none (only local queues: pigeon.Queue())"
        raise InvalidURL(f"no backend for {scheme!r}; known: {known}")
    module, blocking, asynchronous = entry
    return getattr(
        importlib.import_module(module), blocking if face == "blocking" else asynchronous
    )


class Queue(Generic[T]):
    """A FIFO queue with the stdlib's names, usable from threads and processes.

    ``pigeon.Queue()`` is local (shared memory, threads and processes of one host);
    ``pigeon.Queue(url)`` picks a networked backend by the URL's scheme.

    Every queue offers: ``put``/``get`` (``block``, ``timeout``), ``put_nowait``/
    ``get_nowait``, ``put_many``/``get_many``, ``qsize``/``empty``/``full`` (advisory),
    ``task_done``/``join``, ``shutdown(immediate=False)``, iteration until shut down and
    drained, ``get_message`` (at-least-once where the backend allows), ``close`` and
    ``with``. A backend that cannot offer a call raises ``pigeon.Unsupported``.
    """

    def __new__(cls, url: str | None = None, *args: Any, **kwargs: Any) -> Queue[Any]:
        if cls is not Queue:
            return super().__new__(cls)
        if url is None or not isinstance(url, str):
            from pigeon.backends.local import LocalQueue

            return super().__new__(LocalQueue)
        return super().__new__(backend_for(url))

    # Subclasses define __init__; this one exists for Queue(url, ...) typing only.
    def __init__(self, url: str | None = None, *args: Any, **kwargs: Any) -> None:
        raise TypeError("pigeon.Queue subclasses must define __init__")  # pragma: no cover

    # --- to be provided by each backend -----------------------------------------------

    def put(
        self,
        item: T,
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Put ``item`` at the tail. Returns once it is in the queue (confirmed).

        Message options (``pigeon.options``): ``delay`` seconds before it can be taken;
        ``ttl`` seconds it may wait to be taken (then it moves to ``NAME.dead``, reason
        ``expired``); ``dedup_id``: a repeat within the queue's dedup window is confirmed
        but not stored again; ``priority`` 0-9, higher first; ``headers`` str -> str,
        carried to ``Message.headers``.

        Raises:
            Full: no room before ``timeout`` (at once if ``block`` is false).
            ShutDown: the queue was shut down.
            ValueError, TypeError: ``timeout`` is negative, or an option is out of range
                or of the wrong type (nothing was sent).
            Unsupported: this backend cannot honour an option given.
        """
        raise NotImplementedError

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the item at the head.

        Raises:
            Empty: nothing arrived before ``timeout`` (at once if ``block`` is false).
            ShutDown: the queue was shut down and is drained.
        """
        raise NotImplementedError

    def put_many(
        self,
        items: Iterable[T],
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str] | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Put all ``items`` at once (all or none), in order, each with the options given
        (as ``put``'s; ``dedup_ids``: one id per item)."""
        raise NotImplementedError

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        """Wait for at least one item, then return up to ``max_items`` in order."""
        raise NotImplementedError

    def qsize(self) -> int:
        """How many items wait in the queue now (advisory under concurrency)."""
        raise NotImplementedError

    def task_done(self) -> None:
        """Mark one item taken with ``get`` as fully processed (see ``join``)."""
        raise NotImplementedError

    def join(self, timeout: float | None = None) -> None:
        """Block until every item put has been marked ``task_done``."""
        raise NotImplementedError

    def shutdown(self, immediate: bool = False) -> None:
        """Shut the queue down for every handle, in every process (Python 3.13 semantics).

        Puts raise ``ShutDown`` at once; gets return what remains, then raise
        ``ShutDown``. With ``immediate=True`` the remaining items are dropped (and counted
        as done for ``join``).
        """
        raise NotImplementedError

    def get_message(self, timeout: float | None = None, lease: float | None = None) -> Message[T]:
        """Take the next item as a ``Message`` to ``ack`` or ``nack``; unsettled, a
        networked backend redelivers it after ``lease`` seconds (the queue's lease when
        None)."""
        raise Unsupported(f"{type(self).__name__} does not offer get_message")

    def close(self) -> None:
        """Release this handle (other handles and the queue itself live on)."""
        raise NotImplementedError

    # --- administration (``pigeon peek | purge | delete | move``): networked backends ---

    def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        """Up to ``max_items`` waiting messages, taking nothing (see the backend's)."""
        raise Unsupported(f"{type(self).__name__} does not offer peek")

    def purge(self) -> int:
        """Drop every waiting message, delayed ones too (not those held); how many."""
        raise Unsupported(f"{type(self).__name__} does not offer purge")

    def delete(self) -> int:
        """Delete the queue: its messages (held ones too) and settings; how many."""
        raise Unsupported(f"{type(self).__name__} does not offer delete")

    def move_to(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` waiting messages to the tail of ``queue``; how many."""
        raise Unsupported(f"{type(self).__name__} does not offer move_to")

    @property
    def maxsize(self) -> int:
        """The capacity in items (0: unbounded)."""
        raise NotImplementedError

    # --- shared by every backend ------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The URL a networked queue was opened with (None for a local queue)."""
        return None

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``."""
        self.put(item, block=False)

    def get_nowait(self) -> T:
        """``get(block=False)``."""
        return self.get(block=False)

    def empty(self) -> bool:
        """True if the queue holds no item now (advisory)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if the queue holds ``maxsize`` items now (advisory; False if unbounded)."""
        return self.maxsize > 0 and self.qsize() >= self.maxsize

    def __iter__(self) -> Iterator[T]:
        """Yield items as they arrive until the queue is shut down and drained."""
        while True:
            try:
                yield self.get()
            except ShutDown:
                return

    def __enter__(self) -> Queue[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Message(Generic[T]):
    """An item taken for processing, to settle with ``ack`` or ``nack``.

    ``with q.get_message() as msg:`` acks when the block succeeds and nacks (requeue)
    when it raises.
    """

    body: T
    delivery_count: int
    headers: dict[str, str]  # the headers it was put with ({} when none)
    # What names this message across its deliveries, where the backend tells it (the
    # broker's message id, a stream entry's id or sequence); None where it does not.
    # pigeon.consume counts the worker processes a message killed by it.
    _identity: Hashable | None = None

    def ack(self) -> None:
        """Settle: the item is done and will not come back."""
        raise NotImplementedError

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> None:
        """Give the item back (``requeue``, after ``delay`` seconds), or, without
        ``requeue``, send it to the dead-letter queue with ``reason`` (why it died)."""
        raise NotImplementedError

    def extend(self, seconds: float) -> None:
        """Ask for ``seconds`` more before an unacked item is redelivered."""
        raise NotImplementedError

    def __enter__(self) -> Message[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.ack()
        else:
            self.nack(requeue=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} delivery_count={self.delivery_count} body={self.body!r}>"
