"""One private asyncio loop per process, in a daemon thread, for blocking faces over asyncio
clients (redis.asyncio, nats-py).

The blocking call waits on a ``concurrent.futures.Future``; the coroutine runs on the
private loop, never on a loop the caller may be running, so a blocking pigeon call made
from inside asyncio code blocks only its own thread, as any blocking call does.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def _start() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    threading.Thread(target=run, name="pigeon-io", daemon=True).start()
    ready.wait()
    return loop


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
