"""taskiq on pigeon, Redis and RabbitMQ: the same no-op task, one worker process, one run.

Run:  python benchmarks/taskiq_tasks.py [--tasks 10000] [--paced 500 --rate 100] [--rounds 1]
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
Prints a table (medians of --rounds interleaved rounds; ratios to redis-stream,
taskiq-redis's broker with acks: tasks/s and p99 delay) and writes
benchmarks/results/taskiq_tasks.png (benchmarks/_tasks.py holds what the three
task-framework benchmarks share). A service that does not answer is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from _taskiq_app import RABBITMQ_URL, REDIS_URL, make_broker, noop
from _tasks import Result, aphases, available, broker_url, command, report, rounds, worker


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


async def run(kind: str, url: str | None, args: argparse.Namespace) -> Result:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="taskiq-bench-"))
    events = tmp / "events"
    sender = make_broker(kind, queue, url)
    task = sender.register_task(noop, task_name="noop")
    argv = [*command("taskiq"), "worker", "_taskiq_app:broker", "--workers", "1",
            "--log-level", "WARNING"]  # fmt: skip
    env = {"BENCH_BROKER": kind, "BENCH_QUEUE": queue, "BENCH_EVENTS": str(events)}
    if url:
        env["BENCH_URL"] = url
    await sender.startup()
    started = worker(argv, tmp / "worker.log", **env)
    try:
        return await aphases(lambda: task.kiq(time.time()), args.tasks, args.paced, args.rate,
                             started, events)  # fmt: skip
    finally:
        await sender.shutdown()
        await cleanup(kind, queue)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--paced", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median shown)")
    ap.add_argument("--brokers", default="pigeon,pigeon-memory,redis-list,redis-stream,rabbitmq")
    args = ap.parse_args()

    def one(name: str) -> Result:
        with broker_url(name) as url:
            return asyncio.run(run("pigeon" if url else name, url, args))

    report(
        rounds(available(args.brokers), args.rounds, one),
        title=f"taskiq, 1 worker process, {args.tasks:,} no-op tasks; delays of "
        f"{args.paced:,} kicked at {args.rate:g}/s",
        base="redis-stream",
        send="kicks",
        delay="kiq-to-start",
        plot="taskiq_tasks.png",
    )


if __name__ == "__main__":
    main()
