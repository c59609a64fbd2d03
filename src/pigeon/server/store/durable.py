"""What the two durable stores share: the fsync policy and the syncer thread, the
write-in-the-loop with retry and backoff, commit counters, failure reporting, and the
lock that keeps a data directory to one broker.

# Strategy:
# The event loop never waits for the disk to sync. Each store writes a change (a SQLite
# transaction, a log record) and says how it reaches the disk:
#
#   --fsync always  a syncer thread fsyncs, then the confirmations go out; writes that
#                   arrive during one fsync share the next one (group commit). Survives
#                   kill -9 and power loss.
#   --fsync batch   confirm once the write is in the operating system (it survives
#                   kill -9 of the broker); the syncer fsyncs at most ``fsync_interval``
#                   (10 ms) after the first unsynced write.
#   --fsync never   confirm before writing.
#
# A busy or failing disk does not stop the broker: a write that fails with an operational
# error is retried with backoff, the changes kept, and ``stalled_for`` tells the broker
# how long it has failed (it then refuses new puts and answers held confirmations after a
# bounded wait). A failed fsync is different: never retried (see ``_syncer``).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pigeon.errors import StoreInUse
from pigeon.server.core import Store

__all__ = ["LOCK_NAME", "Durable", "FsyncFailed", "FsyncMode", "holding_dir", "lock_dir"]

log = logging.getLogger("pigeon.store")

FsyncMode = Literal["always", "batch", "never"]
_T = TypeVar("_T")
LOCK_NAME = "pigeon.lock"
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)  # fmt: skip
_MAX_RETRY_DELAY = 0.25


class FsyncFailed(Exception):
    """An fsync failed: the store must stop, not retry (see ``Durable._syncer``)."""


_HELD: dict[Path, int] = {}  # data directories locked by holding_dir() in this process


def lock_dir(data_dir: Path) -> int:
    """Take ``DATA_DIR/pigeon.lock`` (flock); the returned descriptor holds it.

    Raises:
        StoreInUse: another process holds it.
    """
    import fcntl

    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreInUse(
            f"{data_dir} is in use by another broker (pid {holder} holds "
            f"{data_dir / LOCK_NAME}); stop it first, or give this one another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def holding_dir(data_dir: Path) -> Iterator[None]:
    """Lock ``data_dir`` for the block: stores opened on it inside share this lock (each
    keeps a duplicate of the descriptor, so the lock lasts as long as the last of them),
    and no other broker can slip in between two steps, such as reading a SQLite store and
    writing the log it becomes."""
    key = Path(data_dir).resolve()
    if key in _HELD:
        yield
        return
    fd = lock_dir(Path(data_dir))
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)


class Durable(Store):
    """What the durable stores share: the fsync policy, the batch counters the server
    holds replies against, the commit histogram, and how a failing disk is reported."""

    def __init__(self, fsync: FsyncMode, fsync_interval: float) -> None:
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always, batch or never, not {fsync!r}")
        self.fsync: FsyncMode = fsync
        self.fsync_interval = fsync_interval
        self.batch = 0  # the last batch written
        self.committed = 0  # every batch <= this is durable
        self.last_tag = 0  # the batch the most recent change belongs to
        self.changes = 0  # how many changes were ever made
        self._closing = False  # the syncer's last pass is due
        self._closed = False  # close() has run: nothing is written any more
        self._error: BaseException | None = None
        self._failing_since: float | None = None
        # (batch, when written) of writes handed to the syncer and not yet confirmed
        # (``always``): a slow fsync stalls the store as surely as a failing write
        self._unsynced: deque[tuple[int, float]] = deque()
        self.on_commit: Callable[[int], None] | None = None
        self.recovery_seconds = 0.0
        self.quarantined = 0
        self.fsyncs = 0
        self._commit_counts = [0] * (len(_COMMIT_BUCKETS) + 1)  # the last: +Inf
        self._commit_sum = 0.0
        self._ops: list[Any] = []  # changes not yet written
        # Attached to an event loop (``attach``), changes are written in its thread: when
        # the server has handled a read (``flush``), or at the end of the loop's turn.
        self._loop: Any = None
        self._flush_pending = False
        # _ops holds a change a reply may wait for; else only what no reply waits for
        # (deliveries counted): written with the next change, or within fsync_interval
        self._pending_change = False
        self._late: Any = None  # the timer of such a write
        self._retry_delay = 0.01
        self._sync = threading.Condition()  # with the thread that fsyncs
        # Held around every fsync of what the broker wrote, whichever thread runs it (the
        # syncer, or the loop's at a segment roll, a compaction, a drop): see _fsync_or_break.
        self._fsync_lock = threading.Lock()
        self._sync_upto = 0  # --fsync always: the batch the syncer must make durable
        self._dirty_since: float | None = None  # --fsync batch: the oldest unsynced write

    def unwritten(self) -> str | None:
        """Why changes made so far are not all written (None: they are): the store broke,
        or the disk refused them and they wait for a retry."""
        self._native_failed()
        if self._error is not None:
            return str(self._error)
        return "the disk refused them" if self._pending_change else None

    @property
    def holds_replies(self) -> bool:
        """True if replies must wait for the commit of the changes they report."""
        return self.fsync != "never"

    @property
    def stalled_for(self) -> float:
        """Seconds since commits began failing, or the oldest write still waiting for its
        fsync was made (0 while they succeed in time)."""
        native = self._native  # the C syncer's failure: one atomic load, read here too
        if native is not None and native.failed():
            self._native_failed()
        if self._error is not None:
            return float("inf")
        if self._failing_since is None and not self._unsynced:
            return 0.0  # the common case, asked before every put
        now = time.monotonic()
        unsynced = self._prune_unsynced()
        waited = now - unsynced[0][1] if unsynced else 0.0
        since = self._failing_since
        return max(waited, 0.0 if since is None else now - since)

    def _prune_unsynced(self) -> deque[tuple[int, float]]:
        unsynced, committed = self._unsynced, self.committed
        while unsynced and unsynced[0][0] <= committed:
            unsynced.popleft()
        return unsynced

    def _broken(self, exc: BaseException) -> None:
        """A damaged store (not a busy or full disk): stop confirming writes."""
        self._error = exc
        log.critical("store %s failed, no more writes are confirmed: %s", self, exc)

    def _fsync_or_break(self, sync: Callable[[], None]) -> None:
        """Run ``sync``, an fsync of what the broker wrote, under the store's fsync lock.

        A failure breaks the store before the lock is let go, so it poisons every batch
        the fsync covered - everything written so far - whichever thread ran it: after a
        failed fsync the kernel may have dropped the dirty pages and marked them clean,
        and reports the error once per open file, so the next fsync (the syncer's, say)
        returns 0 and proves nothing ("fsyncgate", PostgreSQL 2018). No fsync runs on a
        broken store, and the syncer confirms nothing once the store is broken.

        Raises:
            FsyncFailed: this fsync, or an earlier one, failed.
        """
        with self._fsync_lock:
            self._native_failed()
            if self._error is not None:
                raise FsyncFailed(f"the store is broken: {self._error}")
            try:
                sync()
            except OSError as exc:
                self._broken(OSError(f"fsync failed: {exc}; data written since the last "
                                     "successful fsync may be lost"))  # fmt: skip
                raise FsyncFailed(str(self._error)) from exc

    # A syncer thread in C (the log store's, ``--fsync batch``), or None: the Python one.
    _native: NativeSyncer | None = None

    def _native_failed(self) -> bool:
        """Has the C syncer's fdatasync failed? Then the store breaks, as when the Python
        syncer's does (read under the fsync lock, or before a write is confirmed)."""
        native = self._native
        if native is None or not (code := native.failed()):
            return False
        if self._error is None:
            self._broken(OSError(code, f"fsync failed: {os.strerror(code)}; data written since "
                                       "the last successful fsync may be lost"))  # fmt: skip
        return True

    def _commits_again(self) -> None:
        assert self._failing_since is not None
        log.warning("store %s commits again after %.1f s", self,
                    time.monotonic() - self._failing_since)  # fmt: skip
        self._failing_since = None

    # --- writing in the loop's thread ------------------------------------------------------

    # Failures a retry may cure (a full disk, an I/O error, a lock held by another process).
    _retryable: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    def _write_ops(self, ops: list[Any]) -> None:
        """Make ``ops`` reach the operating system, all or none (a transaction, a record)."""
        raise NotImplementedError

    def _after_write(self) -> None:
        """Housekeeping after a successful write (the log: new segments, reclaiming)."""

    def flush_follows(self) -> None:
        # As if a flush were scheduled (``_add`` then schedules none): ``flush`` comes at
        # the end of the read, or, while the disk fails, the retry that is pending.
        self._flush_pending = True

    def flush(self) -> None:
        if self._loop is not None and self._failing_since is None:
            if self._pending_change:
                self._flush()
            else:
                self._flush_pending = False
                if self._ops:
                    self._write_soon()

    def _write_soon(self) -> None:
        """Write what no reply waits for (deliveries counted) within ``fsync_interval``,
        unless a change takes it along first: a GET costs no write of its own."""
        if self._late is None:
            self._late = self._loop.call_later(self.fsync_interval, self._write_late)

    def _write_late(self) -> None:
        self._late = None
        if self._ops and self._failing_since is None:
            self._flush()

    def _flush(self) -> None:
        """Write everything changed since the last flush at once; then confirm it (batch,
        never) or hand it to the syncer to fsync first (always). A retryable failure keeps
        the changes and retries with backoff; anything else stops confirming writes."""
        self._flush_pending = False
        if self._closed:
            return  # a callback that outlived close(): the changes stay unwritten
        if self._error is not None or (self._native is not None and self._native_failed()):
            self._ops = []  # nothing is written any more (the broker refuses puts)
            return
        ops, self._ops = self._ops, []
        if not ops:
            return
        changed, self._pending_change = self._pending_change, False
        self.batch += 1
        batch = self.batch
        try:
            started = time.perf_counter()
            self._write_ops(ops)
            self._count_commit(time.perf_counter() - started)
        except self._retryable as exc:
            self._ops = ops + self._ops
            self._pending_change = self._pending_change or changed
            self.batch -= 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("store %s cannot write (%s); retrying", self, exc)
            if self._loop is not None:
                self._flush_pending = True
                self._loop.call_later(self._retry_delay, self._flush)
                self._retry_delay = min(self._retry_delay * 2, _MAX_RETRY_DELAY)
            return
        except BaseException as exc:
            self._broken(exc)
            return
        if self._failing_since is not None:
            self._commits_again()
            self._retry_delay = 0.01
        if self.fsync == "always" and changed:  # confirmed once the syncer has fsynced it
            self._prune_unsynced().append((batch, time.monotonic()))
            with self._sync:
                self._sync_upto = batch
                self._sync.notify()
        elif self.fsync == "always":  # nothing waits for it: fsynced within the interval
            with self._sync:
                if self._dirty_since is None:
                    self._dirty_since = time.monotonic()
                    self._sync.notify()
        else:
            # Checked before the lock as well: the syncer clears ``_dirty_since`` (under
            # the lock) before it fsyncs, so a write that still sees it set is covered by
            # that fsync; only a write that sees it clear must set it and wake the syncer.
            if self.fsync == "batch":
                native = self._native
                if native is not None:
                    if native.dirty() and self._native_failed():  # (one C call: no error)
                        return  # its fdatasync failed: nothing written since is confirmed
                elif self._dirty_since is None:
                    with self._sync:
                        if self._dirty_since is None:
                            self._dirty_since = time.monotonic()
                            self._sync.notify()
            self.committed = batch
            if self.on_commit is not None:
                self.on_commit(batch)
        self._after_write()

    # --- the syncer thread ------------------------------------------------------------------

    _thread: threading.Thread  # the writer or syncer thread, started by ``start``
    _idle_wakeup: ClassVar[float | None] = None  # wake this often with nothing to sync

    def _fsync_now(self) -> None:
        """Make everything written so far durable (and count it in ``fsyncs``)."""
        raise NotImplementedError

    def _between_syncs(self, closing: bool) -> None:
        """Housekeeping in the syncer's thread after each pass (SQLite: checkpoints)."""

    def _syncer(self) -> None:
        """fsync what was written - for ``always`` before the confirmations go out (then
        confirm), for ``batch`` within ``fsync_interval`` of the first unsynced write - off
        the loop's thread; a failed fsync breaks the store (see below)."""
        synced = 0
        while True:
            with self._sync:
                while not self._closing:
                    if self._sync_upto > synced:
                        break
                    if self._dirty_since is not None:
                        wait = self._dirty_since + self.fsync_interval - time.monotonic()
                        if wait <= 0:
                            break
                        self._sync.wait(wait)
                    else:
                        self._sync.wait(self._idle_wakeup)
                        if self._idle_wakeup is not None:
                            break  # a chance for housekeeping
                upto = self._sync_upto
                dirty = self._dirty_since is not None
                self._dirty_since = None
                closing = self._closing
            if upto > synced or dirty or closing:
                try:
                    self._fsync_now()
                except Exception as exc:
                    # Never retried (see _fsync_or_break): what was waiting for this fsync
                    # is never confirmed; the store stops taking writes.
                    if self._error is None:
                        self._broken(OSError(f"fsync failed: {exc}; data written since "
                                             "the last successful fsync may be lost"))  # fmt: skip
                    return
                if self._error is not None:
                    # An fsync in another thread failed meanwhile (a segment roll in the
                    # loop's): it covered these batches too, and this fsync's success
                    # proves nothing about them.
                    return
            if upto > synced:
                synced = upto
                self.committed = max(self.committed, upto)
                if self.on_commit is not None:
                    self.on_commit(upto)
            self._between_syncs(closing)
            if closing:
                return

    def start(self, on_commit: Callable[[int], None]) -> None:
        """Begin writing; ``on_commit(batch)`` is called once a batch is durable (from the
        loop's thread when attached, else from the thread that wrote it or the syncer's)."""
        self.on_commit = on_commit
        self._thread.start()

    # --- one store per data directory ---------------------------------------------------

    def _open_holding(self, data_dir: Path, opener: Callable[[], _T]) -> _T:
        """``opener()`` with ``data_dir`` locked for this store; the lock is let go if
        opening fails."""
        self._lock_dir(data_dir)
        try:
            return opener()
        except BaseException:
            self._unlock_dir()
            raise

    _lock_fd = -1

    def _lock_dir(self, data_dir: Path) -> None:
        """Hold ``DATA_DIR/pigeon.lock`` (flock) while open: a second broker on the same
        directory is refused rather than allowed to interleave its writes. Inside
        ``holding_dir(data_dir)`` the store shares the lock held there."""
        held = _HELD.get(Path(data_dir).resolve())
        self._lock_fd = os.dup(held) if held is not None else lock_dir(Path(data_dir))

    def _unlock_dir(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _count_commit(self, seconds: float) -> None:
        i = bisect.bisect_left(_COMMIT_BUCKETS, seconds)
        self._commit_counts[i] += 1
        self._commit_sum += seconds

    def commit_histogram(self) -> tuple[list[tuple[float, int]], float]:
        buckets, total = [], 0
        for le, n in zip((*_COMMIT_BUCKETS, float("inf")), self._commit_counts, strict=True):
            total += n
            buckets.append((le, total))
        return buckets, self._commit_sum

    def __str__(self) -> str:
        return str(getattr(self, "path", type(self).__name__))


class NativeSyncer:
    """The syncer thread of ``--fsync batch`` in C (``pigeon._fastring``): it never takes
    the GIL, so it costs the event loop's thread nothing between fsyncs (a Python thread
    that wakes to fsync takes the GIL from the loop's thread at each step). It does what
    one pass of ``Durable._syncer`` does for ``batch`` - fdatasync the active segment once
    ``fsync_interval`` has passed since the first unsynced write, under the store's fsync
    lock, a failure kept for the store to break on - and that Python pass stays the
    reference: it runs where the module is not built, under ``PIGEON_PURE_PYTHON``, and in
    the crash model (tests/server/_crash.py).

    Used as the store's fsync lock (``with syncer:``); ``set_fd`` only with it held."""

    __slots__ = ("_c", "_h", "dirty", "failed")

    def __init__(self, c: Any, interval: float) -> None:
        self._c = c
        self._h = c.syncer_new(interval)
        # A write reached the OS: fdatasync it within the interval. Non-zero: an earlier
        # fdatasync failed (its errno). Called at every write: a C partial, no Python frame.
        self.dirty: Callable[[], int] = functools.partial(c.syncer_dirty, self._h)
        # The errno of a failed fdatasync, or 0: asked before every put, a C partial too.
        self.failed: Callable[[], int] = functools.partial(c.syncer_error, self._h)

    def start(self) -> None:
        self._c.syncer_start(self._h)

    @property
    def error(self) -> int:
        """The errno of a failed fdatasync (the thread has then ended), or 0."""
        return int(self._c.syncer_error(self._h))

    @property
    def fsyncs(self) -> int:
        return int(self._c.syncer_fsyncs(self._h))

    def set_fd(self, fd: int) -> None:
        self._c.syncer_set_fd(self._h, fd)

    def pass_by_hand(self, fsync: Callable[[int], None]) -> bool:
        """One pass of the thread, which is not started, with ``fsync`` doing its
        fdatasync (the crash model's disk). True if it, or an earlier one, failed."""
        return bool(self._c.syncer_pass(self._h, fsync))

    def close(self) -> None:
        """Stop the thread (after the fdatasync it may be in)."""
        self._c.syncer_close(self._h)

    def __enter__(self) -> NativeSyncer:
        self._c.syncer_lock(self._h)
        return self

    def __exit__(self, *exc: object) -> None:
        self._c.syncer_unlock(self._h)
