"""The seed program, done right: a writer and a reader sharing a queue.

The program pigeon grew from: a writer process ``put_nowait``s three words, a reader
process loops on ``empty()``/``get_nowait()`` and stops when the queue looks empty. It
looks empty whenever the writer is merely slow. With pigeon the writer says when it is
done (``shutdown()``) and the reader just iterates.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as stdlib_queue
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

import pigeon

console = Console(highlight=False)
WORDS = ["java", "Python", "JavaScript"]
DELAY = 0.05  # the writer is a little slow, as real writers are


def writer(q: pigeon.Queue[str]) -> None:
    for word in WORDS:
        time.sleep(DELAY)
        q.put_nowait(word)
        console.print(f"  writer put {word!r}")
    q.shutdown()  # end of stream: readers drain what is left, then stop


def reader(q: pigeon.Queue[str]) -> None:
    for word in q:  # until shut down and drained; never polls empty()
        console.print(f"  reader got {word!r}")


def _old_writer(q: Any) -> None:
    for word in WORDS:
        time.sleep(DELAY)
        q.put_nowait(word)


def _old_reader(q: Any, out: Any) -> None:
    got = []
    while not q.empty():  # the seed's bug: empty() is not "the writer is done"
        got.append(q.get_nowait())
    out.put(got)


def old_way() -> None:
    console.rule("[bold]the seed: multiprocessing.Queue and a reader that polls empty()")
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    out: Any = ctx.SimpleQueue()
    w = ctx.Process(target=_old_writer, args=(q,))
    r = ctx.Process(target=_old_reader, args=(q, out))
    w.start()
    r.start()
    got = out.get()
    w.join()
    r.join()
    left = []
    while True:
        try:
            left.append(q.get(timeout=1))
        except stdlib_queue.Empty:
            break
    console.print(
        f"  the reader stopped after {len(got)} of 3 words, because the queue looked empty; "
        f"{left} were never read by it"
    )


def _pair(runner: Callable[..., Any], q: pigeon.Queue[str]) -> tuple[Any, Any]:
    """Start a reader and a writer on ``q`` (threads or processes); wait for both."""
    r = runner(target=reader, args=(q,))
    w = runner(target=writer, args=(q,))
    r.start()
    w.start()
    w.join()
    r.join()
    return r, w


def with_processes() -> None:
    console.rule("[bold]pigeon.Queue between two processes (spawn)")
    with pigeon.Queue[str]() as q:
        r, w = _pair(mp.get_context("spawn").Process, q)
    console.print(f"  writer exit code {w.exitcode}, reader exit code {r.exitcode}: all 3 words")


def with_threads() -> None:
    console.rule("[bold]the same queue API between two threads")
    with pigeon.Queue[str]() as q:
        _pair(threading.Thread, q)


def with_coroutines() -> None:
    console.rule("[bold]and between two coroutines (pigeon.AsyncQueue)")

    async def main() -> None:
        async with pigeon.AsyncQueue[str]() as aq:

            async def awriter() -> None:
                for word in WORDS:
                    await asyncio.sleep(DELAY)
                    await aq.put(word)
                    console.print(f"  writer put {word!r}")
                await aq.shutdown()

            async def areader() -> None:
                async for word in aq:
                    console.print(f"  reader got {word!r}")

            await asyncio.gather(areader(), awriter())

    asyncio.run(main())


def with_broker(url: str) -> None:
    console.rule(f"[bold]and between two processes through the broker: {url}")
    with pigeon.Queue[str](url, reconnect_timeout=30) as q:
        q.qsize()  # waits (up to 30 s) for the broker to come up
        r, w = _pair(mp.get_context("spawn").Process, q)
        stats = q.qsize()
    console.print(
        f"  writer exit code {w.exitcode}, reader exit code {r.exitcode}; "
        f"{stats} left in the broker's queue"
    )


def run(old: bool = True, broker: str | None = None) -> None:
    if old:
        old_way()
    with_processes()
    with_threads()
    with_coroutines()
    if broker:
        with_broker(broker)
    console.print("\nEvery reader ended on shutdown(), not on empty(): nothing was lost.")
