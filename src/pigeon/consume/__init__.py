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
# One module per concern, re-exported here (anyio's to_thread/to_process are the model):
#   report     what a run did: ConsumeReport, DeadLetter, the counters workers share
#   policy     taking, settling, Retry, dead letters; what a handler is (sync or async)
#   leases     one keeper thread extends slow work in every mode, from the queue's lease
#   threads    thread workers under a supervisor (time limit: abandon and replace)
#   processes  children fed by dispatcher threads (the parent holds every message)
#   aio        coroutines on a loop of their own (cancelled, or abandoned if deaf to it)
#   measure    mode="auto": the first items measured in one thread
# Stopping (``stop``, SIGTERM, SIGINT, or the queue shut down and drained) stops the
# taking; work in progress gets ``grace`` seconds, then is given back; nothing taken is
# dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pigeon._queue_base import Queue
from pigeon.consume.aio import run_async
from pigeon.consume.leases import lease_keeper
from pigeon.consume.measure import measure
from pigeon.consume.policy import Ended, Retry, Run, is_async_handler
from pigeon.consume.processes import run_processes
from pigeon.consume.report import ConsumeProgress, ConsumeReport, DeadLetter
from pigeon.consume.threads import run_threads

__all__ = ["ConsumeProgress", "ConsumeReport", "DeadLetter", "Retry", "consume"]

log = logging.getLogger("pigeon.consume")

MODES = ("auto", "thread", "process", "async")


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
    on_start: Callable[[str, str, int], None] | None = None,
    progress: ConsumeProgress | None = None,
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

    For a supervisor (``pigeon worker`` is one): ``on_start(mode, reason, workers)`` is
    called once the mode is chosen, and ``progress`` is the ``ConsumeProgress`` the run
    counts in, to read while it runs (under its ``lock``).

    Raises:
        ValueError: an unknown mode, a bad concurrency or limit, an async handler for
            threads or processes, a process-only limit for threads or coroutines.
    """
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
        run = Run(q, handler, retry, progress, stop, time_limit=time_limit,
                   poison_after=poison_after)  # fmt: skip
        with _stop_on_signals(stop), lease_keeper(run):
            if mode == "async":
                reason = "mode='async' was asked for"
            elif is_async:
                mode, reason = "async", "the handler is async: tasks on one loop"
            elif mode == "auto":
                mode, reason = measure(run, grace)
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
                    run_threads(run, n, grace)
                elif mode == "process":
                    run_processes(run, n, grace, max_tasks_per_child=max_tasks_per_child,
                                   max_memory_per_child=max_memory_per_child)  # fmt: skip
                else:
                    run_async(run, n, grace)
    finally:
        if isinstance(source, str):
            q.close()
    end = run.end or Ended("stopped", "stop was asked for")
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
