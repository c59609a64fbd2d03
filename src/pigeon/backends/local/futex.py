"""Wait on and wake a 32-bit word in shared memory: Linux futexes through ctypes.

A futex lets any number of processes sleep until a word in a shared mapping changes,
without a lock and without losing a wake-up: ``wait(addr, expected)`` sleeps only if the
word still equals ``expected`` when the kernel looks, atomically. Processes killed while
waiting leave nothing behind. On systems without futexes ``AVAILABLE`` is false and
callers fall back to short sleeps (documented in docs/local.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

__all__ = ["AVAILABLE", "wait", "wake"]

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "i686": 240, "i386": 240}
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_EAGAIN = 11
_ETIMEDOUT = 110
_EINTR = 4


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load() -> tuple[object, int] | None:
    if not sys.platform.startswith("linux"):
        return None
    number = _SYS_FUTEX.get(platform.machine().lower())
    if number is None or os.environ.get("PIGEON_NO_FUTEX"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn, number


_loaded = _load()
AVAILABLE = _loaded is not None


def wait(addr: int, expected: int, timeout: float | None) -> None:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``timeout`` seconds.

    Returns on a wake-up, a change, a timeout or a signal; the caller re-checks its
    condition either way.
    """
    assert _loaded is not None
    fn, number = _loaded
    if timeout is None:
        ts = None
    else:
        secs = max(0.0, timeout)
        ts = ctypes.byref(_Timespec(int(secs), int((secs % 1) * 1e9)))
    fn(  # type: ignore[operator]
        ctypes.c_long(number),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ts,
        None,
        ctypes.c_int(0),
    )


def wake(addr: int, count: int = 2**31 - 1) -> None:
    """Wake up to ``count`` sleepers on the u32 at ``addr``."""
    assert _loaded is not None
    fn, number = _loaded
    fn(  # type: ignore[operator]
        ctypes.c_long(number),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(count),
        None,
        None,
        ctypes.c_int(0),
    )
