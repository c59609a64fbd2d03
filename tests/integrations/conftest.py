"""The broker the framework tests run against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._services import free_port, start_broker


@pytest.fixture(scope="module")
def pigeon_url() -> Iterator[str]:
    """A `pigeon serve` subprocess with its durable store, as a user runs it; its URL,
    ``pigeon://127.0.0.1:PORT``."""
    port = free_port()
    proc = start_broker(port)
    try:
        yield f"pigeon://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
