"""Backends under the contract. Each entry: a factory of fresh queues, and what it cannot do.

A backend whose service is missing is skipped with the reason, except in CI (``CI`` set),
where a missing service is a failure: CI has every service.
"""

from __future__ import annotations

import atexit
import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

import pigeon
from pigeon.testing import MakeQueue
from pigeon.testing.broker import BrokerThread
from tests._clusters import RedisCluster, Sentinels
from tests._services import queue_name, service_missing, skip_or_fail

S = TypeVar("S")


@dataclass
class Backend:
    name: str
    make_queue: MakeQueue
    unsupported: frozenset[str] = field(default_factory=frozenset)
    available: Callable[[], str | None] = lambda: None  # reason it is missing, or None


def _local(maxsize: int = 0) -> pigeon.Queue[Any]:
    return pigeon.Queue(maxsize=maxsize)


def _queues_at(url: Callable[[str], str]) -> MakeQueue:
    """Fresh queues, each named by the session (cleaned up at its end) at ``url(name)``."""

    def make(maxsize: int = 0) -> pigeon.Queue[Any]:
        return pigeon.Queue(url(queue_name()), maxsize=maxsize)

    return make


def _for_the_session(start: Callable[[], S], close: Callable[[S], None]) -> Callable[[], S]:
    """The server ``start()`` makes on the first call, the same one after; closed when the
    session ends."""

    @functools.cache
    def server() -> S:
        started = start()
        atexit.register(close, started)
        return started

    return server


_broker = _for_the_session(lambda: BrokerThread().start(), BrokerThread.stop)
# The same contract on a Redis Cluster (3 masters, 3 replicas) the suite starts, and
# through Sentinel (a master, a replica, three sentinels).
_redis_cluster = _for_the_session(RedisCluster, RedisCluster.close)
_redis_sentinel = _for_the_session(Sentinels, Sentinels.close)


def _cluster_tools() -> str | None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return "redis-server and redis-cli are needed to start a Redis Cluster"
    return None


NO_COUNTER = frozenset({"join", "task_done"})  # engines without a server-side counter wait
# The message options a backend refuses with Unsupported (test_contract checks it does).
OPTIONS = frozenset({"delay", "ttl", "dedup", "priority", "headers"})
LOCAL_OPTIONS: frozenset[str] = frozenset()  # the local queue honours every option
REDIS_OPTIONS: frozenset[str] = frozenset()  # Redis (plain, Cluster, Sentinel): every option
NATS_OPTIONS: frozenset[str] = frozenset()  # JetStream honours every option

BACKENDS = [
    # a local message never comes back alone
    Backend("local", _local, frozenset({"lease"}) | LOCAL_OPTIONS),
    Backend("pigeon", _queues_at(lambda name: _broker().url(name))),
    Backend("redis", _queues_at("redis://127.0.0.1:6379/{}".format),
            NO_COUNTER | REDIS_OPTIONS, lambda: service_missing("Redis", 6379)),
    # NATS: an item over max_payload (1 MiB by default) goes in chunks
    Backend("nats", _queues_at("nats://127.0.0.1:4222/{}".format),
            NO_COUNTER | NATS_OPTIONS, lambda: service_missing("NATS", 4222)),
    Backend("redis-cluster", _queues_at(lambda name: _redis_cluster().url(name)),
            NO_COUNTER | REDIS_OPTIONS, _cluster_tools),
    Backend("redis-sentinel", _queues_at(lambda name: _redis_sentinel().url(name)),
            NO_COUNTER | REDIS_OPTIONS, _cluster_tools),
]  # fmt: skip


def usable(b: Backend) -> Backend:
    """``b``, once its service answers (else skipped here, failed in CI)."""
    missing = b.available()
    if missing:
        skip_or_fail(f"{b.name}: {missing}")
    return b


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    return usable(request.param)
