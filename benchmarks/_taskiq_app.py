"""The app of benchmarks/taskiq_tasks.py: one no-op task on the broker ``$BENCH_BROKER``,
run by taskiq's CLI (``taskiq worker _taskiq_app:broker``). Each task appends "sent started"
(two ``time.time()`` stamps) to ``$BENCH_EVENTS``: one write, the same cost on every broker.

The brokers, each as its docs configure it:
  pigeon        PigeonBroker("pigeon://host:port/QUEUE")     ack after the task (late ack)
  redis-list    taskiq-redis ListQueueBroker                 BRPOP: no ack, at most once
  redis-stream  taskiq-redis RedisStreamBroker               consumer group, XACK after the task
  rabbitmq      taskiq-aio-pika AioPikaBroker                quorum queue (its default), qos 10
"""

from __future__ import annotations

import os
import time

from taskiq import AsyncBroker

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


def make_broker(kind: str, queue: str, url: str | None = None) -> AsyncBroker:
    """The one line that differs between the brokers (and the names of their queues)."""
    if kind == "pigeon":
        from pigeon.integrations.taskiq import PigeonBroker

        return PigeonBroker(f"{url or 'pigeon://127.0.0.1:7878'}/{queue}")
    if kind == "redis-list":
        from taskiq_redis import ListQueueBroker

        return ListQueueBroker(REDIS_URL, queue_name=queue)
    if kind == "redis-stream":
        from taskiq_redis import RedisStreamBroker

        return RedisStreamBroker(REDIS_URL, queue_name=queue, consumer_group_name=queue)
    if kind == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue

        return AioPikaBroker(
            RABBITMQ_URL,
            exchange=Exchange(name=queue),
            task_queues=[Queue(name=queue)],
            dead_letter_queue=Queue(name=f"{queue}.dead"),
        )
    raise ValueError(f"no broker {kind!r}; known: pigeon, redis-list, redis-stream, rabbitmq")


_fd: int | None = None


async def noop(sent: float) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_fd, f"{sent!r} {time.time()!r}\n".encode())


if "BENCH_BROKER" in os.environ:  # imported by the worker
    broker = make_broker(
        os.environ["BENCH_BROKER"], os.environ["BENCH_QUEUE"], os.environ.get("BENCH_URL")
    )
    broker.register_task(noop, task_name="noop")
