"""GET: what it takes, in which order, within the reply and unacked budgets; serving the lines."""

from __future__ import annotations

import collections
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pigeon.protocol import Ack, Deliver, Error, Get, Nack, Peek, Put, PutBatch
from pigeon.protocol.messages import Confirmed, PutOptions
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, ids, payloads, replies


def test_fifo_and_auto_ack(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"1", b"2", b"3"]))
    (reply,) = replies(broker.handle(B, Get(1, "q", 2, 0)), B)
    assert payloads(reply) == [b"1", b"2"]
    assert [d.id for d in reply.messages] == [0, 0]  # nothing left to ack
    assert broker.queues["q"].depth == 1


def test_empty_without_wait_is_an_error(broker: Broker) -> None:
    (reply,) = broker.handle(A, Get(7, "q", 1, 0))[0:1]
    assert reply == (A, Error(7, "empty", "queue 'q' is empty"))


def test_parked_get_is_served_by_a_later_put(broker: Broker) -> None:
    assert broker.handle(B, Get(5, "q", 1, None)) == []
    outs = broker.handle(A, Put(1, "q", b"x"))
    assert replies(outs, A) == [Confirmed(1, 1)]
    assert payloads(replies(outs, B)[0]) == [b"x"]


def test_parked_get_times_out_on_tick(broker: Broker) -> None:
    broker.handle(B, Get(5, "q", 1, 1.0), now=100.0)
    assert broker.next_deadline() == 101.0
    assert broker.tick(100.5) == []
    assert broker.tick(101.0) == [(B, Error(5, "empty", "queue 'q' is empty"))]


def test_messages_given_back_are_taken_first_then_the_new_ones_in_order(broker: Broker) -> None:
    broker.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(6)]))
    (first,) = replies(broker.handle(B, Get(1, "q", 3, 0, True)), B)
    broker.handle(B, Nack(2, "q", [first.messages[2].id, first.messages[0].id]))
    (again,) = replies(broker.handle(C, Get(1, "q", 4, 0, True)), C)
    assert payloads(again) == [b"0", b"2", b"3", b"4"]
    assert [d.delivery_count for d in again.messages] == [2, 2, 1, 1]
    (rest,) = replies(broker.handle(C, Get(2, "q", 4, 0, True)), C)
    assert payloads(rest) == [b"5"]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    want=st.integers(1, 30),
    held=st.integers(0, 60),
    reply_budget=st.integers(1, 600),
    unacked_budget=st.integers(1, 200),
)
def test_a_get_takes_what_the_reply_and_unacked_budgets_allow_in_order(
    sizes: list[int], want: int, held: int, reply_budget: int, unacked_budget: int
) -> None:
    # The rule, message by message: stop before a message that would take the reply past
    # max_reply_bytes (payload and framing; the first one always fits: a message that
    # could never fit a reply is refused at its put), or, while the connection holds
    # unacked bytes, past max_unacked_bytes. Batches of any size (the broker takes large
    # ones in bulk) must follow it exactly.
    from pigeon.server.core import _DELIVERY_OVERHEAD as over

    assume(held + over <= reply_budget)  # it was taken first, alone
    b = Broker(limits=Limits(max_frame_size=reply_budget, max_unacked_bytes=unacked_budget))
    if held:
        b.handle(A, Put(1, "held", b"h" * held))
        b.handle(B, Get(1, "held", 1, 0, True))
        assert b._conns[B].unacked == held
    lengths = [len(b"%d" % i) + n for i, n in enumerate(sizes)]
    (put,) = b.handle(A, PutBatch(2, "q", [b"%d" % i + b"." * n for i, n in enumerate(sizes)]))
    if max(lengths) + over > reply_budget:
        assert isinstance(put[1], Error) and put[1].code == "too_large"
        assert not b.queues.get("q")
        return
    expect, size, h = 0, 0, held
    for n in lengths[:want]:
        if size + n + over > reply_budget:
            break
        if h and h + n > unacked_budget:
            break
        size, h, expect = size + n + over, h + n, expect + 1
    (reply,) = replies(b.handle(B, Get(2, "q", want, 0, True)), B)
    if expect == 0:
        assert isinstance(reply, Error)
        return
    assert [int(p.split(b".")[0]) for p in payloads(reply)] == list(range(expect))
    assert b._conns[B].unacked == held + sum(lengths[:expect])
    assert len(b.queues["q"].in_flight) == expect
    ids = [d.id for d in reply.messages]
    assert len(set(ids)) == expect and all(d.delivery_count == 1 for d in reply.messages)
    b.handle(B, Ack(3, "q", ids))
    assert b._conns[B].unacked == held and not b.queues["q"].in_flight


