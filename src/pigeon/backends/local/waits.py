"""Waiting on a local queue: sequence words in the control page that every put, get and
finished join advances, futexes on them, and the count of waiters that lets a waker skip
its system call.

# Strategy:
# A waiter reads its word and counts itself in (``_register``) in the same locked section
# as it finds nothing to do, so a waker that commits after it sees the count and wakes it:
# no wake-up is lost. It watches the word for 50 us before it sleeps (a fast consumer does
# not make its producer pay a wake-up per item), and re-checks at least every second (a
# waker killed between its commit and its wake costs a second, never a hang). It counts
# itself out when it stops waiting, however it stops; a handle keeps its own share of the
# count, so that closing it counts out the threads it leaves waiting.
"""

from __future__ import annotations

import time

from pigeon.backends.local import futex
from pigeon.backends.local.layout import U32, WAITERS
from pigeon.backends.local.shared import SharedRing
from pigeon.errors import ClosedResourceError

__all__ = ["Waits"]

_SPIN = 50e-6  # seconds a waiter watches its word before it sleeps
_SAFETY_SLICE = 1.0  # seconds: the longest a waiter sleeps before re-checking


class Waits(SharedRing):
    """The waiting half of a local queue handle."""

    def _bump(self, word: int) -> bool:
        """Advance a sequence word; True if someone waits on it (call ``_wake`` after)."""
        w = self._words[word]
        w.value += 1  # a c_uint32: wraps at 2**32 by itself
        return bool(U32.unpack_from(self._ctrl, WAITERS[word])[0])

    def _wake(self, word: int) -> None:
        if futex.AVAILABLE:
            futex.wake(self._addr[word])

    def _seq(self, word: int) -> int:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        return int(self._words[word].value)

    def _register(self, word: int, delta: int) -> None:
        """Count this thread in or out of the waiters on ``word`` (under the lock): a
        waker skips its system call while no one is counted. This handle keeps its own
        share too, so that ``close()`` takes back what its waiting threads cannot."""
        off = WAITERS[word]
        n = U32.unpack_from(self._ctrl, off)[0] + delta
        self._registered[word] += delta  # (no call between this and the store below)
        U32.pack_into(self._ctrl, off, max(0, n))

    def _deregister(self, word: int) -> None:
        """Count out a waiter whose wait ended by an exception (Ctrl-C in its sleep, the
        handle closed under it)."""
        try:
            self._lock()
        except ClosedResourceError:
            return  # close() took back this handle's share
        try:
            self._register(word, -1)
        finally:
            self._unlock()

    def _spin(self, word: int, seq: int) -> int:
        """Watch ``word`` for a few microseconds before paying for a futex sleep and wake.

        A consumer that is faster than its producer would otherwise sleep after every
        item and cost the producer a wake syscall per put. Returns a non-zero count so
        the caller spins once per wait.
        """
        w = self._words[word]
        end = time.perf_counter() + _SPIN
        while w.value == seq and time.perf_counter() < end:
            pass
        return 1

    def _sleep(self, word: int, seq: int, deadline: float | None) -> None:
        """Sleep until ``word`` moves past ``seq``, the deadline, or the safety slice."""
        slice_ = _SAFETY_SLICE
        if deadline is not None:
            slice_ = min(slice_, deadline - time.monotonic())
            if slice_ <= 0:
                return
        if futex.AVAILABLE:
            futex.wait(self._addr[word], seq, slice_)
        else:
            time.sleep(min(slice_, 0.001))

    def _wait_change(self, word: int, seq: int, timeout: float | None) -> None:
        """Register as a waiter on ``word`` and sleep until it changes (for AsyncQueue)."""
        self._lock()
        try:
            if self._seq(word) != seq:
                return
            self._register(word, +1)
        finally:
            self._unlock()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._sleep(word, seq, deadline)
        finally:
            self._deregister(word)
