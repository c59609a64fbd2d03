"""``pigeon.consume.leases``: the keeper extends slow work from the queue's own lease, on
every backend, also while ``mode="auto"`` measures and when the broker comes up late."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

import pigeon
from pigeon.testing.broker import BrokerThread
from tests.consume._support import SEEN, record


def test_auto_mode_keeps_the_lease_of_what_it_measures(broker: BrokerThread) -> None:
    url = broker.url("measured", lease=1)
    with pigeon.Queue(url) as q:
        q.put("slow")
    calls: list[str] = []

    def slow(item: str) -> None:
        calls.append(item)
        time.sleep(2.5)  # more than twice the lease

    stop = threading.Event()
    stolen: list[Any] = []

    def other() -> None:
        with pigeon.Queue(url) as q2, contextlib.suppress(pigeon.Empty):
            stolen.append(q2.get(timeout=2.0))

    t = threading.Timer(0.3, other)
    t.start()
    threading.Timer(3.5, stop.set).start()
    report = pigeon.consume(url, slow, stop=stop, grace=5)  # mode="auto"
    t.join()
    assert calls == ["slow"] and stolen == []
    assert report.processed == 1 and report.settle_errors == 0


@pytest.mark.parametrize("mode", ["async", "process"])
def test_the_keeper_extends_the_leases_of_coroutines_and_process_workers(
    broker: BrokerThread, mode: str
) -> None:
    """One keeper for every mode: a coroutine's message is extended on its loop, a process
    worker's in the parent that holds it."""
    url = broker.url(f"kept-{mode}", lease=1)
    with pigeon.Queue(url) as q:
        q.put("slow")
    stop = threading.Event()
    handler = _slow_coroutine if mode == "async" else _slow_function
    threading.Timer(4.0, stop.set).start()
    report = pigeon.consume(url, handler, mode=mode, concurrency=2, stop=stop, grace=10)
    assert report.processed == 1 and report.failed == 0 and report.settle_errors == 0
    with pigeon.Queue(url) as q:
        info = q._info()  # type: ignore[attr-defined]
    assert info["delivered_total"] == 1, info  # never redelivered while it ran


async def _slow_coroutine(item: str) -> None:
    await asyncio.sleep(2.5)  # more than twice the lease


def _slow_function(item: str) -> None:
    time.sleep(2.5)


def _runs_once_past_its_lease(url: str, **put_options: Any) -> None:
    """One item whose handler runs three leases of 1 s, two thread workers: the keeper
    must extend it from the queue's own lease, or the other worker gets it too."""
    with pigeon.Queue(url, **put_options) as q:
        q.put("job-1")
    stop = threading.Event()

    def handler(item: str) -> None:
        record(item)
        time.sleep(3.0)
        stop.set()  # a redelivery would have begun by now (a second lease has passed)

    report = pigeon.consume(url, handler, mode="thread", concurrency=2, stop=stop, grace=10)
    assert SEEN["job-1"] == 1, f"handled {SEEN['job-1']} times"
    assert report.processed == 1 and report.settle_errors == 0


@pytest.mark.slow
@pytest.mark.parametrize("declared", ["url", "producer"])
def test_the_lease_keeper_keeps_the_lease_redis_holds(declared: str) -> None:
    from tests._services import queue_name, require_service

    require_service("redis", 6379)
    url = f"redis://127.0.0.1:6379/{queue_name()}"
    if declared == "url":
        _runs_once_past_its_lease(f"{url}?lease=1")
    else:  # another client declared the lease; this one's URL says nothing of it
        _runs_once_past_its_lease(url, lease=1)


@pytest.mark.slow
def test_the_lease_keeper_keeps_the_ack_wait_of_the_nats_consumer() -> None:
    from tests._services import queue_name, require_service

    require_service("nats", 4222)
    _runs_once_past_its_lease(f"nats://127.0.0.1:4222/{queue_name().replace('-', '_')}?lease=1")


@pytest.mark.slow
def test_the_lease_keeper_learns_the_lease_of_a_broker_that_comes_up_late() -> None:
    from tests._services import free_port

    port = free_port()
    url = f"pigeon://127.0.0.1:{port}/late"
    q: pigeon.Queue[str] = pigeon.Queue(url, reconnect_timeout=1)
    later: dict[str, BrokerThread] = {}
    stop = threading.Event()

    def handler(item: str) -> None:
        record(item)
        time.sleep(3.0)
        stop.set()

    def start_broker() -> None:  # the worker was deployed first
        time.sleep(1.5)
        later["b"] = BrokerThread(port=port, default_lease=1.0).start()
        with pigeon.Queue(url) as p:
            p.put("job-1")

    starter = threading.Thread(target=start_broker)
    starter.start()
    try:
        report = pigeon.consume(q, handler, mode="thread", concurrency=2, stop=stop, grace=10)
    finally:
        starter.join()
        q.close()
        later["b"].stop()
    assert SEEN["job-1"] == 1 and report.processed == 1 and report.settle_errors == 0