def test_a_consumer_holding_max_unacked_bytes_gets_no_more_until_it_acks() -> None:
    broker = Broker(limits=Limits(max_unacked_bytes=10))
    broker.handle(A, PutBatch(1, "q", [b"x" * 6, b"y" * 6, b"z" * 6]))
    (first,) = replies(broker.handle(B, Get(1, "q", 3, 0, True)), B)
    assert payloads(first) == [b"x" * 6]  # a second would pass 10 bytes
    (refused,) = replies(broker.handle(B, Get(2, "q", 1, 0, True)), B)
    assert refused.code == "unacked" and "ack or nack some" in refused.message
    assert broker.handle(B, Get(3, "q", 1, None, True)) == []  # parked
    outs = broker.handle(B, Ack(4, "q", [first.messages[0].id]))
    assert payloads(next(m for c, m in outs if isinstance(m, Deliver))) == [b"y" * 6]
    # another consumer is not held back by B
    assert payloads(replies(broker.handle(C, Get(1, "q", 1, 0, True)), C)[0]) == [b"z" * 6]


def test_get_nowait_is_served_while_another_consumer_is_held_back(broker: Broker) -> None:
    small = Broker(limits=Limits(max_unacked_bytes=1000))
    small.handle(A, Put(1, "q", b"x" * 900))
    small.handle(A, Get(2, "q", 1, 0, True))  # A holds 900 unacked bytes
    small.handle(A, Get(3, "q", 1, 30, True))  # and waits for more: parked
    small.handle(C, Put(1, "q", b"y" * 900))  # A may not take it
    (got,) = replies(small.handle(B, Get(1, "q", 1, 0, True)), B)  # B holds nothing
    assert payloads(got) == [b"y" * 900]


def test_a_get_parked_behind_the_unacked_cap_says_so_when_it_times_out() -> None:
    small = Broker(limits=Limits(max_unacked_bytes=1000))
    small.handle(A, PutBatch(1, "q", [b"x" * 900, b"y" * 900]), now=0.0)
    small.handle(A, Get(2, "q", 1, 0, True), now=0.0)
    assert small.handle(A, Get(3, "q", 1, 1.0, True), now=0.0) == []
    (reply,) = replies(small.tick(1.0), A)
    assert reply.code == "unacked" and "holds 900 unacked bytes" in reply.message


def test_gets_held_back_by_the_unacked_budget_are_limited_and_set_aside() -> None:
    # A connection at its max_unacked_bytes has its GETs passed over while the queue has
    # messages: they used to park with no limit check, and every serve walked them all.
    b = Broker(limits=Limits(max_unacked_bytes=10, max_parked_gets_per_connection=3))
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"x" * 10] * 5))
    (first,) = replies(b.handle(B, Get(1, "q", 1, 0, True)), B)
    outs = [b.handle(B, Get(req, "q", 1, None, True)) for req in range(2, 6)]
    assert outs[:3] == [[], [], []]
    ((_, refused),) = outs[3]
    assert isinstance(refused, Error) and refused.code == "limit"
    q = b.queues["q"]
    assert not q.getters and len(q.blocked[B]) == 3  # out of the line: serving skips them
    assert q.info()["consumers_waiting"] == 3
    got = replies(b.handle(B, Ack(6, "q", ids(first), quiet=True)), B)
    assert [m.req for m in got] == [2]  # the first set aside is served first, one fits
    assert len(q.blocked[B]) == 2 and b.parked_gets == 2


