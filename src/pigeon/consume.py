"""``pigeon.consume``: the loop every consumer writes, with threads, processes or coroutines
chosen by measuring the handler.

# Strategy:
# Each worker takes messages with ``get_message`` and settles them: success acks; an
# exception nacks with an exponential delay (``Retry``), and once the message has been
# delivered ``attempts`` times it goes to the dead-letter queue with the error as the
# reason. Work that runs past half its lease has the lease extended by a keeper thread.
# Workers are threads (blocking I/O), processes (CPU-bound work: the GIL lets one thread
# compute at a time, so processes are the way to use every core), or tasks on one event
# loop (``async def`` handlers). ``mode="auto"`` handles the first items itself and
# measures: a handler whose thread was on the CPU for most of the wall time is GIL-bound
# and gets processes; one that mostly waits gets threads; a coroutine function gets
# tasks. Stopping (``stop``, SIGTERM, SIGINT, or the queue shut down and drained) stops
# the fetching; work in progress gets ``grace`` seconds; nothing taken is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pigeon._queue_base import Message, Queue
from pigeon.errors import Empty, ShutDown

__all__ = ["ConsumeReport", "DeadLetter", "Retry", "consume"]

log = logging.getLogger("pigeon.consume")

MODES = ("auto", "thread", "process", "async")
_SLICE = 0.25  # seconds: how long one fetch waits before it looks at the stop signal
_MEASURE_ITEMS = 8  # auto: how many items the measurement handles (at most)
_MEASURE_SECONDS = 1.0  # auto: or for how long
_CPU_BOUND = 0.5  # auto: the share of wall time on the CPU above which work is GIL-bound


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
    processed: int  # handled successfully (acked)
    failed: int  # handler calls that raised
    retried: int  # of those, given back to be tried again
    dead: int  # of those, sent to the dead-letter queue
    mode: str  # thread, process or async
    reason: str  # why that mode (and the measurement, for auto)
    elapsed: float  # seconds
    dead_letters: list[DeadLetter] = field(default_factory=list)  # local queues only


class _Counts:
    """Counters shared by the workers of one consume, and the messages in progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processed = self.failed = self.retried = self.dead = 0
        self.dead_letters: list[DeadLetter] = []
        # a local queue's delayed nack lives in a timer of this process, outside the queue:
        # a drained, shut-down queue is not finished until those are back in it
        self.retries_until = 0.0
        self.in_progress: dict[
            int, tuple[Message[Any], float, float]
        ] = {}  # id -> (msg, last, lease)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "processed": self.processed, "failed": self.failed, "retried": self.retried,
                "dead": self.dead, "in_progress": len(self.in_progress),
            }  # fmt: skip


# --- settling one message -------------------------------------------------------------------


def _settle_failure(q: Queue[Any], msg: Message[Any], exc: BaseException, retry: Retry,
                    counts: _Counts) -> None:  # fmt: skip
    error = f"{type(exc).__name__}: {exc}"[:500]
    if msg.delivery_count >= retry.attempts:
        if q.url is None:  # the local backend has no dead-letter queue: keep it here
            with counts.lock:
                counts.dead_letters.append(DeadLetter(msg.body, error, msg.delivery_count))
        msg.nack(requeue=False, reason=error)
        counts.add(failed=1, dead=1)
        log.warning("item dead after %d deliveries: %s", msg.delivery_count, error)
    else:
        delay = retry.delay(msg.delivery_count)
        if q.url is None:
            with counts.lock:
                counts.retries_until = max(counts.retries_until, time.monotonic() + delay + 0.5)
        msg.nack(requeue=True, delay=delay)
        counts.add(failed=1, retried=1)


def _retries_pending(counts: _Counts) -> bool:
    with counts.lock:
        return time.monotonic() < counts.retries_until


def _handle(q: Queue[Any], msg: Message[Any], handler: Callable[[Any], Any], retry: Retry,
            counts: _Counts, lease: float | None) -> None:  # fmt: skip
    key = id(msg)
    if lease:
        with counts.lock:
            counts.in_progress[key] = (msg, time.monotonic(), lease)
    try:
        handler(msg.body)
    except Exception as exc:
        _settle_failure(q, msg, exc, retry, counts)
    else:
        msg.ack()
        counts.add(processed=1)
    finally:
        with counts.lock:
            counts.in_progress.pop(key, None)


