"""The app of benchmarks/dramatiq_tasks.py: one no-op actor on the broker ``$BENCH_BROKER``
(pigeon, redis or rabbitmq), run by Dramatiq's CLI. Each task appends "sent started" (two
``time.time()`` stamps) to ``$BENCH_EVENTS``: one write, the same cost on every broker."""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from pigeon.integrations.dramatiq import PigeonBroker

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def make_broker(kind: str, url: str | None = None) -> dramatiq.Broker:
    """The one line that differs between the three."""
    if kind == "pigeon":
        return PigeonBroker(url=url or "pigeon://127.0.0.1:7878")
    if kind == "redis":
        return RedisBroker(url=REDIS_URL)
    if kind == "rabbitmq":
        return RabbitmqBroker(url=RABBITMQ_URL)
    raise ValueError(f"no broker {kind!r}; known: pigeon, redis, rabbitmq")


def declare(broker: dramatiq.Broker, queue_name: str) -> Any:
    def noop(sent: float) -> None:
        line = f"{sent!r} {time.time()!r}\n".encode()
        os.write(_events(), line)

    return dramatiq.actor(noop, actor_name="noop", queue_name=queue_name, broker=broker)


_fd: int | None = None


def _events() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return _fd


if "BENCH_BROKER" in os.environ:  # imported by the worker
    broker = make_broker(os.environ["BENCH_BROKER"], os.environ.get("BENCH_URL"))
    dramatiq.set_broker(broker)
    noop = declare(broker, os.environ["BENCH_QUEUE"])
