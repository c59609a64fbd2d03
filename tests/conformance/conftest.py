"""Backends under the contract. Each entry: a factory of fresh queues, and what it cannot do.

A backend whose service is missing is skipped with the reason, except in CI (``CI`` set),
where a missing service is a failure: CI has every service.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import pigeon
from pigeon.testing import MakeQueue
from pigeon.testing.broker import BrokerThread
from tests._services import queue_name, service_missing, skip_or_fail


@dataclass
class Backend:
    name: str
    make_queue: MakeQueue
    unsupported: frozenset[str] = field(default_factory=frozenset)
    available: Callable[[], str | None] = lambda: None  # reason it is missing, or None


def _local(maxsize: int = 0) -> pigeon.Queue[Any]:
    return pigeon.Queue(maxsize=maxsize)


_broker: BrokerThread | None = None


def _pigeon(maxsize: int = 0) -> pigeon.Queue[Any]:
    global _broker
    if _broker is None:
        _broker = BrokerThread().start()
    return pigeon.Queue(_broker.url(f"q-{uuid.uuid4().hex[:12]}"), maxsize=maxsize)


def _redis(maxsize: int = 0) -> pigeon.Queue[Any]:
    return pigeon.Queue(f"redis://127.0.0.1:6379/{queue_name()}", maxsize=maxsize)


_redis_cluster: Any = None


def _on_redis_cluster(maxsize: int = 0) -> pigeon.Queue[Any]:
    """The same contract on a Redis Cluster (3 masters, 3 replicas) the suite starts."""
    global _redis_cluster
    if _redis_cluster is None:
        from tests._clusters import RedisCluster

        _redis_cluster = RedisCluster()
        import atexit

        atexit.register(_redis_cluster.close)
    return pigeon.Queue(_redis_cluster.url(queue_name()), maxsize=maxsize)


_redis_sentinel: Any = None


def _on_redis_sentinel(maxsize: int = 0) -> pigeon.Queue[Any]:
    """The same contract through Sentinel (a master, a replica, three sentinels)."""
    global _redis_sentinel
    if _redis_sentinel is None:
        from tests._clusters import Sentinels

        _redis_sentinel = Sentinels()
        import atexit

        atexit.register(_redis_sentinel.close)
    return pigeon.Queue(_redis_sentinel.url(queue_name()), maxsize=maxsize)


def _cluster_tools() -> str | None:
    import shutil

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return "redis-server and redis-cli are needed to start a Redis Cluster"
    return None


def _nats(maxsize: int = 0) -> pigeon.Queue[Any]:
    return pigeon.Queue(f"nats://127.0.0.1:4222/{queue_name()}", maxsize=maxsize)


NO_COUNTER = frozenset({"join", "task_done"})  # engines without a server-side counter wait
# The message options a backend refuses with Unsupported (test_contract checks it does).
OPTIONS = frozenset({"delay", "ttl", "dedup", "priority", "headers"})
LOCAL_OPTIONS: frozenset[str] = frozenset()  # the local queue honours every option
REDIS_OPTIONS: frozenset[str] = frozenset()  # Redis (plain, Cluster, Sentinel): every option
NATS_OPTIONS: frozenset[str] = frozenset()  # JetStream honours every option

BACKENDS = [
    # a local message never comes back alone
    Backend("local", _local, frozenset({"lease"}) | LOCAL_OPTIONS),
    Backend("pigeon", _pigeon),
    Backend("redis", _redis, NO_COUNTER | REDIS_OPTIONS, lambda: service_missing("Redis", 6379)),
    # NATS: an item over max_payload (1 MiB by default) goes in chunks
    Backend("nats", _nats, NO_COUNTER | NATS_OPTIONS, lambda: service_missing("NATS", 4222)),
    Backend("redis-cluster", _on_redis_cluster, NO_COUNTER | REDIS_OPTIONS, _cluster_tools),
    Backend("redis-sentinel", _on_redis_sentinel, NO_COUNTER | REDIS_OPTIONS, _cluster_tools),
]


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.param
    missing = b.available()
    if missing:
        skip_or_fail(f"{b.name}: {missing}")
    return b