@contextlib.contextmanager
def _lease_keeper(counts: _Counts) -> Iterator[None]:
    """Extend the lease of work that ran past half of it (from a thread of its own)."""
    done = threading.Event()

    def keep() -> None:
        while not done.wait(0.5):
            now = time.monotonic()
            with counts.lock:
                due = [(k, m, lease) for k, (m, last, lease) in counts.in_progress.items()
                       if now - last >= lease / 2]  # fmt: skip
                for k, m, lease in due:
                    counts.in_progress[k] = (m, now, lease)
            for _, m, lease in due:
                with contextlib.suppress(Exception):  # settled meanwhile
                    m.extend(lease)

    t = threading.Thread(target=keep, name="pigeon-lease-keeper", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _lease_of(q: Queue[Any]) -> float | None:
    """The queue's lease, for extending long work (None: the local queue has none)."""
    if q.url is None:
        return None
    info = getattr(q, "_info", None)
    if info is not None:
        return float(info()["lease"])
    options = getattr(q, "_options", {})
    return float(options.get("lease") or 30.0)


# --- thread workers -------------------------------------------------------------------------


def _run_threads(q: Queue[Any], handler: Callable[[Any], Any], n: int, retry: Retry,
                 counts: _Counts, stop: threading.Event, grace: float) -> str:  # fmt: skip
    """``n`` threads taking and handling messages; returns why they stopped."""
    lease = _lease_of(q)
    ended: list[str] = []

    def work() -> None:
        while not stop.is_set():
            try:
                msg = q.get_message(timeout=_SLICE)
            except Empty:
                continue
            except ShutDown:
                if _retries_pending(counts):
                    stop.wait(_SLICE)
                    continue
                ended.append("the queue was shut down and is drained")
                return
            _handle(q, msg, handler, retry, counts, lease)

    threads = [threading.Thread(target=work, name=f"pigeon-worker-{i}", daemon=True)
               for i in range(n)]  # fmt: skip
    with _lease_keeper(counts):
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and not stop.is_set():
            stop.wait(0.1)
        deadline = time.monotonic() + grace
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    late = sum(t.is_alive() for t in threads)
    if late:
        log.warning("%d handler(s) still running after grace=%s s; their messages come back "
                    "when their lease ends", late, grace)  # fmt: skip
    return ended[0] if ended else "stopped"


# --- coroutine workers ----------------------------------------------------------------------


def _run_async(q: Queue[Any], handler: Callable[[Any], Any], n: int, retry: Retry,
               counts: _Counts, stop: threading.Event, grace: float) -> str:  # fmt: skip
    from pigeon.aio import AsyncQueue

    lease = _lease_of(q)
    ended: list[str] = []

    async def main() -> None:
        aq: AsyncQueue[Any] = AsyncQueue(q)

        async def work() -> None:
            while not stop.is_set():
                try:
                    msg = await aq.get_message(timeout=_SLICE)
                except Empty:
                    continue
                except ShutDown:
                    if _retries_pending(counts):
                        await asyncio.sleep(_SLICE)
                        continue
                    ended.append("the queue was shut down and is drained")
                    return
                keeper = asyncio.create_task(_keep_async(msg, lease)) if lease else None
                try:
                    await handler(msg.body)
                except asyncio.CancelledError:
                    await msg.nack(requeue=True)  # stopped past grace: give it back
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    if msg.delivery_count >= retry.attempts:
                        if q.url is None:
                            with counts.lock:
                                counts.dead_letters.append(
                                    DeadLetter(msg.body, error, msg.delivery_count)
                                )
                        await msg.nack(requeue=False, reason=error)
                        counts.add(failed=1, dead=1)
                    else:
                        delay = retry.delay(msg.delivery_count)
                        if q.url is None:
                            with counts.lock:
                                counts.retries_until = max(
                                    counts.retries_until, time.monotonic() + delay + 0.5
                                )
                        await msg.nack(requeue=True, delay=delay)
                        counts.add(failed=1, retried=1)
                else:
                    await msg.ack()
                    counts.add(processed=1)
                finally:
                    if keeper is not None:
                        keeper.cancel()

        tasks = [asyncio.create_task(work()) for _ in range(n)]
        while not all(t.done() for t in tasks) and not stop.is_set():
            await asyncio.sleep(0.1)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await aq.aclose()

    asyncio.run(main())
    return ended[0] if ended else "stopped"


async def _keep_async(msg: Any, lease: float) -> None:
    while True:
        await asyncio.sleep(lease / 2)
        with contextlib.suppress(Exception):
            await msg.extend(lease)


# --- process workers ------------------------------------------------------------------------


def _process_worker(q: Queue[Any], handler: Callable[[Any], Any], retry: Retry,
                    stop: Any, grace: float, results: Any, index: int) -> None:  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    local_stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: local_stop.set())
    counts = _Counts()

    def watch() -> None:  # the parent's stop, and progress reports every half second
        while not stop.is_set() and not local_stop.is_set():
            results.put(("progress", index, counts.snapshot(), []))
            time.sleep(0.5)
        local_stop.set()

    threading.Thread(target=watch, daemon=True).start()
    why = _run_threads(q, handler, 1, retry, counts, local_stop, grace)
    letters = [(d.item, d.error, d.delivery_count) for d in counts.dead_letters]
    results.put(("done", index, counts.snapshot(), letters, why))


