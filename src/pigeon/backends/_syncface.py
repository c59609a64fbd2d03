"""A blocking ``pigeon.Queue`` over any asyncio implementation of the queue methods.

The Redis and NATS backends are written once, for asyncio; their blocking faces are this
class, which runs each call on pigeon's private I/O loop (``_loopthread``), so a blocking
call never touches an event loop the caller may be running. After a fork the child opens
its own client: connections belong to the process that made them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from pigeon._queue_base import Message, Queue
from pigeon.backends import _loopthread

T = TypeVar("T")


class SyncFace(Queue[T]):
    """Blocking face; subclasses name their asyncio implementation in ``impl_class``."""

    impl_class: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        url: str,
        maxsize: int = 0,
        serializer: Any = None,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self._options: dict[str, Any] = {
            "maxsize": maxsize, "serializer": serializer, "lease": lease,
            "max_deliveries": max_deliveries, "reconnect_timeout": reconnect_timeout,
        }  # fmt: skip
        self._url = url
        self._impl: Any = self.impl_class(url, **self._options)
        self._pid = os.getpid()
        self._call("connect")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._pid != os.getpid():
            self._impl = self.impl_class(self._url, **self._options)
            self._pid = os.getpid()
        return _loopthread.run(getattr(self._impl, method)(*args, **kwargs))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (type(self), self._url, self._options))

    def _async_options(self) -> dict[str, Any]:
        """How ``pigeon.AsyncQueue(q)`` opens the same queue on asyncio."""
        return dict(self._options)

    @property
    def url(self) -> str:
        return self._url

    @property
    def maxsize(self) -> int:
        return int(self._impl.maxsize)

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        self._call("put", item, timeout, block=block)

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        self._call("put_many", list(items), timeout, block=block)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        return self._call("get", timeout, block=block)  # type: ignore[no-any-return]

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        return self._call("get_many", max_items, timeout, block=block)  # type: ignore[no-any-return]

    def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> SyncMessage[T]:
        return SyncMessage(self, self._call("get_message", timeout, lease))

    def qsize(self) -> int:
        return int(self._call("qsize"))

    def full(self) -> bool:
        return bool(self._call("full"))

    def task_done(self) -> None:
        self._call("task_done")

    def join(self, timeout: float | None = None) -> None:
        self._call("join", timeout)

    def shutdown(self, immediate: bool = False) -> None:
        self._call("shutdown", immediate)

    def close(self) -> None:
        if not self._impl.closed and self._pid == os.getpid():
            self._call("aclose")

    def __repr__(self) -> str:
        return f"<pigeon.Queue {self._url}>"


def _reopen(cls: type[SyncFace[Any]], url: str, options: dict[str, Any]) -> SyncFace[Any]:
    return cls(url, **options)


class SyncMessage(Message[T]):
    """The blocking face of an asyncio message (``ack``/``nack``/``extend`` awaitable)."""

    def __init__(self, queue: SyncFace[T], inner: Any) -> None:
        self._queue = queue
        self._inner = inner
        self.body = inner.body
        self.delivery_count = inner.delivery_count

    def _wait(self, make: Callable[[], Any]) -> None:
        async def go() -> None:
            await make()

        _loopthread.run(go())

    def ack(self) -> None:
        self._wait(self._inner.ack)

    def nack(self, requeue: bool = True, delay: float = 0) -> None:
        self._wait(lambda: self._inner.nack(requeue, delay))

    def extend(self, seconds: float) -> None:
        self._wait(lambda: self._inner.extend(seconds))
