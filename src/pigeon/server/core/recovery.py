"""What a broker does with its store's contents when it starts: queue settings, the dedup
ids still within their window, and the messages, each put back where it waits.

A message recovered ready goes to its queue's line (given back ahead of new ones if it
was delivered before, as a dead letter was); one with options waits for its due time and
is watched for its expiry (one whose ttl passed while the broker was down expires at the
first tick, or when a GET meets it). Deliveries are stored: a message whose last allowed
delivery was in flight when the broker stopped comes back after it, and goes to the dead
letters - else one in flight at every crash would be delivered for ever.

A queue's unfinished count (TASK_DONE, JOIN) is what it holds plus the tasks taken and
not yet marked done, which the store keeps (``Store.taken``): a restart forgets neither.
"""

from __future__ import annotations

import heapq
import itertools

from pigeon.server.core.model import QueueState, Stored
from pigeon.server.core.placement import wait
from pigeon.server.core.requeue import dead_letter
from pigeon.server.core.state import BrokerState

__all__ = ["recover"]


def recover(b: BrokerState) -> None:
    """Load what ``b.store`` kept; message ids go on after the largest recovered."""
    store = b.store
    for name, settings in store.recover_queues().items():
        b._queue(name, limit=False).configure(settings)
    wall_now = b.now + b._wall_offset
    for name, ids in store.recover_dedup().items():
        q = b._queue(name, limit=False)
        for dedup_id, until in ids.items():
            if until > wall_now:
                q.dedup[dedup_id] = until
                q.dedup_heap.append((until, dedup_id))
                b.dedup_ids += 1
        heapq.heapify(q.dedup_heap)
    last_id = 0
    spent: list[tuple[QueueState, Stored]] = []
    for name, msg in store.recover():
        q = b._queue(name, limit=False)
        msg.enqueued = b.now
        q.unfinished += 1
        last_id = max(last_id, msg.id)
        if msg.deliveries >= q.max_deliveries and not q.is_dead_letters:
            spent.append((q, msg))  # in flight at a crash after its last delivery
        elif msg.extra is not None:  # (a dead letter has no timer, unless put there with one)
            wait(b, q, msg, back=bool(msg.origin))
        elif q.is_dead_letters and msg.origin:
            q.ready.give_back(msg)
        else:
            q.ready.append(msg)
    for name, taken in store.recover_taken().items():
        q = b._queue(name, limit=False)
        q.taken = taken
        q.unfinished = max(0, q.unfinished + taken)  # (0: a message quarantined since)
    b._ids = itertools.count(last_id + 1)
    with store.atomic():
        for q, msg in spent:
            dead_letter(b, q, msg, "max_deliveries")
        for q in b.queues.values():
            b._tasks_changed(q)  # (nothing, unless the max(0, ...) above clamped it)
