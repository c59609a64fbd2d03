"""The commit gate: replies that wait for the store, released in order once committed."""

from __future__ import annotations

from typing import Any

from pigeon.protocol import Deliver, Error, Get, Join, Ok, Put, TaskDone
from pigeon.protocol.messages import Confirmed, Joined, PutOptions
from pigeon.server.commit_gate import CommitGate
from pigeon.server.core import Broker, Store


class PendingStore(Store):
    """A durable store whose batches commit only when the test says so."""

    def __init__(self) -> None:
        self.last_tag = 0
        self.committed = 0
        self.changes = 0

    @property
    def holds_replies(self) -> bool:
        return True

    def added(self, queue: str, msg: Any) -> None:
        self.changes += 1
        self.last_tag = self.committed + 1


def gate_for(store: Store) -> tuple[CommitGate, list[float]]:
    now = [0.0]
    return CommitGate(store, lambda: now[0]), now


def applied(gate: CommitGate, broker: Broker, msg: Any) -> list[Any]:
    """What goes out at once for ``msg`` (the gate holds the rest)."""
    before = broker.store.changes
    outs = broker.handle(1, msg)
    return [] if gate.hold(before, outs) else outs


def test_a_dedup_repeat_is_not_confirmed_before_the_put_it_repeats_commits() -> None:
    # The repeat changes nothing in the store, so it used to go out at once, while the
    # put it repeats still waited for the disk: "stored", then lost with a kill -9.
    store = PendingStore()
    broker = Broker(store)
    broker.connection_made(1)
    gate, _ = gate_for(store)
    first = Put(1, "q", b"order-42", options=PutOptions(dedup_id="order-42"))
    assert applied(gate, broker, first) == []  # held for its batch
    repeat = Put(2, "q", b"order-42", options=PutOptions(dedup_id="order-42"))
    assert applied(gate, broker, repeat) == []  # held too, though it stored nothing
    store.committed = store.last_tag
    assert gate.committed(store.committed) == [(1, Confirmed(1, 1)), (1, Confirmed(2, 1))]
    # once everything is committed, a repeat is confirmed at once
    again = Put(3, "q", b"order-42", options=PutOptions(dedup_id="order-42"))
    assert applied(gate, broker, again) == [(1, Confirmed(3, 1))]


def test_replies_that_report_no_change_pass_while_a_batch_is_pending() -> None:
    store = PendingStore()
    broker = Broker(store)
    broker.connection_made(1)
    gate, _ = gate_for(store)
    applied(gate, broker, Put(1, "q", b"x"))
    assert applied(gate, broker, Put(2, "q", b"y")) == []
    (reply,) = applied(gate, broker, Get(3, "q", 1, 0, True))  # nothing for the store
    assert isinstance(reply[1], Deliver)


def test_overdue_confirmations_become_unavailable_and_the_rest_go_as_they_are() -> None:
    store = PendingStore()
    gate, now = gate_for(store)
    store.last_tag, store.changes = 1, 1
    assert gate.hold(0, [(1, Confirmed(5, 1)), (2, Ok(6, 0))])
    now[0] = 4.0
    assert gate.overdue(5.0) == []
    now[0] = 6.0
    ((c, err), other) = gate.overdue(5.0)
    assert c == 1 and isinstance(err, Error) and err.code == "unavailable" and err.req == 5
    assert other == (2, Ok(6, 0)) and len(gate) == 0 and not gate.owes(1)


class TaskStore(PendingStore):
    """PendingStore that also counts the tasks taken and not yet done as a change."""

    def taken(self, queue: str, n: int) -> None:
        self.changes += 1
        self.last_tag = self.committed + 1


def test_a_join_is_not_answered_before_the_task_done_that_ended_the_count_commits() -> None:
    # A JOIN answered at once (no task left) changes nothing in the store, so it used to go
    # out while the TASK_DONE that brought the count to 0 still waited for the disk: a
    # crash then lost the TASK_DONE after join() had returned.
    store = TaskStore()
    broker = Broker(store)
    broker.connection_made(1)
    gate, now = gate_for(store)
    applied(gate, broker, Put(1, "q", b"x"))
    store.committed = store.last_tag
    gate.committed(store.committed)
    applied(gate, broker, Get(2, "q", 1, 0, False))  # auto-acked: taken (a change, held)
    store.committed = store.last_tag
    ((_, delivered),) = gate.committed(store.committed)
    assert isinstance(delivered, Deliver)
    assert applied(gate, broker, TaskDone(3, "q", 1)) == []  # held for its batch
    assert applied(gate, broker, Join(4, "q", 0.0)) == []  # held behind it
    store.committed = store.last_tag
    assert [m for _, m in gate.committed(store.committed)] == [Ok(3, 0), Joined(4, 0)]
    # once everything is committed, a JOIN is answered at once
    assert applied(gate, broker, Join(5, "q", 0.0)) == [(1, Joined(5, 0))]
    # and one held past store_timeout goes out as unavailable, not as "all done"
    store.last_tag, store.changes = store.committed + 1, store.changes + 1
    assert gate.hold(store.changes, [(1, Joined(6, 0))])
    now[0] = 10.0
    ((_, late),) = gate.overdue(5.0)
    assert isinstance(late, Error) and late.code == "unavailable" and "join again" in late.message
