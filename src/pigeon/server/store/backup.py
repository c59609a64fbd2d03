"""Copies of a data directory a broker may be writing, as one SQLite file: a log's state
(``backup_log``) or a SQLite store's (``backup_sqlite``); either restores by starting a
broker on it."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import zlib
from pathlib import Path

import msgspec

from pigeon.errors import StoreCorrupted
from pigeon.server.store.log import LOG_DIR
from pigeon.server.store.records import (
    FILE_HEADER_SIZE,
    PAD,
    RECORD_HEADER,
    Changes,
    Replayed,
    first_record,
    list_segments,
    read_segment,
    scan,
)
from pigeon.server.store.sqlite import DB_NAME, SharedAttrs, create_schema

__all__ = ["backup_log", "backup_sqlite"]


def backup_log(data_dir: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Write the state of the log in ``data_dir`` - every record complete when it is read -
    to ``target`` as a pigeon SQLite store (a single file any SQLite tool can read, and a
    broker can start on); returns the messages in the copy. Safe while a broker writes:
    segments are opened before they are read (one reclaimed meanwhile was copied forward
    first), and a record still being written is left out, as are damaged ones."""
    log_dir = Path(data_dir) / LOG_DIR
    segments = list_segments(log_dir)
    if not segments:
        raise StoreCorrupted(f"{log_dir} holds no log: is {data_dir} a pigeon data directory?")
    files = []
    newest = -1
    while segments:
        for seg, path in segments:
            with contextlib.suppress(FileNotFoundError):  # reclaimed after it was listed:
                files.append((seg, path, open(path, "rb")))  # noqa: SIM115 - closed below
            newest = max(newest, seg)
        # what a reclaimed segment held was written forward first - possibly into a
        # segment begun after the listing: open those too, until no newer one appears
        segments = [(seg, path) for seg, path in list_segments(log_dir) if seg > newest]
    state = Replayed()
    decode = msgspec.msgpack.Decoder().decode
    try:
        for k, (seg, path, f) in enumerate(files):
            data = f.read()
            if k == len(files) - 1 and len(data) < FILE_HEADER_SIZE:
                break  # a segment being begun as the copy is made: nothing in it yet
            salt = read_segment(path, data)
            changes = Changes()
            for off, end, valid in scan(data, first_record(data, salt), salt):
                body = data[off + RECORD_HEADER.size : end]
                if valid and body[:1] != PAD:
                    whole = changes.feed(decode(body), off)
                    if whole is not None:
                        state.apply(seg, whole)
    finally:
        for _, _, f in files:
            f.close()
    messages = state.messages()
    Path(target).unlink(missing_ok=True)
    db = sqlite3.connect(target)
    try:
        create_schema(db)
        with db:
            shared = SharedAttrs(1)  # what messages share, once (as the broker's store does)
            rows, shares = [], []
            for q, m in messages:
                sid = None
                if m.origin or m.reason or m.extra is not None:
                    sid, blob = shared.number(m)
                    if blob is not None:
                        shares.append((sid, blob))
                rows.append((m.id, q, m.payload, zlib.crc32(m.payload), m.deliveries, sid))
            db.executemany("INSERT INTO shared VALUES (?, ?)", shares)
            db.executemany(
                "INSERT INTO messages (id, queue, payload, crc, deliveries, attrs) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.executemany(
                "INSERT INTO dedup VALUES (?, ?, ?)",
                [(q, d, until) for q, ids in state.dedup_ids().items() for d, until in ids.items()],
            )
            db.executemany(
                "INSERT INTO queues VALUES (?, ?)",
                [(name, json.dumps(s, sort_keys=True)) for name, s in state.queues.items()],
            )
            db.executemany("INSERT INTO tasks VALUES (?, ?)", list(state.taken().items()))
    finally:
        db.close()
    return len(messages)


StoreKind = str  # "auto" | "log" | "sqlite"


def backup_sqlite(data_dir: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Copy the store in ``data_dir`` to ``target`` while a broker may be writing it
    (SQLite's online backup: one committed state); returns the messages in the copy."""
    source = Path(data_dir) / DB_NAME
    if not source.exists():
        raise StoreCorrupted(f"{source} does not exist: is {data_dir} a pigeon data directory?")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        count: int = dst.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        dst.close()
        src.close()
    return count
