"""What the task-framework benchmarks share (celery_tasks.py, dramatiq_tasks.py,
taskiq_tasks.py): the brokers they compare, the worker process, the stamps its tasks
write, the rounds and the report.

Each benchmark sends no-op tasks and runs one worker process with the framework's own CLI.
A task appends one line ``sent started`` (two ``time.time()`` stamps) to an events file,
which this process reads:
  throughput  --tasks tasks sent back to back (sends/s), then the worker is started and
              drains them: tasks/s from the first task's start to the last one's
  latency     then tasks sent at a steady rate, so no backlog forms: the delay from the
              send to the task's start, p50 and p99
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path

from _report import RESULTS, bars, table
from _serve import answers, pigeon_serve

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# The shared services a broker name needs, and where they answer.
SERVICES = {"redis": 6379, "rabbitmq": 5672}


@dataclass(frozen=True)
class Result:
    tasks_per_s: float
    sends_per_s: float
    p50_ms: float
    p99_ms: float


def measured(sends_per_s: float, drained: Sequence[tuple[float, float]],
             paced: Sequence[tuple[float, float]]) -> Result:  # fmt: skip
    """The result of one run from the stamps of the tasks drained as a backlog and of the
    tasks sent at a steady rate."""
    starts = sorted(start for _, start in drained)
    delays = [(start - sent) * 1000 for sent, start in paced]
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return Result((len(starts) - 1) / (starts[-1] - starts[0]), sends_per_s, q[49], q[98])


def stamps(events: Path) -> list[tuple[float, float]]:
    """The ``(sent, started)`` pairs the tasks have written so far, in the order they started."""
    if not events.exists():
        return []
    out = []
    # whole lines only: a worker may be half way through writing the last one
    for line in events.read_text().split("\n")[:-1]:
        sent, start = line.split()
        out.append((float(sent), float(start)))
    return out


def wait_stamps(events: Path, n: int, timeout: float) -> list[tuple[float, float]]:
    """The first ``n`` pairs once that many tasks have started.

    Raises:
        RuntimeError: fewer started within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = stamps(events)
        if len(rows) >= n:
            return rows[:n]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {n} tasks started within {timeout:g} s")
        time.sleep(0.05)


def pace(n: int, rate: float) -> Iterator[float]:
    """``n`` turns at ``rate`` per second: each gives the seconds to wait before its send
    (asked for after the send before it, so a slow send is not added to the gap)."""
    start = time.monotonic()
    for i in range(n):
        yield max(0.0, start + i / rate - time.monotonic())


def phases(send: Callable[[], object], tasks: int, paced: int, rate: float,
           started: AbstractContextManager[object], events: Path) -> Result:  # fmt: skip
    """The two phases: ``tasks`` sends, then, once ``started`` (the worker) is entered, the
    backlog drained and ``paced`` sends at ``rate`` per second."""
    t0 = time.perf_counter()
    for _ in range(tasks):  # before the worker starts: it drains a full queue
        send()
    sends_per_s = tasks / (time.perf_counter() - t0)
    with started:
        drained = wait_stamps(events, tasks, 600)
        for wait in pace(paced, rate):
            time.sleep(wait)
            send()
        steady = wait_stamps(events, tasks + paced, 120)[tasks:]
    return measured(sends_per_s, drained, steady)


async def aphases(send: Callable[[], Awaitable[object]], tasks: int, paced: int, rate: float,
                  started: AbstractContextManager[object], events: Path) -> Result:  # fmt: skip
    """``phases`` for a sender on this event loop (the stamps are waited for in a thread:
    the loop keeps serving the sender's connection meanwhile)."""
    t0 = time.perf_counter()
    for _ in range(tasks):
        await send()
    sends_per_s = tasks / (time.perf_counter() - t0)
    with started:
        drained = await asyncio.to_thread(wait_stamps, events, tasks, 600)
        for wait in pace(paced, rate):
            await asyncio.sleep(wait)
            await send()
        steady = (await asyncio.to_thread(wait_stamps, events, tasks + paced, 120))[tasks:]
    return measured(sends_per_s, drained, steady)