def _run_processes(q: Queue[Any], handler: Callable[[Any], Any], n: int, retry: Retry,
                   counts: _Counts, stop: threading.Event, grace: float) -> str:  # fmt: skip
    ctx: Any = mp.get_context("spawn" if os.name == "nt" else "fork")
    shared_stop = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, name=f"pigeon-worker-{i}", daemon=True,
                    args=(q, handler, retry, shared_stop, grace, results, i))
        for i in range(n)
    ]  # fmt: skip
    for p in procs:
        p.start()
    base = counts.snapshot()  # what was handled before (auto's measurement)
    latest: dict[int, dict[str, int]] = {}
    done: set[int] = set()
    whys: list[str] = []

    def absorb(timeout: float) -> None:
        try:
            kind, index, snapshot, letters, *why = results.get(timeout=timeout)
        except Exception:  # queue.Empty, or a worker that died mid-message
            return
        latest[index] = snapshot
        if kind == "done":
            done.add(index)
            whys.extend(why)
            with counts.lock:
                counts.dead_letters += [DeadLetter(*d) for d in letters]
        totals = {
            k: sum(s[k] for s in latest.values())
            for k in ("processed", "failed", "retried", "dead")
        }
        with counts.lock:
            for k, v in totals.items():
                setattr(counts, k, base[k] + v)

    deadline: float | None = None
    while len(done) < n:
        absorb(0.1)
        if stop.is_set() and deadline is None:
            shared_stop.set()
            deadline = time.monotonic() + grace + 5
        if deadline is not None and time.monotonic() > deadline:
            break
        if not any(p.is_alive() for p in procs) and results.empty():
            break
    shared_stop.set()
    for p in procs:
        p.join(5)
        if p.is_alive():
            log.warning("%s still running after grace=%s s: terminated", p.name, grace)
            p.terminate()
            p.join()
    while not results.empty():
        absorb(0.05)
    results.close()
    results.join_thread()
    drained = "the queue was shut down and is drained"
    return drained if drained in whys else "stopped"


# --- choosing ---------------------------------------------------------------------------------


def _measure(q: Queue[Any], handler: Callable[[Any], Any], retry: Retry, counts: _Counts,
             stop: threading.Event) -> tuple[str, str]:  # fmt: skip
    """Handle the first items here, measuring CPU time against wall time."""
    cpus = os.cpu_count() or 1
    cpu = wall = 0.0
    n = 0
    lease = _lease_of(q)
    started = None

    def timed(item: Any) -> Any:
        nonlocal cpu, wall
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return handler(item)
        finally:
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - w0

    while not stop.is_set() and n < _MEASURE_ITEMS:
        if started is not None and time.monotonic() - started > _MEASURE_SECONDS:
            break
        try:
            msg = q.get_message(timeout=_SLICE)
        except Empty:
            continue
        except ShutDown:
            break
        started = started or time.monotonic()
        _handle(q, msg, timed, retry, counts, lease)
        n += 1
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


