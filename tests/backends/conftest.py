"""Fixtures the backend tests share: a fresh queue URL on the loopback Redis and NATS (a
missing service skips with the reason, or fails under CI: tests/_services.py)."""

from __future__ import annotations

import pytest

from tests._services import queue_name, require_service


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", 6379)
    return f"redis://127.0.0.1:6379/{queue_name()}"


@pytest.fixture
def nats_url() -> str:
    require_service("NATS", 4222)
    return f"nats://127.0.0.1:4222/{queue_name()}"
