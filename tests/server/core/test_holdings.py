"""What a connection holds: parked requests within their limits, the record of what it was
handed, CANCEL."""

from __future__ import annotations

from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol import Ack, Cancel, Deliver, Error, Get, Nack, Put, PutBatch
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, payloads, replies


def test_cancelled_get_takes_nothing(broker: Broker) -> None:
    broker.handle(B, Get(5, "q", 1, None))
    broker.handle(B, Cancel(5))
    broker.handle(A, Put(1, "q", b"kept"))
    assert broker.queues["q"].depth == 1


def test_parked_gets_are_limited_per_connection_and_in_all() -> None:
    b = Broker(limits=Limits(max_parked_gets_per_connection=3, max_parked_gets=5))
    for conn in (A, B):
        b.connection_made(conn)
    for req in range(1, 4):
        assert b.handle(A, Get(req, "q", 1, None)) == []  # parked
    ((_, refused),) = b.handle(A, Get(4, "q", 1, None))
    assert isinstance(refused, Error) and refused.code == "limit"
    assert "max_parked_gets_per_connection=3" in refused.message
    assert b.handle(B, Get(1, "q", 1, None)) == [] and b.handle(B, Get(2, "q", 1, None)) == []
    ((_, refused),) = b.handle(B, Get(3, "q", 1, None))
    assert isinstance(refused, Error) and "max_parked_gets=5" in refused.message
    b.handle(A, PutBatch(9, "q", [b"x"]))  # serves A's first GET: room for one more
    assert b.handle(B, Get(3, "q", 1, None)) == []
    b.connection_lost(A)  # its two parked GETs go with it
    assert b.parked_gets == 3
    b.connection_made(C)
    assert b.handle(C, Get(1, "q", 1, None)) == [] and b.handle(C, Get(2, "q", 1, None)) == []


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["get", "ack", "nack", "lease"]), st.integers(1, 12), st.randoms()
        ),
        min_size=1,
        max_size=120,
    )
)
def test_a_lost_connection_gives_back_exactly_what_it_holds_in_order(
    steps: list[tuple[str, int, Any]],
) -> None:
    # What a connection holds is recorded a GET at a time and pruned as it settles (not
    # an index entry per delivery): whatever the mix of GETs, ACKs and NACKs of any
    # subset, a second queue and leases that run out, when it goes, exactly the
    # deliveries it still holds go back, in the order it was handed them, and the
    # record stays about the size of what it holds.
    with mock.patch("pigeon.server.core.holdings._PRUNE_HANDED", 2):  # prune often
        _lose_a_connection_that_holds_a_mix(steps)


def _lose_a_connection_that_holds_a_mix(steps: list[tuple[str, int, Any]]) -> None:
    b = Broker(limits=Limits(default_lease=5.0))
    b.connection_made(A)
    b.connection_made(B)
    b._conns[B].prune_at = 2
    peak = 0
    b.handle(A, PutBatch(1, "q", [b"%d" % i for i in range(400)]))
    b.handle(A, PutBatch(2, "r", [b"r%d" % i for i in range(400)]))
    held: dict[int, tuple[str, bytes]] = {}  # delivery id -> (queue, payload), in order
    now = 0.0
    for req, (what, n, rnd) in enumerate(steps, start=10):
        if what == "get":
            name = rnd.choice(["q", "r"])
            outs = replies(b.handle(B, Get(req, name, n, 0, True), now=now), B)
            if isinstance(outs[0], Deliver):
                held.update((d.id, (name, d.payload)) for d in outs[0].messages)
        elif what == "lease":  # time passes: every lease older than 5 s ends
            now += 3.0
            b.tick(now)
            held = {d: v for d, v in held.items() if d in b.queues[v[0]].in_flight}
        elif held:
            pick = rnd.sample(sorted(held), min(n, len(held)))
            for name in ("q", "r"):
                ids = [d for d in pick if held[d][0] == name]
                if ids:
                    kind = Ack if what == "ack" else Nack
                    b.handle(B, kind(req, name, ids, True), now=now)
            for d in pick:
                del held[d]
        cs = b._conns[B]
        peak = max(peak, len(held))
        assert cs.holding == len(held)
        assert len(cs.handed) <= cs.prune_at <= max(2, 2 * peak)
    waiting = {name: len(b.queues[name].ready) for name in ("q", "r")}
    b.connection_lost(B)
    for name, prefix in (("q", b""), ("r", b"r")):
        back = {p for n, p in held.values() if n == name}
        assert not b.queues[name].in_flight
        (rest,) = replies(b.handle(A, Get(1, name, 1000, 0), now=now), A)
        got = payloads(rest)
        # all it held is back, beside what was waiting, and in the original order
        assert len(got) == waiting[name] + len(back) and back <= set(got)
        assert got == sorted(got, key=lambda p: int(p[len(prefix) :]))


def test_timed_out_getters_do_not_pile_up(broker: Broker) -> None:
    for i in range(1000):  # a consumer polling an empty queue with a short timeout
        broker.handle(B, Get(i, "q", 1, 0.5), now=float(i))
        broker.tick(i + 0.5)
    broker.handle(B, Get(5000, "q", 1, 10.0), now=2000.0)
    assert len(broker.queues["q"].getters) == 1
    assert broker.parked(B) == 1
