"""Celery on pigeon's broker: the one line, and what it buys.

    pigeon serve                                      # the broker, on 127.0.0.1:7878
    cd examples && celery -A celery_app worker --loglevel=INFO
    python examples/celery_app.py                     # sends the tasks below

(``PIGEON_BROKER=pigeon://host:port//`` for a broker elsewhere, in both commands.)

Needs ``pip install 'pigeon-queue[celery]'``. Results come back through the broker too
(``rpc://``: each client reads its results from a queue of its own).
"""

from __future__ import annotations

import os
import time

from celery import Celery

import pigeon.integrations.celery  # noqa: F401  (kombu learns pigeon://)

# the worker imports this module too: the broker comes from the environment, not argv
BROKER = os.environ.get("PIGEON_BROKER", "pigeon://127.0.0.1:7878//")

app = Celery("celery_app", broker=BROKER, backend="rpc://")  # tasks: celery_app.add, ...
app.conf.update(
    task_acks_late=True,  # acked when the task ends: a worker killed mid-task loses nothing
    task_reject_on_worker_lost=True,  # a pool process that dies gives its task back
    worker_prefetch_multiplier=1,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def report(name: str) -> str:
    print(f"report {name} at {time.strftime('%X')}")
    return name


if __name__ == "__main__":
    print("add(2, 3) =", add.delay(2, 3).get(timeout=30))

    # A countdown is held by the broker, not by a worker: nothing is leased (so nothing can
    # be redelivered and run twice) before it is due, however long the countdown.
    started = time.time()
    late = report.apply_async(("in five seconds",), countdown=5)
    print(late.get(timeout=60), f"ran after {time.time() - started:.1f} s")

    # Real priorities, 0-9, higher first (as on RabbitMQ; Redis's kombu transport
    # reverses them).
    results = [report.apply_async((f"priority {p}",), priority=p) for p in (1, 9, 5)]
    print([r.get(timeout=30) for r in results])

    # Unique jobs: a second send with the same dedup_id within the queue's dedup window
    # (300 s) is confirmed but not stored again.
    first = report.apply_async(("invoice 42",), dedup_id="invoice-42")
    report.apply_async(("invoice 42",), dedup_id="invoice-42")
    print(first.get(timeout=30), "(once)")
