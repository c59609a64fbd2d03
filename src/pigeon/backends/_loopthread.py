"""One private asyncio loop per process, in a daemon thread, for blocking faces over asyncio
clients (redis.asyncio, nats-py).

The blocking call waits on a ``concurrent.futures.Future``; the coroutine runs on the
private loop, never on a loop the caller may be running, so a blocking pigeon call made
from inside asyncio code blocks only its own thread, as any blocking call does.

Private loops are always the stdlib's selector loop (``new_loop``), whatever event loop
policy the application set (uvloop's, say): pigeon owns them, and a fork child must be
able to give each one a selector of its own (``_detach_in_child``), which uvloop's loop
does not allow - its libuv loop would keep sharing the parent's epoll instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def new_loop() -> asyncio.AbstractEventLoop:
    """A private event loop, detached from its parent's epoll in fork children."""
    return track(asyncio.SelectorEventLoop())


def _start() -> asyncio.AbstractEventLoop:
    loop = new_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    threading.Thread(target=run, name="pigeon-io", daemon=True).start()
    ready.wait()
    return loop


# Event loops of this process whose sockets a fork child inherits (the shared I/O loop
# and the blocking faces' private loops). See ``_detach_in_child``.
_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def track(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """Have ``loop`` detached from its epoll instance in fork children."""
    _LOOPS.add(loop)
    return loop


def _detach_in_child() -> None:
    """In a fork child, give every inherited loop a selector of its own, and this module
    a lock and a loop of its own.

    A child shares its parent's epoll instance (the descriptor and the kernel object are
    inherited). When an inherited client is garbage-collected in the child - redis-py's
    connection closes its transport in ``__del__`` - the loop unregisters the socket from
    that shared epoll and the parent's loop never hears from it again: the parent's next
    call (say, its ``close()``) waits forever. With a fresh selector, such unregistering
    touches only the child's own. The lock is made anew: a parent thread may have held it
    at the fork (inside ``loop()``), and no thread of the child will ever release it."""
    global _lock, _loop, _pid
    _lock = threading.Lock()
    _loop, _pid = None, 0  # the parent's I/O thread does not exist here
    for lp in list(_LOOPS):
        old = getattr(lp, "_selector", None)
        if old is None:  # not a selector loop: not one of ours (new_loop)
            continue
        lp._selector = type(old)()  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            old.close()  # the child's copy of the descriptor; the parent keeps its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_detach_in_child)


def loop() -> asyncio.AbstractEventLoop:
    """The private loop of this process (a new one after fork)."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid():
            _loop = _start()
            _pid = os.getpid()
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the private loop and wait for its result in this thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop()).result()
