"""``pigeon.consume``: the loop every consumer writes, with threads, processes or coroutines
chosen by measuring the handler, and a supervisor that keeps it running.

# Strategy:
# Workers take messages with ``get_message`` and settle them: success acks; an exception
# (any ``BaseException`` the handler raises: ``sys.exit()`` in a handler is a failing item,
# not the end of a worker) nacks with an exponential delay (``Retry``), and once the message
# has been delivered ``attempts`` times it goes to the dead-letter queue with the error as
# the reason.
#
# The run must never stop by accident, because it is what users leave running all day:
# - a failed take (the broker restarting, a lost connection, a Redis or NATS error) is
#   logged and retried with backoff; only errors that no retry can mend (authentication,
#   an unsupported call, a queue closed by the caller) end the run, as ``failed``;
# - a failed ack, nack or extend is logged and the loop goes on: the message comes back
#   when its lease ends or its connection drops (at-least-once);
# - a worker that dies anyway is replaced, counted and reported, and the message it held is
#   given back.
# Every lease is held by this process, so one keeper thread extends the leases of slow
# work for every mode (coroutines included), including while ``mode="auto"`` measures; it
# reads the queue's lease from the queue itself, again until the queue answers and then
# now and then (another client may declare another). Process workers are children fed
# through a pipe by a dispatcher thread each: the parent holds the message, so a child
# that dies, runs past ``time_limit`` or is recycled never takes a message with it; a
# message that killed ``poison_after`` children goes to the dead letters with reason
# ``worker_died``. Children ignore SIGTERM and SIGINT (a signal to the process group is the
# parent's to act on, with ``grace``), hold no descriptor of their siblings, and end when
# the parent asks. A thread past ``time_limit`` cannot be killed: its message is given
# back, the thread is abandoned (its result ignored) and replaced; so is a coroutine that
# ignores its cancellation.
# Stopping (``stop``, SIGTERM, SIGINT, or the queue shut down and drained) stops the
# taking; work in progress gets ``grace`` seconds, then is given back; nothing taken is
# dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import math
import multiprocessing as mp
import os
import pickle
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pigeon import _otel
from pigeon._queue_base import Message, Queue
from pigeon.errors import (
    AuthError,
    ClosedResourceError,
    DecodeError,
    Empty,
    InvalidURL,
    ShutDown,
    Unsupported,
)
from pigeon.options import DEFAULT_LEASE

if TYPE_CHECKING:
    from pigeon.aio import AsyncQueue

__all__ = ["ConsumeProgress", "ConsumeReport", "DeadLetter", "Retry", "consume"]

log = logging.getLogger("pigeon.consume")

MODES = ("auto", "thread", "process", "async")
_SLICE = 0.25  # seconds: how long one fetch waits before it looks at the stop signal
_TICK = 0.05  # seconds: how often supervisors look at their workers
_MEASURE_ITEMS = 8  # auto: how many items the measurement handles (at most)
_MEASURE_SECONDS = 1.0  # auto: or for how long
_CPU_BOUND = 0.5  # auto: the share of wall time on the CPU above which work is GIL-bound
_MAX_BACKOFF = 5.0  # seconds between tries to take, while the queue keeps failing
_CANCEL_WAIT = 1.0  # seconds a cancelled coroutine has to end before it is abandoned
# errors that no retry mends: the run ends as ``failed`` with the error as its cause
_FATAL = (AuthError, Unsupported, InvalidURL, ClosedResourceError)


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
    settle_errors: int = 0  # acks/nacks/extends that failed (those messages come back)


@dataclass(eq=False)
class _Task:
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
        self.in_progress: dict[int, _Task] = {}

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


class _Ended(Exception):
    """Raised inside a worker: the run is over (``shutdown`` or ``failed``)."""

    def __init__(self, ended: str, detail: str) -> None:
        super().__init__(detail)
        self.ended, self.detail = ended, detail


class _NotSync(Exception):
    """A handler run as a function returned an awaitable: it is an async handler."""


_NOT_SYNC = (
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


def _call_sync(handler: Callable[[Any], Any], item: Any) -> None:
    """Call ``handler(item)`` as a function; ``_NotSync`` if it handed back an awaitable
    (closed first: nothing ran, nothing is left to warn about)."""
    result = handler(item)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None) or getattr(result, "cancel", None)
        if close is not None:
            close()
        raise _NotSync(_NOT_SYNC)


# --- the run: taking, settling, the policy for failures ----------------------------------


class _Run:
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
        self.end: _Ended | None = None
        self.crashes: dict[bytes, int] = {}  # item digest -> workers it killed
        self.measuring = False  # auto: the first items run in one thread to be measured
        self.async_seen = False  # the measurement met an async handler
        self._fetch_failures = 0

    def stopping(self) -> bool:
        if self.stop.is_set():
            self.halt.set()
        return self.halt.is_set()

    def finish(self, end: _Ended) -> None:
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
            _Ended: the queue is shut down and drained, or failed for good.
        """
        try:
            msg = self.q.get_message(timeout=_SLICE)
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
            _Ended: the queue is shut down and drained, or failed for good.
        """
        if isinstance(exc, Empty):
            return 0.0
        if isinstance(exc, ShutDown):
            if self.retries_pending():
                return _SLICE
            raise _Ended("shutdown", "the queue was shut down and is drained") from None
        if isinstance(exc, _FATAL):
            raise _Ended("failed", f"{type(exc).__name__}: {exc}") from exc
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
        wait = min(_MAX_BACKOFF, 0.1 * 2.0 ** min(self._fetch_failures, 8))
        log.warning("taking from %s failed (%s); trying again in %.1f s",
                    self.q.url or "the local queue", describe(exc), wait)  # fmt: skip
        return wait

    def retries_pending(self) -> bool:
        with self.progress.lock:
            return time.monotonic() < self.progress.retries_until

    # in progress --------------------------------------------------------------------------

    def begin(self, msg: Any, slot: int,
              extend: Callable[[float], None] | None = None) -> _Task:  # fmt: skip
        now = time.monotonic()
        task = _Task(msg, now, now, slot, extend or msg.extend)
        with self.progress.lock:
            self.progress.in_progress[id(task)] = task
        return task

    def done(self, task: _Task) -> bool:
        """The worker is done with ``task``; False when the supervisor took it over."""
        with self.progress.lock:
            self.progress.in_progress.pop(id(task), None)
            return not task.abandoned

    def abandon(self, task: _Task) -> bool:
        """The supervisor takes ``task`` over (its worker must not settle it)."""
        with self.progress.lock:
            if task.abandoned or self.progress.in_progress.pop(id(task), None) is None:
                return False
            task.abandoned = True
            return True

    def held_by(self, slot: int) -> list[_Task]:
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

    def settle_error(self, what: str, exc: BaseException) -> None:
        self.progress.add(settle_errors=1)
        log.warning("%s failed (%s); the message comes back when its lease ends or its "
                    "connection drops", what, describe(exc))  # fmt: skip

    def ack(self, msg: Message[Any]) -> bool:
        try:
            msg.ack()
        except Exception as exc:
            self.settle_error("ack", exc)
            return False
        self.progress.add(processed=1)
        return True

    def nack(self, msg: Message[Any], *, requeue: bool = True, delay: float = 0,
             reason: str = "") -> bool:  # fmt: skip
        try:
            msg.nack(requeue=requeue, delay=delay, reason=reason)
        except Exception as exc:
            self.settle_error("nack", exc)
            return False
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
            raise _Ended("failed", _NOT_SYNC)
        self.async_seen = True

    def handle(self, msg: Message[Any], slot: int, handler: Callable[[Any], Any]) -> bool:
        """Handle ``msg`` here and settle it; False when it was taken over meanwhile (the
        calling thread was abandoned past ``time_limit`` and must end)."""
        task = self.begin(msg, slot)
        try:
            with self.traced(msg):
                _call_sync(handler, msg.body)
        except _NotSync:
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


# --- leases -------------------------------------------------------------------------------

_LEASE_UNKNOWN = 1.0  # seconds: the lease assumed until the queue tells its own
_LEASE_READ_TIMEOUT = 2.0  # seconds one reading of the queue's lease may take
_LEASE_REREAD = 30.0  # seconds between readings (another client may declare another lease)


class _Leases:
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

    def held(self, task: _Task) -> float:
        """The lease ``task`` holds now: the one the keeper gave it, else the queue's."""
        return task.lease or self.seconds or _LEASE_UNKNOWN

    def grant(self) -> float:
        """What an extension gives: the queue's lease (its default until it is known)."""
        return self.seconds or DEFAULT_LEASE


