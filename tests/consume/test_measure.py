"""``pigeon.consume.measure``: ``mode="auto"`` picks processes for CPU-bound handlers,
threads for waiting ones, coroutines for async ones."""

from __future__ import annotations

import collections

import pigeon
from pigeon.testing.broker import BrokerThread
from tests.consume._support import SEEN, coroutine, cpu_bound, sleeps


def test_auto_picks_processes_for_cpu_bound_work() -> None:
    q = pigeon.Queue()
    q.put_many(range(40))
    q.shutdown()
    report = pigeon.consume(q, cpu_bound, concurrency=2)
    assert report.mode == "process", report.reason
    assert report.processed == 40 and "CPU" in report.reason
    q.close()


def test_auto_picks_threads_for_waiting_work() -> None:
    q = pigeon.Queue()
    q.put_many(range(40))
    q.shutdown()
    report = pigeon.consume(q, sleeps)
    assert report.mode == "thread", report.reason
    assert report.processed == 40 and "waiting" in report.reason


def test_auto_picks_coroutines_for_an_async_handler(broker: BrokerThread) -> None:
    q = pigeon.Queue(broker.url("coros"))
    q.put_many(range(50))
    q.shutdown()
    report = pigeon.consume(q, coroutine, concurrency=10)
    assert report.mode == "async" and report.processed == 50
    assert collections.Counter(range(50)) == SEEN
    q.close()
