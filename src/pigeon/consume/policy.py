"""The policy of a run, shared by every kind of worker: taking (a failed take is retried
with backoff; only errors no retry mends end the run), settling (ack on success; a failure
is retried by ``Retry`` and dead-lettered after ``attempts``), what a handler is (sync or
async), and how a failure is described."""

from __future__ import annotations

import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pigeon import _otel
from pigeon._queue_base import Message, Queue
from pigeon.consume.crashes import Crashes
from pigeon.consume.report import ConsumeProgress, DeadLetter, Task
from pigeon.errors import (
    AuthError,
    ClosedResourceError,
    DecodeError,
    Empty,
    Indeterminate,
    InvalidURL,
    ShutDown,
    Unsupported,
)

__all__ = [
    "NOT_SYNC", "SLICE", "TICK", "Ended", "NotSync", "Retry", "Run", "call_sync", "describe",
    "is_async_handler", "time_limit_error",
]  # fmt: skip

log = logging.getLogger("pigeon.consume")

SLICE = 0.25  # seconds: how long one fetch waits before it looks at the stop signal
TICK = 0.05  # seconds: how often supervisors look at their workers
MAX_BACKOFF = 5.0  # seconds between tries to take, while the queue keeps failing
# errors that no retry mends: the run ends as ``failed`` with the error as its cause
FATAL = (AuthError, Unsupported, InvalidURL, ClosedResourceError)


@dataclass(frozen=True)
class Retry:
    """How failed items are retried: ``attempts`` deliveries in all, then the dead-letter
    queue; between them ``min(max_backoff, backoff * 2 ** (delivery_count - 1))`` seconds,
    drawn uniformly from 0 to that ("full jitter") when ``jitter``."""

    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise ValueError(f"attempts must be an int >= 1, not {self.attempts!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")

    def delay(self, delivery_count: int) -> float:
        """Seconds before a message delivered ``delivery_count`` times is tried again
        (any count: past ~1,000 deliveries the doubling is simply past ``max_backoff``)."""
        try:
            grown = math.ldexp(self.backoff, max(0, delivery_count - 1))  # backoff * 2**(n-1)
        except OverflowError:
            grown = math.inf
        cap = min(self.max_backoff, grown)
        return random.uniform(0, cap) if self.jitter else cap


class Ended(Exception):
    """Raised inside a worker: the run is over (``shutdown`` or ``failed``)."""

    def __init__(self, ended: str, detail: str) -> None:
        super().__init__(detail)
        self.ended, self.detail = ended, detail


class NotSync(Exception):
    """A handler run as a function returned an awaitable: it is an async handler."""


NOT_SYNC = (
    "the handler returned an awaitable: it is an async handler that was not recognised as "
    "one (a decorator without functools.wraps?); run it with mode='async'"
)


def describe(exc: BaseException) -> str:
    """``"TypeName: text"`` for a dead letter's reason, even when ``str(exc)`` raises."""
    try:
        text = str(exc)
    except BaseException as inner:  # a broken __str__ must not take the worker down
        text = f"<str() of the exception raised {type(inner).__name__}>"
    return f"{type(exc).__name__}: {text}"[:500]


def is_async_handler(handler: Any) -> bool:
    """An ``async def`` function, one under ``functools.wraps``/``partial``, or an object
    whose ``__call__`` is ``async def``."""
    try:
        unwrapped = inspect.unwrap(handler)
    except ValueError:  # a __wrapped__ cycle
        unwrapped = handler
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(unwrapped):
        return True
    call = inspect.getattr_static(handler, "__call__", None)
    return not inspect.isroutine(handler) and inspect.iscoroutinefunction(call)


def call_sync(handler: Callable[[Any], Any], item: Any) -> None:
    """Call ``handler(item)`` as a function; ``NotSync`` if it handed back an awaitable
    (closed first: nothing ran, nothing is left to warn about)."""
    result = handler(item)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None) or getattr(result, "cancel", None)
        if close is not None:
            close()
        raise NotSync(NOT_SYNC)


