"""The taskiq app the integration tests run with taskiq's own CLI:

    TASKIQ_PIGEON_URL=pigeon://127.0.0.1:PORT/QUEUE TASKIQ_EVENTS=FILE \\
        taskiq worker taskiq_app:broker --app-dir tests/integrations

Its one line of broker configuration is ``PigeonBroker(url)``. Every task appends what it
saw to the events file, one JSON line each (``record``): the tests read that file. Tasks
have names of their own, so the tests kick them through this module imported under any
name (``flaky.kicker().with_broker(...)``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from taskiq import Context, SmartRetryMiddleware, TaskiqDepends

from pigeon.integrations.taskiq import PigeonBroker

URL = os.environ.get("TASKIQ_PIGEON_URL", "pigeon://127.0.0.1:7878/taskiq")
LEASE = float(os.environ.get("TASKIQ_PIGEON_LEASE", "30"))
EVENTS = os.environ.get("TASKIQ_EVENTS", "taskiq-events.jsonl")

broker = PigeonBroker(URL, lease=LEASE).with_middlewares(
    # retries go back through the broker with a delay label: a broker-held delay here
    SmartRetryMiddleware(default_retry_count=5, default_delay=1.5)
)


# taskiq's idiom is ``context: Context = TaskiqDepends()``; one shared marker is the same
CONTEXT: Context = TaskiqDepends()


def record(kind: str, **fields: Any) -> None:
    """One line per event; small appends to an O_APPEND file do not interleave."""
    line = json.dumps({"kind": kind, "t": time.time(), "pid": os.getpid(), **fields})
    with open(EVENTS, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@broker.task("add")
async def add(tag: str, a: int, b: int) -> int:
    record("add", tag=tag, result=a + b)
    return a + b


@broker.task("stamp")
async def stamp(tag: str, context: Context = CONTEXT) -> None:
    """Says when it ran, and with which labels."""
    record("stamp", tag=tag, labels=context.message.labels)


@broker.task("flaky", retry_on_error=True, max_retries=5)
async def flaky(tag: str, failures: int, context: Context = CONTEXT) -> str:
    """Fails ``failures`` times, then succeeds."""
    attempt = int(context.message.labels.get("_retries", 0))
    record("flaky", tag=tag, attempt=attempt)
    if attempt < failures:
        raise RuntimeError(f"attempt {attempt} fails on purpose")
    return "ok"


@broker.task("slow")
async def slow(tag: str, seconds: float) -> None:
    record("slow-start", tag=tag)
    await asyncio.sleep(seconds)
    record("slow-done", tag=tag)


@broker.task("blocking")
def blocking(tag: str, seconds: float) -> None:
    """A sync task: taskiq runs it in its thread pool."""
    record("blocking-start", tag=tag)
    time.sleep(seconds)
    record("blocking-done", tag=tag)
