"""``pigeon.consume`` end to end (the package's entry, ``consume``): every item handled
once, stopping, arguments, a run that does not end by accident, and what every mode shares
(time limits, handlers raising anything)."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.consume import ConsumeProgress
from pigeon.server.store import open_store
from pigeon.testing.broker import BrokerThread
from tests._proxy import CuttingProxy, settle_ok
from tests.consume._support import SEEN, async_exits_then_works, coroutine, record, sleeps


def test_two_hundred_items_through_four_threads_are_each_handled_once() -> None:
    q = pigeon.Queue()
    q.put_many(range(200))
    q.shutdown()  # consume returns once the queue is drained
    report = pigeon.consume(q, record, mode="thread", concurrency=4)
    assert report.processed == 200 and report.failed == 0 and report.mode == "thread"
    assert collections.Counter(range(200)) == SEEN
    assert q.qsize() == 0
    q.close()


def test_a_supervisor_hears_the_chosen_mode_and_reads_the_counters_of_the_public_call() -> None:
    # what pigeon worker's live view uses, through pigeon.consume itself: on_start once the
    # mode is chosen, the counters in the ConsumeProgress it passed
    q = pigeon.Queue()
    q.put_many(range(20))
    q.shutdown()
    started: list[tuple[str, str, int]] = []
    progress = ConsumeProgress()
    report = pigeon.consume(q, record, mode="thread", concurrency=2,
                            on_start=lambda *a: started.append(a), progress=progress)  # fmt: skip
    assert started == [("thread", "mode='thread' was asked for", 2)]
    with progress.lock:
        assert progress.processed == report.processed == 20
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


def test_bad_arguments_say_what_to_do() -> None:
    q = pigeon.Queue()
    with pytest.raises(ValueError, match="mode must be one of"):
        pigeon.consume(q, record, mode="fibers")
    with pytest.raises(ValueError, match="an async handler runs in mode='async'"):
        pigeon.consume(q, coroutine, mode="thread")
    with pytest.raises(ValueError, match="attempts must be an int >= 1"):
        pigeon.Retry(attempts=0)
    q.close()


class _Flaky:
    """A local queue whose takes fail now and then and whose acks always fail, as a
    restarting broker's do."""

    url = None

    def __init__(self) -> None:
        self.q: pigeon.Queue[Any] = pigeon.Queue()
        self.takes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.q, name)

    def get_message(self, block: bool = True, timeout: float | None = None) -> Any:
        self.takes += 1
        if self.takes % 3 == 0:
            raise pigeon.BrokenResourceError("the broker went away (test)")
        msg = self.q.get_message(block, timeout)

        def ack() -> None:
            raise pigeon.LocalProtocolError("ack of a delivery the broker does not know")

        msg.ack = ack  # type: ignore[method-assign]
        return msg


def test_failed_takes_and_acks_are_logged_and_the_workers_go_on() -> None:
    q = _Flaky()
    q.put_many(range(20))
    q.shutdown()
    report = pigeon.consume(q, record, mode="thread", concurrency=2, grace=5)  # type: ignore[arg-type]
    assert sorted(SEEN) == list(range(20))
    assert report.ended == "shutdown" and report.reason.startswith("shutdown:")
    assert report.settle_errors == 20 and report.worker_deaths == 0
    q.close()