def time_limit_error(limit: float) -> str:
    return f"TimeLimitExceeded: the handler ran past time_limit={limit:g} s"


class Run:
    """What the workers of one run share: the queue, the handler, the policy, the
    counters, and how the run ends."""

    def __init__(self, q: Queue[Any], handler: Callable[[Any], Any], retry: Retry,
                 progress: ConsumeProgress, stop: threading.Event, *,
                 time_limit: float | None, poison_after: int) -> None:  # fmt: skip
        self.q, self.handler, self.retry, self.progress = q, handler, retry, progress
        self.stop = stop  # the caller's: stop was asked for
        self.halt = threading.Event()  # the workers': stop taking (asked for, or the end)
        self.time_limit = time_limit
        self.poison_after = poison_after
        self.local = q.url is None
        self.traced = _otel.tracer_for(q.url)  # a consumer span per message (pigeon[otel])
        self.end: Ended | None = None
        self.crashes = Crashes()  # the worker processes each message killed
        self.measuring = False  # auto: the first items run in one thread to be measured
        self.async_seen = False  # the measurement met an async handler
        self._fetch_failures = 0

    def stopping(self) -> bool:
        if self.stop.is_set():
            self.halt.set()
        return self.halt.is_set()

    def finish(self, end: Ended) -> None:
        """Record how the run ended (the first failure wins over a drained queue)."""
        with self.progress.lock:
            if self.end is None or (end.ended == "failed" and self.end.ended != "failed"):
                self.end = end
        if end.ended == "failed":
            self.halt.set()

    # taking -----------------------------------------------------------------------------

    def fetch(self) -> Message[Any] | None:
        """One message, or None (nothing yet, or the queue failed and we backed off).

        Raises:
            Ended: the queue is shut down and drained, or failed for good.
        """
        try:
            msg = self.q.get_message(timeout=SLICE)
        except Exception as exc:
            wait = self.take_failed(exc)
            if wait:
                self.halt.wait(wait)
            return None
        self.took()
        return msg

    def took(self) -> None:
        """A take succeeded: the next failure backs off from the start again."""
        self._fetch_failures = 0

    def take_failed(self, exc: Exception) -> float:
        """What a failed take means, for both faces: the seconds to wait before the next
        (0: none), after logging what needs it.

        Raises:
            Ended: the queue is shut down and drained, or failed for good.
        """
        if isinstance(exc, Empty):
            return 0.0
        if isinstance(exc, ShutDown):
            if self.retries_pending():
                return SLICE
            raise Ended("shutdown", "the queue was shut down and is drained") from None
        if isinstance(exc, FATAL):
            raise Ended("failed", f"{type(exc).__name__}: {exc}") from exc
        if isinstance(exc, DecodeError):
            # a networked backend dead-lettered it already; a local queue has no dead-letter
            # queue and the item left it in the exception: keep its bytes in the report
            error = describe(exc)
            if self.local:
                with self.progress.lock:
                    self.progress.dead_letters.append(DeadLetter(exc.raw, error, 1))
            log.warning("an item could not be decoded and went to the dead letters: %s", error)
            self.progress.add(failed=1, dead=1)
            return 0.0
        self._fetch_failures += 1
        wait = min(MAX_BACKOFF, 0.1 * 2.0 ** min(self._fetch_failures, 8))
        log.warning("taking from %s failed (%s); trying again in %.1f s",
                    self.q.url or "the local queue", describe(exc), wait)  # fmt: skip
        return wait

    def retries_pending(self) -> bool:
        with self.progress.lock:
            return time.monotonic() < self.progress.retries_until

    # in progress --------------------------------------------------------------------------

    def begin(self, msg: Any, slot: int,
              extend: Callable[[float], None] | None = None) -> Task:  # fmt: skip
        now = time.monotonic()
        task = Task(msg, now, now, slot, extend or msg.extend)
        with self.progress.lock:
            self.progress.in_progress[id(task)] = task
        return task

    def done(self, task: Task) -> bool:
        """The worker is done with ``task``; False when the supervisor took it over."""
        with self.progress.lock:
            self.progress.in_progress.pop(id(task), None)
            return not task.abandoned

    def abandon(self, task: Task) -> bool:
        """The supervisor takes ``task`` over (its worker must not settle it)."""
        with self.progress.lock:
            if task.abandoned or self.progress.in_progress.pop(id(task), None) is None:
                return False
            task.abandoned = True
            return True

    def held_by(self, slot: int) -> list[Task]:
        """The supervisor takes over what the worker of ``slot`` holds (it died)."""
        with self.progress.lock:
            tasks = [t for t in self.progress.in_progress.values() if t.slot == slot]
        return [t for t in tasks if self.abandon(t)]

    # settling (the policy once, for the sync and async faces) ----------------------------

    def on_failure(self, msg: Any, error: str, *, dead: bool = False) -> tuple[bool, float]:
        """Count a failure; return (to the dead letters?, retry delay)."""
        if dead or msg.delivery_count >= self.retry.attempts:
            if self.local:  # the local backend has no dead-letter queue: keep it here
                with self.progress.lock:
                    self.progress.dead_letters.append(
                        DeadLetter(msg.body, error, msg.delivery_count)
                    )
            self.progress.add(failed=1, dead=1)
            log.warning("item dead after %d deliveries: %s", msg.delivery_count, error)
            return True, 0.0
        delay = self.retry.delay(msg.delivery_count)
        if self.local:
            with self.progress.lock:
                self.progress.retries_until = max(
                    self.progress.retries_until, time.monotonic() + delay + 0.5
                )
        self.progress.add(failed=1, retried=1)
        return False, delay

    def settle_error(self, what: str, exc: BaseException) -> bool:
        """Log and count a settle that raised; True when it may have taken effect
        (``Indeterminate``: sent, its reply lost), so it is not handled as undone."""
        self.progress.add(settle_errors=1)
        if isinstance(exc, Indeterminate):
            log.warning("%s may or may not have taken effect (%s); if it did not, the "
                        "message comes back", what, describe(exc))  # fmt: skip
            return True
        log.warning("%s failed (%s); the message comes back when its lease ends or its "
                    "connection drops", what, describe(exc))  # fmt: skip
        return False

    def ack(self, msg: Message[Any]) -> bool:
        """True when acked (or perhaps acked: ``Indeterminate``), counted as processed."""
        try:
            msg.ack()
        except Exception as exc:
            if not self.settle_error("ack", exc):
                return False
        self.progress.add(processed=1)
        return True

    def nack(self, msg: Message[Any], *, requeue: bool = True, delay: float = 0,
             reason: str = "") -> bool:  # fmt: skip
        try:
            msg.nack(requeue=requeue, delay=delay, reason=reason)
        except Exception as exc:
            return self.settle_error("nack", exc)
        return True

    def fail(self, msg: Message[Any], error: str, *, dead: bool = False) -> bool:
        """Settle a failure by the policy; True when the message is dead-lettered."""
        to_dead, delay = self.on_failure(msg, error, dead=dead)
        if to_dead:
            return self.nack(msg, requeue=False, reason=error)
        self.nack(msg, requeue=True, delay=delay)
        return False

    def not_sync(self) -> None:
        """The handler turned out async: the measurement switches to coroutines; a run
        told to use threads or processes cannot go on (no retry mends it)."""
        if not self.measuring:
            raise Ended("failed", NOT_SYNC)
        self.async_seen = True

    def handle(self, msg: Message[Any], slot: int, handler: Callable[[Any], Any]) -> bool:
        """Handle ``msg`` here and settle it; False when it was taken over meanwhile (the
        calling thread was abandoned past ``time_limit`` and must end)."""
        task = self.begin(msg, slot)
        try:
            with self.traced(msg):
                call_sync(handler, msg.body)
        except NotSync:
            if self.done(task):
                self.nack(msg, requeue=True)  # not handled: back, not counted as a failure
            self.not_sync()
            return True
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from a handler too
            error = describe(exc)
            if not self.done(task):
                return False
            self.fail(msg, error)
            return True
        if not self.done(task):
            return False
        self.ack(msg)
        return True
