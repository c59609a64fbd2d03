"""The Celery app the tests' workers run: ``celery -A celery_app worker``.

Configured from the environment, as a deployment would be: ``PIGEON_CELERY_BROKER``
(the broker URL), ``PIGEON_CELERY_QUEUE`` (the default queue), ``PIGEON_CELERY_LEASE``
(the transport's lease) and ``PIGEON_CELERY_LOG``, a file each task appends one JSON
line to, so the test sees every run (which worker process, when, with what).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from celery import Celery

import pigeon.integrations.celery  # noqa: F401  (the one line: registers pigeon://)

app = Celery(
    "pigeon_tests", broker=os.environ.get("PIGEON_CELERY_BROKER", "pigeon://127.0.0.1:7878//")
)
app.conf.update(
    task_default_queue=os.environ.get("PIGEON_CELERY_QUEUE", "celery"),
    broker_transport_options={"lease": float(os.environ.get("PIGEON_CELERY_LEASE", "60"))},
    worker_prefetch_multiplier=int(os.environ.get("PIGEON_CELERY_PREFETCH", "1")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_queue_max_priority=int(os.environ.get("PIGEON_CELERY_MAX_PRIORITY", "9")),
    # how long Celery waits for a result from a pool process that died before it calls
    # it lost (and, with reject_on_worker_lost, requeues its task); 10 s by default
    worker_lost_wait=1.0,
)


def record(event: str, **fields: Any) -> None:
    """One JSON line per event, appended in one write (O_APPEND: lines never interleave)."""
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields})
    fd = os.open(os.environ["PIGEON_CELERY_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.task(bind=True)
def add(self: Any, x: int, y: int) -> int:
    record("add", id=self.request.id, result=x + y)
    return x + y


@app.task(bind=True, max_retries=5)
def flaky(self: Any, tag: str, failures: int, countdown: float) -> str:
    record("flaky", tag=tag, retries=self.request.retries)
    if self.request.retries < failures:
        raise self.retry(countdown=countdown)
    return tag


@app.task(bind=True)
def stamp(self: Any, tag: str) -> None:
    """Says what the worker saw of the message: its eta, priority, headers."""
    record(
        "stamp",
        tag=tag,
        eta=self.request.eta,
        priority=(self.request.delivery_info or {}).get("priority"),
        headers=self.request.headers,
        redelivered=(self.request.delivery_info or {}).get("redelivered"),
    )


@app.task(bind=True, acks_late=True)
def slow(self: Any, tag: str, seconds: float, again: float | None = None) -> str:
    """Sleeps ``seconds`` (``again`` seconds when it is a redelivery, if given)."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    record("start", tag=tag, redelivered=redelivered)
    time.sleep(again if redelivered and again is not None else seconds)
    record("end", tag=tag)
    return tag


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def dies_once(self: Any, tag: str) -> str:
    """Kills its own pool process on its first delivery (the OOM killer, a segfault)."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    record("dies_once", tag=tag, redelivered=redelivered)
    if not redelivered:
        os.kill(os.getpid(), signal.SIGKILL)
    return tag


@app.task(bind=True, acks_late=True, acks_on_failure_or_timeout=False)
def fails(self: Any, tag: str) -> None:
    record("fails", tag=tag)
    raise RuntimeError(f"task {tag} fails on purpose")
