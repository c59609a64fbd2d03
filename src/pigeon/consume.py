"""``pigeon.consume``: the loop every consumer writes, with threads, processes or coroutines
chosen by measuring the handler, and a supervisor that keeps it running.

# Strategy:
# Workers take messages with ``get_message`` and settle them: success acks; an exception
# nacks with an exponential delay (``Retry``), and once the message has been delivered
# ``attempts`` times it goes to the dead-letter queue with the error as the reason.
#
# The run must never stop by accident, because it is what users leave running all day:
# - a failed take (the broker restarting, a lost connection, a Redis or NATS error) is
#   logged and retried with backoff; only errors that no retry can mend (authentication,
#   an unsupported call, a queue closed by the caller) end the run, as ``failed``;
# - a failed ack, nack or extend is logged and the loop goes on: the message comes back
#   when its lease ends or its connection drops (at-least-once);
# - a worker that dies anyway is replaced, counted and reported.
# Every lease is held by this process, so one keeper thread extends the leases of slow
# work for every mode, including while ``mode="auto"`` measures. Process workers are
# children fed through a pipe by a dispatcher thread each: the parent holds the message,
# so a child that dies, runs past ``time_limit`` or is recycled never takes a message
# with it; a message that killed ``poison_after`` children goes to the dead letters with
# reason ``worker_died``. A thread past ``time_limit`` cannot be killed: its message is
# given back, the thread is abandoned (its result ignored) and replaced.
# Stopping (``stop``, SIGTERM, SIGINT, or the queue shut down and drained) stops the
# taking; work in progress gets ``grace`` seconds, then is given back; nothing taken is
# dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import multiprocessing as mp
import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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

__all__ = ["ConsumeProgress", "ConsumeReport", "DeadLetter", "Retry", "consume"]

log = logging.getLogger("pigeon.consume")

MODES = ("auto", "thread", "process", "async")
_SLICE = 0.25  # seconds: how long one fetch waits before it looks at the stop signal
_TICK = 0.05  # seconds: how often supervisors look at their workers
_MEASURE_ITEMS = 8  # auto: how many items the measurement handles (at most)
_MEASURE_SECONDS = 1.0  # auto: or for how long
_CPU_BOUND = 0.5  # auto: the share of wall time on the CPU above which work is GIL-bound
_MAX_BACKOFF = 5.0  # seconds between tries to take, while the queue keeps failing
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
        """Seconds before a message delivered ``delivery_count`` times is tried again."""
        cap = min(self.max_backoff, self.backoff * 2 ** max(0, delivery_count - 1))
        return random.uniform(0, cap) if self.jitter else cap


@dataclass(frozen=True)
class DeadLetter:
    """An item that failed ``attempts`` times, from a queue without a dead-letter queue
    (the local backend): kept in the report, never dropped."""

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
    abandoned: bool = False  # given back by the supervisor: its worker must not settle it


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
        self.lease = _lease_of(q)
        self.local = q.url is None
        self.traced = _otel.tracer_for(q.url)  # a consumer span per message (pigeon[otel])
        self.end: _Ended | None = None
        self.crashes: dict[bytes, int] = {}  # item digest -> workers it killed
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
        if isinstance(exc, DecodeError):  # the backend dead-lettered it already
            log.warning("an item could not be decoded and went to the dead letters: %s", exc)
            self.progress.add(failed=1, dead=1)
            return 0.0
        self._fetch_failures += 1
        wait = min(_MAX_BACKOFF, 0.1 * 2.0 ** min(self._fetch_failures, 8))
        log.warning("taking from %s failed (%s: %s); trying again in %.1f s",
                    self.q.url or "the local queue", type(exc).__name__, exc, wait)  # fmt: skip
        return wait

    def retries_pending(self) -> bool:
        with self.progress.lock:
            return time.monotonic() < self.progress.retries_until

    # in progress --------------------------------------------------------------------------

    def begin(self, msg: Message[Any], slot: int) -> _Task:
        now = time.monotonic()
        task = _Task(msg, now, now, slot)
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
        log.warning("%s failed (%s: %s); the message comes back when its lease ends or its "
                    "connection drops", what, type(exc).__name__, exc)  # fmt: skip

    def ack(self, msg: Message[Any]) -> None:
        try:
            msg.ack()
        except Exception as exc:
            self.settle_error("ack", exc)
        else:
            self.progress.add(processed=1)

    def nack(self, msg: Message[Any], *, requeue: bool = True, delay: float = 0,
             reason: str = "") -> None:  # fmt: skip
        try:
            msg.nack(requeue=requeue, delay=delay, reason=reason)
        except Exception as exc:
            self.settle_error("nack", exc)

    def fail(self, msg: Message[Any], error: str, *, dead: bool = False) -> None:
        to_dead, delay = self.on_failure(msg, error, dead=dead)
        if to_dead:
            self.nack(msg, requeue=False, reason=error)
        else:
            self.nack(msg, requeue=True, delay=delay)

    def handle(self, msg: Message[Any], slot: int, handler: Callable[[Any], Any]) -> bool:
        """Handle ``msg`` here and settle it; False when it was taken over meanwhile (the
        calling thread was abandoned past ``time_limit`` and must end)."""
        task = self.begin(msg, slot)
        try:
            with self.traced(msg):
                handler(msg.body)
        except Exception as exc:
            if self.done(task):
                self.fail(msg, f"{type(exc).__name__}: {exc}"[:500])
                return True
            return False
        if not self.done(task):
            return False
        self.ack(msg)
        return True


def _lease_of(q: Queue[Any]) -> float | None:
    """The queue's lease, for extending long work (None: the local queue has none)."""
    if q.url is None:
        return None
    info = getattr(q, "_info", None)
    if info is not None:
        try:
            return float(info()["lease"])
        except Exception:  # the broker is restarting: its default, until it answers
            return 30.0
    options = getattr(q, "_options", {})
    return float(options.get("lease") or 30.0)


