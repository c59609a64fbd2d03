"""``pigeon bench concurrency``: the GIL made visible on this machine.

The same pure-Python CPU-bound job and the same I/O-bound job run on N threads, N
processes and N coroutines, fed through pigeon queues (tasks in, results out), and are
timed against one worker of the same kind.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pigeon

IO_WAIT = 0.02  # seconds one I/O task waits (a network round trip, a disk read)


def cpu_task(n: int) -> int:
    """Pure-Python arithmetic that holds the GIL the whole time."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def io_task(_: int) -> int:
    time.sleep(IO_WAIT)  # releases the GIL while it waits, as socket I/O does
    return 0


async def io_task_async(_: int) -> int:
    await asyncio.sleep(IO_WAIT)
    return 0


JOBS: dict[str, Callable[[int], int]] = {"cpu": cpu_task, "io": io_task}


def _worker(job: str, tasks: pigeon.Queue[int], results: pigeon.Queue[int]) -> None:
    fn = JOBS[job]
    for n in tasks:
        results.put(fn(n))


async def _coroutine_worker(
    job: str, tasks: pigeon.AsyncQueue[int], results: pigeon.AsyncQueue[int]
) -> None:
    async for n in tasks:
        if job == "io":
            await results.put(await io_task_async(n))
        else:
            await results.put(cpu_task(n))  # runs on the loop's one thread


@dataclass(frozen=True)
class Result:
    job: str
    mode: str
    workers: int
    seconds: float


def run_one(job: str, mode: str, workers: int, count: int, size: int) -> Result:
    """Time ``count`` tasks of ``job`` on ``workers`` workers of ``mode``."""
    with pigeon.Queue[int]() as tasks, pigeon.Queue[int]() as results:
        start = time.perf_counter()
        if mode == "coroutines":

            async def main() -> None:
                atasks = pigeon.AsyncQueue(tasks)
                aresults = pigeon.AsyncQueue(results)
                await atasks.put_many([size] * count)
                await atasks.shutdown()
                await asyncio.gather(
                    *(_coroutine_worker(job, atasks, aresults) for _ in range(workers))
                )
                await atasks.aclose()
                await aresults.aclose()

            asyncio.run(main())
        else:
            tasks.put_many([size] * count)
            tasks.shutdown()
            runners: list[Any]
            if mode == "threads":
                runners = [
                    threading.Thread(target=_worker, args=(job, tasks, results))
                    for _ in range(workers)
                ]
            else:
                ctx: Any = mp.get_context(
                    "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                )
                runners = [
                    ctx.Process(target=_worker, args=(job, tasks, results)) for _ in range(workers)
                ]
            for r in runners:
                r.start()
            for r in runners:
                r.join()
        seconds = time.perf_counter() - start
        assert results.qsize() == count, "lost results"
    return Result(job, mode, workers, seconds)
