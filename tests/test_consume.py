"""pigeon.consume (issue 13): every item handled once, retries and dead letters, stopping,
and the mode chosen by measuring the handler."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
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
from pigeon.consume import ConsumeProgress, run_consumer
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
    from tests import _handlers

    SEEN.clear()
    _TRIES.clear()
    _handlers.TRIED.clear()
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
    with pytest.raises(ValueError, match="an async handler runs in mode='async'"):
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


# --- round 4: the runner's own faults -------------------------------------------------------


def _mail(item: Any) -> None:
    record(item)


class Mailer:
    """A handler object whose ``__call__`` is a coroutine function."""

    async def __call__(self, item: Any) -> None:
        await asyncio.sleep(0)
        record(item)


def _plain_decorator(fn: Any) -> Any:
    def wrapper(*args: Any) -> Any:  # no functools.wraps: nothing tells it is async
        return fn(*args)

    return wrapper


def _wraps_decorator(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


@_wraps_decorator
async def wrapped_coroutine(item: Any) -> None:
    await asyncio.sleep(0)
    record(item)


disguised_coroutine = _plain_decorator(coroutine)


@pytest.mark.parametrize(
    "handler", [Mailer(), wrapped_coroutine, disguised_coroutine], ids=["object", "wraps", "plain"]
)
def test_an_async_handler_the_runner_cannot_see_at_once_is_awaited_not_acked(handler: Any) -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(10))
    q.shutdown()
    report = pigeon.consume(q, handler, concurrency=4)  # mode="auto"
    assert report.mode == "async", report.reason
    assert report.processed == 10 and collections.Counter(range(10)) == SEEN
    q.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_an_async_handler_in_disguise_ends_a_thread_or_process_run_and_loses_nothing(
    mode: str,
) -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(3))
    report = pigeon.consume(q, disguised_coroutine, mode=mode, concurrency=1, grace=1)
    assert report.ended == "failed" and "mode='async'" in (report.error or "")
    assert report.processed == 0 and report.failed == 0
    assert sorted(q.get_many(10, timeout=1)) == [0, 1, 2]  # given back, not acked
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
    handler = exits_then_works if mode != "async" else _async_exits_then_works
    retry = pigeon.Retry(attempts=3, backoff=0.01)
    report = pigeon.consume(q, handler, mode=mode, concurrency=1, retry=retry, grace=5)
    assert report.ended == "shutdown", report.reason
    assert report.processed == 3 and report.failed == 2 and report.retried == 2
    assert report.worker_deaths == 0 and report.dead == 0
    q.close()


_TRIES: collections.Counter[str] = collections.Counter()


async def _async_exits_then_works(item: str) -> None:
    _TRIES[item] += 1
    if _TRIES[item] == 1 and item == "exit":
        raise SystemExit("config not loaded")
    if _TRIES[item] == 1 and item == "interrupt":
        raise KeyboardInterrupt


def test_pigeon_worker_drain_ends_after_a_handler_called_sys_exit(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("exits")) as q:
        q.put_many(["exit", "fine"])
    proc = _worker(broker.url("exits"), "tests._handlers:exits_then_works", "--drain",
                   "--mode", "thread", "-c", "1", "--backoff", "0.01")  # fmt: skip
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "processed 2, failed 1 (1 retried, 0 dead)" in err


def test_an_exception_whose_str_raises_is_a_failure_with_a_reason() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def handler(item: Any) -> None:
        raise Broken

    q: pigeon.Queue[int] = pigeon.Queue()
    q.put(1)
    q.shutdown()
    report = pigeon.consume(q, handler, mode="thread", retry=pigeon.Retry(attempts=1))
    (letter,) = report.dead_letters
    assert letter.error == "Broken: <str() of the exception raised RuntimeError>"
    assert report.worker_deaths == 0
    q.close()


def test_an_undecodable_local_item_is_kept_in_the_dead_letters_as_its_bytes() -> None:
    q: pigeon.Queue[Any] = pigeon.Queue()
    q.put("order-1")
    q.put(_Undecodable())
    q.put("order-3")
    q.shutdown()
    report = pigeon.consume(q, record, mode="thread", concurrency=1)
    assert report.processed == 2 and report.dead == 1
    (letter,) = report.dead_letters
    assert isinstance(letter.item, bytes) and b"_refuse" in letter.item
    assert letter.error.startswith("DecodeError: local queue: an item cannot be decoded")
    q.close()


def _refuse(*fields: str) -> None:
    raise ValueError("schema v2: this consumer only knows v1")


class _Undecodable:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ("id", "amount"))


def _worker_processes() -> list[Any]:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name.startswith("pigeon-worker")]


def _wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_worker_process_that_died_idle_is_replaced_without_blaming_the_next_item() -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    stop = threading.Event()
    progress = ConsumeProgress()
    out: dict[str, pigeon.ConsumeReport] = {}
    runner = threading.Thread(target=lambda: out.update(r=run_consumer(
        q, record, mode="process", concurrency=1, stop=stop, grace=5, progress=progress,
        retry=pigeon.Retry(attempts=1))), daemon=True)  # fmt: skip
    runner.start()
    try:
        _wait_for(_worker_processes)
        (idle,) = _worker_processes()
        os.kill(idle.pid, signal.SIGKILL)  # the OOM killer, while it has nothing to do
        idle.join(10)
        q.put(42)
        _wait_for(lambda: progress.processed + progress.failed == 1)
    finally:
        stop.set()
        runner.join(30)
    report = out["r"]
    assert report.processed == 1 and report.failed == 0 and report.dead == 0
    assert report.worker_deaths == 1
    q.close()


def test_a_retired_worker_process_ends_on_its_own_while_a_younger_sibling_lives() -> None:
    """Every child forked later used to inherit the parent's end of its older siblings'
    pipes, so a retired child never saw its end of file and was killed after 5 s."""
    import multiprocessing

    from pigeon.consume import _Child

    ctx = multiprocessing.get_context("fork")
    older = _Child(ctx, record, 0)
    younger = _Child(ctx, record, 1)
    try:
        older.retire()
        assert older.proc.exitcode == 0  # ended when asked, not SIGKILLed (-9)
    finally:
        younger.retire()
    assert younger.proc.exitcode == 0


def test_a_body_dead_lettered_for_killing_workers_is_tried_afresh_when_it_comes_again(
    tmp_path: Path,
) -> None:
    pressure = tmp_path / "pressure"
    pressure.touch()
    q: pigeon.Queue[dict[str, str]] = pigeon.Queue()
    job = {"job": "refresh-cache"}
    q.put(job)
    stop = threading.Event()
    progress = ConsumeProgress()
    out: dict[str, pigeon.ConsumeReport] = {}
    handler = functools.partial(_killed_under_pressure, str(pressure))
    runner = threading.Thread(target=lambda: out.update(r=run_consumer(
        q, handler, mode="process", concurrency=1, stop=stop, grace=5, progress=progress,
        retry=pigeon.Retry(attempts=10, backoff=0.0))), daemon=True)  # fmt: skip
    runner.start()
    try:
        _wait_for(lambda: progress.dead == 1)  # three deaths: dead-lettered as worker_died
        pressure.unlink()  # the cause is gone
        q.put(job)  # the next run of the periodic job, or the dead letter replayed
        _wait_for(lambda: progress.processed == 1)
    finally:
        stop.set()
        runner.join(30)
    report = out["r"]
    assert report.processed == 1 and report.dead == 1 and _killed(tmp_path) == 3
    assert report.dead_letters[0].error.startswith("worker_died: the item killed 3")
    q.close()


def _killed(where: Path) -> int:
    p = where / "killed"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _killed_under_pressure(pressure: str, item: Any) -> None:
    where = Path(pressure).parent
    if os.path.exists(pressure):
        with open(where / "killed", "a") as f:
            f.write("x\n")
        os.kill(os.getpid(), signal.SIGKILL)
    (where / "handled").touch()


def test_retry_delay_is_defined_for_any_delivery_count() -> None:
    r = pigeon.Retry(attempts=10**9, backoff=1.0, max_backoff=60.0, jitter=False)
    assert r.delay(1025) == r.delay(1100) == r.delay(10**12) == 60.0
    assert pigeon.Retry(backoff=0.0, jitter=False).delay(10**6) == 0.0


def test_an_item_retried_past_a_thousand_deliveries_stays_in_the_queue() -> None:
    q: pigeon.Queue[str] = pigeon.Queue()
    q.put("invoice")
    tries: list[int] = []

    def handler(item: str) -> None:
        tries.append(1)
        if len(tries) <= 1100:
            raise ConnectionError("billing service down")

    q.shutdown()
    report = pigeon.consume(q, handler, mode="thread", concurrency=1, grace=1,
                            retry=pigeon.Retry(attempts=10**9, backoff=0.0))  # fmt: skip
    assert report.processed == 1 and report.failed == 1100 and report.worker_deaths == 0
    q.close()


async def _ignores_cancellation(item: Any) -> None:
    record(item)
    while True:  # a retry loop with a bare except: swallows CancelledError too
        try:
            await asyncio.sleep(0.1)
            raise ConnectionError("payment API unreachable")
        except BaseException:
            continue


def test_an_async_handler_that_ignores_cancellation_does_not_hold_the_run_past_grace() -> None:
    q: pigeon.Queue[str] = pigeon.Queue()
    q.put("order-7")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    out: dict[str, pigeon.ConsumeReport] = {}
    runner = threading.Thread(target=lambda: out.update(r=pigeon.consume(
        q, _ignores_cancellation, concurrency=1, stop=stop, grace=0.5)), daemon=True)  # fmt: skip
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "consume did not return after grace"
    assert out["r"].ended == "stopped" and SEEN["order-7"] == 1
    assert q.get(timeout=1) == "order-7"  # given back
    q.close()


def test_an_async_handler_that_ignores_its_time_limit_is_left_behind_and_replaced() -> None:
    async def handler(item: str) -> None:
        if item == "stuck":
            await _ignores_cancellation(item)
        record(item)

    q: pigeon.Queue[str] = pigeon.Queue()
    q.put_many(["stuck", "a", "b"])
    q.shutdown()
    report = pigeon.consume(q, handler, concurrency=1, time_limit=0.3, grace=1,
                            retry=pigeon.Retry(attempts=1))  # fmt: skip
    assert report.ended == "shutdown" and report.processed == 2 and report.timed_out == 1
    (letter,) = report.dead_letters
    assert letter.item == "stuck" and letter.error.startswith("TimeLimitExceeded")
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


def test_a_child_forked_under_a_live_display_writes_to_the_real_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console
    from rich.file_proxy import FileProxy

    from pigeon.consume import _plain_streams

    real = sys.stdout
    monkeypatch.setattr(sys, "stdout", FileProxy(Console(), real))
    _plain_streams()
    assert sys.stdout is real


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


def test_sigterm_to_the_process_group_lets_process_workers_finish_within_grace(
    broker: BrokerThread, tmp_path: Path
) -> None:
    """systemd (KillMode=control-group), timeout(1) and `kill -TERM -PGID` signal every
    process of the group: the workers must leave the stopping to their parent."""
    with pigeon.Queue(broker.url("group")) as q:
        q.put_many([1, 2])
    env = {**os.environ, "PIGEON_TEST_OUT": str(tmp_path / "out")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "worker", broker.url("group"), "tests._handlers:steady",
         "--quiet", "--mode", "process", "-c", "2", "--attempts", "1", "--grace", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1], start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (tmp_path / "out").exists()
                  and len((tmp_path / "out").read_text().split()) == 2, 30)  # fmt: skip
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "processed 2, failed 0" in err
    with pigeon.Queue(broker.url("group.dead")) as dead:
        assert dead.qsize() == 0


_HANG_ONCE = Path(f"/tmp/pigeon-test-hang-after-fork-{os.getpid()}")


def _hang_in_one_child() -> None:
    """A library's at-fork hook that gets stuck, in the first child forked after the
    marker file appears."""
    with contextlib.suppress(FileNotFoundError):
        _HANG_ONCE.unlink()
        time.sleep(3600)


os.register_at_fork(after_in_child=_hang_in_one_child)


def test_a_large_item_for_a_worker_process_that_does_not_read_is_bound_by_the_time_limit() -> None:
    q: pigeon.Queue[bytes] = pigeon.Queue()
    q.put(b"x" * 2**20)  # far more than a pipe holds
    q.shutdown()
    _HANG_ONCE.touch()
    out: dict[str, pigeon.ConsumeReport] = {}
    runner = threading.Thread(target=lambda: out.update(r=pigeon.consume(
        q, record, mode="process", concurrency=1, time_limit=1, grace=1,
        retry=pigeon.Retry(attempts=1))), daemon=True)  # fmt: skip
    try:
        runner.start()
        runner.join(60)
    finally:
        _HANG_ONCE.unlink(missing_ok=True)
    assert not runner.is_alive(), "the dispatcher hung sending the item"
    report = out["r"]
    assert report.timed_out == 1 and report.dead == 1
    q.close()