def command(name: str) -> list[str]:
    """The framework's CLI as a user runs it: the console script beside this Python."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", name]


@contextlib.contextmanager
def worker(argv: Sequence[str], log: Path, **env: str) -> Iterator[None]:
    """``argv`` run in this folder with the pigeon of this tree first on its path and
    ``env`` added, its output in ``log``; stopped with SIGTERM (SIGKILL after 60 s).
    The output's tail is shown if it ended any other way."""
    path = os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, cwd=HERE, env={**os.environ, "PYTHONPATH": path, **env},
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
        print(log.read_text(errors="replace")[-2000:], file=sys.stderr)


@contextlib.contextmanager
def broker_url(name: str) -> Iterator[str | None]:
    """For ``pigeon`` and ``pigeon-memory``, a `pigeon serve` of this run's own (durable,
    or ``--memory``) and its URL; for the others, None: their app knows the shared service."""
    if name in ("pigeon", "pigeon-memory"):
        with pigeon_serve(memory=name == "pigeon-memory") as url:
            yield url
    else:
        yield None


def available(names: str) -> list[str]:
    """The comma-separated broker names, less those whose service does not answer (with a
    note)."""
    kept = []
    for name in names.split(","):
        port = next((p for service, p in SERVICES.items() if name.startswith(service)), None)
        if port is not None and not answers(port):
            print(f"{name}: nothing answers on 127.0.0.1:{port}; left out")
        else:
            kept.append(name)
    return kept


def rounds(names: Sequence[str], n: int, run: Callable[[str], Result]) -> dict[str, list[Result]]:
    """``run`` each broker ``n`` times, the rounds interleaved: this VM's speed drifts over
    seconds (see broker.py), so each broker meets every phase of it."""
    runs: dict[str, list[Result]] = {name: [] for name in names}
    for r in range(n):
        for name in names:
            runs[name].append(x := run(name))
            print(f"(round {r + 1}/{n}) {name}: {x.tasks_per_s:,.0f} tasks/s, "
                  f"p50 {x.p50_ms:.2f} ms, p99 {x.p99_ms:.2f} ms", flush=True)  # fmt: skip
    return runs


def report(runs: dict[str, list[Result]], *, title: str, base: str, send: str, delay: str,
           plot: str) -> None:  # fmt: skip
    """A table of the rounds' medians, their range of tasks/s (with more than one round)
    and the ratios to ``base`` (or to the first broker, if ``base`` was not run), and a bar
    chart in benchmarks/results/.
    ``send``: what the framework calls a send (``sends``, ``kicks``); ``delay``: what the
    latency phase measures (``send-to-start``)."""
    median = {name: _median(rs) for name, rs in runs.items()}
    b_name = base if base in median else next(iter(median))
    b = median[b_name]
    spread = len(runs[b_name]) > 1  # the rounds' range of tasks/s, when there are rounds
    table(
        f"{title}; median of {len(runs[b_name])} interleaved round(s), ratios to {b_name}",
        ["broker", "tasks/s", *(["rounds' range"] if spread else []), "ratio", f"{send}/s",
         "p50 ms", "p99 ms", "p99 ratio"],
        [
            [name, round(m.tasks_per_s),
             *(["{:,.0f}-{:,.0f}".format(*_range(runs[name]))] if spread else []),
             f"{m.tasks_per_s / b.tasks_per_s:.2f}x", round(m.sends_per_s), m.p50_ms, m.p99_ms,
             f"{m.p99_ms / b.p99_ms:.2f}x"]
            for name, m in median.items()
        ],
    )  # fmt: skip
    groups = {
        "tasks/s (higher is better)": {n: m.tasks_per_s for n, m in median.items()},
        f"p50 {delay}, ms (lower is better)": {n: m.p50_ms for n, m in median.items()},
        f"p99 {delay}, ms (lower is better)": {n: m.p99_ms for n, m in median.items()},
    }
    path = bars(RESULTS / plot, title, groups, "")
    print(f"plot written to {path}")


def _median(rs: Sequence[Result]) -> Result:
    return Result(*(statistics.median(getattr(x, f.name) for x in rs) for f in fields(Result)))


def _range(rs: Sequence[Result]) -> tuple[float, float]:
    return min(x.tasks_per_s for x in rs), max(x.tasks_per_s for x in rs)
