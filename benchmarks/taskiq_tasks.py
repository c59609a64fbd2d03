"""taskiq on pigeon, Redis and RabbitMQ: the same no-op task, one worker process, one run.

Run:  python benchmarks/taskiq_tasks.py [--tasks 10000] [--paced 500 --rate 100]
      [--brokers pigeon,pigeon-memory,redis-list,redis-stream,rabbitmq]

Services: Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 (guest/guest); pigeon's
broker is started here (`pigeon serve`: durable with --fsync batch, its default; and
--memory). For each broker (benchmarks/_taskiq_app.py says how each is configured),
taskiq's own CLI runs one worker process (`taskiq worker _taskiq_app:broker --workers 1`,
its defaults: 100 async tasks, ack when saved), and this process sends:
  throughput  --tasks no-op tasks kicked back to back (`await noop.kiq(...)`: kicks/s),
              then the worker starts and drains them: tasks/s from the first task's start
              to the last one's
  latency     --paced tasks at --rate per second, so no backlog forms: the delay from
              kiq() to the task's start, p50 and p99 (both stamps from time.time() on
              this host)
Prints a table (ratios to redis-stream, taskiq-redis's broker with acks: tasks/s and p99
delay) and writes benchmarks/results/taskiq_tasks.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _report import RESULTS, bars, table
from _serve import wait_listening
from _taskiq_app import RABBITMQ_URL, REDIS_URL, make_broker, noop

HERE = Path(__file__).resolve().parent


@dataclass
class Result:
    name: str
    tasks_per_s: float
    kicks_per_s: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
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
def worker(kind: str, url: str | None, queue: str, events: Path) -> Iterator[None]:
    found = shutil.which("taskiq", path=str(Path(sys.executable).parent))
    cli = [found] if found else [sys.executable, "-m", "taskiq"]
    env = {**os.environ, "BENCH_BROKER": kind, "BENCH_QUEUE": queue, "BENCH_EVENTS": str(events)}
    if url:
        env["BENCH_URL"] = url
    args = ["worker", "_taskiq_app:broker", "--workers", "1", "--log-level", "WARNING"]
    proc = subprocess.Popen([*cli, *args], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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


async def wait_count(events: Path, n: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = started(events)
        if len(rows) >= n:
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {n} tasks started within {timeout:g} s")
        await asyncio.sleep(0.05)


async def cleanup(kind: str, queue: str) -> None:
    """Remove what the run left on the shared Redis and RabbitMQ."""
    if kind.startswith("redis"):
        import redis.asyncio as redis

        r = redis.Redis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=f"*{queue}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    elif kind == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(RABBITMQ_URL)
        ch = await conn.channel()
        for name in (queue, f"{queue}.dead"):
            await ch.queue_delete(name)
        await ch.exchange_delete(queue)
        await conn.close()


async def run(name: str, kind: str, url: str | None, args: argparse.Namespace) -> Result:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="taskiq-bench-"))
    events = tmp / "events"
    sender = make_broker(kind, queue, url)
    task = sender.register_task(noop, task_name="noop")
    await sender.startup()
    try:
        t0 = time.perf_counter()
        for _ in range(args.tasks):  # before the worker starts: it drains a full queue
            await task.kiq(time.time())
        kicks_per_s = args.tasks / (time.perf_counter() - t0)
        with worker(kind, url, queue, events):
            starts = sorted(s for _, s in await wait_count(events, args.tasks, 600))
            tasks_per_s = (args.tasks - 1) / (starts[-1] - starts[0])

            gap = 1 / args.rate
            next_at = time.monotonic()
            for _ in range(args.paced):
                next_at += gap
                await task.kiq(time.time())
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            paced = (await wait_count(events, args.tasks + args.paced, 120))[args.tasks :]
            delays = sorted((s - t) * 1000 for t, s in paced)
    finally:
        await sender.shutdown()
        await cleanup(kind, queue)
        shutil.rmtree(tmp, ignore_errors=True)
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return Result(name, tasks_per_s, kicks_per_s, q[49], q[98])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--paced", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--brokers", default="pigeon,pigeon-memory,redis-list,redis-stream,rabbitmq")
    args = ap.parse_args()

    results = []
    for name in args.brokers.split(","):
        if name in ("pigeon", "pigeon-memory"):
            with pigeon_serve(memory=name == "pigeon-memory") as url:
                results.append(asyncio.run(run(name, "pigeon", url, args)))
        else:
            results.append(asyncio.run(run(name, name, None, args)))
        r = results[-1]
        print(f"{r.name}: {r.tasks_per_s:,.0f} tasks/s, p50 {r.p50_ms:.2f} ms", flush=True)

    base = next((r for r in results if r.name == "redis-stream"), results[0])
    title = (
        f"taskiq, 1 worker process, {args.tasks:,} no-op tasks; delays of {args.paced:,} "
        f"kicked at {args.rate:g}/s (ratios to {base.name})"
    )
    table(
        title,
        ["broker", "tasks/s", "ratio", "kicks/s", "p50 ms", "p99 ms", "p99 ratio"],
        [
            [r.name, round(r.tasks_per_s), f"{r.tasks_per_s / base.tasks_per_s:.2f}x",
             round(r.kicks_per_s), r.p50_ms, r.p99_ms, f"{r.p99_ms / base.p99_ms:.2f}x"]
            for r in results
        ],
    )  # fmt: skip
    groups = {
        "tasks/s (higher is better)": {r.name: r.tasks_per_s for r in results},
        "p50 kiq-to-start, ms": {r.name: r.p50_ms for r in results},
        "p99 kiq-to-start, ms": {r.name: r.p99_ms for r in results},
    }
    path = bars(RESULTS / "taskiq_tasks.png", title, groups, "")
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
