"""Dramatiq on pigeon, Redis and RabbitMQ: the same no-op task, one worker process, one run.

Run:  python benchmarks/dramatiq_tasks.py [--tasks 10000] [--paced 500 --rate 100]
      [--threads 8] [--brokers pigeon,pigeon-memory,redis,rabbitmq]

Services: Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 (guest/guest); pigeon's
broker is started here (`pigeon serve`: durable, --fsync batch, its default; and
--memory). For each broker, Dramatiq's own CLI runs one worker process
(`dramatiq _dramatiq_app --processes 1 --threads 8`), and this process sends:
  throughput  --tasks no-op tasks sent back to back (one sender thread: sends/s), then
              the worker starts and drains them: tasks/s from the first task's start to
              the last one's
  latency     --paced tasks at --rate per second, so no backlog forms: the delay from
              send() to the task's start, p50 and p99 (both stamps from time.time()
              on this host)
Prints a table (ratios to Redis: tasks/s and p99 delay) and writes
benchmarks/results/dramatiq_tasks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _dramatiq_app import RABBITMQ_URL, REDIS_URL, declare, make_broker
from _report import RESULTS, bars, table
from _serve import wait_listening

HERE = Path(__file__).resolve().parent


@dataclass
class Result:
    name: str
    tasks_per_s: float
    sends_per_s: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def pigeon_serve(memory: bool) -> Iterator[str]:
    port = free_port()
    data = tempfile.mkdtemp(prefix="pigeon-bench-")
    store = ["--memory"] if memory else ["--data-dir", data]
    cmd = [sys.executable, "-m", "pigeon", "serve", "--port", str(port), *store]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield f"pigeon://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def worker(kind: str, url: str | None, queue: str, events: Path, threads: int) -> Iterator[None]:
    found = shutil.which("dramatiq", path=str(Path(sys.executable).parent))
    cli = [found] if found else [sys.executable, "-m", "dramatiq"]
    env = {**os.environ, "BENCH_BROKER": kind, "BENCH_QUEUE": queue, "BENCH_EVENTS": str(events)}
    if url:
        env["BENCH_URL"] = url
    args = ["_dramatiq_app", "--processes", "1", "--threads", str(threads)]
    proc = subprocess.Popen(
        [*cli, *args], cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def started(events: Path) -> list[tuple[float, float]]:
    if not events.exists():
        return []
    out = []
    for line in events.read_text().splitlines():
        sent, start = line.split()
        out.append((float(sent), float(start)))
    return out


def wait_count(events: Path, n: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = started(events)
        if len(rows) >= n:
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {n} tasks started within {timeout:g} s")
        time.sleep(0.05)


def cleanup(kind: str, queue: str) -> None:
    """Remove what the run left on the shared Redis and RabbitMQ."""
    if kind == "redis":
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=f"dramatiq:{queue}*"))
        if keys:
            r.delete(*keys)
        r.close()
    elif kind == "rabbitmq":
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        ch = conn.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            ch.queue_delete(name)
        conn.close()


def run(name: str, kind: str, url: str | None, args: argparse.Namespace) -> Result:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="dramatiq-bench-"))
    events = tmp / "events"
    sender = make_broker(kind, url)
    noop = declare(sender, queue)
    try:
        t0 = time.perf_counter()
        for _ in range(args.tasks):  # before the worker starts: it drains a full queue
            noop.send(time.time())
        sends_per_s = args.tasks / (time.perf_counter() - t0)
        with worker(kind, url, queue, events, args.threads):
            starts = sorted(s for _, s in wait_count(events, args.tasks, 600))
            tasks_per_s = (args.tasks - 1) / (starts[-1] - starts[0])

            gap = 1 / args.rate
            next_at = time.monotonic()
            for _ in range(args.paced):
                next_at += gap
                noop.send(time.time())
                time.sleep(max(0.0, next_at - time.monotonic()))
            paced = wait_count(events, args.tasks + args.paced, 120)[args.tasks :]
            delays = sorted((s - t) * 1000 for t, s in paced)
    finally:
        sender.close()
        cleanup(kind, queue)
        shutil.rmtree(tmp, ignore_errors=True)
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return Result(name, tasks_per_s, sends_per_s, q[49], q[98])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--paced", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--brokers", default="pigeon,pigeon-memory,redis,rabbitmq")
    args = ap.parse_args()

    results = []
    for name in args.brokers.split(","):
        if name in ("pigeon", "pigeon-memory"):
            with pigeon_serve(memory=name == "pigeon-memory") as url:
                results.append(run(name, "pigeon", url, args))
        else:
            results.append(run(name, name, None, args))
        r = results[-1]
        print(f"{r.name}: {r.tasks_per_s:,.0f} tasks/s, p50 {r.p50_ms:.2f} ms", flush=True)

    base = next((r for r in results if r.name == "redis"), results[0])
    title = (
        f"Dramatiq, 1 worker process x {args.threads} threads, {args.tasks:,} no-op tasks; "
        f"delays of {args.paced:,} sent at {args.rate:g}/s (ratios to {base.name})"
    )
    table(
        title,
        ["broker", "tasks/s", "ratio", "sends/s", "p50 ms", "p99 ms", "p99 ratio"],
        [
            [r.name, round(r.tasks_per_s), f"{r.tasks_per_s / base.tasks_per_s:.2f}x",
             round(r.sends_per_s), r.p50_ms, r.p99_ms, f"{r.p99_ms / base.p99_ms:.2f}x"]
            for r in results
        ],
    )  # fmt: skip
    groups = {
        "tasks/s (higher is better)": {r.name: r.tasks_per_s for r in results},
        "p50 send-to-start, ms": {r.name: r.p50_ms for r in results},
        "p99 send-to-start, ms": {r.name: r.p99_ms for r in results},
    }
    path = bars(RESULTS / "dramatiq_tasks.png", title, groups, "")
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
