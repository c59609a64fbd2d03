"""What the consume tests share: handlers that record what they saw, waits with deadlines."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import multiprocessing
import threading
import time
from typing import Any

SEEN: collections.Counter[Any] = collections.Counter()
LOCK = threading.Lock()


def record(item: Any) -> None:
    with LOCK:
        SEEN[item] += 1


def flaky(item: Any) -> None:
    """Fails the first two times it sees an item."""
    record(item)
    if SEEN[item] <= 2:
        raise RuntimeError(f"failure {SEEN[item]} on {item!r}")


def always_fails(item: Any) -> None:
    raise ValueError(f"cannot handle {item!r}")


def cpu_bound(item: Any) -> None:
    data = str(item).encode()
    for _ in range(20_000):
        data = hashlib.sha256(data).digest()


def sleeps(item: Any) -> None:
    time.sleep(0.02)


async def coroutine(item: Any) -> None:
    await asyncio.sleep(0.001)
    record(item)


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def worker_processes() -> list[Any]:

    return [p for p in multiprocessing.active_children() if p.name.startswith("pigeon-worker")]


TRIES: collections.Counter[str] = collections.Counter()


async def async_exits_then_works(item: str) -> None:
    TRIES[item] += 1
    if TRIES[item] == 1 and item == "exit":
        raise SystemExit("config not loaded")
    if TRIES[item] == 1 and item == "interrupt":
        raise KeyboardInterrupt


async def ignores_cancellation(item: Any) -> None:
    record(item)
    while True:  # a retry loop with a bare except: swallows CancelledError too
        try:
            await asyncio.sleep(0.1)
            raise ConnectionError("payment API unreachable")
        except BaseException:
            continue