def test_a_reply_takes_only_as_many_items_as_fit() -> None:
    small = Broker(limits=Limits(max_frame_size=3000))
    small.handle(A, PutBatch(1, "q", [b"x" * 1000] * 5))
    (got,) = replies(small.handle(B, Get(1, "q", 10, 0)), B)
    assert len(got.messages) == 2  # 2 x (1000 + overhead) fit in 3000, 3 do not
    assert small.queues["q"].depth == 3


def test_a_reply_counts_headers_within_max_reply_bytes() -> None:
    from pigeon.server.core import _DELIVERY_OVERHEAD as over
    from pigeon.server.core import headers_size

    headers = {"k": "v" * 500}
    b = Broker(limits=Limits(max_frame_size=5_000))
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, PutBatch(1, "q", [b"p"] * 100, None, PutOptions(headers=headers)))
    cost = 1 + over + headers_size(headers)
    (got,) = replies(b.handle(B, Get(1, "q", 100, 0)), B)
    assert len(got.messages) == 5_000 // cost  # headers counted: 9, not 100
    (peeked,) = replies(b.handle(B, Peek(2, "q", 100)), B)
    assert 0 < len(peeked.value) <= 5_000 // cost


def test_a_message_too_large_for_shrunken_limits_is_dead_lettered_not_a_block() -> None:
    # The limits shrank across a restart: the message can never be delivered; it goes to
    # the dead letters (reason too_large) instead of blocking every message behind it.
    b = Broker(limits=Limits(max_frame_size=10_000))
    b.handle(A, PutBatch(1, "q", [b"x" * 500, b"small"]))
    b.limits.max_frame_size = 100
    (reply,) = replies(b.handle(B, Get(1, "q", 10, 0)), B)
    assert payloads(reply) == [b"small"]
    assert b.queues["q.dead"].depth == 1 and b.queues["q.dead"].ready.peek().reason == "too_large"
    (reply,) = replies(b.handle(B, Get(2, "q.dead", 1, 0)), B)  # a dead letter stays put
    assert reply.code == "too_large" and b.queues["q.dead"].depth == 1


def test_a_get_never_receives_a_message_whose_ttl_passed() -> None:
    # Between its expiry and the tick that moves it (a late loop, a broker that just
    # started), a GET used to deliver it.
    wall = [1000.0]
    b = Broker(clock=lambda: 0.0, wall_clock=lambda: wall[0])
    for conn in (A, B):
        b.connection_made(conn)
    b.handle(A, Put(1, "q", b"stale", options=PutOptions(ttl=1.0)), now=0.0)
    b.handle(A, Put(2, "q", b"fresh"), now=0.0)
    (got,) = replies(b.handle(B, Get(1, "q", 10, 0), now=2.0), B)  # no tick in between
    assert payloads(got) == [b"fresh"]
    dead = b.queues["q.dead"].ready.peek()
    assert dead.payload == b"stale" and dead.reason == "expired"


class _CountingLine(collections.deque):  # type: ignore[type-arg]
    """A queue's line of waiters that counts the waiters anyone walks through."""

    walked = 0

    def __iter__(self) -> Any:
        for w in super().__iter__():
            _CountingLine.walked += 1
            yield w


def test_parking_and_serving_getters_does_not_walk_the_whole_line() -> None:
    b = Broker()
    for conn in (A, B, C):
        b.connection_made(conn)
    b.handle(A, Get(1, "q", 1, None))
    q = b.queues["q"]
    q.getters = _CountingLine(q.getters)
    _CountingLine.walked = 0
    n = 4_000
    for req in range(2, n + 2):  # each GET used to scan every parked one
        b.handle(A if req % 2 else B, Get(req, "q", 1, None))
    for req in range(1, 101):  # and so did each put
        b.handle(C, PutBatch(req, "q", [b"x"]))
    assert len(q.getters) == n + 1 - 100
    assert _CountingLine.walked <= 2 * n, _CountingLine.walked