def test_a_broker_restart_does_not_stop_the_runner(tmp_path: Path) -> None:
    first = BrokerThread(store=open_store(tmp_path)).start()
    port = first.port
    url = first.url("restarts")
    with pigeon.Queue(url) as q:
        q.put_many(range(6))
    stop = threading.Event()
    seen: list[int] = []

    def slow(item: int) -> None:
        seen.append(item)
        time.sleep(0.6)

    result: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: result.update(
            r=pigeon.consume(url, slow, mode="thread", concurrency=2, stop=stop, grace=5)
        )
    )
    runner.start()
    time.sleep(0.3)
    first.stop()  # a routine restart while both handlers run
    second = BrokerThread(store=open_store(tmp_path), port=port).start()
    try:
        deadline = time.monotonic() + 30
        while set(seen) != set(range(6)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert runner.is_alive(), "consume returned although nobody stopped it"
        stop.set()
        runner.join(30)
        report = result["r"]
        assert report.ended == "stopped" and report.worker_deaths == 0
        assert set(seen) == set(range(6))
        with pigeon.Queue(url) as q:
            info = q._info()  # type: ignore[attr-defined]
            assert info["depth"] == 0 and info["in_flight"] == 0
    finally:
        stop.set()
        second.stop()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_handler_past_its_time_limit_is_retried_and_its_worker_replaced(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIGEON_TEST_OUT", str(tmp_path / "out"))
    from tests._handlers import chaos

    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many([100, 1, 2, 3])
    q.shutdown()
    retry = pigeon.Retry(attempts=2, backoff=0.01)
    report = pigeon.consume(q, chaos, mode=mode, concurrency=1, time_limit=0.5, retry=retry,
                            grace=1)  # fmt: skip
    assert sorted(map(int, (tmp_path / "out").read_text().split())) == [1, 2, 3]
    assert report.processed == 3 and report.timed_out == 2 and report.dead == 1
    (letter,) = report.dead_letters
    assert letter.item == 100 and letter.error.startswith("TimeLimitExceeded")
    q.close()


def test_handlers_raising_base_exceptions_fail_their_item_and_the_workers_go_on_threads() -> None:
    """SystemExit (sys.exit, argparse in a handler) and KeyboardInterrupt raised by a
    handler are failures of that item: retried, then handled; no worker dies."""
    _base_exceptions_case("thread")


@pytest.mark.parametrize("mode", ["process", "async"])
def test_handlers_raising_base_exceptions_fail_their_item_and_the_workers_go_on(mode: str) -> None:
    _base_exceptions_case(mode)


def _base_exceptions_case(mode: str) -> None:
    from tests._handlers import exits_then_works

    q: pigeon.Queue[str] = pigeon.Queue()
    q.put_many(["exit", "interrupt", "fine"])
    q.shutdown()
    handler = exits_then_works if mode != "async" else async_exits_then_works
    retry = pigeon.Retry(attempts=3, backoff=0.01)
    report = pigeon.consume(q, handler, mode=mode, concurrency=1, retry=retry, grace=5)
    assert report.ended == "shutdown", report.reason
    assert report.processed == 3 and report.failed == 2 and report.retried == 2
    assert report.worker_deaths == 0 and report.dead == 0
    q.close()


def test_process_only_limits_are_refused_for_threads_and_noted_under_auto() -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    with pytest.raises(ValueError, match="max_tasks_per_child apply to process workers"):
        pigeon.consume(q, record, mode="thread", max_tasks_per_child=10)
    with pytest.raises(ValueError, match="max_memory_per_child apply to process workers"):
        pigeon.consume(q, coroutine, max_memory_per_child=2**30)
    q.put_many(range(4))
    q.shutdown()
    report = pigeon.consume(q, sleeps, max_tasks_per_child=10)
    assert report.mode == "thread" and "max_tasks_per_child: process workers only" in report.reason
    q.close()


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_an_ack_whose_outcome_is_unknown_is_logged_and_the_item_not_handled_twice(
    broker: BrokerThread, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply to the first ack is lost (the connection is cut as the broker's OK
    comes); the client sends the ack again and the broker, which applied the first one,
    no longer holds the delivery: ``Indeterminate``. The runner logs it, counts it as a
    settle error and the item as processed, and goes on: nothing crashes, nothing is
    handled twice."""
    with pigeon.Queue(broker.url(f"unknown-ack-{mode}")) as q:
        q.put_many(range(5))
        q.shutdown()
    proxy = CuttingProxy(broker.port, cut=settle_ok)
    try:
        with pigeon.Queue(f"pigeon://127.0.0.1:{proxy.port}/unknown-ack-{mode}") as q:
            handler = coroutine if mode == "async" else record
            report = pigeon.consume(q, handler, mode=mode, concurrency=1, grace=5)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert dict(SEEN) == dict.fromkeys(range(5), 1)
    assert report.ended == "shutdown" and report.processed == 5 and report.settle_errors == 1
    assert "ack may or may not have taken effect (Indeterminate: " in caplog.text
