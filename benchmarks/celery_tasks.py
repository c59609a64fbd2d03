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
(and the rounds' range of tasks/s), ratios to pigeon, and benchmarks/results/celery_tasks.png
(benchmarks/_tasks.py holds what the three task-framework benchmarks share).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

from _tasks import Result, available, broker_url, command, phases, report, rounds, worker


def measure(broker: str, tasks: int, rate: float, tmp: Path) -> Result:
    from celery import Celery

    import pigeon.integrations.celery  # noqa: F401

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    events = tmp / f"{queue}.log"
    app = Celery("bench-producer", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)
    argv = [*command("celery"), "-A", "_celery_bench_app", "worker", "--pool", "solo",
            "--queues", queue, "--loglevel", "WARNING", "--without-heartbeat",
            "--without-gossip", "--without-mingle", "--hostname", f"bench-{queue}@%h"]  # fmt: skip
    started = worker(argv, events.with_suffix(".worker.log"), BENCH_BROKER=broker,
                     BENCH_LOG=str(events))  # fmt: skip
    try:
        with app.producer_or_acquire() as producer:

            def send() -> None:
                app.send_task("bench.noop", (time.time(),), producer=producer)

            result = phases(send, tasks, max(tasks // 20, 100), rate, started, events)
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)  # the worker has stopped
    finally:
        app.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks in the throughput phase")
    ap.add_argument("--rate", type=float, default=200.0, help="tasks/s in the latency phase")
    ap.add_argument("--only", default="pigeon,redis,rabbitmq", help="brokers, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    args = ap.parse_args()
    urls = {"redis": "redis://127.0.0.1:6379/15", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}

    with tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp:

        def run(name: str) -> Result:
            with broker_url(name) as url:
                broker = f"{url}//" if url else urls[name]  # kombu: the virtual host after /
                return measure(broker, args.tasks, args.rate, Path(tmp))

        runs = rounds(available(args.only), args.rounds, run)
    report(
        runs,
        title=f"Celery, {args.tasks:,} no-op tasks, one worker process (--pool solo); latency "
        f"at {args.rate:g} tasks/s",
        base="pigeon",
        send="sends",
        delay="enqueue→start",
        plot="celery_tasks.png",
    )


if __name__ == "__main__":
    main()
