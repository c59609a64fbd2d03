"""The local queue's shared file: the control page, the double-buffered ring state,
and the kinds of record the ring holds."""

from __future__ import annotations

import struct
import sys

import msgspec

from pigeon.backends import _ring

if sys.platform != "win32":
    pass


PAGE = 4096
MAGIC = b"PIGEONQ1"  # locked with flock (where robust process-shared mutexes do not exist)
MAGIC_MUTEX = b"PIGEONQ2"  # locked with the robust mutex at OFF_MUTEX
# control page layout (little-endian)
OFF_MAXSIZE = 8  # u64
OFF_INDEX = 16  # u32: which state slot is current
OFF_FLAGS = 20  # u32: SHUTDOWN | IMMEDIATE
PUT_SEQ = 24  # u32 futex words
GET_SEQ = 28
JOIN_SEQ = 32
WAITERS = {PUT_SEQ: 36, GET_SEQ: 40, JOIN_SEQ: 44}  # u32 waiter counts
OFF_SLOTS = 64  # two slots of STATE, 64 bytes apart
OFF_MUTEX = 256  # a pthread_mutex_t (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST), 64 bytes
# head, tail, count, unfinished, capacity; special, tombs (see _take_special)
STATE = struct.Struct("<5Q2I")
U32 = struct.Struct("<I")
unpack_state = STATE.unpack_from
pack_state = STATE.pack_into
pack_header = _ring.HEADER.pack_into
unpack_header = _ring.HEADER.unpack_from

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
# [f64 due][f64 expires] (wall clock; 0: none), n bytes of headers, then the item's record.
K_OPTIONS = 7
OPTS = struct.Struct("<IHHdd")
K_TAKEN = 8  # a record taken from the middle of the ring: skipped, then dropped at the head
DEDUP_SUFFIX = ".dedup"  # beside the queue's file: its table of dedup ids (SQLite)
COPY_AS_BYTES = frozenset((K_BYTES, K_PICKLE, K_SERIALIZED))
encode_headers = msgspec.msgpack.Encoder().encode
decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode
