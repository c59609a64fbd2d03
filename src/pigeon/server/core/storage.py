"""Where a broker keeps its messages: the interface the broker calls as its state changes,
and the in-memory store (``--memory``), which keeps nothing.

The durable stores (``pigeon.server.store``: the log and SQLite) implement it; the broker
imports nothing of theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from pigeon.server.core.model import Stored

__all__ = ["NO_TRANSACTION", "Store"]

# What ``Store.atomic`` gives when there is nothing to do around a request (one object,
# reused: the broker enters it for every request).
NO_TRANSACTION: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class Store:
    """Where a broker keeps messages. This base class keeps nothing: ``--memory``.

    A durable store records puts and removals; the broker calls these as its state
    changes, and ``recover`` returns what survived a restart.
    """

    def added(self, queue: str, msg: Stored) -> None:
        """``msg`` entered ``queue``."""

    def removed(self, queue: str, msg_id: int) -> None:
        """The message left the broker for good (acked, dropped by a purge)."""

    def added_many(self, queue: str, msgs: list[Stored]) -> None:
        """``msgs`` entered ``queue``, in order (a batch: one call for the whole of it)."""
        if type(self).added is not Store.added:  # the memory store keeps nothing
            for msg in msgs:
                self.added(queue, msg)

    def added_plain(self, queue: str, msgs: list[Stored]) -> None:
        """``added_many`` of new messages without options, their ids consecutive (a plain
        put: a store may take them in bulk)."""
        self.added_many(queue, msgs)

    def removed_many(self, queue: str, msg_ids: list[int]) -> None:
        """The messages left the broker for good (a batch of acks)."""
        if type(self).removed is not Store.removed:
            for msg_id in msg_ids:
                self.removed(queue, msg_id)

    def moved(self, msg: Stored, queue: str) -> None:
        """The message moved to another queue (a dead letter, or one replayed from it)."""

    def requeued(self, queue: str, msg: Stored) -> None:
        """The message goes back to its queue after ``msg.deliveries`` deliveries; with a
        delay, ``msg.extra.due`` says until when (wall clock)."""

    def delivered(self, queue: str, msg_ids: list[int]) -> None:
        """The messages were handed out once more (a GET with manual ack). Counted after a
        restart once the store has it; no reply waits for it."""

    def deduped(self, queue: str, dedup_id: str, until: float) -> None:
        """``queue`` remembers ``dedup_id`` until ``until`` (wall-clock seconds)."""

    def declared(self, queue: str, settings: dict[str, Any] | None) -> None:
        """A queue's settings (maxsize, lease, max_deliveries, shutdown) changed, or
        the queue was deleted (``None``)."""

    def taken(self, queue: str, n: int) -> None:
        """``queue``'s tasks taken and not yet marked done are now ``n``: its unfinished
        count beyond the messages it holds. An ACK (or a GET's auto-ack) adds to it,
        TASK_DONE takes off; negative after task_done() for items still held; 0 is the
        default (a store keeps nothing for it). A change like any other: a TASK_DONE's
        reply waits for its commit. A deleted queue (``declared(queue, None)``) has
        none."""

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """Changes made inside go to the store in one transaction."""
        return NO_TRANSACTION

    last_tag = 0  # a durable store: the batch of the latest change (see server/store/durable.py)
    committed = 0
    changes = 0

    # Why new puts are refused while the store can still write settles (the log's disk is
    # full: it let go of its reserve so acks can drain the queues), or None.
    disk_full: str | None = None
    # True while the disk may have too little room for a large put (the log store looks at
    # its free space then): the server asks ``no_room_for`` about each put's bytes.
    room_low = False

    def no_room_for(self, nbytes: int) -> str | None:
        """Why a put of ``nbytes`` of payload would not fit on the disk now, or None."""
        return None

    def no_room_to_deliver(self, out: int) -> str | None:
        """While ``disk_full``: why a GET is refused now (what room is left is kept for
        settling the ``out`` messages delivered and not yet settled), or None. A delivery
        and its NACK free nothing: a loop of them would spend the room."""
        return None

    @property
    def holds_replies(self) -> bool:
        return False

    @property
    def stalled_for(self) -> float:
        """Seconds the oldest change has waited for its commit (0 when all is committed)."""
        return 0.0

    def commit_histogram(self) -> tuple[list[tuple[float, int]], float] | None:
        """Cumulative (upper bound, count) buckets of commit durations and their sum in
        seconds, or None for a store that does not commit."""
        return None

    def start(self, on_commit: Callable[[int], None]) -> None:
        """Begin persisting (a durable store starts its writer here)."""

    def flush_follows(self) -> None:
        """The server is handling a read and calls ``flush`` at its end: changes made
        meanwhile need not schedule a write of their own."""

    def flush(self) -> None:
        """Write the changes made so far now, rather than at the end of the loop's turn.
        The server calls it when it has handled what one read brought, so the replies
        those changes hold go out in this turn of the loop, not the next."""

    def close(self) -> None:
        """Flush and release."""

    def recover(self) -> Iterable[tuple[str, Stored]]:
        """Messages to reload at start, in order, per queue."""
        return ()

    def recover_queues(self) -> dict[str, dict[str, Any]]:
        """Queue settings to reload at start."""
        return {}

    def recover_dedup(self) -> dict[str, dict[str, float]]:
        """Dedup ids remembered at start: queue -> {id: wall-clock until}."""
        return {}

    def recover_taken(self) -> dict[str, int]:
        """Each queue's tasks taken and not yet done at start (``taken``), if not 0."""
        return {}
