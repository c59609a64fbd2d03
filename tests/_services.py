"""What the tests need around them: free ports, brokers in subprocesses, external services.

A test that needs Redis or NATS calls ``require_service``: on a developer machine without
the service it is skipped with the reason; in CI (``CI`` set), where every service exists,
it fails instead, so a missing service can never pass unnoticed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

_DATA_DIRS: dict[int, str] = {}

# Queues this test session makes on the shared Redis and NATS carry this prefix, so the
# session cleans up its own and never another session's (tests/conftest.py).
SESSION_PREFIX = f"t-{uuid.uuid4().hex[:6]}-"


def queue_name() -> str:
    """A fresh queue name for the shared services, cleaned up at the end of the session."""
    return SESSION_PREFIX + uuid.uuid4().hex[:10]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start_broker(port: int, *args: str) -> subprocess.Popen[bytes]:
    """A `pigeon serve` process on ``port``. Unless ``args`` choose the store, it gets a
    data directory of its own, kept across restarts on the same port."""
    if "--memory" not in args and "--data-dir" not in args:
        data = _DATA_DIRS.setdefault(port, tempfile.mkdtemp(prefix="pigeon-test-"))
        args = ("--data-dir", data, *args)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


def service_missing(name: str, port: int) -> str | None:
    """Why ``name`` on 127.0.0.1:``port`` cannot be used, or None if it answers."""
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except OSError as exc:
        return f"{name} is not running on 127.0.0.1:{port} ({exc})"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, which has every service and tool the tests use. Called
    at the top of a test module, it skips (or fails) the whole module."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it (see .ci/run)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_service(name: str, port: int) -> None:
    missing = service_missing(name, port)
    if missing:
        skip_or_fail(missing)
