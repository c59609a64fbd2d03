"""The broker's durable stores, and the choice between them.

``open_store(data_dir, kind)`` opens the store of a data directory: the log (``log.py``,
the default) or SQLite (``sqlite.py``); both build on ``durable.py``. ``backup.py`` copies
either into one SQLite file. The interface the broker calls is ``pigeon.server.core.Store``
(the in-memory store, which keeps nothing).
"""

from __future__ import annotations

import logging
import os
from itertools import groupby
from operator import itemgetter
from pathlib import Path

from pigeon.errors import StoreCorrupted, StoreInUse
from pigeon.server.core import Store
from pigeon.server.store.backup import backup_log, backup_sqlite
from pigeon.server.store.durable import Durable, FsyncMode, holding_dir, lock_dir
from pigeon.server.store.log import LOG_DIR, SEGMENT_BYTES, LogStore
from pigeon.server.store.records import fsync_dir, list_segments
from pigeon.server.store.sqlite import DB_NAME, SQLiteStore, create_schema

__all__ = [
    "DB_NAME", "LOG_DIR", "Durable", "FsyncMode", "LogStore", "SQLiteStore", "Store",
    "StoreCorrupted", "StoreInUse", "backup_log", "backup_sqlite", "create_schema", "holding_dir",
    "lock_dir", "open_store",
]  # fmt: skip

# (not named ``log``: that is the log store, ``pigeon.server.store.log``)
logger = logging.getLogger("pigeon.store")

StoreKind = str  # "auto" | "log" | "sqlite"

IMPORTING = "IMPORTING"  # log/IMPORTING: the segments beside it are an unfinished import
IMPORTED_MARK = "IMPORTED"  # log/IMPORTED: this log was made from DATA_DIR/pigeon.sqlite3
_IMPORT_CHUNK = 10_000  # messages a record while importing (no record nears its limit)


def open_store(
    data_dir: str | os.PathLike[str],
    kind: StoreKind = "auto",
    fsync: FsyncMode = "batch",
    fsync_interval: float = 0.010,
    segment_bytes: int = SEGMENT_BYTES,
) -> Durable:
    """The durable store of ``data_dir``. ``auto``: the log, unless the directory holds only
    a SQLite store (``pigeon.sqlite3``, written by an earlier pigeon or restored from a
    backup), which is then used as it is. ``log`` on such a directory imports the SQLite
    store into a new log once (and renames the file ``pigeon.sqlite3.imported``);
    ``sqlite`` always uses SQLite.

    A data directory is always one of: a SQLite store; a log; a log made by a finished
    import (marked ``log/IMPORTED``) whose SQLite file may still wait to be renamed. An
    import is written under a mark (``log/IMPORTING``) that is removed only once the whole
    log is on disk: an import that is interrupted (killed, disk full) leaves the SQLite
    store as it was, its partial log is thrown away at the next start, and the import is
    done again. A directory holding both a log and a
    SQLite file the log was not made from is refused: one of them would be ignored.

    Raises:
        StoreCorrupted: the directory holds two stores, or a damaged one.
        StoreInUse: another broker has the directory open.
    """

    root = Path(data_dir)
    if kind not in ("auto", "log", "sqlite"):
        raise ValueError(f"store must be auto, log or sqlite, not {kind!r}")
    root.mkdir(parents=True, exist_ok=True)
    with holding_dir(root):  # the whole decision, and any import, under one lock
        sqlite_file = root / DB_NAME
        if (root / LOG_DIR / IMPORTING).exists():
            _discard_unfinished_import(root / LOG_DIR, sqlite_file)
        has_log = bool(list_segments(root / LOG_DIR))
        if has_log and sqlite_file.exists():
            if not (root / LOG_DIR / IMPORTED_MARK).exists():
                raise StoreCorrupted(
                    f"{root} holds both a log store ({root / LOG_DIR}) and a SQLite store "
                    f"({sqlite_file}) the log was not made from: starting would leave one's "
                    "messages behind; move one aside (or move its messages with pigeon backup "
                    "and a restore into an empty directory)"
                )
            _set_aside(sqlite_file)  # an import finished but stopped before this step
        if kind == "sqlite" or (kind == "auto" and not has_log and sqlite_file.exists()):
            if has_log:
                raise StoreCorrupted(
                    f"{root} holds a log store ({root / LOG_DIR}); starting on SQLite would "
                    "leave its messages behind: use --store log (or auto), or move the log aside"
                )
            return SQLiteStore(root, fsync, fsync_interval)
        if not has_log and sqlite_file.exists():
            _import(root, sqlite_file, segment_bytes)
        return LogStore(root, fsync, fsync_interval, segment_bytes)


