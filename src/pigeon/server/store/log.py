"""The default durable store: an append-only log of checksummed records.

# Strategy:
# Every change the broker makes (puts, acks, dead letters, requeues, queue settings) while
# it handles what one read brought (``flush``, called by the server), or in one turn of
# its event loop (timers), becomes one record, written with one ``pwritev`` before the
# replies that depend on it go out - the shape of Redis's AOF, Kafka's log and NATS
# JetStream's file store. A record is ``MAGIC | length | crc32 | header crc32 | body``,
# the body a msgpack list of operations, the CRCs seeded with a random salt of the
# segment; a record is the unit of atomicity: recovery applies all of it or none of it.
#
#   --fsync batch   confirm once the record is in the operating system (it survives
#                   kill -9 of the broker); a syncer thread fdatasyncs the log at most
#                   ``fsync_interval`` (10 ms) after the first unsynced write.
#   --fsync always  the syncer fdatasyncs, then confirms: writes that arrive during one
#                   fdatasync share the next one (group commit). Survives power loss.
#   --fsync never   confirm before writing; the OS writes the log back when it likes.
#
# The log is a directory of segments (``log/0000000000000001.seg``...), each opened by a
# file header and, from the second on, a snapshot of every queue's settings. A segment
# is closed (fsynced) at ``segment_bytes`` and a new one begun. The store counts the live
# messages of each segment (it keeps a reference to each live ``Stored``: the broker's
# own objects, not copies). Space is reclaimed from the oldest segment only: once it
# holds no live message it is deleted; once the log is more than twice the size of what
# is live, its live messages are written again at the end (their current state, in one
# record, fsynced) and then it is deleted. Only the oldest, so that every record still
# on disk is newer than the add it refers to: replaying the remaining segments in order
# gives the same state.
#
# Recovery replays every segment. A torn tail of the last segment (a write cut short by
# a crash: never confirmed) is cut off. A record that fails its checksum, or bytes that
# are no record, elsewhere are copied to ``log/quarantine/``, reported, and overwritten
# with a padding record, so they are reported once; the messages they held are not
# delivered. A busy or failing disk (ENOSPC, EIO) does not stop the broker: a write that
# fails is retried with backoff at the same offset, the changes kept, and ``stalled_for``
# tells the broker to refuse new puts meanwhile.
#
# A full disk that the broker filled itself would keep it stuck: acks are changes too, so
# consumers could not drain the queues to make room. The store therefore holds a reserve
# (``log/reserve``, ``reserve_bytes``, allocated at open). A write refused with ENOSPC
# lets go of the reserve and is made again at once; from then on the store says
# ``disk_full`` and the broker refuses new puts while gets, acks and compaction go on. Once
# the disk has room for twice the reserve again (checked every second), the reserve is
# taken back and puts are accepted.
#
# Settles write records too, and a whole segment may take more of them to empty than the
# reserve holds (review 7b #2). So while the disk is full the store punches the oldest
# segment's dead prefix out of the file as acks make it dead (``_punch``: the header notes
# where records begin, fdatasynced, then fallocate PUNCH_HOLE), and the broker refuses
# GETs once the room left is what settling the messages out needs (``no_room_to_deliver``):
# a delivery and its NACK free nothing, and an ack of a message smaller than its record
# frees less than it takes, so the store never meets ENOSPC with no reserve left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from itertools import repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import msgspec

from pigeon._native import load_c_path
from pigeon.errors import StoreCorrupted
from pigeon.server.core import NO_TRANSACTION, Stored
from pigeon.server.store.durable import Durable, FsyncFailed, FsyncMode, NativeSyncer
from pigeon.server.store.records import (
    ADD,
    ADDS,
    DECLARE,
    DEDUP,
    DEL,
    DELIVERED,
    FILE_HEADER,
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    HOLE_AT,
    MOVE,
    MSGS,
    PAD,
    PART,
    RECORD_HEADER,
    REQUEUED,
    TASKS,
    Changes,
    Replayed,
    extra_bytes,
    first_record,
    fsync_dir,
    hole_mark,
    list_segments,
    msgs_ops,
    oldest_first,
    read_segment,
    record_header,
    salt_crc,
    scan,
    truncate,
    whole_record,
)

__all__ = ["LOG_DIR", "LogStore"]

log = logging.getLogger("pigeon.store")

LOG_DIR = "log"
SEGMENT_BYTES = 64 * 2**20
# Of the disk, held for settles once it is full (at most a segment): an ACK's record is
# ~30 bytes, so this is room for some 100,000 settles, and for segments to be begun.
RESERVE_BYTES = 4 * 2**20
RESERVE_NAME = "reserve"
_SPACE_CHECK = 1.0  # seconds between looks at the disk's free space while it is full
# While the disk is full: a GET is refused once the room left is under a quarter of the
# reserve plus this much per message out (what settling each takes: an ACK, a NACK, a dead
# letter), so what is out can always be settled and the store never meets ENOSPC with no
# reserve left (a write retried for ever, every ack behind it).
_SETTLE_BYTES = 64
# While the disk is full, every this many batches, the dead prefix of the oldest segment
# is punched out of the file (``_punch``), once it is at least _PUNCH_MIN bytes; a turn
# reads at most _PUNCH_SCAN bytes of it.
_PUNCH_EVERY = 256
_PUNCH_MIN = 16 * 1024
_PUNCH_SCAN = 4 * 2**20
# Below this much free space (or 4 segments, if more) the store looks at the disk's room
# before each large put; above it, never.
_ROOM_LOW = 64 * 2**20
_PUT_OVERHEAD = 64  # bytes of record per message, beside its payload (an estimate)
_FORWARD_CHUNK = 4096  # live entries written forward per turn of the loop
_FORWARD_BYTES = 64 * 2**20  # ... and bytes at most (then the next turn)
_FORWARD_MIN = 4096  # a full disk: no chunk forward while less than this fits (see _forward)
_FORGET_PER_TURN = 65_536  # expired dedup ids forgotten per turn of the loop
_DROPS_PER_TURN = 64  # empty segments deleted per turn of the loop (then one directory fsync)
# What a live message costs when it is written forward, beyond its payload, queue name,
# origin and reason: the ADD op's msgpack framing (at most 36 bytes) and its share of a
# record header. Compaction's trigger counts this, so it never undercounts what a copy of
# the live set takes (else it would copy the live set again and again).
_ENTRY_OVERHEAD = 40
# The parts of a live entry (segment, queue, message), and a message's payload: for map.
_segment, _queue, _message = itemgetter(0), itemgetter(1), itemgetter(2)
_payload = attrgetter("payload")
# What writing a queue's settings or a dedup id forward takes beyond their encoding (a
# DEDUP op's framing and float: 14 bytes; a share of a record header).
_STATE_OVERHEAD = 24
# Keys of what is live in a segment: a message id, (queue,) for a queue's settings,
# (queue, dedup id) for a dedup id, (queue, None) for its tasks taken and not yet done.
_State = tuple[str] | tuple[str, str] | tuple[str, None]
_Key = int | _State
_BULK = 8  # from this many messages a put or an ack is recorded with map, not one by one
_MAX_RETRY_DELAY = 0.25
# A change larger than this is written as several records, applied together at recovery
# (a record's length field is 32 bits; a change - a move of a large queue - is not bounded).
_MAX_RECORD = 256 * 2**20


def _cut_torn_tail(path: Path, data: bytes, at: int) -> bytes:
    log.warning("%s: cut off %d byte(s) of a write a crash left unfinished (never confirmed)",
                path, len(data) - at)  # fmt: skip
    truncate(path, at)
    return data[:at]


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_fallocate: Any = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(2) PUNCH_HOLE | KEEP_SIZE: the bytes read back as zeros and the blocks
    wholly inside are freed; the file keeps its size."""
    global _fallocate
    if _fallocate is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if fn is None:
            raise OSError(errno.ENOSYS, "fallocate is not available")
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _dedup_size(queue: str, dedup_id: str) -> int:
    """What writing a dedup id forward takes."""
    return len(queue.encode()) + len(dedup_id.encode()) + _STATE_OVERHEAD


