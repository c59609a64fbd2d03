"""The Dramatiq app of tests/integrations/test_dramatiq.py, run with Dramatiq's own CLI:

    PIGEON_URL=pigeon://127.0.0.1:7878 EVENTS=/tmp/events dramatiq tests.integrations.dramatiq_app

The one line that puts it on pigeon is ``PigeonBroker(...)``. Every task appends one JSON
line to the file ``$EVENTS`` (what ran, in which process, when), which the tests read.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from pigeon.integrations.dramatiq import PigeonBroker

broker = PigeonBroker(
    url=os.environ.get("PIGEON_URL", "pigeon://127.0.0.1:7878"),
    namespace=os.environ.get("DRAMATIQ_NAMESPACE", "dramatiq:"),
    lease=float(os.environ.get("PIGEON_LEASE", "600")),
)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


def record(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "at": time.time(), **fields})
    fd = os.open(os.environ["EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write per line: whole lines, any order
    finally:
        os.close(fd)


def current() -> Any:
    return CurrentMessage.get_current_message()


@dramatiq.actor
def plain(n: int) -> None:
    record("plain", n=n)


@dramatiq.actor(max_retries=3, min_backoff=100, max_backoff=400)
def flaky(key: str, failures: int) -> None:
    attempt = current().options.get("retries", 0)
    record("flaky", key=key, attempt=attempt)
    if attempt < failures:
        raise RuntimeError(f"attempt {attempt} of {key} fails")


@dramatiq.actor(max_retries=0)
def doomed(key: str) -> None:
    record("doomed", key=key)
    raise ValueError(f"{key} cannot succeed")


@dramatiq.actor
def due(key: str) -> None:
    record("due", key=key)


@dramatiq.actor  # priority 0, Dramatiq's default and its highest: pigeon's 9
def urgent(n: int) -> None:
    record("urgent", n=n)


@dramatiq.actor(priority=10)  # lower in Dramatiq (higher number): pigeon's 0
def routine(n: int) -> None:
    record("routine", n=n)


@dramatiq.actor
def echo(key: str) -> None:
    record("echo", key=key, headers=current().options.get("headers"))


@dramatiq.actor
def sleepy(key: str, seconds: float) -> None:
    record("sleepy-start", key=key)
    time.sleep(seconds)
    record("sleepy-done", key=key)


@dramatiq.actor(time_limit=300_000)
def slow(key: str) -> None:
    """Hangs on its first delivery (for a test to SIGKILL its worker), then finishes."""
    delivery_count = current().delivery_count
    record("slow-start", key=key, delivery_count=delivery_count)
    if delivery_count == 1:
        time.sleep(120)
    record("slow-done", key=key)
