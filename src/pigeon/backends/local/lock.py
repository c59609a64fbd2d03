"""The lock of a local queue (a robust process-shared mutex, through the C fast path or
ctypes; else flock), the fork bookkeeping, and the file's place and removal."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from pigeon._native import load_c_path
from pigeon.backends.local import tracker
from pigeon.backends.local.layout import DEDUP_SUFFIX

LOCK_TRIES = 50  # tries of the ctypes mutex before the robust lock is taken blocking


# the local queue's put and get in C, or None: pure Python
C = load_c_path("pigeon.local", "the local queue's C fast path")


class Mutex(NamedTuple):
    """The robust process-shared mutex in a queue's control page: each function takes the
    mutex's address (the control page's + ``OFF_MUTEX``). From the C module where it is
    built, else from libc through ctypes (the pure-Python path). ``unlock`` is a C
    function in both (no Python frame, so no signal handler runs before the mutex is
    dropped), and a no-op (EPERM) in a thread that does not hold it."""

    init: Callable[[int], None]
    lock: Callable[[int], None]
    unlock: Callable[[int], None]


def ctypes_mutex() -> Mutex:
    """The mutex through ctypes; AttributeError where libc has no robust mutexes."""
    libc = ctypes.CDLL(None, use_errno=True)

    def fn(name: str, *argtypes: Any) -> Any:
        f = getattr(libc, name)
        f.restype = ctypes.c_int
        f.argtypes = list(argtypes) or [ctypes.c_void_p]
        return f

    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    attr_init = fn("pthread_mutexattr_init")
    attr_pshared = fn("pthread_mutexattr_setpshared", c_void_p, c_int)
    attr_robust = fn("pthread_mutexattr_setrobust", c_void_p, c_int)
    attr_destroy = fn("pthread_mutexattr_destroy")
    mutex_init = fn("pthread_mutex_init", c_void_p, c_void_p)
    trylock = fn("pthread_mutex_trylock")
    lock_ = fn("pthread_mutex_lock")
    unlock_ = fn("pthread_mutex_unlock")
    consistent = fn("pthread_mutex_consistent")

    def init(m: int) -> None:
        attr = ctypes.create_string_buffer(64)
        rc = (
            attr_init(attr)
            or attr_pshared(attr, 1)  # PTHREAD_PROCESS_SHARED
            or attr_robust(attr, 1)  # PTHREAD_MUTEX_ROBUST
            or mutex_init(m, attr)
        )
        attr_destroy(attr)
        if rc:
            raise OSError(rc, f"cannot make the local queue's mutex: {os.strerror(rc)}")

    def lock(m: int) -> None:
        rc = errno.EBUSY
        for _ in range(LOCK_TRIES):
            rc = trylock(m)
            if rc != errno.EBUSY:
                break
        else:
            rc = lock_(m)  # ctypes lets go of the GIL meanwhile
        if rc == errno.EOWNERDEAD:
            # its holder died: the double-buffered state is whole, take the lock over
            rc = consistent(m)
        if rc:
            raise OSError(rc, f"cannot lock the local queue: {os.strerror(rc)}")

    return Mutex(init, lock, unlock_)


def load_mutex() -> Mutex | None:
    """The robust mutex, or None where there is none (macOS): queues are locked with
    flock there. ``PIGEON_LOCAL_LOCK=flock`` forces flock (for tests)."""
    if os.environ.get("PIGEON_LOCAL_LOCK") == "flock" or not sys.platform.startswith("linux"):
        return None
    if C is not None and C.ROBUST:
        return Mutex(C.init_lock, C.lock, C.unlock)
    try:
        return ctypes_mutex()
    except (AttributeError, OSError):
        return None


MUTEX = load_mutex()


# Bumped in every child after fork, so a handle notices it crossed a fork without a
# getpid() syscall per operation.
fork_generation = [0]
# Serialises the handles' first use after a fork: several threads of a fork child may
# reach ``_after_fork`` at once, and only one may swap the descriptor.
fork_lock = threading.Lock()


def forked() -> None:
    global fork_lock
    fork_generation[0] += 1
    fork_lock = threading.Lock()  # the parent's may have been held by a thread not copied


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forked)


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def release(fd: int, path: str | None, owner_pid: int) -> None:
    """A handle is closed or garbage-collected: close its descriptor; its creator, in the
    process that created it, removes the file too."""
    if os.getpid() == owner_pid:  # a fork child shares the description until it reopens
        tracker.let_go(fd)
    with contextlib.suppress(OSError):
        os.close(fd)
    if path is not None and os.getpid() == owner_pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        for extra in (DEDUP_SUFFIX, DEDUP_SUFFIX + "-journal"):  # the table of dedup ids,
            with contextlib.suppress(FileNotFoundError):  # and its journal if a put died
                os.unlink(path + extra)
        tracker.unregister(path)
