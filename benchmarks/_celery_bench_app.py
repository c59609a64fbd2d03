"""The Celery app of benchmarks/celery_tasks.py: one no-op task that notes when it started.

The worker runs ``celery -A _celery_bench_app worker`` with ``BENCH_BROKER`` (the broker
URL) and ``BENCH_LOG`` (a file: one line ``enqueued started`` per task, Unix times).
"""

from __future__ import annotations

import os
import time

from celery import Celery

import pigeon.integrations.celery  # noqa: F401  (registers pigeon://)

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "pigeon://127.0.0.1:7878//"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)

_log = os.open(os.environ.get("BENCH_LOG", os.devnull), os.O_WRONLY | os.O_APPEND | os.O_CREAT)


@app.task(name="bench.noop")
def noop(enqueued: float) -> None:
    os.write(_log, f"{enqueued!r} {time.time()!r}\n".encode())
