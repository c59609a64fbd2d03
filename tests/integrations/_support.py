"""What the Celery, Dramatiq and taskiq tests share: the framework present (or a clear skip,
a failure in CI), its worker CLI in a session of its own, a test's queue with the events
its tasks write, the ``shared`` and ``own`` fixtures, and waiting for what a worker does.

The broker they all run against, a ``pigeon serve`` subprocess, is the ``pigeon_url``
fixture of tests/integrations/conftest.py.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import pigeon
from tests._services import skip_or_fail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# the workers import the same pigeon as the tests (the sources under test)
SRC = Path(pigeon.__file__).resolve().parents[1]
T = TypeVar("T")
S = TypeVar("S", bound="Setup")


def _installed(module: str) -> bool:
    # kombu swaps its module for a lazy one without __spec__, which find_spec refuses
    return module in sys.modules or importlib.util.find_spec(module) is not None


def require(extra: str, *modules: str) -> None:
    """Call at the top of a test module, before importing the framework: skips the module
    when one of ``modules`` is missing, and fails it under CI (``CI`` set), whose dev
    extra installs them."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        skip_or_fail(
            f"{' and '.join(missing)} not installed: pip install 'pigeon-queue[{extra}]' "
            "(the dev extra has it)"
        )


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy, and return that; fail saying
    ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {value!r})")
        time.sleep(0.05)


def tag() -> str:
    """A fresh name for one test's tasks on a shared queue."""
    return uuid.uuid4().hex[:10]


def cli(name: str) -> list[str]:
    """A framework's CLI as a user runs it: the console script beside this Python."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def worker_env(*path: Path, **env: str) -> dict[str, str]:
    """This environment with ``env`` added, and the pigeon under test (then ``path``)
    first on ``PYTHONPATH``."""
    search = [str(SRC), *map(str, path), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(search), **env}


class Worker:
    """A framework's worker CLI, started as a user starts it, in a session of its own (a
    signal to the session reaches its child processes too); its output goes to ``log``."""

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path = HERE
    ) -> None:
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the whole session at once: the worker and its child processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 30.0, *, group: bool = False) -> int | None:
        """SIGTERM to the worker's main process (with ``group``, to the whole session, as
        Ctrl-C in a terminal), and up to ``timeout`` seconds for it to exit; then SIGKILL
        to the session, which also ends the child processes it left. Returns its exit
        status, or None if it had to be killed."""
        code = self.proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                else:
                    self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout)
        self.kill()
        return code


def read_events(path: Path, field: str, kind: str | None = None, /, **match: Any) -> list[Any]:
    """The events a test's tasks appended to ``path`` (one JSON object a line) whose
    ``field`` is ``kind`` (any, if None) and whose other fields have the values ``match``
    gives, in the order they were written."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [
        r
        for r in rows
        if (kind is None or r[field] == kind) and all(r.get(k) == v for k, v in match.items())
    ]


class Setup:
    """One test's queue on the broker, the file its tasks write events to and the workers
    it started (stopped by ``close``)."""

    field = "event"  # what each event's name is under

    def __init__(self, base: str, directory: Path, prefix: str) -> None:
        self.base = base  # pigeon://host:port
        self.queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.dir = directory
        self.events_path = directory / f"{self.queue}.events.jsonl"
        self.workers: list[Worker] = []

    def events(self, kind: str | None = None, /, **match: Any) -> list[Any]:
        return read_events(self.events_path, self.field, kind, **match)

    def info(self, queue: str | None = None) -> dict[str, Any]:
        """The broker's statistics of this test's queue (or of ``queue``)."""
        name = queue or self.queue
        with pigeon.Queue(f"{self.base}/{name}") as q:
            info: dict[str, Any] = q.stats()["queues"].get(name, {})
        return info

    def worker(self, *args: str) -> Worker:
        """A worker on this queue, started with ``args``."""
        raise NotImplementedError

    def close(self) -> None:
        for w in self.workers:
            w.stop()


def setup_fixtures(make: Callable[[str, Path], S], *worker_args: str) -> tuple[Any, Any]:
    """The fixtures ``shared`` (a queue with one worker started with ``worker_args``, for
    the module's tests that need no worker of their own) and ``own`` (a queue of the
    test's own; it starts the workers it needs), each ``make(pigeon_url, directory)``:
    ``shared, own = setup_fixtures(...)`` in the test module."""

    @pytest.fixture(scope="module")
    def shared(pigeon_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S]:
        with contextlib.closing(make(pigeon_url, tmp_path_factory.mktemp("shared"))) as setup:
            setup.worker(*worker_args)
            yield setup

    @pytest.fixture
    def own(pigeon_url: str, tmp_path: Path) -> Iterator[S]:
        with contextlib.closing(make(pigeon_url, tmp_path)) as setup:
            yield setup

    return shared, own