@contextlib.contextmanager
def _lease_keeper(run: _Run) -> Iterator[None]:
    """Extend the lease of work that ran past half of it (from a thread of its own)."""
    lease = run.lease
    if not lease:
        yield
        return
    done = threading.Event()

    def keep() -> None:
        while not done.wait(min(0.5, lease / 4)):
            now = time.monotonic()
            with run.progress.lock:
                due = [t for t in run.progress.in_progress.values()
                       if now - t.extended >= lease / 2]  # fmt: skip
                for t in due:
                    t.extended = now
            for t in due:
                try:
                    t.msg.extend(lease)
                except Exception as exc:  # settled meanwhile, or the connection is gone
                    log.debug("extending a lease failed: %s: %s", type(exc).__name__, exc)

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
    _give_back_late_work(run, grace)


class _Supervised:
    """``n`` threads running ``target(slot)``; one that dies (an exception other than the
    run's end) is counted and replaced by ``replace_dead``."""

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

    def replace_dead(self) -> None:
        for slot, t in list(self.threads.items()):
            if not t.is_alive() and t not in self.clean:
                self.run.progress.add(worker_deaths=1)
                log.error("%s died; started another", t.name)
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


def _rss() -> int:
    """This process's resident memory in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(conn: Any, other: Any, handler: Callable[[Any], Any]) -> None:
    """A process worker: items in through the pipe, (error or None, RSS) out."""
    other.close()  # the parent's end: EOF here when the parent goes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        error = None
        try:
            handler(pickle.loads(payload))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        conn.send((error, _rss()))


class _Child:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, handler: Callable[[Any], Any], slot: int) -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(theirs, self.conn, handler),
                                name=f"pigeon-worker-{slot}", daemon=True)  # fmt: skip
        self.proc.start()
        theirs.close()
        self.tasks = 0
        self.rss = 0  # bytes, as the child last said

    def died(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the worker process was killed by {signal.Signals(-code).name}"
        return f"the worker process exited with code {code}"

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def retire(self) -> None:
        """Ask it to end (EOF on its pipe), kill it if it does not."""
        self.conn.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


def _call_child(run: _Run, child: _Child, payload: bytes,
                grace: float) -> tuple[str, Any]:  # fmt: skip
    """Run one item in ``child``: ("ok"|"error", (error, rss)) from the child, or
    ("died", why), ("timeout", None), ("stopped", None) when the parent ended it."""
    try:
        child.conn.send_bytes(payload)
    except OSError:
        return "died", child.died()
    started = time.monotonic()
    stop_by: float | None = None
    while True:
        try:
            if child.conn.poll(_TICK):
                result = child.conn.recv()
                return ("ok" if result[0] is None else "error"), result
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
    handler = run.handler

    def dispatch(slot: int) -> None:
        child = _Child(ctx, handler, slot)
        try:
            while not run.stopping():
                msg = run.fetch()
                if msg is None:
                    continue
                child = _process_one(run, msg, child, ctx, slot, grace)
                if child.tasks and (
                    (max_tasks_per_child and child.tasks >= max_tasks_per_child)
                    or (max_memory_per_child and child.rss > max_memory_per_child)
                ):
                    child.retire()
                    run.progress.add(workers_recycled=1)
                    child = _Child(ctx, handler, slot)
        finally:
            child.retire()

    pool = _Supervised(run, dispatch, "pigeon-dispatch", n)
    while not run.stopping() and not pool.all_ended():
        pool.replace_dead()
        run.halt.wait(_TICK)
    pool.join(grace + 10)  # each gives its work back after grace by itself


def _process_one(run: _Run, msg: Message[Any], child: _Child, ctx: Any, slot: int,
                 grace: float) -> _Child:  # fmt: skip
    """Handle one message in ``child``; return the child to use next (a new one when
    this one died, timed out or was stopped)."""
    try:
        payload = pickle.dumps(msg.body, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        run.fail(msg, f"{type(exc).__name__}: the item cannot be sent to a worker process: "
                      f"{exc}"[:500])  # fmt: skip
        return child
    key = hashlib.blake2b(payload, digest_size=16).digest()
    with run.progress.lock:
        kills = run.crashes.get(key, 0)
    if kills >= run.poison_after:
        run.fail(msg, f"worker_died: the item killed {kills} worker processes", dead=True)
        return child
    task = run.begin(msg, slot)
    with run.traced(msg):
        outcome, detail = _call_child(run, child, payload, grace)
    run.done(task)
    child.tasks += 1
    if outcome == "ok":
        child.rss = detail[1]
        run.ack(msg)
        with run.progress.lock:
            run.crashes.pop(key, None)
        return child
    if outcome == "error":
        child.rss = detail[1]
        run.fail(msg, detail[0])
        return child
    if outcome == "stopped":  # past grace while stopping: give it back, not a failure
        run.nack(msg, requeue=True)
        return child  # killed; the dispatcher is stopping and retires it (no new fork)
    if outcome == "timeout":
        run.progress.add(timed_out=1)
        log.warning("a handler ran past time_limit=%s s: its worker process was killed and "
                    "replaced", run.time_limit)  # fmt: skip
        run.fail(msg, _time_limit_error(run.time_limit or 0))
        return _Child(ctx, run.handler, slot)
    with run.progress.lock:  # died
        kills = run.crashes[key] = run.crashes.get(key, 0) + 1
    run.progress.add(worker_deaths=1)
    log.error("%s while handling an item (%d time(s) for this item); started another",
              detail, kills)  # fmt: skip
    error = f"worker_died: {detail}"
    run.fail(msg, error if kills < run.poison_after else
             f"worker_died: the item killed {kills} worker processes (last: {detail})",
             dead=kills >= run.poison_after)  # fmt: skip
    return _Child(ctx, run.handler, slot)


# --- coroutine workers ----------------------------------------------------------------------


def _run_async(run: _Run, n: int, grace: float) -> None:
    from pigeon.aio import AsyncQueue

    async def main() -> None:
        aq: AsyncQueue[Any] = AsyncQueue(run.q)

        async def take() -> Any:
            try:
                msg = await aq.get_message(timeout=_SLICE)
            except Exception as exc:
                wait = run.take_failed(exc)
                if wait:
                    await asyncio.sleep(wait)
                return None
            run.took()
            return msg

        async def settle(what: str, call: Any) -> bool:
            try:
                await call
            except Exception as exc:
                run.settle_error(what, exc)
                return False
            return True

        async def fail(msg: Any, error: str) -> None:
            to_dead, delay = run.on_failure(msg, error)
            if to_dead:
                await settle("nack", msg.nack(requeue=False, reason=error))
            else:
                await settle("nack", msg.nack(requeue=True, delay=delay))

        async def one(msg: Any) -> None:
            keeper = asyncio.create_task(_keep_async(msg, run.lease)) if run.lease else None
            limit = asyncio.timeout(run.time_limit)
            try:
                async with limit:
                    with run.traced(msg):
                        await run.handler(msg.body)
            except asyncio.CancelledError:
                await settle("nack", msg.nack(requeue=True))  # stopped past grace: give back
                raise
            except TimeoutError as exc:
                if limit.expired():  # the limit, not a TimeoutError the handler raised
                    run.progress.add(timed_out=1)
                    await fail(msg, _time_limit_error(run.time_limit or 0))
                else:
                    await fail(msg, f"{type(exc).__name__}: {exc}"[:500])
            except Exception as exc:
                await fail(msg, f"{type(exc).__name__}: {exc}"[:500])
            else:
                if await settle("ack", msg.ack()):
                    run.progress.add(processed=1)
            finally:
                if keeper is not None:
                    keeper.cancel()

        async def work() -> None:
            while not run.stopping():
                try:
                    msg = await take()
                    if msg is not None:
                        await one(msg)
                except _Ended as end:
                    run.finish(end)
                    return
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    run.progress.add(worker_deaths=1)
                    log.exception("a worker task died; it goes on")

        tasks = [asyncio.create_task(work()) for _ in range(n)]
        while not all(t.done() for t in tasks) and not run.stopping():
            await asyncio.sleep(_TICK)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await aq.aclose()

    asyncio.run(main())


async def _keep_async(msg: Any, lease: float) -> None:
    while True:
        await asyncio.sleep(lease / 2)
        with contextlib.suppress(Exception):
            await msg.extend(lease)


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
            return n < _MEASURE_ITEMS and not late

    _run_threads(run, 1, grace, handler=timed, more=more)
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

    ``source``: a queue or a URL. ``handler(item)``: a function, or an ``async def``
    function. Success acks the item; an exception gives it back after a delay (``retry``)
    until it has been delivered ``retry.attempts`` times, then sends it to the dead-letter
    queue with the error as the reason (a local queue, which has none, keeps it in
    ``report.dead_letters``). ``mode``: ``"thread"``, ``"process"``, ``"async"`` (for
    ``async def`` handlers), or ``"auto"`` (measure the first items; see ``report.reason``).
    ``concurrency``: workers; by default the CPU count for processes, ``min(32, CPUs + 4)``
    threads, 100 coroutines. On stop, taking stops and work in progress has ``grace``
    seconds to finish, then its messages are given back.

    The run does not end by accident: failed takes are retried with backoff, failed acks
    are logged (the message comes back), dead workers are replaced. It ends ``failed``
    only on an error no retry mends (``AuthError``, ``Unsupported``, ``InvalidURL``, the
    queue closed by the caller); ``report.ended`` and ``report.reason`` say how it ended.

    ``time_limit`` (seconds): a handler call running longer counts as a failure and its
    message is given back (retried, or dead after ``attempts``); its worker is replaced
    (a process is killed; a thread cannot be, so it is abandoned). Process workers only:
    ``max_tasks_per_child`` items, or ``max_memory_per_child`` bytes of resident memory
    after an item, and the process is replaced; an item that killed ``poison_after``
    worker processes goes to the dead letters with reason ``worker_died: ...``.

    Raises:
        ValueError: an unknown mode, a bad concurrency or limit, an ``async def`` handler
            for threads or processes.
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
    is_async = inspect.iscoroutinefunction(handler)
    if is_async and mode in ("thread", "process"):
        raise ValueError(f"an async def handler runs in mode='async', not {mode!r}")
    if not is_async and mode == "async":
        raise ValueError("mode='async' needs an async def handler")
    stop = stop if stop is not None else threading.Event()
    q: Queue[Any] = Queue(source) if isinstance(source, str) else source
    progress = progress if progress is not None else ConsumeProgress()
    started = time.monotonic()
    reason = ""
    try:
        run = _Run(q, handler, retry, progress, stop, time_limit=time_limit,
                   poison_after=poison_after)  # fmt: skip
        with _stop_on_signals(stop), _lease_keeper(run):
            if is_async:
                mode, reason = "async", "the handler is a coroutine function: tasks on one loop"
            elif mode == "auto":
                mode, reason = _measure(run, grace)
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
