"""``pigeon.consume.processes``: process workers that die, hang, are recycled, die idle,
inherit nothing of their siblings, or are sent more than a pipe holds."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.consume import ConsumeProgress
from pigeon.testing.broker import BrokerThread
from tests.consume._support import cpu_bound, record, wait_for, worker_processes


def test_process_mode_over_the_network(broker: BrokerThread) -> None:
    q = pigeon.Queue(broker.url("procs"))
    q.put_many(range(30))
    q.shutdown()
    report = pigeon.consume(q, cpu_bound, mode="process", concurrency=2)
    assert report.processed == 30 and report.mode == "process"
    q.close()


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


def test_a_worker_process_that_died_idle_is_replaced_without_blaming_the_next_item() -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    stop = threading.Event()
    progress = ConsumeProgress()
    out: dict[str, pigeon.ConsumeReport] = {}
    runner = threading.Thread(target=lambda: out.update(r=pigeon.consume(
        q, record, mode="process", concurrency=1, stop=stop, grace=5, progress=progress,
        retry=pigeon.Retry(attempts=1))), daemon=True)  # fmt: skip
    runner.start()
    try:
        wait_for(worker_processes)
        (idle,) = worker_processes()
        os.kill(idle.pid, signal.SIGKILL)  # the OOM killer, while it has nothing to do
        idle.join(10)
        q.put(42)
        wait_for(lambda: progress.processed + progress.failed == 1)
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

    from pigeon.consume.processes import Child

    ctx = multiprocessing.get_context("fork")
    older = Child(ctx, record, 0)
    younger = Child(ctx, record, 1)
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
    runner = threading.Thread(target=lambda: out.update(r=pigeon.consume(
        q, handler, mode="process", concurrency=1, stop=stop, grace=5, progress=progress,
        retry=pigeon.Retry(attempts=10, backoff=0.0))), daemon=True)  # fmt: skip
    runner.start()
    try:
        wait_for(lambda: progress.dead == 1)  # three deaths: dead-lettered as worker_died
        pressure.unlink()  # the cause is gone
        q.put(job)  # the next run of the periodic job, or the dead letter replayed
        wait_for(lambda: progress.processed == 1)
    finally:
        stop.set()
        runner.join(30)
    report = out["r"]
    assert report.processed == 1 and report.dead == 1 and _killed(tmp_path) == 3
    assert report.dead_letters[0].error.startswith("worker_died: the item killed 3")
    q.close()


def _killed_on_the_first_calls(calls: str, n: int, item: Any) -> None:
    """SIGKILLs its own worker process on the first ``n`` calls of the run, whatever the
    item (the OOM killer picking workers), then handles."""
    with open(calls, "a+") as f:  # the calls of the whole run, across worker processes
        f.seek(0)
        made = len(f.read())
        f.write("x")
    if made < n:
        os.kill(os.getpid(), signal.SIGKILL)


def test_identical_messages_that_each_killed_one_worker_are_not_poison(
    broker: BrokerThread, tmp_path: Path
) -> None:
    """Three messages with the same bytes, each of which killed one worker: no message
    killed three, so none is dead-lettered (the count was per body: the third went to the
    dead letters on its first delivery)."""
    with pigeon.Queue(broker.url("twins")) as q:
        q.put_many([{"job": "refresh-cache"}] * 3)
        q.shutdown()
    handler = functools.partial(_killed_on_the_first_calls, str(tmp_path / "calls"), 3)
    report = pigeon.consume(
        broker.url("twins"), handler, mode="process", concurrency=1, poison_after=3, grace=5,
        retry=pigeon.Retry(attempts=5, backoff=2.0, jitter=False),  # the twins come first
    )  # fmt: skip
    assert (report.worker_deaths, report.dead, report.processed) == (3, 0, 3)
    with pigeon.Queue(broker.url("twins.dead")) as dead:
        assert dead.qsize() == 0


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


def test_a_child_forked_under_a_live_display_writes_to_the_real_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console
    from rich.file_proxy import FileProxy

    from pigeon.consume.processes import plain_streams

    real = sys.stdout
    monkeypatch.setattr(sys, "stdout", FileProxy(Console(), real))
    plain_streams()
    assert sys.stdout is real