@contextlib.contextmanager
def _lease_keeper(run: _Run) -> Iterator[None]:
    """Extend the lease of work that ran past half of the lease it holds (from a thread of
    its own, for every mode)."""
    if run.local:
        yield
        return
    leases = _Leases(run.q)
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


def _time_limit_error(limit: float) -> str:
    return f"TimeLimitExceeded: the handler ran past time_limit={limit:g} s"


# --- thread workers -------------------------------------------------------------------------


def _run_threads(run: _Run, n: int, grace: float, *,
                 handler: Callable[[Any], Any] | None = None,
                 more: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
    """``n`` threads taking and handling messages until the run halts or ends (or, for
    the measurement, ``more()`` says enough). A thread that dies is replaced; one past
    ``time_limit`` has its message given back and is replaced."""
    fn = handler or run.handler

    def work(slot: int) -> None:
        while not run.stopping() and more():
            msg = run.fetch()
            if msg is not None and not run.handle(msg, slot, fn):
                return  # abandoned past its time limit: a replacement took the slot

    pool = _Supervised(run, work, "pigeon-worker", n)
    while not run.stopping() and not pool.all_ended():  # all ended: drained, or measured
        pool.replace_dead()
        if run.time_limit is not None:
            _enforce_time_limit(run, pool.start)
        run.halt.wait(_TICK)
    pool.join(grace)
    pool.replace_dead(restart=False)
    _give_back_late_work(run, grace)


class _Supervised:
    """``n`` threads running ``target(slot)``; one that dies (an exception other than the
    run's end) is counted, what it held is given back, and it is replaced by
    ``replace_dead``."""

    def __init__(self, run: _Run, target: Callable[[int], None], name: str, n: int) -> None:
        self.run, self.target, self.name = run, target, name
        self.clean: set[threading.Thread] = set()  # threads that ended on purpose
        self.threads: dict[int, threading.Thread] = {}
        for slot in range(n):
            self.start(slot)

    def _body(self, slot: int) -> None:
        try:
            self.target(slot)
        except _Ended as end:
            self.run.finish(end)
        self.clean.add(threading.current_thread())

    def start(self, slot: int) -> None:
        t = threading.Thread(target=self._body, args=(slot,), name=f"{self.name}-{slot}",
                             daemon=True)  # fmt: skip
        self.threads[slot] = t
        t.start()

    def all_ended(self) -> bool:
        return all(t in self.clean for t in self.threads.values())

    def replace_dead(self, *, restart: bool = True) -> None:
        for slot, t in list(self.threads.items()):
            if not t.is_alive() and t not in self.clean:
                self.clean.add(t)
                self.run.progress.add(worker_deaths=1)
                for task in self.run.held_by(slot):  # neither settled nor forgotten
                    self.run.nack(task.msg, requeue=True)
                log.error("%s died; %s", t.name, "started another" if restart else "stopping")
                if restart:
                    self.start(slot)

    def join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))


