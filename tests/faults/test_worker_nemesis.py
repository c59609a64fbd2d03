"""The runner under a nemesis (issue 32 item 4): `pigeon worker`, run as a user runs it, in
each mode against a real `pigeon serve` that is killed (-9) and restarted during the run,
with handlers that raise anything (SystemExit and KeyboardInterrupt included), hang past
the time limit, ignore their cancellation or segfault, and signals to the worker's whole
process group: SIGTERM mid-run (systemctl stop in a redeploy: a second worker takes over),
SIGINT at the end (Ctrl-C). Every item must be handled at least once or be in the
dead-letter queue with its reason; each worker must exit 0 (it was asked to stop); nothing
may be left in flight.

Bounded: about 20 s a mode; each wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pigeon
from tests._handlers import ALWAYS_FAILS, HANGS, SEGFAULTS
from tests._services import free_port, start_broker

ITEMS = 60
ROOT = Path(__file__).resolve().parents[2]


def _handled(out: Path) -> set[int]:
    return set(map(int, out.read_text().split())) if out.exists() else set()


def _dead(url: str) -> dict[int, str]:
    try:
        with pigeon.Queue(url + ".dead", reconnect_timeout=2) as dead:
            return {m["body"]: m["reason"] for m in dead.peek(50)}  # type: ignore[attr-defined]
    except pigeon.PigeonError:
        return {}  # the broker is restarting


def _stop_group(worker: subprocess.Popen[str], sig: int) -> str:
    """Signal the worker's whole process group (systemctl stop, Ctrl-C); its stderr."""
    os.killpg(worker.pid, sig)
    try:
        return worker.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        err = worker.communicate()[1]
        pytest.fail(f"pigeon worker still ran 60 s after {signal.Signals(sig).name}: {err[-3000:]}")


def _stopped_as_asked(worker: subprocess.Popen[str], err: str) -> None:
    """Exit code 0 and why; no worker died of what the handlers did or of the signal (a
    segfault kills a worker process: that one is the handler's doing, and allowed)."""
    assert worker.returncode == 0, err[-3000:]
    summary = [line for line in err.splitlines() if line.startswith("processed ")]
    assert summary and "stopped: stop was asked for" in summary[-1], err[-3000:]
    for death in ("died; started another", "a worker task died", "killed by SIGTERM",
                  "killed by SIGINT"):  # fmt: skip
        assert death not in err, err[-3000:]


def _after(out: Path, more: int) -> None:
    """Wait until ``more`` items more are handled (items are in flight then)."""
    deadline = time.monotonic() + 20
    before = len(_handled(out))
    while len(_handled(out)) < before + more and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process", "async"])
def test_pigeon_worker_under_a_nemesis_handles_or_dead_letters_every_item(
    mode: str, tmp_path: Path
) -> None:
    port = free_port()
    broker = start_broker(port, "--lease", "5")
    url = f"pigeon://127.0.0.1:{port}/nemesis"
    with pigeon.Queue(url) as q:
        q.put_many(range(ITEMS))
    out, tried = tmp_path / "out", tmp_path / "tried"
    tried.mkdir()
    handler = "tests._handlers:nemesis_async" if mode == "async" else "tests._handlers:nemesis"
    env = {**os.environ, "PIGEON_TEST_OUT": str(out), "PIGEON_TEST_TRIED": str(tried)}

    def start_worker() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "pigeon", "worker", url, handler, "--quiet", "--mode", mode,
             "-c", "4", "--attempts", "4", "--backoff", "0.05", "--time-limit", "1",
             "--grace", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            start_new_session=True,  # a process group of its own, as under systemd
        )  # fmt: skip

    dead_reasons = {ALWAYS_FAILS: "RuntimeError: ", HANGS: "TimeLimitExceeded: "}
    if mode == "process":
        dead_reasons[SEGFAULTS] = "worker_died: "  # killed 3 workers, or ran out of attempts
    expected = set(range(ITEMS)) - set(dead_reasons)
    worker = start_worker()
    try:
        _after(out, 5)
        broker.send_signal(signal.SIGKILL)  # kill -9 the broker while items are in flight
        broker.wait(10)
        broker = start_broker(port, "--lease", "5")
        _after(out, 5)
        _stopped_as_asked(worker, _stop_group(worker, signal.SIGTERM))  # systemctl stop
        worker = start_worker()
        _after(out, 5)
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        broker = start_broker(port, "--lease", "5")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _handled(out) >= expected and set(_dead(url)) >= set(dead_reasons):
                break
            time.sleep(0.25)
        _stopped_as_asked(worker, _stop_group(worker, signal.SIGINT))  # Ctrl-C
        assert _handled(out) >= expected, f"never handled: {expected - _handled(out)}"
        letters = _dead(url)
        assert set(letters) == set(dead_reasons), letters
        for item, reason in dead_reasons.items():
            assert letters[item].startswith(reason), (item, letters[item])
        with pigeon.Queue(url) as q:
            info = q._info()  # type: ignore[attr-defined]
        assert info["depth"] == 0 and info["in_flight"] == 0, info
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.communicate()
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
