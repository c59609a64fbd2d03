"""``pigeon.consume.threads``: what a stop does to thread workers still running."""

from __future__ import annotations

import threading
import time

import pigeon
from pigeon.testing.broker import BrokerThread


def test_work_still_running_after_grace_is_given_back_at_once(broker: BrokerThread) -> None:
    url = broker.url("late", lease=60)
    with pigeon.Queue(url) as q:
        q.put("slow")
    stop = threading.Event()
    started = threading.Event()

    def stuck(item: str) -> None:
        started.set()
        time.sleep(5)

    threading.Timer(0.5, stop.set).start()
    report = pigeon.consume(url, stuck, mode="thread", concurrency=1, stop=stop, grace=0.3)
    assert started.is_set() and report.ended == "stopped" and report.processed == 0
    with pigeon.Queue(url) as q:  # back in the queue now, not after the 60 s lease
        info = q._info()  # type: ignore[attr-defined]
        assert info["in_flight"] == 0 and info["depth"] == 1
        assert q.get(timeout=1) == "slow"
