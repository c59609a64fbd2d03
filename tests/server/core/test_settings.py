"""DECLARE and INFO: a queue's settings, kept by the store."""

from __future__ import annotations

from pigeon.options import DEFAULT_DEDUP_WINDOW
from pigeon.protocol import Declare, Get, Info, Put, PutBatch
from pigeon.protocol.messages import Confirmed
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from tests.server.core._broker import A, B, C, Recorder, replies


def test_info_reports_the_queue(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=5, lease=3.0))
    broker.handle(A, Put(2, "q", b"x"))
    (ok,) = replies(broker.handle(A, Info(3, "q")), A)
    assert ok.value["depth"] == 1 and ok.value["maxsize"] == 5 and ok.value["lease"] == 3.0


def test_lowering_maxsize_refuses_a_parked_batch_that_can_never_fit(broker: Broker) -> None:
    broker.handle(A, Declare(1, "q", maxsize=3))
    broker.handle(A, PutBatch(2, "q", [b"1", b"2"]))
    assert broker.handle(B, PutBatch(1, "q", [b"a", b"b"], None)) == []  # parked
    outs = broker.handle(A, Declare(3, "q", maxsize=1))
    (refused,) = replies(outs, B)
    assert refused.code == "bad_request" and "can never fit in maxsize=1" in refused.message
    broker.handle(A, Get(4, "q", 2, 0))  # the queue drains and takes puts again
    assert replies(broker.handle(C, Put(1, "q", b"c")), C) == [Confirmed(1, 1)]


def test_declared_settings_are_kept_whole_and_a_declare_without_any_is_a_reference() -> None:
    store = Recorder()
    b = Broker(store, limits=Limits(default_lease=30.0))
    b.connection_made(A)
    b.handle(A, Declare(1, "ref"))
    assert store.calls == [] and "ref" not in b.queues
    b.handle(A, Declare(2, "q", lease=5.0))
    b.handle(A, Declare(3, "q", maxsize=7))  # the lease declared before stays
    assert store.of("declared")[-1] == (
        "q",
        {
            "maxsize": 7,
            "lease": 5.0,  # declared before: kept
            "max_deliveries": b.limits.max_deliveries,
            "dedup_window": DEFAULT_DEDUP_WINDOW,
            "shutdown": False,
        },
    )
