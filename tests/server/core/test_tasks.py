"""TASK_DONE and JOIN, with a wait and without."""

from __future__ import annotations

from pigeon.protocol import Ack, Cancel, Error, Get, Join, Ok, Purge, Put, PutBatch, TaskDone
from pigeon.protocol.messages import Joined
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, Recorder, ids, replies


def test_task_done_and_join(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2"]))
    assert broker.handle(C, Join(1, "q", None)) == []
    broker.handle(B, Get(1, "q", 2, 0))
    assert replies(broker.handle(B, TaskDone(2, "q", 1)), C) == []
    outs = broker.handle(B, TaskDone(3, "q", 1))
    assert (C, Joined(1, 0)) in outs
    assert replies(broker.handle(B, TaskDone(4, "q", 1)), B)[0].code == "value"


def test_task_done_count_zero_is_a_bad_request_not_too_many(broker: Broker) -> None:
    broker.handle(A, Put(1, "q", b"x"))
    (reply,) = replies(broker.handle(A, TaskDone(2, "q", 0)), A)
    assert reply.code == "bad_request" and reply.message.startswith("count")


def test_joins_with_a_wait_are_limited_like_gets() -> None:
    b = Broker(limits=Limits(max_parked_gets_per_connection=2, max_parked_gets=3))
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"unfinished"))
    assert b.handle(A, Join(2, "q", 60.0)) == [] and b.handle(A, Get(3, "other", 1, None)) == []
    ((_, refused),) = b.handle(A, Join(4, "q", 60.0))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert b.handle(B, Join(1, "q", 60.0)) == []
    ((_, refused),) = b.handle(B, Join(2, "q", 60.0))
    assert isinstance(refused, Error) and "max_parked_gets=3" in refused.message


def test_joins_without_a_wait_cost_their_bytes_of_the_parked_budget_and_are_all_answered() -> None:
    # They parked a waiter each with no limit: a million JOINs took 154 MiB.
    from pigeon.server.core.holdings import JOIN_COST

    b = Broker(limits=Limits(max_parked_bytes_per_connection=JOIN_COST * 100_000))
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"unfinished"))
    for req in range(1, 100_001):
        assert b.handle(B, Join(req, "q")) == []
    ((_, refused),) = b.handle(B, Join(100_001, "q"))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert b.parked_bytes == JOIN_COST * 100_000 and b.parked(B) == 100_000
    b.handle(C, Join(1, "q"))
    b.handle(A, Get(2, "q", 1, 0))
    done = b.handle(A, TaskDone(3, "q", 1))
    assert len(replies(done, B)) == 100_000 and replies(done, C) == [Joined(1, 0)]
    assert b.parked_bytes == 0 and b.parked(B) == 0
    b.handle(A, Put(4, "q", b"again"))
    b.handle(B, Join(7, "q"))
    assert b.drain(B) == [(B, Error(7, "timeout", "1 tasks unfinished"))]
    b.handle(C, Join(8, "q"))
    ((conn, stopping),) = b.stop()
    assert conn == C and stopping.req == 8 and stopping.code == "unavailable"
    b.handle(C, Join(9, "q"))
    b.connection_lost(C)
    assert b.parked_bytes == 0


def test_a_join_without_a_wait_can_be_cancelled() -> None:
    from pigeon.server.core.holdings import JOIN_COST

    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"unfinished"))
    b.handle(A, Join(2, "q"))
    b.handle(A, Join(3, "q"))
    b.handle(A, Cancel(2))
    assert b.parked(A) == 1 and b.parked_bytes == JOIN_COST
    b.handle(A, Get(4, "q", 1, 0))
    assert replies(b.handle(A, TaskDone(5, "q", 1)), A) == [Ok(5, 0), Joined(3, 0)]


def test_cancelling_among_many_joins_without_a_wait_looks_up_not_scans() -> None:
    # A CANCEL scanned every bare JOIN of the connection: with a million of them, 500
    # CANCELs of an unused req stalled every other client for 6.5 s.
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"unfinished"))
    for req in range(2, 200_002):
        b.handle(A, Join(req, "q"))
    q = b.queues["q"]
    assert isinstance(q.join_reqs[A], dict)  # indexed by req
    b.handle(A, Cancel(150_000))
    assert 150_000 not in q.join_reqs[A] and b.parked(A) == 199_999
    b.handle(A, Join(300_000, "q"))
    b.handle(A, Join(300_000, "q"))  # the same req while it waits: one JOIN
    assert b.parked(A) == 200_000


def test_the_store_keeps_each_queues_tasks_taken_and_not_yet_done() -> None:
    # unfinished - held: what a restart cannot rebuild from the messages the store holds
    # (round 6, FINDINGS-nemesis.md #2). An ACK or a GET's auto-ack adds to it, TASK_DONE
    # takes off, a purge's max(0, ...) may clamp it; the store is told only of changes.
    store = Recorder()
    b = Broker(store)
    b.connection_made(A)
    b.handle(A, PutBatch(1, "q", [b"1", b"2", b"3", b"4"]))
    b.handle(A, Get(2, "q", 1, 0))  # auto-acked
    (got,) = replies(b.handle(A, Get(3, "q", 2, 0, manual_ack=True)), A)
    b.handle(A, Ack(4, "q", ids(got)))
    assert store.of("taken") == [("q", 1), ("q", 3)]
    assert replies(b.handle(A, TaskDone(5, "q", 2)), A) == [Ok(5, 2)]
    assert store.of("taken")[-1] == ("q", 1)  # 2 unfinished: 1 held, 1 taken
    b.handle(A, TaskDone(6, "q", 2))  # done before the last was taken: 0 unfinished
    assert store.of("taken")[-1] == ("q", -1) and b.queues["q"].unfinished == 0
    store.calls.clear()
    b.handle(A, Purge(7, "q"))  # 0 unfinished, nothing held: the clamp made it 0
    assert store.of("taken") == [("q", 0)]
    b.handle(A, Put(8, "q", b"5"))
    assert store.of("taken") == [("q", 0)]  # a put changes nothing taken
