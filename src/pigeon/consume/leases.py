"""Keeping the leases of slow work: one keeper thread for every mode extends each message
that ran past half of the lease it holds. The lease is the queue's own, asked of the queue
(``q._queue_lease``): pigeon:// asks the broker, redis:// reads the queue's meta hash,
nats:// its consumer's AckWait - never assumed."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pigeon._queue_base import Queue
from pigeon.consume.policy import Run, describe
from pigeon.consume.report import Task
from pigeon.options import DEFAULT_LEASE

__all__ = ["Leases", "lease_keeper"]

log = logging.getLogger("pigeon.consume")

_LEASE_UNKNOWN = 1.0  # seconds: the lease assumed until the queue tells its own
_LEASE_READ_TIMEOUT = 2.0  # seconds one reading of the queue's lease may take
_LEASE_REREAD = 30.0  # seconds between readings (another client may declare another lease)


class Leases:
    """The queue's lease as the queue tells it: ``q._queue_lease(timeout)`` (pigeon://
    asks the broker, redis:// its meta hash, nats:// its consumer's AckWait). Until it
    answers, work is assumed to hold a lease of ``_LEASE_UNKNOWN`` seconds: extended early
    rather than late."""

    def __init__(self, q: Queue[Any]) -> None:
        self._read: Callable[[float], float] | None = getattr(q, "_queue_lease", None)
        self.seconds: float | None = None
        self._next_read = 0.0

    def refresh(self) -> None:
        """Read the lease if it is unknown or due for another reading."""
        if self._read is None or time.monotonic() < self._next_read:
            return
        try:
            self.seconds = float(self._read(_LEASE_READ_TIMEOUT))
        except Exception as exc:  # unreachable for now: ask again soon
            log.debug("reading the queue's lease failed: %s", describe(exc))
            self._next_read = time.monotonic() + 1.0
        else:
            self._next_read = time.monotonic() + _LEASE_REREAD

    def held(self, task: Task) -> float:
        """The lease ``task`` holds now: the one the keeper gave it, else the queue's."""
        return task.lease or self.seconds or _LEASE_UNKNOWN

    def grant(self) -> float:
        """What an extension gives: the queue's lease (its default until it is known)."""
        return self.seconds or DEFAULT_LEASE


@contextlib.contextmanager
def lease_keeper(run: Run) -> Iterator[None]:
    """Extend the lease of work that ran past half of the lease it holds (from a thread of
    its own, for every mode)."""
    if run.local:
        yield
        return
    leases = Leases(run.q)
    done = threading.Event()

    def keep() -> None:
        while True:
            leases.refresh()
            now = time.monotonic()
            grant = leases.grant()
            with run.progress.lock:
                due = [t for t in run.progress.in_progress.values()
                       if now - t.extended >= leases.held(t) / 2]  # fmt: skip
                for t in due:
                    t.extended, t.lease = now, grant
            for t in due:
                try:
                    t.extend(grant)
                except Exception as exc:  # settled meanwhile, or the connection is gone
                    log.debug("extending a lease failed: %s", describe(exc))
            if done.wait(min(0.5, (leases.seconds or _LEASE_UNKNOWN) / 4)):
                return

    t = threading.Thread(target=keep, name="pigeon-lease-keeper", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
