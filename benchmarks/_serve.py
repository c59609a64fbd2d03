"""Shared by the benchmarks that start servers: a free port, a `pigeon serve` of their own,
wait until one listens, read its CPU time."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator


def free_port() -> int:
    """A loopback port nothing listens on (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts a connection.

    Raises:
        RuntimeError: nothing listened there within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nothing listened on {host}:{port} within {timeout:g} s"
                ) from None
            time.sleep(0.05)


@contextlib.contextmanager
def pigeon_serve(memory: bool = False) -> Iterator[str]:
    """A `pigeon serve` on a free loopback port, its defaults otherwise: a durable store
    (``--fsync batch``) in a temporary directory, or ``--memory``. Yields its URL,
    ``pigeon://127.0.0.1:PORT``; stops it and removes the directory afterwards."""
    port = free_port()
    data = tempfile.mkdtemp(prefix="pigeon-bench-")
    store = ["--memory"] if memory else ["--data-dir", data]
    cmd = [sys.executable, "-m", "pigeon", "serve", "--port", str(port), *store]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield f"pigeon://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts a connection on ``host:port`` now."""
    try:
        socket.create_connection((host, port), 1).close()
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` has used (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
