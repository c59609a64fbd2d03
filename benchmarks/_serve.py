"""Shared by the benchmarks that start servers: wait until one listens, read its CPU time."""

from __future__ import annotations

import os
import socket
import time


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


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` has used (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
