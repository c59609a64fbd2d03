"""Handlers for `pigeon worker` tests: importable as tests._handlers:NAME."""

from __future__ import annotations

import time
from typing import Any


def quick(item: Any) -> None:
    pass


def slow(item: Any) -> None:
    time.sleep(0.2)
