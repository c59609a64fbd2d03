"""``mode="auto"``: handle the first items in one thread and measure the handler's CPU
time against its wall time - CPU-bound work is GIL-bound in threads (processes), waiting
work overlaps in threads, an awaitable result means coroutines."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pigeon.consume.policy import Run
from pigeon.consume.threads import run_threads

__all__ = ["measure"]

MEASURE_ITEMS = 8  # how many items the measurement handles (at most)
MEASURE_SECONDS = 1.0  # or for how long
CPU_BOUND = 0.5  # the share of wall time on the CPU above which work is GIL-bound


def measure(run: Run, grace: float) -> tuple[str, str]:
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
            late = bool(started) and time.monotonic() - started[0] > MEASURE_SECONDS
            return n < MEASURE_ITEMS and not late and not run.async_seen

    run.measuring = True
    try:
        run_threads(run, 1, grace, handler=timed, more=more)
    finally:
        run.measuring = False
    if run.async_seen:
        return "async", "auto: the handler returned an awaitable: tasks on one loop"
    if n == 0:
        return "thread", "auto: no item came to measure; threads"
    share = cpu / wall if wall > 0 else 0.0
    facts = f"{n} item(s) measured: the handler kept its thread on the CPU {share:.0%} of the time"
    if share >= CPU_BOUND:
        if cpus == 1:
            return "thread", f"auto: {facts} (CPU-bound) but this machine has one CPU: threads"
        return "process", f"auto: {facts}: CPU-bound, so GIL-bound in threads: processes"
    return "thread", f"auto: {facts}: mostly waiting (I/O), which threads overlap: threads"