def _discard_unfinished_import(log_dir: Path, sqlite_file: Path) -> None:
    if not sqlite_file.exists():
        raise StoreCorrupted(
            f"{log_dir} holds an import that did not finish, and {sqlite_file}, which it was "
            "made from, is gone: put the SQLite file back to import it again"
        )
    logger.warning("an earlier import from %s did not finish; importing again", sqlite_file)
    for _, path in list_segments(log_dir):
        path.unlink()
    # A crash after the import wrote its IMPORTED mark but before it removed IMPORTING
    # leaves both: the mark goes too, else it would vouch for whatever log is found here
    # later as "made from" the SQLite store (which would then be set aside). Removed
    # before IMPORTING, so a crash in between discards again at the next start.
    (log_dir / IMPORTED_MARK).unlink(missing_ok=True)
    (log_dir / IMPORTING).unlink()
    fsync_dir(log_dir)


def _import(root: Path, sqlite_file: Path, segment_bytes: int) -> None:
    """Write a log holding what the SQLite store in ``root`` holds, in chunks, under the
    ``IMPORTING`` mark; remove the mark once all of it is on disk; then rename the SQLite
    file."""

    log_dir = root / LOG_DIR
    old = SQLiteStore(root, "batch")
    try:
        queues = old.recover_queues()
        dedup = old.recover_dedup()
        taken = old.recover_taken()
        messages = list(old.recover())
    finally:
        old.close()
    log_dir.mkdir(exist_ok=True)
    _write_durably(log_dir / IMPORTING, f"{sqlite_file.name}\n")
    store = LogStore(root, "never", segment_bytes=segment_bytes)
    try:
        with store.atomic():
            for name, settings in queues.items():
                store.declared(name, settings)
            for name, ids in dedup.items():
                for dedup_id, until in ids.items():
                    store.deduped(name, dedup_id, until)
            for name, n in taken.items():
                store.taken(name, n)
        for start in range(0, len(messages), _IMPORT_CHUNK):
            with store.atomic():  # one record a chunk: the mark makes the whole atomic
                for queue, run in groupby(messages[start : start + _IMPORT_CHUNK], itemgetter(0)):
                    store.added_many(queue, [msg for _, msg in run])  # shared options once
            if (failure := store.unwritten()) is not None:
                raise StoreCorrupted(
                    f"could not write the imported messages to {store.path} "
                    f"({failure}); {sqlite_file} is unchanged "
                    "and the import is done again at the next start"
                )
    finally:
        store.close()  # fsyncs the last segment
    _write_durably(log_dir / IMPORTED_MARK, f"{sqlite_file.name}\n")
    (log_dir / IMPORTING).unlink()  # the one step that makes the log the store
    fsync_dir(log_dir)
    _set_aside(sqlite_file)
    logger.warning("imported %d message(s) from %s into %s; the SQLite file is kept as %s",
                len(messages), sqlite_file, log_dir, f"{sqlite_file}.imported")  # fmt: skip


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def _set_aside(sqlite_file: Path) -> None:
    """Rename an imported SQLite store (and its WAL) to ``*.imported``."""
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{sqlite_file}{suffix}")
        if src.exists():
            src.rename(f"{sqlite_file}.imported{suffix}")
    fsync_dir(sqlite_file.parent)