def _enforce_time_limit(run: _Run, replace: Callable[[int], None]) -> None:
    assert run.time_limit is not None
    now = time.monotonic()
    with run.progress.lock:
        late = [t for t in run.progress.in_progress.values()
                if now - t.started > run.time_limit]  # fmt: skip
    for task in late:
        if run.abandon(task):
            run.progress.add(timed_out=1)
            log.warning("a handler ran past time_limit=%s s: its message is given back and "
                        "its thread replaced", run.time_limit)  # fmt: skip
            run.fail(task.msg, _time_limit_error(run.time_limit))
            replace(task.slot)


def _give_back_late_work(run: _Run, grace: float) -> None:
    """Work still running after ``grace``: give its messages back now, so none waits
    for a lease (or is lost with this process)."""
    with run.progress.lock:
        late = list(run.progress.in_progress.values())
    given = [t for t in late if run.abandon(t)]
    for task in given:
        run.nack(task.msg, requeue=True)
    if given:
        log.warning("%d handler(s) still running after grace=%s s: their messages were given "
                    "back", len(given), grace)  # fmt: skip


# --- process workers ------------------------------------------------------------------------

_RETIRE = b""  # an empty frame: the parent asks the child to end (no pickle is empty)
_SEND_INLINE = 16 * 2**10  # bytes: a payload this small fits the idle pipe, never blocks
# The parent's ends of every live child's pipe. A child forked later closes them all
# first: else it would keep its older siblings' pipes open, and they would never see the
# end of file that tells them the parent is gone (fork copies every descriptor).
_PARENT_ENDS: set[Any] = set()
_FORK_LOCK = threading.Lock()  # forks and the set change together