def _tasks_size(queue: str) -> int:
    """What writing a queue's tasks taken and not yet done forward takes."""
    return len(queue.encode()) + _STATE_OVERHEAD


class LogStore(Durable):
    """A ``Store`` that appends every change to ``DATA_DIR/log/*.seg``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: FsyncMode = "batch",
        fsync_interval: float = 0.010,
        segment_bytes: int = SEGMENT_BYTES,
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        super().__init__(fsync, fsync_interval)
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be 0 (none) or more, not {reserve_bytes}")
        self.reserve_bytes = min(reserve_bytes, segment_bytes)
        self._space_timer: Any = None
        self._room = 0  # bytes free on the disk at the last look, less what was written since
        self._room_at = -1.0  # time.monotonic() of that look
        self._maintain_said = -60.0  # when a housekeeping failure was last logged
        self._punch_at = 0  # the batch from which a full disk punches dead prefixes again
        self._can_punch = True  # False once the filesystem said it cannot punch holes
        # (segment, offset): a queue's settings, dedup id or tasks were written again at
        # that offset of that segment by ``_punch`` (what is before it there is stale)
        self._restated: dict[_State, tuple[int, int]] = {}
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, not {segment_bytes}")
        self.dir = Path(data_dir)
        self.path = self.dir / LOG_DIR
        self.path.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self._depth = 0  # inside atomic(): write when the outermost block ends
        self._fd = -1  # the active segment's (switched under _fsync_lock: not mid-fsync)
        self._synced = (0, 0)  # (segment, size) the loop's thread last fdatasynced
        self._thread = threading.Thread(target=self._syncer, name="pigeon-log-sync", daemon=True)
        self.compactions = 0
        # what is live in the oldest segment and left to write forward: message ids,
        # (queue,) for a queue's settings, (queue, dedup id) for a dedup id
        self._forwarding: list[_Key] | None = None
        self._open_holding(self.dir, self._open_log)

    def _open_log(self) -> None:
        started = time.perf_counter()
        state = self._recover_files()
        self._live = state.live
        self._queues = state.queues  # name -> settings
        self._queue_seg = state.queue_seg  # name -> the segment its settings were written to
        self._dedup = state.dedup  # queue -> dedup id -> (until, segment)
        self._tasks = state.tasks  # queue -> (tasks taken and not yet done, segment)
        # the TASKS op of each queue waiting to be written with batch _tasks_batch + 1: a
        # later count for the queue in that batch updates it (the last value is what counts)
        self._tasks_ops: dict[str, list[Any]] = {}
        self._tasks_batch = -1
        self.recovery_seconds = time.perf_counter() - started
        # Live entries per segment (messages, queue settings, dedup ids): a segment with
        # none is deleted; the oldest one's are written forward once the log is over twice
        # the size of what is live (``_live_bytes``: what writing all of it forward takes).
        self._seg_live: dict[int, int] = dict.fromkeys(self._sizes, 0)
        self._live_bytes = 0
        self._extra: dict[int, int] = {}  # id -> origin + reason bytes, for dead letters
        for seg, queue, msg in self._live.values():
            self._seg_live[seg] += 1
            self._live_bytes += len(msg.payload) + len(queue) + _ENTRY_OVERHEAD
            if msg.origin or msg.reason or msg.extra is not None:
                self._extra[msg.id] = n = extra_bytes(msg)
                self._live_bytes += n
        for name, seg in self._queue_seg.items():
            self._seg_live[seg] += 1
            self._live_bytes += self._settings_size(name, self._queues[name])
        for name, (_, seg) in self._tasks.items():
            self._seg_live[seg] += 1
            self._live_bytes += _tasks_size(name)
        # dedup ids by the time their window ends, to forget them then (lazily deleted:
        # an entry whose id was deleted or remembered again since is skipped)
        self._dedup_heap: list[tuple[float, str, str]] = []
        now = time.time()
        for queue, ids in list(self._dedup.items()):
            for dedup_id, (until, seg) in list(ids.items()):
                if until <= now:
                    del ids[dedup_id]
                    continue
                self._seg_live[seg] += 1
                self._live_bytes += _dedup_size(queue, dedup_id)
                self._dedup_heap.append((until, queue, dedup_id))
            if not ids:
                del self._dedup[queue]
        heapq.heapify(self._dedup_heap)
        self._maintaining = False  # a turn of housekeeping is scheduled
        self._open_active()
        if not self._take_reserve():
            self.disk_full = self._full_why()
            log.error("store %s: %s", self.path, self.disk_full)
        self._look_at_room()
        log.info("recovered %d message(s) from %s in %.3f s", len(self._live), self.path,
                 self.recovery_seconds)  # fmt: skip

    # --- opening and recovery -------------------------------------------------------------

    def _recover_files(self) -> Replayed:
        state = Replayed()
        self._sizes: dict[int, int] = {}
        self._salts: dict[int, int] = {}
        self._holes: dict[int, int] = {}  # where each segment's records begin (see _punch)
        segments = list_segments(self.path)
        decode = msgspec.msgpack.Decoder().decode
        for k, (seg, path) in enumerate(segments):
            last = k == len(segments) - 1
            data = path.read_bytes()
            if last and len(data) < FILE_HEADER_SIZE and FILE_MAGIC.startswith(data[:16]):
                path.unlink()  # created, its header never written: nothing in it
                continue
            salt = self._salts[seg] = read_segment(path, data)
            good_end = self._holes[seg] = first_record(data, salt)
            changes = Changes()
            for off, end, valid in scan(data, good_end, salt):
                body = data[off + RECORD_HEADER.size : end]
                if valid:
                    good_end = end
                    if body[:1] == PAD:
                        continue
                    try:
                        whole = changes.feed(decode(body), off)
                        if whole is not None:
                            state.apply(seg, whole)
                    except (msgspec.DecodeError, ValueError, TypeError) as exc:
                        raise StoreCorrupted(
                            f"{path} holds a record pigeon cannot read at offset {off} "
                            f"({exc}); if a newer pigeon wrote it, run that one; else move "
                            "the segment aside (its messages are lost) or restore a backup"
                        ) from exc
                    continue
                if last and end == len(data):
                    rec_end = whole_record(data, off, salt)
                    if rec_end is None:  # a torn tail: a write a crash cut short
                        data = _cut_torn_tail(path, data, off)
                        break
                    # A whole record (its header checks out, its length fits) whose body
                    # fails its checksum: a confirmed record may have rotted - kept in
                    # quarantine and reported like damage anywhere else; what follows it,
                    # if anything, is a torn tail.
                    if rec_end < end:
                        data = _cut_torn_tail(path, data, rec_end)
                    end = rec_end
                self._quarantine(path, data, off, end, salt)
                state.bad_records += 1
                state.bad_bytes += end - off
                good_end = end
            if changes.partial:  # the first records of a change whose last never came
                log.warning("%s: dropped the unfinished %d-op change from offset %d (a crash "
                            "cut it short: never confirmed)", path, len(changes.partial),
                            changes.since)  # fmt: skip
                if last:  # nothing may follow it and join it at the next start
                    truncate(path, changes.since)
                    data = data[: changes.since]
                    good_end = min(good_end, changes.since)
            self._sizes[seg] = max(good_end, len(data))
        if state.bad_records:
            self.quarantined = state.bad_records
            log.error(
                "%s: %d damaged record(s) (%d bytes) failed their checksum; copied to %s and "
                "not delivered",
                self.path, state.bad_records, state.bad_bytes, self.path / "quarantine",
            )  # fmt: skip
        return state

    def _quarantine(self, path: Path, data: bytes, off: int, end: int, salt: int) -> None:
        """Keep a copy of damaged bytes, then overwrite them with padding (when there is
        room for a record header) so the next start does not report them again."""
        qdir = self.path / "quarantine"
        qdir.mkdir(exist_ok=True)
        (qdir / f"{path.stem}-{off}.bad").write_bytes(data[off:end])
        size = end - off - RECORD_HEADER.size
        if size >= 1:
            body = PAD + bytes(size - 1)
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(record_header(body, salt) + body)
                os.fsync(f.fileno())

    def _open_active(self) -> None:
        if self._sizes:
            seg = max(self._sizes)
            path = self._segment_path(seg)
            self._fd = os.open(path, os.O_RDWR)
            self._active = seg
        else:
            self._new_segment(1)

    def _segment_path(self, seg: int) -> Path:
        return self.path / f"{seg:016d}.seg"

    def _new_segment(self, seg: int) -> None:
        """Begin segment ``seg``: its file header, fsynced with the directory entry before
        anything is written to it. (Nothing else: what is live in older segments - queue
        settings and dedup ids too - stays where it is until it is written forward.)"""
        path = self._segment_path(seg)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        salt = int.from_bytes(os.urandom(4), "little")
        data = FILE_HEADER.pack(FILE_MAGIC, salt, salt_crc(salt))
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with self._fsync_lock:  # not while the syncer fsyncs
            old, self._fd = self._fd, fd
            if self._native is not None:
                self._native.set_fd(fd)
            if old >= 0:
                os.close(old)
        self._active = seg
        self._synced = (seg, len(data))
        self._salts[seg] = salt
        self._sizes[seg] = len(data)
        self._holes[seg] = FILE_HEADER_SIZE
        self._seg_live[seg] = 0

    def recover(self) -> Iterator[tuple[str, Stored]]:
        """Every live message, oldest first (replayed when the store was opened)."""
        return iter(oldest_first(self._live))

    def recover_queues(self) -> dict[str, dict[str, Any]]:
        return dict(self._queues)

    def recover_dedup(self) -> dict[str, dict[str, float]]:
        return {q: {d: v[0] for d, v in ids.items()} for q, ids in self._dedup.items()}

    def recover_taken(self) -> dict[str, int]:
        return {q: v[0] for q, v in self._tasks.items()}

    def _settings_size(self, name: str, settings: dict[str, Any]) -> int:
        """What writing a queue's settings forward takes."""
        return len(self._encode([DECLARE, name, settings])) + _STATE_OVERHEAD

    def attach(self, loop: Any) -> None:
        """Write in ``loop``'s thread, once per turn of the loop. Call before ``start``.
        Unattached, changes are written by the thread that makes them, at the end of
        each ``atomic`` block (or at once, outside one)."""
        self._loop = loop
        if self.disk_full is not None:
            self._watch_space()

    # --- the broker's notifications -------------------------------------------------------

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        # Attached to a loop, changes are written when the server has handled a read:
        # nothing to do around one request.
        return NO_TRANSACTION if self._loop is not None else self._inline()

    @contextlib.contextmanager
    def _inline(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._loop is None and self._ops:
                self._flush()

    def _add(self, op: list[Any], change: bool = True) -> None:
        """Write ``op`` with the next record. ``change`` False: no reply waits for it (a
        delivery counted)."""
        self._ops.append(op)
        self._changed(change)

    def _changed(self, change: bool = True) -> None:
        """Count what was just added to ``_ops`` and see that it is written."""
        if change:
            self.last_tag = self.batch + 1
            self.changes += 1
            self._pending_change = True
        if self._loop is not None:
            if not change:
                self._write_soon()  # with the next change, or within the interval
            elif not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)
        elif not self._depth:
            self._flush()

    def added(self, queue: str, msg: Stored) -> None:
        self.added_many(queue, [msg])

    def added_many(self, queue: str, msgs: list[Stored]) -> None:
        if not msgs:
            return
        live, seg = self._live, self._active
        first = next_id = msgs[0].id
        fresh = True  # consecutive ids, nothing but a payload: the short form
        size = (len(queue) + _ENTRY_OVERHEAD) * len(msgs)
        for m in msgs:
            live[m.id] = (seg, queue, m)
            size += len(m.payload)
            if m.id != next_id or m.deliveries or m.origin or m.reason or m.extra is not None:
                fresh = False
                if m.origin or m.reason or m.extra is not None:
                    self._extra[m.id] = n = extra_bytes(m)
                    size += n
            next_id += 1
        self._seg_live[seg] += len(msgs)
        self._live_bytes += size
        if fresh:
            self._add([ADDS, queue, first, [m.payload for m in msgs]])
            return
        for op in msgs_ops([(queue, m) for m in msgs], payloads=True):
            self._add(op)  # a batch's options once, however many messages share them

    def added_plain(self, queue: str, msgs: list[Stored]) -> None:
        # added_many's short form, in bulk: consecutive ids, nothing but payloads
        if len(msgs) == 1:  # a single put: the same, without the loops
            (m,) = msgs
            seg, mid = self._active, m.id
            self._live[mid] = (seg, queue, m)
            self._seg_live[seg] += 1
            self._live_bytes += len(m.payload) + len(queue) + _ENTRY_OVERHEAD
            self._add([ADDS, queue, mid, [m.payload]])
            return
        if len(msgs) < _BULK:
            self.added_many(queue, msgs)
            return
        seg, first, k = self._active, msgs[0].id, len(msgs)
        entries = zip(repeat(seg, k), repeat(queue, k), msgs, strict=True)
        self._live.update(zip(range(first, first + k), entries, strict=True))
        payloads = list(map(_payload, msgs))
        self._seg_live[seg] += k
        self._live_bytes += sum(map(len, payloads)) + (len(queue) + _ENTRY_OVERHEAD) * k
        self._add([ADDS, queue, first, payloads])

    def removed(self, queue: str, msg_id: int) -> None:
        self.removed_many(queue, [msg_id])

    def removed_many(self, queue: str, msg_ids: list[int]) -> None:
        if len(msg_ids) < _BULK:
            self._removed_each(msg_ids)
        else:
            self._removed_bulk(msg_ids)
        self._add([DEL, list(msg_ids)])

    def _removed_each(self, msg_ids: list[int]) -> None:
        pop, seg_live, extra = self._live.pop, self._seg_live, self._extra
        size = 0
        for mid in msg_ids:
            entry = pop(mid, None)
            if entry is not None:
                seg_live[entry[0]] -= 1
                size += len(entry[2].payload) + len(entry[1]) + _ENTRY_OVERHEAD
                if extra:
                    size += extra.pop(mid, 0)
        self._live_bytes -= size

    def _removed_bulk(self, msg_ids: list[int]) -> None:
        # The live entries (segment, queue, message) of those still here, with map.
        entries = list(filter(None, map(self._live.pop, msg_ids, repeat(None))))
        if entries:
            seg_live, k = self._seg_live, len(entries)
            segs = list(map(_segment, entries))
            if segs.count(segs[0]) == k:  # the usual case: all in one segment
                seg_live[segs[0]] -= k
            else:
                for seg in segs:
                    seg_live[seg] -= 1
            size = sum(map(len, map(_payload, map(_message, entries))))
            size += sum(map(len, map(_queue, entries))) + _ENTRY_OVERHEAD * k
            if self._extra:
                size += sum([self._extra.pop(mid, 0) for mid in msg_ids])
            self._live_bytes -= size

    def moved(self, msg: Stored, queue: str) -> None:
        entry = self._live.get(msg.id)
        if entry is not None:
            self._live[msg.id] = (entry[0], queue, msg)
            n = extra_bytes(msg)
            self._live_bytes += len(queue) - len(entry[1]) + n - self._extra.pop(msg.id, 0)
            if n:
                self._extra[msg.id] = n
        # Consecutive moves to one queue with one origin and reason (a NACK's messages to
        # its dead-letter queue) join one MSGS op while it waits to be written: the reason,
        # and options the messages share, are written once.
        e = msg.extra
        shared = None if e is None else (e.priority, e.due, e.expires, id(e.headers))
        op: list[Any] = self._ops[-1] if self._ops else []
        if op and op is self._move_op and op[1:4] == [queue, msg.origin, msg.reason]:
            self._ops.pop()  # (added again below: counted as a change)
        else:
            self._move_op = op = [MSGS, queue, msg.origin, msg.reason, [], []]
            self._move_extras = {}
        k = -1
        if shared is not None:
            k = self._move_extras.setdefault(shared, len(op[4]))
            if k == len(op[4]):
                op[4].append(e)
        op[5].append([msg.id, None, msg.deliveries, k])
        self._add(op)

    _move_op: list[Any] | None = None  # the MSGS op of moves still waiting to be written
    _move_extras: dict[tuple[int, float, float, int], int]

    def delivered(self, queue: str, msg_ids: list[int]) -> None:
        # Counted at recovery once this record is written; the DELIVER does not wait for it.
        # (Written on a full disk too: the crash model holds a delivery counted once a
        # later batch is written, and found the count lost when it was skipped there.)
        self._add([DELIVERED, msg_ids], change=False)

    def requeued(self, queue: str, msg: Stored) -> None:
        due = msg.extra.due if msg.extra is not None else 0.0
        if not due:
            self._add([REQUEUED, msg.id, msg.deliveries])
            return
        entry = self._live.get(msg.id)  # a NACK's delay: kept with the message
        if entry is not None:
            n = extra_bytes(msg)
            self._live_bytes += n - self._extra.pop(msg.id, 0)
            self._extra[msg.id] = n
        self._add([REQUEUED, msg.id, msg.deliveries, due])

    def deduped(self, queue: str, dedup_id: str, until: float) -> None:
        ids = self._dedup.setdefault(queue, {})
        size = _dedup_size(queue, dedup_id)
        old = ids.get(dedup_id)
        if old is not None:
            self._unlive(old[1], size)
        ids[dedup_id] = (until, self._active)
        self._seg_live[self._active] += 1
        self._live_bytes += size
        heapq.heappush(self._dedup_heap, (until, queue, dedup_id))
        self._add([DEDUP, queue, dedup_id, until])

    def taken(self, queue: str, n: int) -> None:
        old = self._tasks.pop(queue, None)
        size = _tasks_size(queue)
        if old is not None:
            self._unlive(old[1], size)
        if n:  # (0 is what a queue without an entry has: nothing live to keep)
            self._tasks[queue] = (n, self._active)
            self._seg_live[self._active] += 1
            self._live_bytes += size
        if self._tasks_batch != self.batch:  # a batch was written since: start afresh
            self._tasks_batch, self._tasks_ops = self.batch, {}
        op = self._tasks_ops.get(queue)
        if op is None:  # the first count of this queue in the change being made
            self._tasks_ops[queue] = op = [TASKS, queue, n]
            self._add(op)
        else:  # acks pipelined in one read: one op, with the last count
            op[2] = n
            self._changed()

    def declared(self, queue: str, settings: dict[str, Any] | None) -> None:
        old = self._queues.pop(queue, None)
        if old is not None:
            self._unlive(self._queue_seg.pop(queue), self._settings_size(queue, old))
        if settings is None:  # deleted: its dedup ids and tasks are forgotten with it
            for dedup_id, (_, seg) in self._dedup.pop(queue, {}).items():
                self._unlive(seg, _dedup_size(queue, dedup_id))
            tasks = self._tasks.pop(queue, None)
            if tasks is not None:
                self._unlive(tasks[1], _tasks_size(queue))
            self._tasks_ops.pop(queue, None)  # a later count comes after the deletion
        else:
            self._queues[queue] = settings
            self._queue_seg[queue] = self._active
            self._seg_live[self._active] += 1
            self._live_bytes += self._settings_size(queue, settings)
        self._add([DECLARE, queue, settings])

    def _unlive(self, seg: int, size: int) -> None:
        """A live entry of ``seg`` that was not a message is gone (or written again)."""
        self._seg_live[seg] -= 1
        self._live_bytes -= size

    def _forget_expired(self, now: float) -> bool:
        """Forget dedup ids whose window has passed (``_FORGET_PER_TURN`` at most: True
        when more are left): they no longer keep their segment, nor memory."""
        heap, dedup = self._dedup_heap, self._dedup
        for _ in range(_FORGET_PER_TURN):
            if not heap or heap[0][0] > now:
                return False
            until, queue, dedup_id = heapq.heappop(heap)
            ids = dedup.get(queue)
            entry = ids.get(dedup_id) if ids else None
            if ids is None or entry is None or entry[0] != until:
                continue  # deleted with its queue, or remembered again since
            del ids[dedup_id]
            if not ids:
                del dedup[queue]
            self._unlive(entry[1], _dedup_size(queue, dedup_id))
        return bool(heap) and heap[0][0] <= now

    # --- writing --------------------------------------------------------------------------

    def _write(self, ops: list[list[Any]]) -> None:
        """Append one change at the end of the active segment: one record, or, past
        ``_MAX_RECORD``, several whose all but last begin with ``[PART]`` (recovery
        applies a change only once its last record is there). A write that fails part way
        leaves the offset where it was: the retry writes over what it left."""
        body = self._encode(ops)
        bodies = self._split(ops) if len(body) > _MAX_RECORD and len(ops) > 1 else [body]
        salt = self._salts[self._active]
        offset = self._sizes[self._active]
        parts: list[bytes] = []
        for b in bodies:
            parts += [record_header(b, salt), b]
        total = sum(map(len, parts))
        try:
            done = os.pwritev(self._fd, parts, offset)
            while done < total:  # a short write (a disk filling up): the rest, or an error
                done += os.pwrite(self._fd, b"".join(parts)[done:], offset + done)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)  # leave no half record behind, if we can
            if exc.errno == errno.ENOSPC and self._let_go_of_reserve():
                self._write(ops)  # again, in the room the reserve held
                return
            raise
        self._sizes[self._active] = offset + total
        self._room -= total
        if self._room < self._room_low_mark() and not self.room_low:
            self._look_at_room()

    # --- the disk's reserve -------------------------------------------------------------

    def _full_why(self) -> str:
        return (
            f"the broker's disk is full ({self.path}); nothing was stored: gets and acks go "
            "on, so consumers can make room; retry the put once space is freed"
        )

    def _take_reserve(self) -> bool:
        """Hold ``reserve_bytes`` of the disk in ``log/reserve`` (kept if it is already
        there); False if the disk has not the room."""
        if not self.reserve_bytes:
            return True
        path = self.path / RESERVE_NAME
        with contextlib.suppress(OSError):
            if path.stat().st_blocks * 512 >= self.reserve_bytes:
                return True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("store %s: no room for the %d-byte reserve (%s)", self.path,
                        self.reserve_bytes, exc)  # fmt: skip
            return False
        return True

    def _room_low_mark(self) -> int:
        return max(_ROOM_LOW, 4 * self.segment_bytes)

    def _look_at_room(self) -> None:
        """Read the disk's free space; below the low mark, each put asks ``no_room_for``."""
        try:
            st = os.statvfs(self.path)
            self._room = st.f_bavail * st.f_frsize
        except OSError:
            self._room = 1 << 62  # cannot tell: as if plenty (ENOSPC still lets go)
        self._room_at = time.monotonic()
        self.room_low = self._room < self._room_low_mark()

    def no_room_for(self, nbytes: int) -> str | None:
        if time.monotonic() - self._room_at > 0.1:
            self._look_at_room()  # (room freed, or taken by others, meanwhile)
        need = nbytes + _PUT_OVERHEAD + len(self._ops) * _PUT_OVERHEAD
        if need <= self._room - _PUT_OVERHEAD * 1024:  # room left beside it for settles
            return None
        return (
            f"the broker's disk is full: no room for this put ({nbytes} bytes; {self._room} "
            f"free in {self.path}); nothing was stored: gets and acks go on, so consumers "
            "can make room; retry once space is freed, or put less at once"
        )

    def _let_go_of_reserve(self) -> bool:
        """The disk is full: free the reserve for the write that failed and the settles
        that follow, and refuse new puts until there is room again. False if there was
        no reserve left to let go of."""
        path = self.path / RESERVE_NAME
        try:
            path.unlink()
        except OSError:
            return False
        self.disk_full = self._full_why()
        log.error("store %s: the disk is full; the %d-byte reserve is let go for acks and "
                  "new puts are refused until there is room", self.path,
                  self.reserve_bytes)  # fmt: skip
        self._watch_space()
        return True

    def _watch_space(self) -> None:
        if self._loop is not None and self._space_timer is None and not self._closed:
            self._space_timer = self._loop.call_later(_SPACE_CHECK, self._space_back)

    def _space_back(self) -> None:
        """While the disk is full: once it has room for twice the reserve, take the
        reserve back and accept puts again."""
        self._space_timer = None
        if self.disk_full is None or self._closed:
            return
        try:
            st = os.statvfs(self.path)
            room = st.f_bavail * st.f_frsize >= 2 * self.reserve_bytes
        except OSError:
            room = False
        if room and self._take_reserve():
            self.disk_full = None
            log.warning("store %s: the disk has room again; puts are accepted", self.path)
            return
        self._watch_space()

    def _split(self, ops: list[list[Any]]) -> list[bytes]:
        """The bodies of a change too large for one record, each up to ``_MAX_RECORD``
        (an op larger than that alone in its record)."""
        encode = self._encode
        bodies: list[bytes] = []
        chunk: list[list[Any]] = [[PART]]
        size = 0
        for op in ops:
            n = len(encode(op))
            if size and size + n > _MAX_RECORD:
                bodies.append(encode(chunk))
                chunk, size = [[PART]], 0
            chunk.append(op)
            size += n
        bodies.append(encode(chunk[1:]))  # the last: no PART, the change is whole
        return bodies

    def _write_ops(self, ops: list[Any]) -> None:
        """One record (the loop's ``_flush``: see ``Durable``)."""
        self._write(ops)

    def _after_write(self) -> None:
        if self._error is not None or self._closed:
            return
        try:
            more = self._maintain()
        except FsyncFailed:
            return  # the store is broken (and said so): nothing more is begun or dropped
        except OSError as exc:
            # Said once a minute at most, not after every write (a full disk fails the
            # same way each time until there is room).
            now = time.monotonic()
            if now - self._maintain_said >= 60.0:
                self._maintain_said = now
                log.error("store %s: starting a segment or reclaiming space failed (%s); "
                          "will retry after each write (said once a minute)", self.path,
                          exc)  # fmt: skip
            return
        if more and self._loop is not None and not self._maintaining:
            self._maintaining = True  # the rest in the next turns, between requests
            self._loop.call_soon(self._maintain_later)

    def _maintain_later(self) -> None:
        self._maintaining = False
        if self._loop is not None and not self._ops:
            self._after_write()  # (nothing, if the store was closed or broke meanwhile)

    def _maintain(self) -> bool:
        """Forget expired dedup ids; begin a new segment when the active one is full;
        reclaim the oldest segments while nothing in them is live; once the log is over
        twice what is live, write what is live in the oldest forward, then reclaim it.

        One turn does a bounded amount of work, however much a request freed: at most
        one segment begun (one fsync), one chunk of ``_FORWARD_CHUNK`` live entries
        written forward (one fdatasync), ``_DROPS_PER_TURN`` segments deleted (one
        fdatasync, one directory fsync), ``_FORGET_PER_TURN`` dedup ids forgotten. (A
        chunk holds at most ``_FORWARD_BYTES``; on a full disk, what fits beside settles.)
        Returns True when more is left for the next turn."""
        more = False
        heap = self._dedup_heap
        if heap and heap[0][0] <= (now := time.time()):
            more = self._forget_expired(now)
        if self.disk_full is not None and self.batch >= self._punch_at and self._can_punch:
            self._punch_at = self.batch + _PUNCH_EVERY
            self._punch()
        if len(self._sizes) == 1 and self._sizes[self._active] < self.segment_bytes:
            return more  # one segment, not full: nothing to begin, reclaim or forward
        if self._sizes[self._active] >= self.segment_bytes:
            self._roll()
        dropped: list[int] = []
        try:
            while (oldest := min(s for s in self._sizes if s not in dropped)) != self._active:
                if len(dropped) >= _DROPS_PER_TURN:
                    return True
                if self._seg_live[oldest]:
                    if self._forwarding is None:
                        if not self._over_threshold(dropped):
                            return more
                        # oldest first (``_forward`` takes from the end): on a full disk
                        # the prefix written forward is then dead, and punched out
                        self._forwarding = self._live_keys(oldest)[::-1]
                    if not self._forward_limit():
                        return more  # a full disk: forward once acks or punches give room
                    self._forward(oldest, self._forwarding)
                    if self._seg_live[oldest]:
                        if self.disk_full is not None and self._can_punch:
                            self._punch()  # what was written forward gives its room back
                        return True
                    self._sync_or_break()  # the copies are on disk before the originals go
                    self.compactions += 1
                    self._forwarding = None
                    dropped.append(oldest)
                    return True
                self._forwarding = None
                dropped.append(oldest)
            return more
        finally:
            self._drop(dropped)

    def _over_threshold(self, dropped: list[int]) -> bool:
        total = sum(self._kept(seg) for seg in self._sizes if seg not in dropped)
        return total > 2 * self._live_bytes + self.segment_bytes

    def _kept(self, seg: int) -> int:
        """Bytes of segment ``seg`` not punched out (see ``_punch``)."""
        return self._sizes[seg] - self._holes[seg] + FILE_HEADER_SIZE

    def _roll(self) -> None:
        self._sync_or_break()  # a closed segment is on disk before the next one begins
        self._new_segment(self._active + 1)

    def _sync_or_break(self) -> None:
        """fdatasync the active segment in the loop's thread; a failure breaks the store
        and poisons every batch written so far (``Durable._fsync_or_break``): nothing is
        confirmed, begun or dropped after it."""
        self._fsync_or_break(self._fdatasync_active)
        self._synced = (self._active, self._sizes[self._active])

    def _fdatasync_active(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def _live_keys(self, seg: int) -> list[_Key]:
        """What is live in segment ``seg``: message ids, then (queue,) for queue settings
        and (queue, dedup id) for dedup ids (``_forward`` takes from the end)."""
        keys: list[_Key] = [mid for mid, e in self._live.items() if e[0] == seg]
        keys += [(name,) for name, s in self._queue_seg.items() if s == seg]
        keys += [(q, d) for q, ids in self._dedup.items() for d, v in ids.items() if v[1] == seg]
        keys += [(q, None) for q, v in self._tasks.items() if v[1] == seg]
        return keys

    def _forward_limit(self) -> int:
        """Bytes one chunk written forward may hold: while the disk is full, half the room
        beyond half the reserve (kept for settles), or 0 (none) below ``_FORWARD_MIN``."""
        if self.disk_full is None:
            return _FORWARD_BYTES
        limit = self._room_beside_settles() // 2
        return min(limit, _FORWARD_BYTES) if limit >= _FORWARD_MIN else 0

    def _room_beside_settles(self) -> int:
        """While the disk is full: the room left beyond half the reserve, which is kept
        for settles (housekeeping writes only into what is beyond it)."""
        self._look_at_room()
        return max(0, self._room - self.reserve_bytes // 2)

    def _forward(self, seg: int, keys: list[_Key]) -> None:
        """Write up to ``_FORWARD_CHUNK`` of what is live in segment ``seg`` (taken from
        the end of ``keys``) again, as it is now, at the end of the log, in one record;
        a dedup id whose window has passed is forgotten instead."""
        live, active, now = self._live, self._active, time.time()
        limit = self._forward_limit()
        moving: list[tuple[int, str, Stored]] = []
        settings: list[str] = []
        dedup: list[tuple[str, str, float]] = []
        tasks: list[str] = []
        size = 0
        while keys and len(moving) + len(settings) + len(dedup) + len(tasks) < _FORWARD_CHUNK:
            if size >= limit:
                break
            key = keys.pop()
            if isinstance(key, int):
                entry = live.get(key)
                if entry is not None and entry[0] == seg:  # not acked since
                    moving.append((key, entry[1], entry[2]))
                    size += len(entry[2].payload) + _ENTRY_OVERHEAD
            elif len(key) == 1:
                if self._queue_seg.get(key[0]) == seg:  # not declared again or deleted
                    settings.append(key[0])
            elif key[1] is None:
                entry_t = self._tasks.get(key[0])
                if entry_t is not None and entry_t[1] == seg:  # not counted again since
                    tasks.append(key[0])
            else:
                queue, dedup_id = key
                v = self._dedup.get(queue, {}).get(dedup_id)
                if v is not None and v[1] == seg:
                    if v[0] > now:
                        dedup.append((queue, dedup_id, v[0]))
                    else:  # its window passed: forgotten, not copied
                        ids = self._dedup[queue]
                        del ids[dedup_id]
                        if not ids:
                            del self._dedup[queue]
                        self._unlive(seg, _dedup_size(queue, dedup_id))
        ops = msgs_ops([(q, m) for _, q, m in reversed(moving)], payloads=True)
        ops += [[DECLARE, name, self._queues[name]] for name in settings]
        ops += [[DEDUP, q, d, until] for q, d, until in dedup]
        ops += [[TASKS, name, self._tasks[name][0]] for name in tasks]
        if ops:
            self._write(ops)
        for mid, q, m in moving:
            live[mid] = (active, q, m)
        for name in settings:
            self._queue_seg[name] = active
        for q, d, until in dedup:
            self._dedup[q][d] = (until, active)
        for name in tasks:
            self._tasks[name] = (self._tasks[name][0], active)
        n = len(moving) + len(settings) + len(dedup) + len(tasks)
        self._seg_live[active] += n
        self._seg_live[seg] -= n
        if not keys and self._seg_live[seg]:  # cannot be; but never lose one: look again
            keys += self._live_keys(seg)
        log.debug("store %s: wrote %d live entries forward from segment %d",
                  self.path, n, seg)  # fmt: skip

    def _drop(self, segs: list[int]) -> None:
        """Delete segments with nothing live in them. The records that emptied them are
        made durable first (an fdatasync of the active segment, unless this thread just
        did one: the older segments were fdatasynced when they were closed) - else a
        power cut could keep the deletion and lose a record that moved their messages.
        Then one directory fsync for all: a segment that comes back after a crash is
        replayed harmlessly, as nothing in it is live."""
        if not segs:
            return
        if self._synced != (self._active, self._sizes[self._active]):
            self._sync_or_break()
        for seg in segs:
            self._segment_path(seg).unlink()
            del self._sizes[seg], self._salts[seg], self._holes[seg]
            del self._seg_live[seg]
        if self._restated:
            self._restated = {k: v for k, v in self._restated.items() if v[0] in self._sizes}
        fsync_dir(self.path)

    # --- a full disk: freeing what settles made dead --------------------------------------

    def _punch(self) -> None:
        """While the disk is full: free the blocks of the oldest segment's dead prefix - the
        records before the first that still holds something live - so settles give room
        back as they go (a FIFO drain), not only once a whole segment is dead.

        The same rule as deleting the oldest segment, applied to a prefix of it: every
        record left on disk stays newer than the add it refers to. The records that made
        the prefix dead are fdatasynced first; then the segment's header notes where its
        records now begin (``HOLE``), fdatasynced, and only then are the bytes punched out
        (fallocate PUNCH_HOLE, the file's size kept): a crash at any point leaves either
        the dead records or zeros, and recovery reads from the noted offset either way."""
        seg = min(self._sizes)
        start = self._holes[seg]
        end = self._dead_until(seg, start)
        if end - start < max(_PUNCH_MIN, 1) or end >= 2**32:  # (the note holds 32 bits)
            return
        if self._synced != (self._active, self._sizes[self._active]):
            self._sync_or_break()  # what made the prefix dead is on disk first
        fd = self._fd if seg == self._active else os.open(self._segment_path(seg), os.O_RDWR)
        try:
            os.pwrite(fd, hole_mark(end, self._salts[seg]), HOLE_AT)
            self._fsync_or_break(functools.partial(os.fdatasync, fd))
            self._holes[seg] = end  # (recovery reads from here, punched or not)
            try:
                _punch_hole(fd, start, end - start)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_punch = False
                log.warning("store %s: the filesystem cannot punch holes (%s); a full disk "
                            "gets room back only as whole segments empty", self.path,
                            exc)  # fmt: skip
                return
            self._fsync_or_break(functools.partial(os.fdatasync, fd))
        finally:
            if fd != self._fd:
                os.close(fd)
        if seg == self._active:
            self._synced = (seg, self._sizes[seg])
        self._look_at_room()
        log.debug("store %s: the disk is full; punched out %d dead byte(s) of segment %d",
                  self.path, end - start, seg)  # fmt: skip

    def _dead_until(self, seg: int, start: int) -> int:
        """The offset of the first record from ``start`` in segment ``seg`` that may still
        matter at recovery (it adds a message still live there, or may be the last write of
        a queue's settings, dedup id or tasks kept there), within ``_PUNCH_SCAN`` bytes.
        Settings, dedup ids and tasks in the way are written again at the end first (a
        few bytes), so only a live message stops the prefix."""
        size = self._sizes[seg]
        fd = self._fd if seg == self._active else os.open(self._segment_path(seg), os.O_RDONLY)
        try:
            head = os.pread(fd, RECORD_HEADER.size, start)
            window = _PUNCH_SCAN
            if len(head) == RECORD_HEADER.size:  # a record larger than the window: all of it
                window = max(window, RECORD_HEADER.size + RECORD_HEADER.unpack(head)[1])
            data = os.pread(fd, min(size - start, window), start)
        finally:
            if fd != self._fd:
                os.close(fd)
        salt, decode, off = self._salts[seg], msgspec.msgpack.Decoder().decode, 0
        for rec, end, valid in scan(data, 0, salt):
            if not valid:
                break  # damage, or a record the window cuts: stop (the rest waits)
            body = data[rec + RECORD_HEADER.size : end]
            if body[:1] != PAD:
                try:
                    ops = decode(body)
                except msgspec.DecodeError:
                    break
                if not self._dead_ops(seg, start + rec, ops):
                    break
            off = end
        return start + off

    def _dead_ops(self, seg: int, at: int, ops: list[Any]) -> bool:
        """Can the record at ``at`` in segment ``seg``, holding ``ops``, be left out of the
        log? Not while it adds a message still live in ``seg``; a queue's settings, dedup
        id or tasks still kept in ``seg`` are written again at the end (``_restate``) so
        the record is no longer their last write."""
        live, restate = self._live, list[_State]()
        for op in ops:
            kind = op[0]
            if kind == ADDS:
                first = op[2]
                for mid in range(first, first + len(op[3])):
                    e = live.get(mid)
                    if e is not None and e[0] == seg:
                        return False
            elif kind == MSGS:
                for entry in op[5]:
                    e = live.get(entry[0])
                    if entry[1] is not None and e is not None and e[0] == seg:
                        return False
            elif kind == ADD:
                e = live.get(op[1])
                if e is not None and e[0] == seg:
                    return False
            elif kind == DECLARE:
                if op[2] is not None and self._queue_seg.get(op[1]) == seg:
                    restate.append((op[1],))
            elif kind == DEDUP:
                v = self._dedup.get(op[1], {}).get(op[2])
                if v is not None and v[1] == seg:
                    restate.append((op[1], op[2]))
            elif kind == TASKS:
                t = self._tasks.get(op[1])
                if op[2] and t is not None and t[1] == seg:
                    restate.append((op[1], None))
            elif kind not in (DEL, DELIVERED, REQUEUED, MOVE, PART):
                return False  # (SETTINGS: a snapshot of older logs; kept)
        stale = [k for k in restate if self._restated.get(k, (0, 0)) <= (seg, at)]
        if stale:
            if len(stale) * (_STATE_OVERHEAD + 64) > self._room_beside_settles():
                return False  # no room to write them again now (settles come first)
            self._restate(stale)
        return True

    def _restate(self, keys: list[_State]) -> None:
        """Write queue settings, dedup ids and tasks (``keys``) again, as they are now, at
        the end of the log: their earlier writes are then stale."""
        ops: list[Any] = []
        for key in keys:
            if len(key) == 1:
                ops.append([DECLARE, key[0], self._queues[key[0]]])
            elif key[1] is None:
                ops.append([TASKS, key[0], self._tasks[key[0]][0]])
            else:
                ops.append([DEDUP, key[0], key[1], self._dedup[key[0]][key[1]][0]])
        active, at = self._active, self._sizes[self._active]
        self._write(ops)
        for key in keys:
            if len(key) == 1:
                seg = self._queue_seg[key[0]]
                self._queue_seg[key[0]] = active
            elif key[1] is None:
                n, seg = self._tasks[key[0]]
                self._tasks[key[0]] = (n, active)
            else:
                until, seg = self._dedup[key[0]][key[1]]
                self._dedup[key[0]][key[1]] = (until, active)
            self._seg_live[seg] -= 1
            self._seg_live[active] += 1
            self._restated[key] = (active, at)

    def no_room_to_deliver(self, out: int) -> str | None:
        if self.disk_full is None:
            return None
        if time.monotonic() - self._room_at > 0.1:
            self._look_at_room()
        floor = self.reserve_bytes // 4 + out * _SETTLE_BYTES
        if self._room > floor:
            return None
        return (
            f"the broker's disk is full ({self._room} bytes free in {self.path}): what room "
            f"is left is kept to settle the {out} message(s) out, so nothing is delivered "
            "until acks free room (as they empty whole blocks of the log) or space is freed "
            "on the disk; ack or nack what you hold, and retry the get later"
        )

    # --- the syncer thread ----------------------------------------------------------------

    def _fsync_now(self) -> None:
        self._fsync_or_break(self._fdatasync_active)  # not while a segment is switched
        self.fsyncs += 1

    def start(self, on_commit: Callable[[int], None]) -> None:
        """Begin writing: ``--fsync batch`` fsyncs in a C thread where ``pigeon._fastring``
        is built (``NativeSyncer``), else, and for ``always``, in the Python one."""
        native = self._use_native()
        if native is None:
            super().start(on_commit)
            return
        self.on_commit = on_commit
        native.start()

    def _use_native(self) -> NativeSyncer | None:
        """For ``--fsync batch``, the C syncer in place of the Python one (its thread not
        started yet), or None where ``pigeon._fastring`` is not built."""
        if self._native is None and self.fsync == "batch":
            c = load_c_path("pigeon.store", "the log store's C syncer")
            if c is not None:
                native = NativeSyncer(c, self.fsync_interval)
                with native:
                    native.set_fd(self._fd)
                self._fsync_lock = native  # type: ignore[assignment]  # both threads' fsyncs
                self._native = native
        return self._native

    @property
    def fsyncs(self) -> int:
        """fsyncs of the log made so far (both threads')."""
        return self._fsyncs + (self._native.fsyncs if self._native is not None else 0)

    @fsyncs.setter
    def fsyncs(self, n: int) -> None:
        self._fsyncs = n

    @property
    def disk_bytes(self) -> int:
        """Bytes the log takes on disk now (less what was punched out of it)."""
        return sum(map(self._kept, self._sizes))

    def close(self) -> None:
        """Write what is pending, fsync, stop the syncer, close the segment."""
        self._closing_flush()
        self._closed = True  # housekeeping still scheduled on the loop does nothing now
        with self._sync:
            self._closing = True
            self._sync.notify()
        if self._thread.is_alive():
            self._thread.join(30)
        if self._native is not None:
            self._native.close()
        with contextlib.suppress(FsyncFailed):
            self._fsync_or_break(self._fsync_active)
        with self._fsync_lock:
            if self._native is not None:
                self._native.set_fd(-1)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._unlock_dir()

    def _fsync_active(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def _closing_flush(self) -> None:
        loop, self._loop = self._loop, None
        deadline = time.monotonic() + 5.0
        while self._ops and self._error is None:
            self._flush()
            if not self._ops or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if self._ops:
            log.critical("store %s: %d change(s) could not be written at close",
                         self.path, len(self._ops))  # fmt: skip
        self._loop = loop
