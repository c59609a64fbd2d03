"""Around the Celery tests: a test's queue on the broker, and its workers.

A worker is started the way a user starts one, ``celery -A celery_app worker ...`` in a
subprocess of its own session, so the test can SIGKILL it with its pool processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integrations import _support
from tests.integrations._support import HERE, wait_for


class Setup(_support.Setup):
    """One test's queue, task log and worker environment on a shared broker."""

    def __init__(self, base: str, tmp: Path, *, lease: float = 60.0, prefetch: int = 1):
        super().__init__(base, tmp, "celery")
        self.broker_url = f"{base}//"  # kombu: the virtual host after the /
        self.env = _support.worker_env(
            HERE,
            PIGEON_CELERY_BROKER=self.broker_url,
            PIGEON_CELERY_QUEUE=self.queue,
            PIGEON_CELERY_LEASE=str(lease),
            PIGEON_CELERY_PREFETCH=str(prefetch),
            PIGEON_CELERY_LOG=str(self.events_path),
        )

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


class Worker(_support.Worker):
    """``python -m celery -A celery_app worker`` with the setup's environment, once ready.
    ``stop()`` is a warm shutdown, SIGTERM to the main process only, as Celery asks (a pool
    process killed while it holds billiard's inqueue lock hangs the pool's exit)."""

    def __init__(self, setup: Setup, n: int, args: tuple[str, ...]) -> None:
        argv = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--loglevel=INFO", "--hostname", f"w{n}-{setup.queue}@%h",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            *args,
        ]  # fmt: skip
        log = setup.dir / f"{setup.queue}.worker{n}.log"
        super().__init__(argv, env=setup.env, log=log)
        wait_for(f"worker {n} ready ({log})", self._ready, timeout=60)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited ({self.proc.returncode}):\n{self.log()}")
        return " ready." in self.output()

    def log(self) -> str:
        return self.output()[-4000:]
