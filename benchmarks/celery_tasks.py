"""Celery on pigeon's broker, Redis and RabbitMQ: the same no-op task, one worker process.

Run:  python benchmarks/celery_tasks.py [--tasks 10000] [--rate 200] [--rounds 3]
                                        [--only pigeon,redis,rabbitmq]

For each broker, in one run: a `pigeon serve` the benchmark starts (its durable store,
fsync batch), Redis on 127.0.0.1:6379 (db 15) and RabbitMQ on 127.0.0.1:5672
(guest/guest); a broker that does not answer is left out with a note. One worker process,
`celery -A _celery_bench_app worker --pool solo` (Celery's defaults otherwise: early
acks, prefetch multiplier 4), consumes a queue of its own.

Two phases per broker:
  throughput  --tasks no-op tasks sent back to back by one producer (sends/s), then the
              worker started: tasks/s from the first task's start to the last one's
              (the worker draining a backlog, its start-up left out)
  latency     then --tasks/20 tasks (at least 100) sent at --rate per second, a pace
              every broker keeps up with: the delay from apply_async to the task's
              start, p50 and p99 (the worker idles between tasks: no backlog)
Each broker is measured --rounds times, the rounds interleaved; the table gives medians
(and the rounds' range of tasks/s), ratios to pigeon, and benchmarks/results/celery_tasks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _report import RESULTS, bars, table
from _serve import wait_listening

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def pigeon_broker() -> Iterator[str]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="pigeon-celery-bench-") as data:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pigeon", "serve", "--port", str(port), "--data-dir", data],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port)
            yield f"pigeon://127.0.0.1:{port}//"
        finally:
            proc.terminate()
            proc.wait(20)


@contextlib.contextmanager
def running(url: str) -> Iterator[str]:
    yield url


def _env(broker: str, log: Path) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "BENCH_BROKER": broker, "BENCH_LOG": str(log)}


@contextlib.contextmanager
def worker(broker: str, queue: str, log: Path) -> Iterator[None]:
    out = log.with_suffix(".worker.log")
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "_celery_bench_app", "worker",
             "--pool", "solo", "--queues", queue, "--loglevel", "WARNING",
             "--without-heartbeat", "--without-gossip", "--without-mingle",
             "--hostname", f"bench-{queue}@%h"],
            cwd=HERE, env=_env(broker, log), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
        print(out.read_text(errors="replace")[-2000:], file=sys.stderr)


def _lines(log: Path) -> list[tuple[float, float]]:
    rows = []
    for line in log.read_text().splitlines():
        enq, start = line.split()
        rows.append((float(enq), float(start)))
    return rows


def _wait_rows(log: Path, n: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _lines(log)
        if len(rows) >= n:
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {n} tasks ran within {timeout:g} s")
        time.sleep(0.05)


def measure(broker: str, tasks: int, rate: float, tmp: Path) -> dict[str, float]:
    from celery import Celery

    import pigeon.integrations.celery  # noqa: F401

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    log = tmp / f"{queue}.log"
    log.touch()
    app = Celery("bench-producer", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)
    try:
        with app.producer_or_acquire() as producer:

            def send() -> None:
                app.send_task("bench.noop", (time.time(),), producer=producer)

            first = time.time()
            for _ in range(tasks):
                send()
            sent = time.time()
            with worker(broker, queue, log):
                rows = _wait_rows(log, tasks, 600)
                starts = sorted(start for _, start in rows)
                log.write_text("")

                n_lat = max(tasks // 20, 100)
                gap = 1.0 / rate
                t0 = time.monotonic()
                for i in range(n_lat):
                    while time.monotonic() < t0 + i * gap:
                        time.sleep(gap / 10)
                    send()
                lat = _wait_rows(log, n_lat, 120)
                delays = sorted((start - enq) * 1000 for enq, start in lat)
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)  # the worker has stopped
    finally:
        app.close()
    return {
        "sends/s": tasks / (sent - first),
        "tasks/s": (tasks - 1) / (starts[-1] - starts[0]),
        "p50 ms": statistics.median(delays),
        "p99 ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks in the throughput phase")
    ap.add_argument("--rate", type=float, default=200.0, help="tasks/s in the latency phase")
    ap.add_argument("--only", default="pigeon,redis,rabbitmq", help="brokers, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    args = ap.parse_args()

    brokers: dict[str, Any] = {
        "pigeon": pigeon_broker,
        "redis": lambda: running("redis://127.0.0.1:6379/15"),
        "rabbitmq": lambda: running("amqp://guest:guest@127.0.0.1:5672//"),
    }
    ports = {"redis": 6379, "rabbitmq": 5672}
    names = []
    for name in args.only.split(","):
        if name in ports and not _answers(ports[name]):
            print(f"{name}: nothing answers on 127.0.0.1:{ports[name]}; left out")
        else:
            names.append(name)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp:
        # rounds interleaved: this VM's speed drifts over seconds (see broker.py)
        for r in range(args.rounds):
            for name in names:
                with brokers[name]() as url:
                    runs[name].append(measure(url, args.tasks, args.rate, Path(tmp)))
                print(f"(round {r + 1}/{args.rounds}) {name}: {runs[name][-1]}")
    results = {
        n: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for n, rs in runs.items()
    }
    spread = {
        n: (min(x["tasks/s"] for x in rs), max(x["tasks/s"] for x in rs)) for n, rs in runs.items()
    }

    base = results.get("pigeon")
    rows = []
    for name, r in results.items():
        ratio = f"{r['tasks/s'] / base['tasks/s']:.2f}x" if base else "-"
        low, high = spread[name]
        rows.append(
            [name, round(r["sends/s"]), round(r["tasks/s"]), f"{low:,.0f}-{high:,.0f}", ratio,
             r["p50 ms"], r["p99 ms"]]
        )  # fmt: skip
    table(
        f"Celery, {args.tasks:,} no-op tasks, one worker process (--pool solo); latency at "
        f"{args.rate:g} tasks/s; median of {args.rounds} interleaved rounds",
        [
            "broker",
            "sends/s",
            "tasks/s",
            "rounds' range",
            "vs pigeon",
            "enqueue→start p50 ms",
            "p99 ms",
        ],
        rows,
    )
    out = bars(
        RESULTS / "celery_tasks.png",
        f"Celery on three brokers: {args.tasks:,} no-op tasks, one worker process",
        {
            "tasks/s (higher is better)": {n: r["tasks/s"] for n, r in results.items()},
            "enqueue→start p50 ms (lower is better)": {n: r["p50 ms"] for n, r in results.items()},
            "enqueue→start p99 ms (lower is better)": {n: r["p99 ms"] for n, r in results.items()},
        },
        "",
    )
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
