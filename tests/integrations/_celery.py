"""Around the Celery tests: the framework present (or a clear skip), a broker, workers.

A worker is started the way a user starts one, ``celery -A celery_app worker ...`` in a
subprocess of its own session, so the test can SIGKILL it with its pool processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon

HERE = Path(__file__).parent
# the workers import the same pigeon as the tests (the sources under test)
SRC = Path(pigeon.__file__).parent.parent


def _installed(module: str) -> bool:
    # kombu swaps its module for a lazy one without __spec__, which find_spec refuses
    return module in sys.modules or importlib.util.find_spec(module) is not None


def require_celery() -> None:
    """Skip the module (fail under CI, which installs the dev extra) when Celery or kombu
    is not installed."""
    missing = [m for m in ("celery", "kombu") if not _installed(m)]
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed: pip install 'pigeon-queue[celery]' "
            "(the dev extra has it)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must provide it", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail saying ``what`` did not come."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {value!r})")
        time.sleep(0.05)


class Setup:
    """One test's queue, task log and worker environment on a shared broker."""

    def __init__(self, broker_url: str, tmp: Path, *, lease: float = 60.0, prefetch: int = 1):
        self.broker_url = broker_url
        self.queue = f"celery-{uuid.uuid4().hex[:8]}"
        self.log = tmp / f"{self.queue}.tasks.jsonl"
        self.log.touch()
        self.tmp = tmp
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]),
            "PIGEON_CELERY_BROKER": broker_url,
            "PIGEON_CELERY_QUEUE": self.queue,
            "PIGEON_CELERY_LEASE": str(lease),
            "PIGEON_CELERY_PREFETCH": str(prefetch),
            "PIGEON_CELERY_LOG": str(self.log),
        }
        self.workers: list[Worker] = []

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [
            r
            for r in rows
            if (event is None or r["event"] == event)
            and all(r.get(k) == v for k, v in match.items())
        ]

    def worker(self, *args: str) -> Worker:
        w = Worker(self, len(self.workers), args)
        self.workers.append(w)
        return w

    @contextlib.contextmanager
    def producer(self, **conf: Any) -> Iterator[Any]:
        """A Celery app of the test's own, sending by task name (as a web app would)."""
        from celery import Celery

        import pigeon.integrations.celery  # noqa: F401

        app = Celery("producer", broker=self.broker_url, set_as_current=False)
        app.conf.update(task_default_queue=self.queue, **conf)
        try:
            yield app
        finally:
            app.close()

    def close(self) -> None:
        for w in self.workers:
            w.stop()


class Worker:
    """``python -m celery -A celery_app worker`` with the setup's environment."""

    def __init__(self, setup: Setup, n: int, args: tuple[str, ...]) -> None:
        self.output = setup.tmp / f"{setup.queue}.worker{n}.log"
        self._out = self.output.open("wb")
        cmd = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--loglevel=INFO", "--hostname", f"w{n}-{setup.queue}@%h",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            cwd=HERE,
            env=setup.env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(f"worker {n} ready ({self.output})", self._ready, timeout=60)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited ({self.proc.returncode}):\n{self.log()}")
        return b" ready." in self.output.read_bytes()

    def log(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """A warm shutdown (SIGTERM to the main process, as Celery asks: a pool process
        killed while it holds billiard's inqueue lock hangs the pool's exit), then SIGKILL
        for the whole group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes left behind
        self._out.close()
