"""The log store's record format and its replay: what a segment holds, how a record is
framed and checked, and the state a sequence of records describes. Shared by the store
(``log.py``), its backup (``backup.py``) and the import (``__init__``); nothing here
writes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from pigeon.errors import StoreCorrupted
from pigeon.server.core import Extra, Stored

log = logging.getLogger("pigeon.store")

FILE_MAGIC = b"PIGEON LOG v1\n\0\0"  # a segment's first 16 bytes
# A segment's header: the magic, then a random 32-bit salt that seeds the CRC of each of its
# records (a record hidden inside a payload cannot pass for one of the log's own, should
# recovery ever look for the next record after damage), then crc32 of the magic and salt
# (0 in segments written before it existed: not checked), then zeros. A damaged salt would
# make every record of the segment fail its check - for the last segment, silently, as a
# torn tail - so it is checked, and a single flipped bit is mended from the CRC.
FILE_HEADER = struct.Struct("<16sII8x")
FILE_HEADER_SIZE = FILE_HEADER.size  # 32
# In the header's last 8 bytes (zeros: none): where the segment's records begin once the
# dead ones before were punched out of the file on a full disk (they read back as zeros),
# and the crc32 of that offset, salted. Written and fdatasynced before the punch.
HOLE = struct.Struct("<II")
HOLE_AT = 24
MAGIC = b"PgR1"
# A record's header: magic, body length, crc32(body, salt), and crc32 of the two before it
# (salted too): a stretch of bytes that merely starts with the magic is told from a record
# by 8 bytes, without reading the length it claims - recovery after damage stays linear.
RECORD_HEADER = struct.Struct("<4sIII")
CHECKED = struct.Struct("<II")


def record_header(body: bytes, salt: int) -> bytes:
    crc = zlib.crc32(body, salt)
    return RECORD_HEADER.pack(MAGIC, len(body), crc, zlib.crc32(CHECKED.pack(len(body), crc), salt))


PAD = b"\xc0"  # a body starting with msgpack nil is padding: skipped

# Operations (the first item of each msgpack list in a record's body).
ADDS = 0  # [0, queue, first_id, [payload, ...]]: fresh messages, consecutive ids
ADD = 1  # [1, id, queue, payload, deliveries, origin, reason, extra?]: any message, as it
# is (read only: MSGS writes these now)
DEL = 2  # [2, [id, ...]]: gone for good (acked, purged, deleted)
MOVE = 3  # [3, id, queue, deliveries, origin, reason, extra?]: to another queue (read only)
REQUEUED = 4  # [4, id, deliveries, due?]: handed back after this many deliveries; due: not
# to be delivered before then (a NACK's delay, wall clock; 0 or absent: at once)
DECLARE = 5  # [5, queue, settings or None]
SETTINGS = 6  # [6, {queue: settings}, {queue: {dedup id: until}}?]: every queue's settings
# and dedup ids, once the first record of every segment (read only: a snapshot that grew
# with the ids and was rewritten at every segment; settings and ids are written forward
# like messages now)
PART = 7  # [7]: first op of a record that is not the last of its change (see _write)
DEDUP = 8  # [8, queue, dedup id, until]: the queue remembers the id until then (wall clock)
MSGS = 9  # [9, queue, origin, reason, [extra, ...], [[id, payload?, deliveries, k], ...]]:
# messages in ``queue`` that share an origin and reason, each with extra number k of the
# op's table (-1: none) - what one request shares (a batch's options, a NACK's reason) is
# written once, and shared again when it is read. A nil payload: a message already in the
# log, moved here (a dead letter); else a message added as it is.
DELIVERED = 10  # [10, [id, ...]]: each handed out once more (a GET with manual ack)
TASKS = 11  # [11, queue, n]: the queue's tasks taken (acked) and not yet marked done are
# now n - its unfinished count beyond the messages it holds (absolute: the last one wins;
# 0 or none, as in logs written before it: none)

# A live message: (segment number, queue, message).
Entry = tuple[int, str, Stored]


class Replayed:
    """The state a log describes: what replaying its segments in order gives, and the
    segment each live part of it was last written to (compaction writes forward what is
    live in the oldest segment: messages, queue settings, dedup ids)."""

    def __init__(self) -> None:
        self.live: dict[int, Entry] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.queue_seg: dict[str, int] = {}
        self.dedup: dict[str, dict[str, tuple[float, int]]] = {}  # queue -> id -> (until, seg)
        self.tasks: dict[str, tuple[int, int]] = {}  # queue -> (tasks taken, not done; seg)
        self.bad_records = 0
        self.bad_bytes = 0

    def dedup_ids(self) -> dict[str, dict[str, float]]:
        return {q: {d: v[0] for d, v in ids.items()} for q, ids in self.dedup.items()}

    def taken(self) -> dict[str, int]:
        return {q: v[0] for q, v in self.tasks.items()}

    def apply(self, seg: int, ops: list[Any]) -> None:
        live = self.live
        for op in ops:
            kind = op[0]
            if kind == ADDS:
                _, queue, first, payloads = op
                for i, payload in enumerate(payloads, first):
                    live[i] = (seg, queue, Stored(i, payload))
            elif kind == MSGS:
                self._msgs(seg, op)
            elif kind == DEL:
                pop = live.pop
                for mid in op[1]:
                    pop(mid, None)
            elif kind == DELIVERED:
                for mid in op[1]:
                    entry = live.get(mid)
                    if entry is not None:
                        entry[2].deliveries += 1
            elif kind == REQUEUED:
                entry = live.get(op[1])
                if entry is not None:
                    msg = entry[2]
                    msg.deliveries = op[2]
                    if len(op) > 3:
                        msg.extra = with_due(msg.extra, op[3])
            elif kind == ADD:
                _, mid, queue, payload, deliveries, origin, reason, *more = op
                extra = extra_of(more)
                msg = Stored(mid, payload, deliveries, 0.0, origin, reason, extra)
                live[mid] = (seg, queue, msg)
            elif kind == MOVE:
                _, mid, queue, deliveries, origin, reason, *more = op
                entry = live.get(mid)
                if entry is not None:
                    msg = entry[2]
                    msg.deliveries, msg.origin, msg.reason = deliveries, origin, reason
                    msg.extra = extra_of(more)
                    live[mid] = (entry[0], queue, msg)
            elif kind == DECLARE:
                if op[2] is None:
                    self.queues.pop(op[1], None)
                    self.queue_seg.pop(op[1], None)
                    self.dedup.pop(op[1], None)
                    self.tasks.pop(op[1], None)
                else:
                    self.queues[op[1]] = op[2]
                    self.queue_seg[op[1]] = seg
            elif kind == DEDUP:
                self.dedup.setdefault(op[1], {})[op[2]] = (op[3], seg)
            elif kind == TASKS:
                if op[2]:
                    self.tasks[op[1]] = (op[2], seg)
                else:
                    self.tasks.pop(op[1], None)
            elif kind == SETTINGS:
                self.queues = dict(op[1])
                self.queue_seg = dict.fromkeys(self.queues, seg)
                if len(op) > 2:
                    self.dedup = {
                        q: {d: (until, seg) for d, until in ids.items()} for q, ids in op[2].items()
                    }
            else:
                raise ValueError(f"unknown operation {kind!r}")

    def _msgs(self, seg: int, op: list[Any]) -> None:
        _, queue, origin, reason, table, entries = op
        extras = [msgspec.convert(x, Extra) for x in table]
        live = self.live
        for mid, payload, deliveries, k in entries:
            extra = extras[k] if k >= 0 else None
            if payload is not None:
                msg = Stored(mid, payload, deliveries, 0.0, origin, reason, extra)
                live[mid] = (seg, queue, msg)
                continue
            entry = live.get(mid)
            if entry is not None:  # moved here
                msg = entry[2]
                msg.deliveries, msg.origin, msg.reason = deliveries, origin, reason
                msg.extra = extra
                live[mid] = (entry[0], queue, msg)

    def messages(self) -> list[tuple[str, Stored]]:
        return oldest_first(self.live)


def extra_of(more: list[Any]) -> Extra | None:
    """The Extra of an ADD or MOVE op (None for a plain message)."""
    return msgspec.convert(more[0], Extra) if more and more[0] is not None else None


def with_due(extra: Extra | None, due: float) -> Extra | None:
    """``extra`` not to be delivered before ``due`` (a new Extra: they are shared)."""
    if extra is None:
        return Extra(0, due) if due else None
    return Extra(extra.priority, due, extra.expires, extra.headers)


def extra_bytes(msg: Stored) -> int:
    """What a message's origin, reason and options add, at most, to a copy of it in the
    log (a copy written with others that share them takes less)."""
    n = len(msg.origin) + len(msg.reason)
    if msg.extra is not None:
        n += 32 + sum(len(k) + len(v) + 4 for k, v in (msg.extra.headers or {}).items())
    return n


MSGS_BYTES = 64 * 2**20  # payload bytes in one MSGS op at most (a change is split by op)


def msgs_ops(items: list[tuple[str, Stored]], payloads: bool) -> list[list[Any]]:
    """MSGS ops for ``items`` (queue, message), in order: one op per run of messages that
    share a queue, an origin and a reason (and hold at most ``MSGS_BYTES`` of payload, so
    a change can still be split into records), each op's extras written once however many
    of its messages share them (the same object, or the same priority, times and headers
    object). ``payloads`` False: the messages are in the log already (a move)."""
    ops: list[list[Any]] = []
    key: tuple[str, str, str] | None = None
    index: dict[tuple[int, float, float, int], int] = {}
    table: list[Extra] = []
    entries: list[list[Any]] = []
    size = 0
    for queue, m in items:
        if key != (queue, m.origin, m.reason) or size > MSGS_BYTES:
            key = (queue, m.origin, m.reason)
            index, table, entries, size = {}, [], [], 0
            ops.append([MSGS, queue, m.origin, m.reason, table, entries])
        if payloads:
            size += len(m.payload)
        e = m.extra
        if e is None:
            k = -1
        else:
            shared = (e.priority, e.due, e.expires, id(e.headers))
            k = index.get(shared, -1)
            if k < 0:
                k = index[shared] = len(table)
                table.append(e)  # (holds its headers: their id stays theirs meanwhile)
        entries.append([m.id, m.payload if payloads else None, m.deliveries, k])
    return ops


def oldest_first(live: dict[int, Entry]) -> list[tuple[str, Stored]]:
    """Live messages, smallest id first (insertion order, unless some were written
    forward or ids started again after a restart that found nothing live)."""
    ids = list(live)
    if any(a > b for a, b in itertools.pairwise(ids)):
        ids.sort()
    return [(e[1], e[2]) for e in map(live.__getitem__, ids)]


def list_segments(log_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in log_dir.glob("*.seg"):
        with contextlib.suppress(ValueError):
            out.append((int(p.stem), p))
    return sorted(out)


class Changes:
    """Puts a change written as several records (``PART``) back together: ``feed`` gives
    the ops to apply once a change is whole, None while it is not."""

    def __init__(self) -> None:
        self.partial: list[Any] = []
        self.since = -1  # offset of the first record of an unfinished change

    def feed(self, ops: list[Any], off: int) -> list[Any] | None:
        if ops and ops[0] == [PART]:
            if not self.partial:
                self.since = off
            self.partial += ops[1:]
            return None
        if self.partial:
            ops, self.partial = self.partial + ops, []
        return ops


def scan(data: bytes, start: int, salt: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, end, valid) for each record from ``start``; invalid stretches (bytes that
    are no record, or a record whose checksum fails) are one item each, up to the next
    valid record or the end."""
    n = len(data)
    off = start
    hsize = RECORD_HEADER.size
    unpack = RECORD_HEADER.unpack_from
    checked = CHECKED.pack
    crc32 = zlib.crc32
    view = memoryview(data)
    while off < n:
        if off + hsize <= n:
            magic, length, crc, hcrc = unpack(data, off)
            end = off + hsize + length
            if (
                magic == MAGIC
                and crc32(checked(length, crc), salt) == hcrc
                and end <= n
                and crc32(view[off + hsize : end], salt) == crc
            ):
                yield off, end, True
                off = end
                continue
        # Not a record here: find the next offset where a valid one starts.
        nxt = off
        while True:
            nxt = data.find(MAGIC, nxt + 1)
            if nxt < 0:
                yield off, n, False
                return
            if nxt + hsize <= n:
                magic, length, crc, hcrc = unpack(data, nxt)
                end = nxt + hsize + length
                if (
                    crc32(checked(length, crc), salt) == hcrc
                    and end <= n
                    and crc32(view[nxt + hsize : end], salt) == crc
                ):
                    break
        yield off, nxt, False
        off = nxt


