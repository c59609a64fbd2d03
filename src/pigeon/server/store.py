"""The durable store: SQLite in WAL mode, written by one thread with group commit.

# Strategy:
# The event loop never touches the disk. The broker's state changes (a message added,
# removed, moved to a dead-letter queue, handed out again) are appended to an in-memory
# batch; a writer thread takes the whole batch, applies it in one transaction and
# commits, then tells the loop which batch is durable. The server holds every reply that
# depends on a batch (a put's confirmation, an ack's) until that batch is committed, so a
# confirmed put survives ``kill -9``:
#
#   --fsync always  commit as soon as anything is pending; the commit fsyncs the WAL
#                   (synchronous=FULL) before the confirmations go out. Puts that arrive
#                   during one fsync share the next one: group commit. Survives kill -9
#                   and power loss.
#   --fsync batch   commit as soon as anything is pending and confirm once the commit is
#                   in the operating system (it survives kill -9 of the broker); one fsync
#                   per batch of commits, at most ``fsync_interval`` (10 ms) later, so a
#                   power loss can lose at most the last interval of confirmed puts.
#   --fsync never   confirm before writing; commits are never fsynced (synchronous=OFF).
#                   Fastest; a crash of the broker can lose the puts not yet committed.
#
# Every payload carries a CRC32. At start the database file is checked (``PRAGMA
# quick_check``) and every row's CRC verified: a damaged file refuses to start with its
# path in the message; a row whose CRC does not match is moved to a ``quarantine`` table
# and reported, never delivered.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pigeon.errors import PigeonError
from pigeon.server.state import Store, Stored

log = logging.getLogger("pigeon.store")

FsyncMode = Literal["always", "batch", "never"]
DB_NAME = "pigeon.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload BLOB NOT NULL,
    crc INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload BLOB,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class StoreCorrupted(PigeonError):
    """The data directory holds a damaged database; the message names the file."""


class SQLiteStore(Store):
    """A ``Store`` that keeps every message in ``DATA_DIR/pigeon.sqlite3``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: FsyncMode = "batch",
        fsync_interval: float = 0.010,
    ) -> None:
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always, batch or never, not {fsync!r}")
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self.fsync: FsyncMode = fsync
        self.fsync_interval = fsync_interval
        self._ops: list[tuple[str, tuple[object, ...]]] = []
        self._lock = threading.Condition()
        self.batch = 0  # the last batch the writer took
        self.committed = 0  # every batch <= this is durable
        self.last_tag = 0  # the batch the most recent change belongs to
        self.changes = 0  # how many changes were ever made
        self._closing = False
        self._error: BaseException | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.recovery_seconds = 0.0
        self.quarantined = 0
        self._last_fsync = 0.0
        self.fsyncs = 0
        self._db = self._open()
        self._thread = threading.Thread(target=self._writer, name="pigeon-store", daemon=True)

    # --- opening and recovery -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # always: the commit fsyncs the WAL. batch: commits reach the OS at once (they
            # survive the broker's death) and _fsync_wal makes them durable once per
            # interval; NORMAL still fsyncs around checkpoints. never: no fsync at all.
            sync = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}[self.fsync]
            db.execute(f"PRAGMA synchronous={sync}")
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise StoreCorrupted(
                    f"{self.path} is damaged ({result}); move it aside to start empty, or "
                    "restore it from a backup"
                )
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupted(
                f"{self.path} cannot be read as a pigeon store ({exc}); move it aside to "
                "start empty, or restore it from a backup"
            ) from exc
        return db

    def recover(self) -> Iterator[tuple[str, Stored]]:
        """Every stored message, oldest first; damaged rows are quarantined, not returned."""
        start = time.perf_counter()
        bad: list[tuple[int, str, bytes]] = []
        count = 0
        try:
            rows = self._db.execute(
                "SELECT id, queue, payload, crc, deliveries FROM messages ORDER BY id"
            )
            for mid, queue, payload, crc, deliveries in rows:
                if zlib.crc32(payload) != crc:
                    bad.append((mid, queue, payload))
                    continue
                count += 1
                yield queue, Stored(mid, bytes(payload), deliveries)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupted(f"{self.path} is damaged ({exc})") from exc
        if bad:
            now = time.time()
            with self._db:
                for mid, queue, payload in bad:
                    self._db.execute(
                        "INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?, ?, ?)",
                        (mid, queue, payload, "checksum mismatch", now),
                    )
                    self._db.execute("DELETE FROM messages WHERE id = ?", (mid,))
            self.quarantined = len(bad)
            log.error(
                "%s: %d message(s) failed their checksum and were moved to the quarantine "
                "table, not delivered (ids %s)",
                self.path, len(bad), ", ".join(str(b[0]) for b in bad[:10]),
            )  # fmt: skip
        self.recovery_seconds = time.perf_counter() - start
        log.info("recovered %d message(s) from %s in %.3f s", count, self.path,
                 self.recovery_seconds)  # fmt: skip

    def start(self, on_commit: Callable[[int], None]) -> None:
        """Begin writing; ``on_commit(batch)`` is called (from the writer thread) after each
        commit."""
        self.on_commit = on_commit
        self._thread.start()

    # --- the broker's notifications (event-loop thread) -----------------------------------

    def _add(self, op: str, args: tuple[object, ...]) -> None:
        with self._lock:
            self._ops.append((op, args))
            self.last_tag = self.batch + 1
            self.changes += 1
            self._lock.notify()

    def added(self, queue: str, msg: Stored) -> None:
        self._add("add", (msg.id, queue, msg.payload, zlib.crc32(msg.payload), msg.deliveries))

    def removed(self, queue: str, msg_id: int) -> None:
        self._add("del", (msg_id,))

    def moved(self, msg_id: int, queue: str) -> None:
        self._add("move", (queue, msg_id))

    def requeued(self, queue: str, msg: Stored) -> None:
        self._add("deliveries", (msg.deliveries, msg.id))

    @property
    def holds_replies(self) -> bool:
        """True if replies must wait for the commit of the changes they report."""
        return self.fsync != "never"

    # --- the writer thread ----------------------------------------------------------------

    def _writer(self) -> None:
        db = self._db
        unsynced = False
        while True:
            with self._lock:
                while not self._ops and not self._closing:
                    if unsynced:
                        wait = self._last_fsync + self.fsync_interval - time.monotonic()
                        if wait <= 0:
                            break
                        self._lock.wait(wait)
                    else:
                        self._lock.wait()
                ops, self._ops = self._ops, []
                if ops:
                    self.batch += 1
                batch = self.batch
                closing = self._closing
            try:
                if ops:
                    self._apply(db, ops)
                    unsynced = self.fsync == "batch"
                if unsynced and (
                    closing or time.monotonic() - self._last_fsync >= self.fsync_interval
                ):
                    self._fsync_wal()
                    unsynced = False
            except BaseException as exc:  # a full disk, an I/O error: stop confirming
                self._error = exc
                log.critical("store %s failed, no more writes are confirmed: %s", self.path, exc)
                return
            if ops:
                self.committed = batch
                if self.on_commit is not None:
                    self.on_commit(batch)
            if closing and not ops:
                return

    def _fsync_wal(self) -> None:
        """One fsync for everything committed since the last one (``--fsync batch``)."""
        wal = f"{self.path}-wal"
        if os.path.exists(wal):
            fd = os.open(wal, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._last_fsync = time.monotonic()
        self.fsyncs += 1

    _SQL: ClassVar[dict[str, str]] = {
        "add": "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?)",
        "del": "DELETE FROM messages WHERE id = ?",
        "move": "UPDATE messages SET queue = ? WHERE id = ?",
        "deliveries": "UPDATE messages SET deliveries = ? WHERE id = ?",
    }

    @classmethod
    def _apply(cls, db: sqlite3.Connection, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        """One transaction; consecutive changes of one kind go in one executemany."""
        db.execute("BEGIN")
        try:
            i = 0
            while i < len(ops):
                kind = ops[i][0]
                j = i
                while j < len(ops) and ops[j][0] == kind:
                    j += 1
                db.executemany(cls._SQL[kind], [args for _, args in ops[i:j]])
                i = j
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Commit what is pending, stop the writer, close the database."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(30)
        elif self._ops:
            self._apply(self._db, self._ops)
            self._ops = []
        self._db.close()
