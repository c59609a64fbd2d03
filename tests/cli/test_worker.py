"""``pigeon worker`` (``pigeon.cli.worker``): ``pigeon.consume`` from the command line - its
exit codes, ``--drain``, and signals to it or to its whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
from pigeon.server.store import open_store
from pigeon.testing.broker import BrokerThread
from tests.consume._support import wait_for


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pigeon", "worker", *args, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
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
        cwd=Path(__file__).resolve().parents[2],
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
        cwd=Path(__file__).resolve().parents[2], start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "out").exists()
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
