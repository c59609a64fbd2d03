"""The local backend: one queue shared by threads and processes on one host, no server.

Features
    The whole ``pigeon.Queue`` contract: put/get with block and timeout, nowait, many,
    qsize/empty/full, task_done/join, shutdown (Python 3.13 semantics), iteration,
    ``get_message`` with in-process requeue. ``pigeon.AsyncQueue(q)`` gives an asyncio
    face of the same queue. Picklable: hand it to ``multiprocessing.Process`` under fork,
    spawn or forkserver, to ``Pool``/``ProcessPoolExecutor`` initializers, or send it
    (pickled) to a process that is already running.

Connection URL
    None: ``pigeon.Queue()`` or ``pigeon.Queue(maxsize=N)``.

Options
    ``maxsize`` (items, 0 = unbounded), ``serializer`` (``"pickle"`` by default),
    ``capacity`` (initial bytes of shared memory; it grows as needed).

Delivery guarantees
    When ``put`` returns, the item is in shared memory: the producer may exit at once.
    A process SIGKILLed inside ``put`` or ``get``, or a call interrupted by Ctrl-C,
    ``SystemExit`` or ``MemoryError``, leaves no lock held (a robust mutex, or ``flock``,
    which the kernel drops with their holder) and no torn item (the queue state is
    committed with one single-byte store after the bytes are in place; the tombstones a
    take from the middle writes go through an intent area the next lock holder
    completes). The item such a call was moving is either still in the queue
    (interrupted before the commit) or was taken by it (after): never half-written, never
    delivered twice to live consumers.
    ``get`` removes the item: an item taken by a process that then dies is gone, which is
    at-most-once for crashing consumers; use a networked backend for at-least-once.

# Layout of the package, one concept a module:
#   layout.py   the file: control page, state slots, intent area, record kinds, host clock
#   ring.py     a ring of variable-length records in a flat buffer (sans-IO)
#   pick.py     what a take copies out and how the state changes (sans-IO)
#   codec.py    an item as a record and back; envelopes with headers or options
#   lock.py     the robust mutex (C or ctypes) or flock, fork bookkeeping, the file's removal
#   tracker.py  who still holds a queue's file; removing it when its creator cannot
#   shared.py   a handle's mappings, its lock, the committed state and its recovery
#   futex.py    futex wait and wake through ctypes
#   waits.py    sequence words, waiter counts, spinning and sleeping
#   dedup.py    the table of dedup ids (SQLite beside the file)
#   queue.py    LocalQueue: the operations
#   message.py  LocalMessage: ack, nack (back to the ring), extend
#   aio.py      the asyncio face
#
# Strategy:
# One file in /dev/shm (or the temp dir) holds a control page and a data ring
# (``ring.py``). Mutual exclusion is a robust process-shared mutex in the control page
# (where there is none: a ``threading.Lock`` inside a process plus ``fcntl.flock`` between
# processes; each process re-opens the file after fork, because flock belongs to the open
# file description and fork shares it). The ring state is double-buffered in the control
# page: a writer fills the spare slot and flips the slot index; what a commit must write
# in the ring itself (tombstones) goes through an intent area that the next lock holder
# completes (``shared._commit``, ``shared._recover``). Waiting is a futex on a sequence word
# bumped by every put (getters wait on it), every get (putters wait on it) and every
# finished join; wakers skip the syscall when no one registered as waiting. A waiter
# re-checks at least every second, so a waker killed between its commit and its wake costs
# at most a second, never a hang; a handle counts its own waiters, so that closing it
# counts out the threads it leaves waiting.
"""

from __future__ import annotations

from pigeon.backends.local.layout import GET_SEQ, JOIN_SEQ, PUT_SEQ
from pigeon.backends.local.message import LocalMessage
from pigeon.backends.local.queue import LocalQueue

__all__ = ["GET_SEQ", "JOIN_SEQ", "PUT_SEQ", "LocalMessage", "LocalQueue"]
