"""Handlers for `pigeon worker` tests: importable as tests._handlers:NAME."""

from __future__ import annotations

import time
from typing import Any


def quick(item: Any) -> None:
    pass


def slow(item: Any) -> None:
    time.sleep(0.2)


def _record(item: Any) -> None:
    """Append the item to the file named by $PIGEON_TEST_OUT (one line, one write)."""
    import os

    fd = os.open(os.environ["PIGEON_TEST_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{item}\n".encode())
    finally:
        os.close(fd)


def chaos(item: Any) -> None:
    """Every 50th item kills its worker process (a crashing C extension); item 100 sleeps
    far past any time limit; the rest take a moment and are recorded."""
    import os
    import signal

    if item % 50 == 49:
        os.kill(os.getpid(), signal.SIGSEGV)
    if item == 100:
        time.sleep(120)
    time.sleep(0.01)
    _record(item)


def exits_then_works(item: Any) -> None:
    """The first call for "exit" raises SystemExit, for "interrupt" KeyboardInterrupt (a
    handler that calls sys.exit, or argparse); every later call in the same process works."""
    import sys

    TRIED[item] = TRIED.get(item, 0) + 1
    if TRIED[item] == 1 and item == "exit":
        sys.exit("config not loaded")
    if TRIED[item] == 1 and item == "interrupt":
        raise KeyboardInterrupt


TRIED: dict[Any, int] = {}


def steady(item: Any) -> None:
    """Says it started (in $PIGEON_TEST_OUT), then works two seconds."""
    _record(f"started-{item}")
    time.sleep(2.0)


# --- the worker nemesis (tests/faults/test_worker_nemesis.py) ---------------------------------
# Items by their last digit: 1 raises ValueError, 2 SystemExit, 3 KeyboardInterrupt, 4 an
# exception whose __str__ raises - each on its first try only; item 7 always raises
# (dead: RuntimeError), item 17 always runs past any time limit (dead: TimeLimitExceeded),
# item 27 always segfaults in process mode (dead: worker_died). Every success is recorded
# in $PIGEON_TEST_OUT; first tries are marked in the directory $PIGEON_TEST_TRIED.

ALWAYS_FAILS, HANGS, SEGFAULTS = 7, 17, 27


class _BrokenText(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def _first_try(item: int) -> bool:
    import os

    path = os.path.join(os.environ["PIGEON_TEST_TRIED"], str(item))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _fails_as_told(item: int) -> None:
    import sys

    if item == ALWAYS_FAILS:
        raise RuntimeError(f"item {item} never works")
    kind = item % 10
    if kind in (1, 2, 3, 4) and _first_try(item):
        if kind == 1:
            raise ValueError(f"item {item} fails once")
        if kind == 2:
            sys.exit(f"item {item} called sys.exit")
        if kind == 3:
            raise KeyboardInterrupt
        raise _BrokenText


def nemesis(item: int) -> None:
    import multiprocessing

    _fails_as_told(item)
    if item == HANGS:
        time.sleep(60)  # past any time limit
    if item == SEGFAULTS and multiprocessing.parent_process() is not None:
        import ctypes

        ctypes.string_at(0)  # a crashing C extension: SIGSEGV
    time.sleep(0.05)
    _record(item)


async def nemesis_async(item: int) -> None:
    import asyncio

    _fails_as_told(item)
    while item == HANGS:  # past any time limit, and deaf to its cancellation
        try:
            await asyncio.sleep(0.2)
        except BaseException:
            continue
    await asyncio.sleep(0.05)
    _record(item)
