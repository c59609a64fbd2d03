"""pigeon.consume (issue 13): every item handled once, retries and dead letters, stopping,
and the mode chosen by measuring the handler."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.testing.broker import BrokerThread

SEEN: collections.Counter[Any] = collections.Counter()
LOCK = threading.Lock()


def record(item: Any) -> None:
    with LOCK:
        SEEN[item] += 1


def flaky(item: Any) -> None:
    """Fails the first two times it sees an item."""
    record(item)
    if SEEN[item] <= 2:
        raise RuntimeError(f"failure {SEEN[item]} on {item!r}")


def always_fails(item: Any) -> None:
    raise ValueError(f"cannot handle {item!r}")


def cpu_bound(item: Any) -> None:
    data = str(item).encode()
    for _ in range(20_000):
        data = hashlib.sha256(data).digest()


def sleeps(item: Any) -> None:
    time.sleep(0.02)


async def coroutine(item: Any) -> None:
    await asyncio.sleep(0.001)
    record(item)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def test_two_hundred_items_through_four_threads_are_each_handled_once() -> None:
    q = pigeon.Queue()
    q.put_many(range(200))
    q.shutdown()  # consume returns once the queue is drained
    report = pigeon.consume(q, record, mode="thread", concurrency=4)
    assert report.processed == 200 and report.failed == 0 and report.mode == "thread"
    assert collections.Counter(range(200)) == SEEN
    assert q.qsize() == 0
    q.close()


@pytest.mark.parametrize("where", ["local", "pigeon"])
def test_retries_then_success_and_dead_letters(broker: BrokerThread, where: str) -> None:
    q = pigeon.Queue() if where == "local" else pigeon.Queue(broker.url("retry"))
    q.put("flaky")
    q.shutdown()
    retry = pigeon.Retry(attempts=3, backoff=0.01)
    report = pigeon.consume(q, flaky, mode="thread", concurrency=2, retry=retry)
    assert SEEN["flaky"] == 3 and report.processed == 1
    assert report.failed == 2 and report.retried == 2 and report.dead == 0
    q.close()

    q = pigeon.Queue() if where == "local" else pigeon.Queue(broker.url("doomed"))
    q.put("poison")
    q.shutdown()
    report = pigeon.consume(q, always_fails, mode="thread", concurrency=1, retry=retry)
    assert report.dead == 1 and report.processed == 0 and report.failed == 3
    if where == "local":  # no dead-letter queue: kept in the report, never dropped
        (letter,) = report.dead_letters
        assert letter.item == "poison" and "ValueError" in letter.error
    else:
        with pigeon.Queue(broker.url("doomed.dead")) as dead:
            (shown,) = dead.peek(5)  # type: ignore[attr-defined]
            assert shown["body"] == "poison" and "ValueError: cannot handle" in shown["reason"]
    q.close()


def test_stop_midway_loses_nothing(broker: BrokerThread) -> None:
    q = pigeon.Queue(broker.url("stoppable"))
    q.put_many(range(300))
    stop = threading.Event()

    def slow(item: Any) -> None:
        record(item)
        time.sleep(0.005)
        if len(SEEN) >= 50:
            stop.set()

    report = pigeon.consume(q, slow, mode="thread", concurrency=4, stop=stop)
    left = q.get_many(1000, timeout=5)
    assert report.processed + len(left) == 300
    assert sorted([*SEEN, *left]) == list(range(300))
    q.close()


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


def test_process_mode_over_the_network(broker: BrokerThread) -> None:
    q = pigeon.Queue(broker.url("procs"))
    q.put_many(range(30))
    q.shutdown()
    report = pigeon.consume(q, cpu_bound, mode="process", concurrency=2)
    assert report.processed == 30 and report.mode == "process"
    q.close()


def test_bad_arguments_say_what_to_do() -> None:
    q = pigeon.Queue()
    with pytest.raises(ValueError, match="mode must be one of"):
        pigeon.consume(q, record, mode="fibers")
    with pytest.raises(ValueError, match="async def handler runs in mode='async'"):
        pigeon.consume(q, coroutine, mode="thread")
    with pytest.raises(ValueError, match="attempts must be an int >= 1"):
        pigeon.Retry(attempts=0)
    q.close()


def test_retry_delay_follows_the_formula() -> None:
    r = pigeon.Retry(backoff=1.0, max_backoff=5.0, jitter=False)
    assert [r.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    j = pigeon.Retry(backoff=1.0, max_backoff=60.0)
    assert all(0 <= j.delay(3) <= 4.0 for _ in range(100))


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pigeon", "worker", *args, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_pigeon_worker_drains_a_queue_and_exits_0(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("cli")) as q:
        q.put_many(range(50))
    proc = _worker(broker.url("cli"), "tests._handlers:quick", "--drain", "--mode", "thread")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "processed 50," in err
    with pigeon.Queue(broker.url("cli")) as q:
        assert q.qsize() == 0


def test_sigterm_finishes_work_in_progress_and_leaves_the_rest(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("term")) as q:
        q.put_many(range(100))
    proc = _worker(broker.url("term"), "tests._handlers:slow", "-c", "2", "--mode", "thread")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    processed = int(err.split("processed ", 1)[1].split(",", 1)[0])
    with pigeon.Queue(broker.url("term")) as q:
        info = q._info()  # type: ignore[attr-defined]
    assert 0 < processed < 100
    assert info["in_flight"] == 0 and processed + info["depth"] == 100