def consume(
    source: Queue[Any] | str,
    handler: Callable[[Any], Any],
    *,
    concurrency: int | None = None,
    mode: str = "auto",
    retry: Retry | None = None,
    stop: threading.Event | None = None,
    grace: float = 30.0,
) -> ConsumeReport:
    """Handle every item of ``source`` with ``handler`` until the queue is shut down and
    drained, ``stop`` is set, or (called from the main thread) SIGTERM/SIGINT arrives.

    ``source``: a queue or a URL. ``handler(item)``: a function, or an ``async def``
    function. Success acks the item; an exception gives it back after a delay (``retry``)
    until it has been delivered ``retry.attempts`` times, then sends it to the dead-letter
    queue with the error as the reason (a local queue, which has none, keeps it in
    ``report.dead_letters``). ``mode``: ``"thread"``, ``"process"`` (the handler must be
    importable), ``"async"`` (for ``async def`` handlers), or ``"auto"`` (measure the first
    items; see ``report.reason``). ``concurrency``: workers; by default the CPU count for
    processes, ``min(32, CPUs + 4)`` threads, 100 coroutines. On stop, fetching stops and
    work in progress has ``grace`` seconds to finish; nothing else is taken.

    Raises:
        ValueError: an unknown mode, a bad concurrency, an ``async def`` handler for
            threads or processes.
    """
    return run_consumer(source, handler, concurrency=concurrency, mode=mode, retry=retry,
                        stop=stop, grace=grace)  # fmt: skip


def run_consumer(
    source: Queue[Any] | str,
    handler: Callable[[Any], Any],
    *,
    concurrency: int | None = None,
    mode: str = "auto",
    retry: Retry | None = None,
    stop: threading.Event | None = None,
    grace: float = 30.0,
    on_start: Callable[[str, str, int], None] | None = None,
    counts: _Counts | None = None,
) -> ConsumeReport:
    """``consume`` with hooks for ``pigeon worker``: ``on_start(mode, reason, workers)``
    once the mode is chosen, and ``counts`` to read progress from while it runs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    c = concurrency
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
    retry = retry if retry is not None else Retry()
    is_async = inspect.iscoroutinefunction(handler)
    if is_async and mode in ("thread", "process"):
        raise ValueError(f"an async def handler runs in mode='async', not {mode!r}")
    if not is_async and mode == "async":
        raise ValueError("mode='async' needs an async def handler")
    stop = stop if stop is not None else threading.Event()
    q: Queue[Any] = Queue(source) if isinstance(source, str) else source
    counts = counts if counts is not None else _Counts()
    started = time.monotonic()
    try:
        with _stop_on_signals(stop):
            if is_async:
                mode, reason = "async", "the handler is a coroutine function: tasks on one loop"
            elif mode == "auto":
                mode, reason = _measure(q, handler, retry, counts, stop)
            else:
                reason = f"mode={mode!r} was asked for"
            cpus = os.cpu_count() or 1
            n = concurrency or {"process": cpus, "thread": min(32, cpus + 4), "async": 100}[mode]
            log.info("consuming with %d %s worker(s): %s", n, mode, reason)
            if on_start is not None:
                on_start(mode, reason, n)
            runner = {"thread": _run_threads, "process": _run_processes, "async": _run_async}[mode]
            why = runner(q, handler, n, retry, counts, stop, grace)
    finally:
        if isinstance(source, str):
            q.close()
    with counts.lock:
        return ConsumeReport(
            processed=counts.processed, failed=counts.failed, retried=counts.retried,
            dead=counts.dead, mode=mode, reason=f"{reason}; ended: {why}",
            elapsed=time.monotonic() - started, dead_letters=list(counts.dead_letters),
        )  # fmt: skip
