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
# A busy or failing disk does not stop the broker: a commit that fails with an
# operational error (another process holds a lock, the disk is full, an I/O error) is
# retried with backoff, the changes kept, and the broker is told how long the store has
# been failing (``stalled_for``): it then refuses new puts with ``unavailable`` and
# answers held confirmations after a bounded wait, until a commit succeeds again.
#
# Every payload carries a CRC32. At start the database file is checked (``PRAGMA
# quick_check``) and every row's CRC verified: a damaged file refuses to start with its
# path in the message; a row whose CRC does not match is moved to a ``quarantine`` table
# and reported, never delivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from pigeon.errors import StoreCorrupted
from pigeon.server.core import NO_TRANSACTION, Extra, Stored
from pigeon.server.store.durable import Durable, FsyncFailed, FsyncMode
from pigeon.server.store.records import with_due

__all__ = ["DB_NAME", "SQLiteStore", "SharedAttrs", "create_schema", "read_shared"]

log = logging.getLogger("pigeon.store")

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
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (queue, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shared (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL  -- MessagePack [origin, reason, Extra or nil]
);
-- A queue's tasks taken (acked) and not yet marked done: its unfinished count beyond the
-- messages it holds. No row (a store written before this table, too): 0. Not a column of
-- queues: a queue that was never declared has no row there, and a row there declares it.
CREATE TABLE IF NOT EXISTS tasks (
    queue TEXT PRIMARY KEY,
    taken INTEGER NOT NULL
) WITHOUT ROWID;
"""
# What messages share - a batch's options, a NACK's reason - is a row of ``shared``, written
# once and named by each message's ``attrs``; deleted with the last message naming it.
_SHARED = """
CREATE INDEX IF NOT EXISTS messages_attrs ON messages (attrs) WHERE attrs IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS shared_unused_after_delete AFTER DELETE ON messages
WHEN old.attrs IS NOT NULL AND NOT EXISTS (SELECT 1 FROM messages WHERE attrs = old.attrs)
BEGIN DELETE FROM shared WHERE id = old.attrs; END;
CREATE TRIGGER IF NOT EXISTS shared_unused_after_update AFTER UPDATE OF attrs ON messages
WHEN old.attrs IS NOT NULL AND old.attrs IS NOT new.attrs
    AND NOT EXISTS (SELECT 1 FROM messages WHERE attrs = old.attrs)
BEGIN DELETE FROM shared WHERE id = old.attrs; END;
"""
# Columns added after the first release: added to an older store when it is opened.
_ADDED_COLUMNS = {
    "origin": "TEXT NOT NULL DEFAULT ''",
    "reason": "TEXT NOT NULL DEFAULT ''",
    "extra": "BLOB",  # a message put with options: its Extra in MessagePack (else NULL)
    "attrs": "INTEGER",  # a row of shared: its origin, reason and Extra (else the above)
    "due": "REAL NOT NULL DEFAULT 0",  # a NACK's delay: not delivered before (wall clock)
}
_encode_extra = msgspec.msgpack.Encoder().encode
_decode_extra = msgspec.msgpack.Decoder(Extra).decode
_decode_shared = msgspec.msgpack.Decoder(tuple[str, str, Extra | None]).decode
_BUSY_TIMEOUT_MS = 200  # how long one statement waits for another process's lock
_CHECKPOINT_BYTES = 8 * 2**20  # the syncer checkpoints the WAL beyond this size
_MAX_RETRY_DELAY = 0.25
# The writer thread wakes this often when idle: deliveries counted (no reply waits for
# them, so they wake nobody) are committed at the latest then, if no change came first.
_WRITER_IDLE = 0.05


def _id_ranges(ops: list[tuple[str, tuple[object, ...]]]) -> Iterator[tuple[int, int]]:
    """The ids of removals as (first, last) runs of consecutive ids."""
    ids = sorted(int(args[0]) for _, args in ops)  # type: ignore[call-overload]
    first = last = ids[0]
    for i in ids[1:]:
        if i != last + 1:
            yield first, last
            first = i
        last = i
    yield first, last


def create_schema(db: sqlite3.Connection) -> None:
    """The tables of a pigeon SQLite store, with the columns added since the first
    release (added to an older store when it is opened)."""
    db.executescript(_SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    for column, decl in _ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE messages ADD COLUMN {column} {decl}")
    db.executescript(_SHARED)


class SharedAttrs:
    """Numbers what messages share (origin, reason, options: the same priority, times and
    headers object) as rows of ``shared``, so that a batch's options or a NACK's reason is
    written once, not once per message.

    A number is handed out again only while a row of it surely still exists: any change
    that may remove or re-point the messages naming one (``forget``, ``keep_only``)
    drops it from memory first, as the triggers may then delete its row."""

    def __init__(self, next_id: int) -> None:
        self._next = next_id
        self._known: dict[tuple[str, str, int, float, float, int], tuple[int, Extra | None]] = {}

    def number(self, m: Stored) -> tuple[int, bytes | None]:
        """The row for ``m``'s origin, reason and options, and its data if it is new."""
        e = m.extra
        key = (m.origin, m.reason, *(
            (e.priority, e.due, e.expires, id(e.headers)) if e is not None else (0, 0.0, 0.0, 0)
        ))  # fmt: skip
        known = self._known.get(key)
        if known is not None:
            return known[0], None
        if len(self._known) >= 256:
            self._known.clear()
        sid = self._next
        self._next += 1
        self._known[key] = (sid, e)  # (holds the headers: their id stays theirs meanwhile)
        return sid, _encode_extra([m.origin, m.reason, e])

    def forget(self) -> None:
        self._known.clear()

    def keep_only(self, m: Stored) -> None:
        """Messages are re-pointed to ``m``'s row: any other may lose its last one."""
        if len(self._known) > 1:
            e = m.extra
            key = (m.origin, m.reason, *(
                (e.priority, e.due, e.expires, id(e.headers)) if e is not None
                else (0, 0.0, 0.0, 0)
            ))  # fmt: skip
            kept = self._known.get(key)
            self._known = {key: kept} if kept is not None else {}


def read_shared(db: sqlite3.Connection) -> dict[int, tuple[str, str, Extra | None]]:
    """Every row of ``shared``, decoded once (its messages then share the objects)."""
    out = {}
    for sid, data in db.execute("SELECT id, data FROM shared"):
        origin, reason, extra = _decode_shared(data)
        out[sid] = (origin, reason, extra)
    return out


class SQLiteStore(Durable):
    """A ``Store`` that keeps every message in ``DATA_DIR/pigeon.sqlite3``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: FsyncMode = "batch",
        fsync_interval: float = 0.010,
    ) -> None:
        super().__init__(fsync, fsync_interval)
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self._lock = threading.Condition()
        self._last_fsync = 0.0
        self._db = self._open_holding(self.dir, self._open)
        (top,) = self._db.execute("SELECT coalesce(max(id), 0) FROM shared").fetchone()
        self._shared = SharedAttrs(top + 1)
        # Attached (``attach``), commits run in the event loop's thread and the syncer
        # thread fsyncs and checkpoints; else this writer thread does it all.
        self._thread = threading.Thread(target=self._writer, name="pigeon-store", daemon=True)

    # --- opening and recovery -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
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
            create_schema(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreCorrupted(
                f"{self.path} cannot be read as a pigeon store ({exc}); move it aside to "
                "start empty, or restore it from a backup"
            ) from exc
        except BaseException:
            db.close()
            raise
        return db

    def recover(self) -> Iterator[tuple[str, Stored]]:
        """Every stored message, oldest first; damaged rows are quarantined, not returned."""
        start = time.perf_counter()
        bad: list[tuple[int, str, bytes]] = []
        count = 0
        try:
            shared = read_shared(self._db)
            rows = self._db.execute(
                "SELECT id, queue, payload, crc, deliveries, origin, reason, extra, attrs, due "
                "FROM messages ORDER BY id"
            )
            for mid, queue, payload, crc, deliveries, origin, reason, extra, attrs, due in rows:
                if zlib.crc32(payload) != crc:
                    bad.append((mid, queue, payload))
                    continue
                count += 1
                if attrs is not None:
                    origin, reason, options = shared.get(attrs, ("", "", None))
                else:
                    options = _decode_extra(extra) if extra else None
                if due:
                    options = with_due(options, due)
                yield queue, Stored(mid, bytes(payload), deliveries, 0.0, origin, reason, options)
        except (sqlite3.DatabaseError, msgspec.DecodeError) as exc:
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

    def recover_queues(self) -> dict[str, dict[str, Any]]:
        """Declared queue settings (maxsize, lease, max_deliveries, shutdown)."""
        rows = self._db.execute("SELECT name, settings FROM queues").fetchall()
        return {name: json.loads(settings) for name, settings in rows}

    def recover_dedup(self) -> dict[str, dict[str, float]]:
        """Dedup ids whose window has not passed (the others are deleted now)."""
        with self._db:
            self._db.execute("DELETE FROM dedup WHERE until <= ?", (time.time(),))
        out: dict[str, dict[str, float]] = {}
        for queue, dedup_id, until in self._db.execute("SELECT queue, id, until FROM dedup"):
            out.setdefault(queue, {})[dedup_id] = until
        return out

    def recover_taken(self) -> dict[str, int]:
        """Each queue's tasks taken and not yet done (those with a row)."""
        try:
            rows = self._db.execute("SELECT queue, taken FROM tasks").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupted(f"{self.path} is damaged ({exc})") from exc
        return {queue: int(taken) for queue, taken in rows if taken}

    def attach(self, loop: Any) -> None:
        """Commit in ``loop``'s thread once per turn of the loop - no thread hop per commit
        - and leave fsyncs and checkpoints to a background thread. Call before ``start``."""
        if self.fsync == "always":
            # Measured: the writer thread committing with synchronous=FULL (one hop, SQLite's
            # own fsync) confirms in 260 us p50; a commit here plus an fsync in the syncer
            # took 440 us. The fsync is the cost either way; group commit shares it.
            return
        self._loop = loop
        self._db.execute("PRAGMA busy_timeout=0")  # never block the loop: retry on a timer
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the syncer checkpoints
        self._thread = threading.Thread(target=self._syncer, name="pigeon-store-sync", daemon=True)

    # --- the broker's notifications (event-loop thread) -----------------------------------

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """Changes made inside reach the writer together: one transaction (the writer
        cannot take half of them while the broker is still making the rest). Inline, a
        flush runs between requests only: nothing to lock."""
        return NO_TRANSACTION if self._loop is not None else self._locked()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield

    # --- inline mode: the loop commits, the syncer syncs ---------------------------------

    @property
    def disk_bytes(self) -> int:
        """Bytes the database and its WAL take on disk now."""
        return sum(os.path.getsize(p) for p in (self.path, f"{self.path}-wal") if os.path.exists(p))

    _retryable = (sqlite3.OperationalError, OSError)

    def _write_ops(self, ops: list[Any]) -> None:
        """One transaction (the loop's ``_flush``: see ``Durable``)."""
        self._apply(self._db, ops)

    _idle_wakeup = 1.0  # checkpoint the WAL now and then even when idle
    _checkpointer: sqlite3.Connection | None = None

    def _fsync_now(self) -> None:
        self._fsync_or_break(self._fsync_wal)

    def _between_syncs(self, closing: bool) -> None:
        """Checkpoint the WAL once it passes ``_CHECKPOINT_BYTES``, off the loop."""
        wal = f"{self.path}-wal"
        try:
            if os.path.exists(wal) and os.path.getsize(wal) > _CHECKPOINT_BYTES:
                if self._checkpointer is None:
                    self._checkpointer = sqlite3.connect(
                        self.path, check_same_thread=False, isolation_level=None
                    )
                    self._checkpointer.execute("PRAGMA busy_timeout=1000")
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (sqlite3.OperationalError, OSError) as exc:
            log.error("store %s: checkpoint failed (%s); retrying", self.path, exc)
        if closing and self._checkpointer is not None:
            self._checkpointer.close()

    def _add(self, op: str, args: tuple[object, ...]) -> None:
        self._add_all([(op, args)])

    def _add_all(self, ops: list[tuple[str, tuple[object, ...]]], change: bool = True) -> None:
        """Commit ``ops`` with the next transaction. ``change`` False: no reply waits for
        them (deliveries counted)."""
        if not ops:
            return
        if self._loop is not None:  # inline: the loop's thread alone touches _ops
            self._ops += ops
            if not change:
                self._write_soon()  # with the next change, or within the interval
                return
            self.last_tag = self.batch + 1
            self.changes += len(ops)
            self._pending_change = True
            if not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)
            return
        with self._lock:
            self._ops += ops
            if change:  # (else committed with the next change, or when the writer wakes)
                self.last_tag = self.batch + 1
                self.changes += len(ops)
                self._lock.notify()

    def added(self, queue: str, msg: Stored) -> None:
        self.added_many(queue, [msg])

    def removed(self, queue: str, msg_id: int) -> None:
        self.removed_many(queue, [msg_id])

    def added_many(self, queue: str, msgs: list[Stored]) -> None:
        """A fresh put's row binds only the columns it sets (the rest take their defaults:
        binding fewer values is measurably faster); what messages share (a batch's
        options) is one row of ``shared``."""
        crc = zlib.crc32
        ops: list[tuple[str, tuple[object, ...]]] = []
        for m in msgs:
            if not m.origin and not m.reason and m.extra is None:
                if m.deliveries:
                    ops.append(("add", (m.id, queue, m.payload, crc(m.payload), m.deliveries,
                                        None)))  # fmt: skip
                else:
                    ops.append(("add_new", (m.id, queue, m.payload, crc(m.payload))))
                continue
            sid, data = self._shared.number(m)
            if data is not None:
                ops.append(("share", (sid, data)))
            ops.append(("add", (m.id, queue, m.payload, crc(m.payload), m.deliveries, sid)))
        self._add_all(ops)

    def removed_many(self, queue: str, msg_ids: list[int]) -> None:
        self._shared.forget()  # their rows of shared may go with them
        self._add_all([("del", (i,)) for i in msg_ids])

    def moved(self, msg: Stored, queue: str) -> None:
        self._shared.keep_only(msg)  # the row it named may go
        sid, data = self._shared.number(msg)
        ops: list[tuple[str, tuple[object, ...]]] = [] if data is None else [("share", (sid, data))]
        ops.append(("move", (queue, msg.deliveries, sid, msg.id)))
        self._add_all(ops)

    def delivered(self, queue: str, msg_ids: list[int]) -> None:
        self._add_all([("delivered", (i,)) for i in msg_ids], change=False)

    def deduped(self, queue: str, dedup_id: str, until: float) -> None:
        self._deduped += 1
        if self._deduped % 1024 == 0:  # now and then, forget the ids whose window passed
            self._add("forget", (time.time(),))
        self._add("dedup", (queue, dedup_id, until))

    _deduped = 0

    def declared(self, queue: str, settings: dict[str, Any] | None) -> None:
        if settings is None:
            self._shared.forget()
            self._add("undeclare", (queue,))
            self._add("undedup", (queue,))
            self._add("untaken", (queue,))
        else:
            self._add("declare", (queue, json.dumps(settings, sort_keys=True)))

    def taken(self, queue: str, n: int) -> None:
        if n:
            self._add("taken", (queue, n))
        else:
            self._add("untaken", (queue,))

    def requeued(self, queue: str, msg: Stored) -> None:
        due = msg.extra.due if msg.extra is not None else 0.0  # a NACK's delay
        self._add("deliveries", (msg.deliveries, due, msg.id))

    # --- the writer thread ----------------------------------------------------------------

    def _writer(self) -> None:
        db = self._db
        unsynced = False
        delay = 0.01
        while True:
            with self._lock:
                while not self._ops and not self._closing:
                    if unsynced:
                        wait = self._last_fsync + self.fsync_interval - time.monotonic()
                        if wait <= 0:
                            break
                        self._lock.wait(wait)
                    else:
                        self._lock.wait(_WRITER_IDLE)
                ops, self._ops = self._ops, []
                if ops:
                    self.batch += 1
                batch = self.batch
                closing = self._closing
            try:
                if ops:
                    started = time.perf_counter()
                    self._apply(db, ops)
                    self._count_commit(time.perf_counter() - started)
                    unsynced = self.fsync == "batch"
                if unsynced and (
                    closing or time.monotonic() - self._last_fsync >= self.fsync_interval
                ):
                    try:
                        self._fsync_wal()
                    except OSError as exc:  # never retried: see Durable._syncer
                        why = f"fsync failed: {exc}; what was written since may be lost"
                        raise FsyncFailed(why) from exc
                    unsynced = False
            except (sqlite3.OperationalError, OSError) as exc:
                # Busy (another process holds a lock), full, or an I/O error: keep the
                # changes, retry with backoff; the broker refuses new puts meanwhile.
                with self._lock:
                    self._ops = ops + self._ops
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.error("store %s cannot commit (%s); retrying", self.path, exc)
                if closing and time.monotonic() - self._failing_since > 5.0:
                    log.critical("store %s: giving up at close: %s", self.path, exc)
                    return
                time.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                continue
            except BaseException as exc:
                self._broken(exc)
                return
            if self._failing_since is not None:
                self._commits_again()
                delay = 0.01
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
        "add": "INSERT OR REPLACE INTO messages (id, queue, payload, crc, deliveries, attrs) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        "share": "INSERT OR REPLACE INTO shared VALUES (?, ?)",
        # a fresh put: the other columns take their defaults (binding fewer values is faster)
        "add_new": "INSERT OR REPLACE INTO messages (id, queue, payload, crc) VALUES (?, ?, ?, ?)",
        "del": "DELETE FROM messages WHERE id BETWEEN ? AND ?",
        "move": "UPDATE messages SET queue = ?, deliveries = ?, origin = '', reason = '', "
        "extra = NULL, due = 0, attrs = ? WHERE id = ?",  # a dead letter keeps no delay
        "delivered": "UPDATE messages SET deliveries = deliveries + 1 WHERE id BETWEEN ? AND ?",
        "dedup": "INSERT OR REPLACE INTO dedup VALUES (?, ?, ?)",
        "undedup": "DELETE FROM dedup WHERE queue = ?",
        "forget": "DELETE FROM dedup WHERE until <= ?",
        "deliveries": "UPDATE messages SET deliveries = ?, due = ? WHERE id = ?",
        "declare": "INSERT OR REPLACE INTO queues VALUES (?, ?)",
        "undeclare": "DELETE FROM queues WHERE name = ?",
        "taken": "INSERT OR REPLACE INTO tasks VALUES (?, ?)",
        "untaken": "DELETE FROM tasks WHERE queue = ?",
    }

    @classmethod
    def _apply(cls, db: sqlite3.Connection, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        """One transaction; consecutive changes of one kind go in one executemany, and
        consecutive removals as ranges of ids (acks mostly come in runs: measured, a range
        delete of 100 rows costs about a third of 100 single deletes)."""
        db.execute("BEGIN")
        try:
            i = 0
            while i < len(ops):
                kind = ops[i][0]
                j = i
                while j < len(ops) and ops[j][0] == kind:
                    j += 1
                if kind in ("del", "delivered"):
                    rows: list[tuple[object, ...]] = list(_id_ranges(ops[i:j]))
                else:
                    rows = [args for _, args in ops[i:j]]
                db.executemany(cls._SQL[kind], rows)
                i = j
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Commit what is pending, stop the writer, close the database."""
        self._closed = True  # a flush still scheduled on the loop does nothing now
        if self._loop is not None:
            if self._ops:
                self._flush_pending = False
                with contextlib.suppress(sqlite3.Error):
                    self._apply(self._db, self._ops)
                self._ops = []
            with self._sync:
                self._closing = True
                self._sync.notify()
            if self._thread.is_alive():
                self._thread.join(30)
            self._db.close()
            self._unlock_dir()
            return
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(30)
        elif self._ops:
            self._apply(self._db, self._ops)
            self._ops = []
        self._db.close()
        self._unlock_dir()
