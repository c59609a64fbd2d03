"""Dramatiq on pigeon, Redis and RabbitMQ: the same no-op task, one worker process, one run.

Run:  python benchmarks/dramatiq_tasks.py [--tasks 10000] [--paced 500 --rate 100]
      [--threads 8] [--rounds 1] [--brokers pigeon,pigeon-memory,redis,rabbitmq]

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
Prints a table (medians of --rounds interleaved rounds; ratios to Redis: tasks/s and p99
delay) and writes benchmarks/results/dramatiq_tasks.png (benchmarks/_tasks.py holds what
the three task-framework benchmarks share). A service that does not answer is left out.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from _dramatiq_app import RABBITMQ_URL, REDIS_URL, declare, make_broker
from _tasks import Result, available, broker_url, command, phases, report, rounds, worker


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


def run(kind: str, url: str | None, args: argparse.Namespace) -> Result:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="dramatiq-bench-"))
    events = tmp / "events"
    sender = make_broker(kind, url)
    noop = declare(sender, queue)
    argv = [*command("dramatiq"), "_dramatiq_app", "--processes", "1", "--threads",
            str(args.threads)]  # fmt: skip
    env = {"BENCH_BROKER": kind, "BENCH_QUEUE": queue, "BENCH_EVENTS": str(events)}
    if url:
        env["BENCH_URL"] = url
    started = worker(argv, tmp / "worker.log", **env)
    try:
        return phases(lambda: noop.send(time.time()), args.tasks, args.paced, args.rate, started,
                      events)  # fmt: skip
    finally:
        sender.close()
        cleanup(kind, queue)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--paced", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median shown)")
    ap.add_argument("--brokers", default="pigeon,pigeon-memory,redis,rabbitmq")
    args = ap.parse_args()

    def one(name: str) -> Result:
        with broker_url(name) as url:
            return run("pigeon" if url else name, url, args)

    report(
        rounds(available(args.brokers), args.rounds, one),
        title=f"Dramatiq, 1 worker process x {args.threads} threads, {args.tasks:,} no-op "
        f"tasks; delays of {args.paced:,} sent at {args.rate:g}/s",
        base="redis",
        send="sends",
        delay="send-to-start",
        plot="dramatiq_tasks.png",
    )


if __name__ == "__main__":
    main()
