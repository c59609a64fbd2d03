"""pigeon.consume (issue 13): every item handled once, retries and dead letters, stopping,
and the mode chosen by measuring the handler."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
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
from pigeon.server.store import open_store
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


# --- a runner that never stops by accident ------------------------------------------------


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


def test_a_dying_worker_process_is_replaced_and_its_poison_item_dead_lettered(
    broker: BrokerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIGEON_TEST_OUT", str(tmp_path / "out"))
    from tests._handlers import chaos

    with pigeon.Queue(broker.url("crashes")) as q:
        q.put_many([*range(40), 49, *range(50, 60)])
        q.shutdown()
    report = pigeon.consume(broker.url("crashes"), chaos, mode="process", concurrency=2,
                            poison_after=2, grace=5)  # fmt: skip
    done = (tmp_path / "out").read_text().split()
    assert sorted(map(int, done)) == [*range(40), *range(50, 60)]
    assert report.ended == "shutdown" and report.worker_deaths == 2 and report.dead == 1
    with pigeon.Queue(broker.url("crashes.dead")) as dead:
        (letter,) = dead.peek(5)  # type: ignore[attr-defined]
    assert letter["body"] == 49 and letter["reason"].startswith("worker_died: ")
    assert "SIGSEGV" in letter["reason"]


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


def test_process_workers_are_recycled_after_max_tasks_and_max_memory() -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(12))
    q.shutdown()
    report = pigeon.consume(q, record, mode="process", concurrency=1, max_tasks_per_child=5)
    assert report.processed == 12 and report.workers_recycled == 2
    q = pigeon.Queue()
    q.put_many(range(3))
    q.shutdown()
    report = pigeon.consume(q, record, mode="process", concurrency=1, max_memory_per_child=1)
    assert report.processed == 3 and report.workers_recycled == 3
    with pytest.raises(ValueError, match="max_tasks_per_child must be a number > 0"):
        pigeon.consume(q, record, mode="process", max_tasks_per_child=0)


def test_pigeon_worker_exits_1_when_the_run_fails() -> None:
    with BrokerThread(token="s3cret") as b:
        proc = _worker(f"pigeon://127.0.0.1:{b.port}/locked", "tests._handlers:quick",
                       "--mode", "thread")  # fmt: skip
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "failed: AuthError" in err


@pytest.mark.slow
def test_pigeon_worker_survives_restarts_crashes_and_hangs(tmp_path: Path) -> None:
    """The chaos run: 300 items through process workers while the broker restarts twice;
    every 50th item kills its worker, one sleeps past the time limit."""
    out = tmp_path / "out"
    data = tmp_path / "data"
    b = BrokerThread(store=open_store(data)).start()
    port = b.port
    url = b.url("chaos")
    with pigeon.Queue(url) as q:
        q.put_many(range(300))
    env = {**os.environ, "PIGEON_TEST_OUT": str(out)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "worker", url, "tests._handlers:chaos", "--quiet",
         "--mode", "process", "-c", "2", "--time-limit", "2", "--attempts", "2",
         "--backoff", "0.05", "--grace", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    expected = {i for i in range(300) if i % 50 != 49 and i != 100}
    try:
        for _ in range(2):
            time.sleep(2.0)
            b.stop()
            b = BrokerThread(store=open_store(data), port=port).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = set(map(int, out.read_text().split())) if out.exists() else set()
            with pigeon.Queue(b.url("chaos.dead")) as dead:
                if done >= expected and dead.qsize() == 7:
                    break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert set(map(int, out.read_text().split())) == expected
        with pigeon.Queue(b.url("chaos.dead")) as dead:
            letters = {m["body"]: m["reason"] for m in dead.peek(10)}  # type: ignore[attr-defined]
        assert set(letters) == {49, 99, 100, 149, 199, 249, 299}
        assert letters[100].startswith("TimeLimitExceeded")
        assert all(letters[i].startswith("worker_died") for i in letters if i != 100)
        with pigeon.Queue(url) as q:
            info = q._info()  # type: ignore[attr-defined]
        assert info["depth"] == 0 and info["in_flight"] == 0
        print(err.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
        b.stop()


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


def test_async_handlers_have_the_same_time_limit_as_threads() -> None:
    async def handler(item: str) -> None:
        if item == "slow":
            await asyncio.sleep(30)
        if item == "own-timeout":
            raise TimeoutError("the handler's own")  # not the time limit

    q: pigeon.Queue[str] = pigeon.Queue()
    q.put_many(["slow", "own-timeout", "fine"])
    q.shutdown()
    retry = pigeon.Retry(attempts=1)
    report = pigeon.consume(q, handler, concurrency=3, time_limit=0.3, retry=retry, grace=1)
    assert report.mode == "async" and report.processed == 1 and report.timed_out == 1
    errors = sorted(d.error for d in report.dead_letters)
    assert errors[0].startswith("TimeLimitExceeded") and errors[1].startswith("TimeoutError")
    q.close()