def whole_record(data: bytes, off: int, salt: int) -> int | None:
    """The end of the record at ``off`` if its header checks out and all the length it
    claims is there (its body's checksum aside), else None: a record that fails its body
    checksum is then damage, not a write a crash cut short."""
    if off + RECORD_HEADER.size > len(data):
        return None
    magic, length, crc, hcrc = RECORD_HEADER.unpack_from(data, off)
    end: int = off + RECORD_HEADER.size + length
    if magic != MAGIC or zlib.crc32(CHECKED.pack(length, crc), salt) != hcrc or end > len(data):
        return None
    return end


def hole_mark(end: int, salt: int) -> bytes:
    """The header's note that the records of a segment begin at ``end`` (see ``HOLE``)."""
    return HOLE.pack(end, zlib.crc32(end.to_bytes(4, "little"), salt))


def first_record(data: bytes, salt: int) -> int:
    """Where a segment's records begin: after its header, or after the hole its header
    notes (``HOLE``). A note that fails its checksum is ignored: what follows is read as
    damage, never skipped unchecked."""
    end, crc = HOLE.unpack_from(data, HOLE_AT)
    if FILE_HEADER_SIZE < end <= len(data) and crc == zlib.crc32(end.to_bytes(4, "little"), salt):
        return int(end)
    return FILE_HEADER_SIZE


