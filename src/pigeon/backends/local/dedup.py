"""The local queue's table of dedup ids: a SQLite file beside the queue's (``PATH.dedup``),
shared by every process of the host.

# Strategy:
# A put with ids runs one short transaction: BEGIN IMMEDIATE (the table's write lock),
# forget the ids past their window, insert the new ones (those already there are the
# repeats), put the fresh items in the ring without waiting, COMMIT. It never waits for
# room while it holds the write lock: a queue that is full makes the transaction roll back
# (``Full``), and the put waits for room outside it, then tries again. So the lock is
# held for microseconds, and a put that must not block (the asyncio face) can refuse to
# wait for it at all (``DedupBusy``) and come back a moment later.
#
# Each thread has its own connection (a SQLite connection holds one transaction at a
# time: threads sharing one interleaved theirs). A connection is never used across a
# fork (SQLite forbids it): a fork child makes its own.
#
# The journal is SQLite's default rollback journal, on tmpfs like the table: a process
# killed in the middle of a transaction, even of its COMMIT, leaves a hot journal that the
# next connection rolls back, so the table is never corrupt. Killed after the ring's
# commit and before the table's, a put leaves its item stored and its ids forgotten (a
# retry may store it twice: at-least-once), never the reverse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator

from pigeon.errors import BrokenResourceError, ClosedResourceError, Full, PigeonError

__all__ = ["DedupBusy", "DedupTable"]

_FOREVER_MS = 2**31 - 1  # SQLite's busy timeout is an int of milliseconds
log = logging.getLogger("pigeon.local")


class DedupBusy(Full):
    """Another put holds the table of dedup ids (for a moment); raised only to a caller
    that asked not to wait for it (the asyncio face, which tries again soon)."""


class DedupTable:
    """This handle's connections to a queue's table of dedup ids, one per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []  # every thread's, to close them all
        self._pid = os.getpid()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # a fork child: its parent's connections are not ours
            self._local, self._all, self._pid = threading.local(), [], os.getpid()
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        db = sqlite3.connect(
            self.path, timeout=_FOREVER_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=DELETE")  # on tmpfs: cheap, and kill-safe
            db.execute("PRAGMA synchronous=OFF")  # tmpfs: nothing to protect from power loss
            db.execute(
                "CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY, until REAL NOT NULL) "
                "WITHOUT ROWID"
            )
            db.execute("CREATE INDEX IF NOT EXISTS ids_until ON ids (until)")
        except BaseException:
            db.close()
            raise
        self._local.db = db
        self._all.append(db)
        return db

    @contextlib.contextmanager
    def transaction(self, wait: float | None) -> Iterator[sqlite3.Connection]:
        """Hold the table's write lock for the block, then commit (roll back if the block
        raises). ``wait``: seconds to wait for the lock (None: as long as it takes);
        ``DedupBusy`` if it stays taken."""
        db = self._connection()
        committing = False
        try:
            if db.in_transaction:  # one this thread left open when it was interrupted
                db.execute("ROLLBACK")
            if wait is not None:
                db.execute(f"PRAGMA busy_timeout={max(0, min(_FOREVER_MS, int(wait * 1000)))}")
            try:
                db.execute("BEGIN IMMEDIATE")
            finally:
                if wait is not None:  # the COMMIT waits for other connections' brief locks
                    db.execute(f"PRAGMA busy_timeout={_FOREVER_MS}")
            yield db
            committing = True
            db.execute("COMMIT")
        except BaseException as exc:
            # whatever ended the block - the items' put refused, or an interruption (Ctrl-C
            # just after BEGIN, or before COMMIT, too) - must not leave the table's write
            # lock taken
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if committing and isinstance(exc, sqlite3.Error):
                # The items are in the ring already: the put did store them. Say so rather
                # than raise (a caller would retry and store them twice for certain).
                log.warning("a put stored its items but not their dedup ids: %s", exc)
                return
            if isinstance(exc, sqlite3.OperationalError) and (
                exc.sqlite_errorcode == sqlite3.SQLITE_BUSY
            ):
                raise DedupBusy(
                    f"another put held the local queue's table of dedup ids for {wait} s"
                ) from None
            if isinstance(exc, sqlite3.Error):
                raise _translated(exc) from exc
            raise

    def remember(self, ids: list[str], now: float, window: float) -> list[bool]:
        """Inside ``transaction``: forget the ids whose window is over, remember ``ids``
        for ``window`` seconds; which of them were new (a repeat in ``ids`` is not)."""
        db = self._connection()
        db.execute("DELETE FROM ids WHERE until <= ?", (now,))
        until = now + window
        insert = "INSERT OR IGNORE INTO ids VALUES (?, ?)"
        return [bool(db.execute(insert, (d, until)).rowcount) for d in ids]

    def close(self) -> None:
        """Close every thread's connection (in the process that made them)."""
        if os.getpid() != self._pid:
            return  # a fork child's copies belong to its parent
        for db in self._all:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._all.clear()


def _translated(exc: sqlite3.Error) -> PigeonError:
    if isinstance(exc, sqlite3.ProgrammingError):  # its connection was closed under it
        return ClosedResourceError("this queue handle was closed")
    return BrokenResourceError(f"the local queue's table of dedup ids failed: {exc}")