def _rss() -> int:
    """This process's resident memory in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plain_streams() -> None:
    """A child forked while the parent shows a live display writes to the streams the
    display wraps (rich's proxies hold locks a parent thread may have held at the fork)."""
    for name in ("stdout", "stderr"):
        proxied = getattr(getattr(sys, name), "rich_proxied_file", None)
        if proxied is not None:
            setattr(sys, name, proxied)


def _child(conn: Any, inherited: list[Any], handler: Callable[[Any], Any]) -> None:
    """A process worker: items in through the pipe, (outcome, error, RSS) out; an empty
    frame or the end of file (the parent went) ends it."""
    for other in inherited:
        other.close()
    # the parent decides when to stop: a signal to the whole group is its to act on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _plain_streams()
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if payload == _RETIRE:
            return
        outcome, error = "ok", None
        try:
            _call_sync(handler, pickle.loads(payload))
        except _NotSync:
            outcome = "async"
        except BaseException as exc:  # sys.exit() in a handler fails the item, not the child
            outcome, error = "error", describe(exc)
        conn.send((outcome, error, _rss()))


class _Child:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, handler: Callable[[Any], Any], slot: int) -> None:
        with _FORK_LOCK:
            self.conn, theirs = ctx.Pipe()
            self.proc = ctx.Process(
                target=_child, args=(theirs, [*_PARENT_ENDS, self.conn], handler),
                name=f"pigeon-worker-{slot}", daemon=True,
            )  # fmt: skip
            self.proc.start()
            theirs.close()
            _PARENT_ENDS.add(self.conn)
        self.tasks = 0
        self.rss = 0  # bytes, as the child last said

    def idle_death(self) -> bool:
        """The child died while it had nothing to do (an end of file, or it is gone)."""
        try:
            return not self.proc.is_alive() or self.conn.poll(0)
        except (OSError, ValueError):
            return True

    def died(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the worker process was killed by {signal.Signals(-code).name}"
        return f"the worker process exited with code {code}"

    def _close(self) -> None:
        with _FORK_LOCK:
            _PARENT_ENDS.discard(self.conn)
            self.conn.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.join(5)
        self._close()

    def retire(self) -> None:
        """Ask it to end (it is idle: it reads the request at once); kill it if it
        does not."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send_bytes(_RETIRE)
        self.proc.join(5)
        if self.proc.is_alive():
            log.warning("a worker process did not end when asked; killed")
            self.kill()
        else:
            self._close()


def _send(conn: Any, payload: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the child died: the poll loop sees it
        conn.send_bytes(payload)


def _call_child(run: _Run, child: _Child, payload: bytes,
                grace: float) -> tuple[str, Any]:  # fmt: skip
    """Run one item in ``child``: ("ok"|"error"|"async", (error, rss)) from the child, or
    ("died", why), ("timeout", None), ("stopped", None) when the parent ended it."""
    sender = None
    if len(payload) <= _SEND_INLINE:
        try:
            child.conn.send_bytes(payload)
        except OSError:
            return "died", child.died()
    else:  # the child reads it while it comes: a child that does not read must not hang us
        sender = threading.Thread(target=_send, args=(child.conn, payload), daemon=True)
        sender.start()
    try:
        return _await_child(run, child, grace)
    finally:
        if sender is not None:
            sender.join(5)


def _await_child(run: _Run, child: _Child, grace: float) -> tuple[str, Any]:
    started = time.monotonic()
    stop_by: float | None = None
    while True:
        try:
            if child.conn.poll(_TICK):
                outcome, error, rss = child.conn.recv()
                return outcome, (error, rss)
        except (EOFError, OSError):
            return "died", child.died()
        if not child.proc.is_alive() and not child.conn.poll(0):
            return "died", child.died()
        now = time.monotonic()
        if run.time_limit is not None and now - started > run.time_limit:
            child.kill()
            return "timeout", None
        if run.stopping():
            stop_by = stop_by or now + grace
            if now > stop_by:
                child.kill()
                return "stopped", None


def _run_processes(run: _Run, n: int, grace: float, *, max_tasks_per_child: int | None,
                   max_memory_per_child: int | None) -> None:  # fmt: skip
    """``n`` child processes, each fed by a dispatcher thread of this process that takes
    the message, sends the item, and settles it from the child's answer."""
    ctx: Any = mp.get_context("fork")

    def dispatch(slot: int) -> None:
        child: _Child | None = _Child(ctx, run.handler, slot)
        try:
            while not run.stopping():
                msg = run.fetch()
                if msg is None:
                    continue
                child = _process_one(run, msg, child, ctx, slot, grace)
                if (
                    child is not None
                    and child.tasks
                    and (
                        (max_tasks_per_child and child.tasks >= max_tasks_per_child)
                        or (max_memory_per_child and child.rss > max_memory_per_child)
                    )
                ):
                    child.retire()
                    run.progress.add(workers_recycled=1)
                    child = _replacement(run, ctx, slot)
                elif child is None:
                    child = _replacement(run, ctx, slot)
        finally:
            if child is not None:
                child.retire()

    pool = _Supervised(run, dispatch, "pigeon-dispatch", n)
    while not run.stopping() and not pool.all_ended():
        pool.replace_dead()
        run.halt.wait(_TICK)
    pool.join(grace + 10)  # each gives its work back after grace by itself
    pool.replace_dead(restart=False)


def _replacement(run: _Run, ctx: Any, slot: int) -> _Child | None:
    """A new child for ``slot``, unless the run is stopping (then the next item, if one
    comes, forks it)."""
    return None if run.stopping() else _Child(ctx, run.handler, slot)


def _ready_child(run: _Run, child: _Child | None, ctx: Any, slot: int) -> _Child:
    """``child``, or a new one if there is none or it died while idle (the OOM killer,
    an operator's kill: not the fault of the item about to be sent)."""
    if child is not None and child.idle_death():
        why = child.died()
        child.kill()
        run.progress.add(worker_deaths=1)
        log.error("%s while idle; started another", why)
        child = None
    return child or _Child(ctx, run.handler, slot)


def _process_one(run: _Run, msg: Message[Any], child: _Child | None, ctx: Any, slot: int,
                 grace: float) -> _Child | None:  # fmt: skip
    """Handle one message in a child process; return the child to use next (None when
    this one died, timed out or was stopped)."""
    try:
        payload = pickle.dumps(msg.body, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        run.fail(msg, f"{type(exc).__name__}: the item cannot be sent to a worker process: "
                      f"{describe(exc)}"[:500])  # fmt: skip
        return child
    key = hashlib.blake2b(payload, digest_size=16).digest()
    with run.progress.lock:
        kills = run.crashes.get(key, 0)
    if kills >= run.poison_after:  # its dead-lettering failed: it came back
        if run.fail(msg, f"worker_died: the item killed {kills} worker processes", dead=True):
            _forget_crashes(run, key)
        return child
    child = _ready_child(run, child, ctx, slot)
    task = run.begin(msg, slot)
    with run.traced(msg):
        outcome, detail = _call_child(run, child, payload, grace)
    run.done(task)
    child.tasks += 1
    if outcome == "ok":
        child.rss = detail[1]
        if run.ack(msg):
            _forget_crashes(run, key)
        return child
    if outcome == "error":
        child.rss = detail[1]
        if run.fail(msg, detail[0]):
            _forget_crashes(run, key)
        return child
    if outcome == "async":
        run.nack(msg, requeue=True)  # not handled: back, not counted as a failure
        run.not_sync()
        return child
    if outcome == "stopped":  # past grace while stopping: give it back, not a failure
        run.nack(msg, requeue=True)
        return None
    if outcome == "timeout":
        run.progress.add(timed_out=1)
        log.warning("a handler ran past time_limit=%s s: its worker process was killed and "
                    "replaced", run.time_limit)  # fmt: skip
        if run.fail(msg, _time_limit_error(run.time_limit or 0)):
            _forget_crashes(run, key)
        return None
    child.kill()  # died: reap it and close its pipe
    with run.progress.lock:
        kills = run.crashes[key] = run.crashes.get(key, 0) + 1
    run.progress.add(worker_deaths=1)
    log.error("%s while handling an item (%d time(s) for this item); started another",
              detail, kills)  # fmt: skip
    error = f"worker_died: {detail}"
    poisoned = kills >= run.poison_after
    if run.fail(msg, f"worker_died: the item killed {kills} worker processes (last: {detail})"
                if poisoned else error, dead=poisoned):  # fmt: skip
        _forget_crashes(run, key)
    return None


def _forget_crashes(run: _Run, key: bytes) -> None:
    """The message is settled for good: a later one with the same bytes starts afresh."""
    with run.progress.lock:
        run.crashes.pop(key, None)


# --- coroutine workers ----------------------------------------------------------------------


def _run_async(run: _Run, n: int, grace: float) -> None:
    """``n`` coroutines on a loop of their own (``asyncio.run``, except that a coroutine
    that ignores its cancellation is not awaited for ever: like an abandoned thread, it
    runs on - its loop in a daemon thread - while the process lives. Closing it instead
    would run its code in a finalizer with no loop, where such a coroutine spins)."""
    from pigeon.aio import AsyncQueue

    loop = asyncio.new_event_loop()
    workers = _AsyncRun(run, n, grace, loop, AsyncQueue(run.q))
    try:
        loop.run_until_complete(workers.main())
    finally:
        stuck = {t for t in workers.stuck if not t.done()}  # they had their chance
        pending = asyncio.all_tasks(loop) - stuck
        for t in pending:
            t.cancel()
        if pending:
            _, late = loop.run_until_complete(asyncio.wait(pending, timeout=_CANCEL_WAIT))
            stuck |= late
        if stuck:
            threading.Thread(target=loop.run_forever, name="pigeon-abandoned-coroutines",
                             daemon=True).start()  # fmt: skip
        else:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()


class _AsyncRun:
    """The coroutine workers of one run and their supervisor (time limit, grace)."""

    def __init__(self, run: _Run, n: int, grace: float, loop: asyncio.AbstractEventLoop,
                 aq: AsyncQueue[Any]) -> None:  # fmt: skip
        self.run, self.n, self.grace, self.loop, self.aq = run, n, grace, loop, aq
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.stuck: list[asyncio.Task[None]] = []  # ignored their cancellation: left behind
        self.background: set[asyncio.Task[None]] = set()  # extensions from the keeper

    async def main(self) -> None:
        run = self.run
        try:
            for slot in range(self.n):
                self.workers[slot] = asyncio.create_task(self.work(slot))
            while not all(t.done() for t in self.workers.values()) and not run.stopping():
                await asyncio.sleep(_TICK)
                if run.time_limit is not None:
                    await self.abandon_late(run.time_limit + _CANCEL_WAIT)
            _, pending = await asyncio.wait(self.workers.values(), timeout=self.grace)
            for t in pending:
                t.cancel()
            if pending:
                _, ignored = await asyncio.wait(pending, timeout=_CANCEL_WAIT)
                self.stuck.extend(ignored)
            given = await self.give_back_all()  # left: handlers that ignore cancellation
            if given:
                log.warning("%d async handler(s) still running after grace=%s s and their "
                            "cancellation: their messages were given back", given,
                            self.grace)  # fmt: skip
        finally:
            await self.aq.aclose()

    async def take(self) -> Any:
        try:
            msg = await self.aq.get_message(timeout=_SLICE)
        except Exception as exc:
            wait = self.run.take_failed(exc)
            if wait:
                await asyncio.sleep(wait)
            return None
        self.run.took()
        return msg

    async def settle(self, what: str, make: Callable[[], Awaitable[Any]]) -> bool:
        try:
            await make()
        except Exception as exc:
            self.run.settle_error(what, exc)
            return False
        return True

    async def fail(self, msg: Any, error: str) -> None:
        to_dead, delay = self.run.on_failure(msg, error)
        if to_dead:
            await self.settle("nack", lambda: msg.nack(requeue=False, reason=error))
        else:
            await self.settle("nack", lambda: msg.nack(requeue=True, delay=delay))

    def extender(self, msg: Any) -> Callable[[float], None]:
        """``msg.extend`` from the keeper's thread: run on this loop, without waiting."""

        async def extend(seconds: float) -> None:
            try:
                await msg.extend(seconds)
            except Exception as exc:  # settled meanwhile, or the connection is gone
                log.debug("extending a lease failed: %s", describe(exc))

        def start(seconds: float) -> None:
            task = self.loop.create_task(extend(seconds))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

        def soon(seconds: float) -> None:
            self.loop.call_soon_threadsafe(start, seconds)  # RuntimeError once closed

        return soon

    async def one(self, msg: Any, slot: int) -> None:
        run = self.run
        task = run.begin(msg, slot, self.extender(msg))
        limit = asyncio.timeout(run.time_limit)
        error: str | None = None
        try:
            async with limit:
                with run.traced(msg):
                    result = run.handler(msg.body)
                    if inspect.isawaitable(result):
                        await result
        except asyncio.CancelledError as exc:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # ours: stopped past grace
                if run.done(task):
                    await self.settle("nack", lambda: msg.nack(requeue=True))
                raise
            error = describe(exc)  # the handler's own CancelledError: it failed
        except TimeoutError as exc:
            if limit.expired():  # the limit, not a TimeoutError the handler raised
                run.progress.add(timed_out=1)
                error = _time_limit_error(run.time_limit or 0)
            else:
                error = describe(exc)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from a handler too
            error = describe(exc)
        if not run.done(task):
            return  # abandoned by the supervisor, which settled it
        if error is not None:
            await self.fail(msg, error)
        elif await self.settle("ack", msg.ack):
            run.progress.add(processed=1)

    async def work(self, slot: int) -> None:
        run = self.run
        while not run.stopping():
            try:
                msg = await self.take()
                if msg is not None:
                    await self.one(msg, slot)
            except _Ended as end:
                run.finish(end)
                return
            except asyncio.CancelledError:
                raise
            except BaseException:
                run.progress.add(worker_deaths=1)
                log.exception("a worker task died; it goes on")

    async def abandon_late(self, limit: float) -> None:
        """A handler that outlived its cancellation at ``time_limit``: fail its message,
        leave the coroutine behind, start another worker in its slot."""
        now = time.monotonic()
        with self.run.progress.lock:
            late = [t for t in self.run.progress.in_progress.values() if now - t.started > limit]
        for task in late:
            if self.run.abandon(task):
                log.warning("an async handler ignored its cancellation at time_limit=%s s: "
                            "its message is given back and its task replaced",
                            self.run.time_limit)  # fmt: skip
                self.run.progress.add(timed_out=1)
                await self.fail(task.msg, _time_limit_error(self.run.time_limit or 0))
                self.stuck.append(self.workers[task.slot])
                self.workers[task.slot] = asyncio.create_task(self.work(task.slot))

    async def give_back_all(self) -> int:
        with self.run.progress.lock:
            late = list(self.run.progress.in_progress.values())
        given = [t for t in late if self.run.abandon(t)]
        for task in given:
            await self.settle("nack", functools.partial(task.msg.nack, requeue=True))
        return len(given)


# --- choosing ---------------------------------------------------------------------------------


def _measure(run: _Run, grace: float) -> tuple[str, str]:
    """Handle the first items in one worker thread, measuring CPU time against wall
    time (with the same lease keeping, time limit and replacement as the threads)."""
    cpus = os.cpu_count() or 1
    lock = threading.Lock()
    cpu = wall = 0.0
    n = 0
    started: list[float] = []

    def timed(item: Any) -> Any:
        nonlocal cpu, wall, n
        if not started:
            started.append(time.monotonic())
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return run.handler(item)
        finally:
            with lock:
                cpu += time.thread_time() - c0
                wall += time.perf_counter() - w0
                n += 1

    def more() -> bool:
        with lock:
            late = bool(started) and time.monotonic() - started[0] > _MEASURE_SECONDS
            return n < _MEASURE_ITEMS and not late and not run.async_seen

    run.measuring = True
    try:
        _run_threads(run, 1, grace, handler=timed, more=more)
    finally:
        run.measuring = False
    if run.async_seen:
        return "async", "auto: the handler returned an awaitable: tasks on one loop"
    if n == 0:
        return "thread", "auto: no item came to measure; threads"
    share = cpu / wall if wall > 0 else 0.0
    facts = f"{n} item(s) measured: the handler kept its thread on the CPU {share:.0%} of the time"
    if share >= _CPU_BOUND:
        if cpus == 1:
            return "thread", f"auto: {facts} (CPU-bound) but this machine has one CPU: threads"
        return "process", f"auto: {facts}: CPU-bound, so GIL-bound in threads: processes"
    return "thread", f"auto: {facts}: mostly waiting (I/O), which threads overlap: threads"


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """From the main thread, SIGTERM and SIGINT set ``stop`` (a second one is not
    special: grace still applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _positive(name: str, value: Any, kind: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < float(value) < 1e300:
        raise ValueError(f"{name} must be a number > 0 or None, not {value!r}")


def consume(
    source: Queue[Any] | str,
    handler: Callable[[Any], Any],
    *,
    concurrency: int | None = None,
    mode: str = "auto",
    retry: Retry | None = None,
    stop: threading.Event | None = None,
    grace: float = 30.0,
    time_limit: float | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
    poison_after: int = 3,
) -> ConsumeReport:
    """Handle every item of ``source`` with ``handler`` until the queue is shut down and
    drained, ``stop`` is set, or (called from the main thread) SIGTERM/SIGINT arrives.

    ``source``: a queue or a URL. ``handler(item)``: a function, or an async one (``async
    def``, also under a ``functools.wraps`` decorator or as an object's ``async def
    __call__``). Success acks the item; an exception (``SystemExit`` and
    ``KeyboardInterrupt`` included) gives it back after a delay (``retry``) until it has
    been delivered ``retry.attempts`` times, then sends it to the dead-letter queue with the
    error as the reason (a local queue, which has none, keeps it in
    ``report.dead_letters``). ``mode``: ``"thread"``, ``"process"``, ``"async"`` (for async
    handlers; any callable whose result is awaited), or ``"auto"`` (measure the first
    items; see ``report.reason``). A handler run in threads or processes that returns an
    awaitable is an async handler in disguise: auto mode switches to coroutines; the
    ``thread`` and ``process`` modes give the item back and end the run ``failed``.
    ``concurrency``: workers; by default the CPU count for processes, ``min(32, CPUs + 4)``
    threads, 100 coroutines. On stop, taking stops and work in progress has ``grace``
    seconds to finish, then its messages are given back.

    The run does not end by accident: failed takes are retried with backoff, failed acks
    are logged (the message comes back), dead workers are replaced and what they held is
    given back. It ends ``failed`` only on an error no retry mends (``AuthError``,
    ``Unsupported``, ``InvalidURL``, the queue closed by the caller); ``report.ended`` and
    ``report.reason`` say how it ended.

    ``time_limit`` (seconds): a handler call running longer counts as a failure and its
    message is given back (retried, or dead after ``attempts``); its worker is replaced
    (a process is killed; a thread cannot be, so it is abandoned; a coroutine is cancelled,
    and abandoned if it ignores that). Process workers only: ``max_tasks_per_child``
    items, or ``max_memory_per_child`` bytes of resident memory after an item, and the
    process is replaced; an item that killed ``poison_after`` worker processes goes to the
    dead letters with reason ``worker_died: ...``.

    Raises:
        ValueError: an unknown mode, a bad concurrency or limit, an async handler for
            threads or processes, a process-only limit for threads or coroutines.
    """
    return run_consumer(source, handler, concurrency=concurrency, mode=mode, retry=retry,
                        stop=stop, grace=grace, time_limit=time_limit,
                        max_tasks_per_child=max_tasks_per_child,
                        max_memory_per_child=max_memory_per_child,
                        poison_after=poison_after)  # fmt: skip


def run_consumer(
    source: Queue[Any] | str,
    handler: Callable[[Any], Any],
    *,
    concurrency: int | None = None,
    mode: str = "auto",
    retry: Retry | None = None,
    stop: threading.Event | None = None,
    grace: float = 30.0,
    time_limit: float | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
    poison_after: int = 3,
    on_start: Callable[[str, str, int], None] | None = None,
    progress: ConsumeProgress | None = None,
) -> ConsumeReport:
    """``consume`` with hooks for ``pigeon worker``: ``on_start(mode, reason, workers)``
    once the mode is chosen, and ``progress`` to read the counters from while it runs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    c = concurrency
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
    _positive("time_limit", time_limit, (int, float))
    _positive("max_tasks_per_child", max_tasks_per_child, int)
    _positive("max_memory_per_child", max_memory_per_child, int)
    _positive("poison_after", poison_after, int)
    if not isinstance(grace, int | float) or isinstance(grace, bool) or not grace >= 0:
        raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
    retry = retry if retry is not None else Retry()
    is_async = mode == "async" or is_async_handler(handler)
    if is_async and mode in ("thread", "process"):
        raise ValueError(f"an async handler runs in mode='async', not {mode!r}")
    limits = {"max_tasks_per_child": max_tasks_per_child,
              "max_memory_per_child": max_memory_per_child}  # fmt: skip
    process_only = [name for name, value in limits.items() if value is not None]
    if process_only and (mode == "thread" or is_async):
        raise ValueError(f"{' and '.join(process_only)} apply to process workers, not to "
                         f"mode={'async' if is_async else mode!r}")  # fmt: skip
    stop = stop if stop is not None else threading.Event()
    q: Queue[Any] = Queue(source) if isinstance(source, str) else source
    progress = progress if progress is not None else ConsumeProgress()
    started = time.monotonic()
    reason = ""
    try:
        run = _Run(q, handler, retry, progress, stop, time_limit=time_limit,
                   poison_after=poison_after)  # fmt: skip
        with _stop_on_signals(stop), _lease_keeper(run):
            if mode == "async":
                reason = "mode='async' was asked for"
            elif is_async:
                mode, reason = "async", "the handler is async: tasks on one loop"
            elif mode == "auto":
                mode, reason = _measure(run, grace)
                if process_only and mode != "process":
                    reason += f" ({' and '.join(process_only)}: process workers only, unused)"
                    log.warning("%s: not applied, the handler runs in %s mode",
                                " and ".join(process_only), mode)  # fmt: skip
            else:
                reason = f"mode={mode!r} was asked for"
            cpus = os.cpu_count() or 1
            n = concurrency or {"process": cpus, "thread": min(32, cpus + 4), "async": 100}[mode]
            if run.end is None and not run.stopping():
                log.info("consuming with %d %s worker(s): %s", n, mode, reason)
                if on_start is not None:
                    on_start(mode, reason, n)
                if mode == "thread":
                    _run_threads(run, n, grace)
                elif mode == "process":
                    _run_processes(run, n, grace, max_tasks_per_child=max_tasks_per_child,
                                   max_memory_per_child=max_memory_per_child)  # fmt: skip
                else:
                    _run_async(run, n, grace)
    finally:
        if isinstance(source, str):
            q.close()
    end = run.end or _Ended("stopped", "stop was asked for")
    if end.ended == "failed":
        log.error("consuming ended: %s", end.detail)
    p = progress
    with p.lock:
        return ConsumeReport(
            processed=p.processed, failed=p.failed, retried=p.retried, dead=p.dead,
            mode=mode, reason=f"{end.ended}: {end.detail}; {reason}",
            elapsed=time.monotonic() - started, dead_letters=list(p.dead_letters),
            ended=end.ended, error=end.detail if end.ended == "failed" else None,
            timed_out=p.timed_out, worker_deaths=p.worker_deaths,
            workers_recycled=p.workers_recycled, settle_errors=p.settle_errors,
        )  # fmt: skip