def read_segment(path: Path, data: bytes) -> int:
    """The segment's salt, once its header is checked."""
    if len(data) < FILE_HEADER_SIZE or data[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise StoreCorrupted(
            f"{path} cannot be read as a pigeon log segment (it does not start with "
            f"{FILE_MAGIC[:13]!r}); move it aside to start without it, or restore the "
            "data directory from a backup"
        )
    _, salt, crc = FILE_HEADER.unpack_from(data)
    if crc == 0 or crc == salt_crc(salt):
        return int(salt)
    for bit in range(32):  # one flipped bit in the salt: the CRC says which
        if salt_crc(salt ^ (1 << bit)) == crc:
            log.error("%s: its header's salt had a damaged bit, mended from its checksum",
                      path)  # fmt: skip
            return int(salt ^ (1 << bit))
    if any(salt_crc(salt) == crc ^ (1 << bit) for bit in range(32)):
        return int(salt)  # the damaged bit is in the checksum itself
    raise StoreCorrupted(
        f"{path}: its header is damaged (the salt its records are checked with fails its "
        "checksum), so none of its records can be trusted; move it aside to start without "
        "it (its messages are lost), or restore the data directory from a backup"
    )


def salt_crc(salt: int) -> int:
    return zlib.crc32(SALT.pack(FILE_MAGIC, salt)) or 1  # never 0: that means "unchecked"


SALT = struct.Struct("<16sI")


def truncate(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes, durably."""
    with open(path, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
