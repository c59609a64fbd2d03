"""The local queue's shared file: the control page, the double-buffered ring state,
the intent area of a commit that marks records taken, the kinds of record the ring holds,
and the host's clock for delays and ttls."""

from __future__ import annotations

import struct
import time

import msgspec

from pigeon.backends.local import ring

PAGE = 4096
# The magic says which lock the file uses, and the layout's version: files of layout 1
# (PIGEONQ1/PIGEONQ2: flags outside the state, no intent area, wall-clock times) are
# refused by name rather than misread.
MAGIC = b"PIGEONQ3"  # locked with flock (where robust process-shared mutexes do not exist)
MAGIC_MUTEX = b"PIGEONQ4"  # locked with the robust mutex at OFF_MUTEX
OLD_MAGICS = (b"PIGEONQ1", b"PIGEONQ2")
# control page layout (little-endian)
OFF_MAXSIZE = 8  # u64
OFF_INDEX = 16  # u32: which state slot is current
PUT_SEQ = 24  # u32 futex words
GET_SEQ = 28
JOIN_SEQ = 32
WAITERS = {PUT_SEQ: 36, GET_SEQ: 40, JOIN_SEQ: 44}  # u32 waiter counts
OFF_SLOTS = 64  # two slots of STATE, 64 bytes apart
OFF_MUTEX = 256  # a pthread_mutex_t (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST), 64 bytes
# head, tail, count, unfinished, capacity; special, tombs, flags, marks (see RingState)
STATE = struct.Struct("<5Q4I")
# The intent area: the offsets of the record headers a commit turns into tombstones
# (K_TAKEN). A commit with marks writes them here, publishes a state whose ``marks`` says
# how many there are, applies them, and publishes the state again without them; whoever
# takes the lock and finds a published state with marks applies them first (they are
# idempotent), so a holder that died or was interrupted between the two publishes left a
# change that is complete, never half made.
OFF_MARKS = 512
MAX_MARKS = (PAGE - OFF_MARKS) // 8
U32 = struct.Struct("<I")
unpack_state = STATE.unpack_from
pack_state = STATE.pack_into
pack_header = ring.HEADER.pack_into
unpack_header = ring.HEADER.unpack_from

SHUTDOWN = 1
IMMEDIATE = 2

# record kinds
K_PICKLE = 1
K_BYTES = 2
K_BYTEARRAY = 3
K_PICKLE_OOB = 4
K_SERIALIZED = 5
# An item put with headers: [u32 n][u16 the item's kind][u16 0], n bytes of the headers in
# MessagePack, then the item's record as it would be without them.
K_HEADERS = 6
ENVELOPE = struct.Struct("<IHH")
# An item put with a priority, a delay or a ttl: [u32 n][u16 the item's kind][u16 priority]
# [f64 due][f64 expires] (``host_clock``; 0: none), n bytes of headers, then the item's
# record.
K_OPTIONS = 7
OPTS = struct.Struct("<IHHdd")
K_TAKEN = 8  # a record taken from the middle of the ring: skipped, then dropped at the head
KIND_AT = 4  # where a record's u16 kind sits in its header (a mark rewrites only that)
DEDUP_SUFFIX = ".dedup"  # beside the queue's file: its table of dedup ids (SQLite)
COPY_AS_BYTES = frozenset((K_BYTES, K_PICKLE, K_SERIALIZED))
encode_headers = msgspec.msgpack.Encoder().encode
decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode

# Delays, ttls and dedup windows are measured on one clock that every process of the host
# reads alike and that no one can step: CLOCK_BOOTTIME (Linux: monotonic, system-wide, and
# it counts a suspend, so a ttl of a minute is over after an hour of sleep, as on a wall
# clock), else CLOCK_MONOTONIC (system-wide too; on macOS it counts sleep as well). The
# wall clock would let NTP or a hand-set clock expire messages early or hold delayed ones
# for as long as it was set back. The queue's file lives no longer than the boot (tmpfs).
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def host_clock() -> float:
    """Seconds on the host's shared clock (see above)."""
    return time.clock_gettime(_CLOCK)
