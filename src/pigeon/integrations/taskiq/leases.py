"""Keeping the lease of every task a worker runs, for as long as it runs.

# Strategy:
# Each message is taken with an explicit lease (``get_message(lease=...)``): the broker
# gives it to another worker only once this one has neither acked nor extended it for that
# long, or at once when this worker's connection drops. One coroutine per worker extends
# every message held for more than half its lease, so a task of any length runs once while
# its worker lives (taskiq-redis#101: RedisStreamBroker hands a task running past its
# ``idle_timeout`` to a second worker). A worker whose event loop is blocked for longer
# than the lease cannot extend, and its tasks go to another worker: the lease is the bound
# on how long a stuck worker keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

__all__ = ["LeaseKeeper"]

log = logging.getLogger("pigeon.integrations.taskiq")


class LeaseKeeper:
    """The messages a worker holds, each extended by ``lease`` seconds once half its
    lease has passed. ``hold`` one when it is taken, ``release`` it before it is acked."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._held: dict[int, tuple[Any, float]] = {}  # id(message) -> (message, last extended)
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, message: Any) -> None:
        self._held[id(message)] = (message, time.monotonic())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep())

    def release(self, message: Any) -> bool:
        """Stop extending ``message``; False if it was not held."""
        return self._held.pop(id(message), None) is not None

    async def _keep(self) -> None:
        tick = self.lease / 4
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            due = [m for m, at in self._held.values() if now - at >= self.lease / 2]
            for m in due:
                self._held[id(m)] = (m, now)
            results = await asyncio.gather(*map(self._extend, due), return_exceptions=True)
            for m, result in zip(due, results, strict=True):
                if isinstance(result, Exception):
                    # the broker no longer holds it for this worker (its connection dropped):
                    # it was or will be given to another worker; the ack will say so too
                    log.warning("cannot extend the lease of a task in progress: %s", result)
                    self.release(m)

    async def _extend(self, message: Any) -> None:
        await message.extend(self.lease)

    async def aclose(self) -> None:
        """Stop extending (the worker is done; what it still holds goes back when its
        connection closes)."""
        self._held.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
