"""Test-suite settings.

- Hypothesis without per-example deadlines (CI machines are busy; tests assert behaviour,
  never speed).
- At the end of the session, the queues the tests made on the shared Redis and NATS
  services are deleted, so repeated runs do not pile up streams there.
- ``scratch_redis`` and ``scratch_nats``: a server of the test's own, to crash and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests._clusters import ScratchNats, ScratchRedis
from tests._services import SESSION_PREFIX

settings.register_profile("pigeon", deadline=None)
settings.load_profile("pigeon")

TEST_PREFIXES = (SESSION_PREFIX, f"kill-{os.getpid()}-")


def _clean_redis() -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        for prefix in TEST_PREFIXES:
            keys = list(r.scan_iter(match=f"pigeon:{prefix}*", count=1000))
            for i in range(0, len(keys), 500):
                r.delete(*keys[i : i + 500])
    finally:
        r.close()


def _clean_nats() -> None:
    async def main() -> None:
        import nats

        nc = await nats.connect("nats://127.0.0.1:4222", connect_timeout=5)
        try:
            js = nc.jetstream()
            # queues' streams, the streams of their large items' chunks, their id buckets
            prefixes = tuple(
                f"{k}_{p}"
                for p in TEST_PREFIXES
                for k in ("PIGEON", "PIGEON-CHUNKS", "KV_PIGEON-IDS")
            )
            for _ in range(100):  # streams_info answers 256 streams at a time
                names = [i.config.name for i in await js.streams_info()]
                victims = [n for n in names if n.startswith(prefixes)]
                for stream in victims:
                    await js.delete_stream(stream)
                if not victims:
                    break
        finally:
            await nc.close()

    asyncio.run(main())


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_services() -> Iterator[None]:
    yield
    for clean in (_clean_redis, _clean_nats):
        with contextlib.suppress(Exception):  # a service that is down has nothing to clean
            clean()


@pytest.fixture
def scratch_redis(tmp_path: Path) -> Iterator[ScratchRedis]:
    """A redis-server of the test's own with AOF (appendfsync always); ``restart()`` is a
    crash (SIGKILL) and a start on the same port and data."""
    with contextlib.closing(ScratchRedis(tmp_path)) as server:
        yield server


@pytest.fixture
def scratch_nats(tmp_path: Path) -> Iterator[ScratchNats]:
    """A nats-server of the test's own with JetStream on a file store; ``restart()`` is a
    clean stop and a start on the same port and data, ``kill()`` a crash."""
    with contextlib.closing(ScratchNats(tmp_path)) as server:
        yield server
