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
