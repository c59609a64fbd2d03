"""What a run of ``consume`` did: the report it returns, the counters its workers share
while it runs, and the messages in progress (a ``Task`` each)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConsumeProgress", "ConsumeReport", "DeadLetter", "Task"]


@dataclass(frozen=True)
class DeadLetter:
    """An item that failed ``attempts`` times, from a queue without a dead-letter queue
    (the local backend): kept in the report, never dropped. An item this process could not
    decode is kept as its bytes (``DecodeError.raw``)."""

    item: Any
    error: str
    delivery_count: int


@dataclass(frozen=True)
class ConsumeReport:
    """What a run of ``consume`` did, and why it ended.

    ``ended`` is ``"stopped"`` (``stop`` was set, or SIGTERM/SIGINT came), ``"shutdown"``
    (the queue was shut down and is drained) or ``"failed"`` (an error no retry mends;
    ``error`` says which). ``reason`` says the same in words, then why that ``mode``.
    """

    processed: int  # handled successfully (acked)
    failed: int  # handler calls that raised, ran past time_limit, or killed their worker
    retried: int  # of those, given back to be tried again
    dead: int  # of those, sent to the dead-letter queue
    mode: str  # thread, process or async
    reason: str  # how the run ended, then why that mode (and the measurement, for auto)
    elapsed: float  # seconds
    dead_letters: list[DeadLetter] = field(default_factory=list)  # local queues only
    ended: str = "stopped"  # stopped | shutdown | failed
    error: str | None = None  # the cause, when ended == "failed"
    timed_out: int = 0  # handler calls stopped at time_limit (counted in failed)
    worker_deaths: int = 0  # workers that died (and were replaced)
    workers_recycled: int = 0  # process workers replaced at max_tasks/max_memory_per_child
    # acks/nacks/extends that raised: those messages come back, except that one which
    # raised Indeterminate (its reply lost) may have taken effect (an ack: still processed)
    settle_errors: int = 0


@dataclass(eq=False)
class Task:
    """A message being handled: the keeper extends its lease; the supervisor its limit."""

    msg: Any
    started: float
    extended: float
    slot: int
    extend: Callable[[float], None]  # from the keeper's thread
    abandoned: bool = False  # given back by the supervisor: its worker must not settle it
    lease: float | None = None  # the lease the keeper gave it (None: the queue's own)


class ConsumeProgress:
    """Counters of one run, shared by its workers, and the messages in progress; ``pigeon
    worker`` reads them for its live view (``snapshot()``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processed = self.failed = self.retried = self.dead = 0
        self.timed_out = self.worker_deaths = self.workers_recycled = self.settle_errors = 0
        self.dead_letters: list[DeadLetter] = []
        # a local queue's delayed nack lives in a timer of this process, outside the queue:
        # a drained, shut-down queue is not finished until those are back in it
        self.retries_until = 0.0
        self.in_progress: dict[int, Task] = {}

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "processed": self.processed, "failed": self.failed, "retried": self.retried,
                "dead": self.dead, "in_progress": len(self.in_progress),
                "timed_out": self.timed_out, "worker_deaths": self.worker_deaths,
                "workers_recycled": self.workers_recycled, "settle_errors": self.settle_errors,
            }  # fmt: skip
