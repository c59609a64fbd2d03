"""Who still holds a local queue's file, and who removes it when its creator cannot.

# Strategy:
# A creator that closes its queue (or exits normally) removes the file itself. One that
# is SIGKILLed, or a fork child that exits with ``os._exit`` without running finalizers,
# cannot: its queue's pages would stay in /dev/shm (RAM) until reboot. So, in the spirit
# of ``multiprocessing.resource_tracker``, the first queue a process creates starts a
# small tracker process, told over a pipe which files this process created and which it
# removed itself. When the pipe reaches end of file - the creator is gone, however it
# went - the tracker removes each file that remains once no live process holds it.
#
# "Holds" is an open file description lock (``F_OFD_SETLK``, Linux 3.15+), a shared read
# lock on the file's first byte, taken by every handle that opens the file (creator,
# attached, and each fork child's own reopened handle). The kernel drops it with the last
# descriptor of that description, even on SIGKILL. The tracker removes a file as soon as
# it can take the same byte's write lock: nobody holds it. It is independent of the
# ``flock`` the queue uses for mutual exclusion (on Linux the two kinds never conflict).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading

__all__ = ["hold", "register", "unregister"]

_F_OFD_SETLK = 37  # Linux; fcntl.F_OFD_SETLK where Python exposes it
_F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2
# struct flock on 64-bit Linux: type, whence, start, len, pid
_LOCK = struct.Struct("hhxxxxqqixxxx")


def _ofd_lock(fd: int, kind: int) -> bool:
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", _F_OFD_SETLK), _LOCK.pack(kind, 0, 0, 1, 0))
        return True
    except OSError:
        return False


def hold(fd: int) -> None:
    """Mark ``fd``'s queue file as held by this open file description (best effort: where
    OFD locks are missing, the tracker only removes files whose creator closed them)."""
    if sys.platform.startswith("linux"):
        _ofd_lock(fd, _F_RDLCK)


def let_go(fd: int) -> None:
    """Drop the hold of ``fd``'s open file description (a mapping of the file keeps the
    description, and its lock, alive after the descriptor closes)."""
    if sys.platform.startswith("linux"):
        _ofd_lock(fd, _F_UNLCK)


# The tracker: stdin is the pipe; a line "+PATH" registers, "-PATH" forgets.
_TRACKER = r"""
import fcntl, os, signal, struct, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
LOCK = struct.Struct("hhxxxxqqixxxx")
paths = set()
for line in sys.stdin.buffer:
    path = os.fsdecode(line[1:].rstrip(b"\n"))
    (paths.add if line[:1] == b"+" else paths.discard)(path)
deadline = time.monotonic() + 7 * 86400
while paths and time.monotonic() < deadline:
    for path in list(paths):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            paths.discard(path)
            continue
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37), LOCK.pack(1, 0, 0, 1, 0))
        except OSError:
            continue  # still held by a live process
        finally:
            os.close(fd)
        # the queue, its table of dedup ids, and that table's journal if a put died
        for victim in (path, path + ".dedup", path + ".dedup-journal"):
            try:
                os.unlink(victim)
            except OSError:
                pass
        paths.discard(path)
    if paths:
        time.sleep(1.0)
"""

_lock = threading.Lock()
_pipe: int | None = None  # the write end, in the process that started the tracker
_owner = 0


def _start() -> int | None:
    r, w = os.pipe()
    try:
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", _TRACKER],
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)],
        )
    except OSError:
        os.close(w)
        return None
    finally:
        os.close(r)
    return w


def _send(line: bytes) -> None:
    global _pipe, _owner
    with _lock:
        if _owner != os.getpid():  # a fork child starts its own, for its own queues
            _pipe, _owner = None, os.getpid()
            if line[:1] == b"-":
                return
            _pipe = _start()
        if _pipe is not None:
            with contextlib.suppress(OSError):
                os.write(_pipe, line)


def register(path: str) -> None:
    """This process created ``path``: remove it if the process dies without doing so."""
    if sys.platform.startswith("linux") and hasattr(os, "posix_spawn"):
        _send(b"+" + os.fsencode(path) + b"\n")


def unregister(path: str) -> None:
    """This process removed ``path`` itself."""
    if _pipe is not None and _owner == os.getpid():
        _send(b"-" + os.fsencode(path) + b"\n")


def _after_fork_in_child() -> None:
    # The parent's tracker must see end of file when the parent dies, not when the last
    # of its children does.
    global _pipe
    if _pipe is not None:
        with contextlib.suppress(OSError):
            os.close(_pipe)
        _pipe = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
