"""Shared helpers for the r7b_* scripts: a small tmpfs and a real `pigeon serve` on it."""

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
from pathlib import Path

SEG = 256 * 1024


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="r7b-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        print(f"cannot mount a tmpfs: {done.stderr.strip()} (needs root)")
        sys.exit(2)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        time.sleep(0.05)
    return False


class Broker:
    def __init__(self, port: int, data: Path, *args: str, seg: int = SEG) -> None:
        self.seg = seg
        self.port, self.data, self.args = port, data, args
        self.logf = Path(tempfile.mkstemp(prefix=f"r7b-broker-{port}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        out = open(self.logf, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pigeon", "serve", "--port", str(self.port),
             "--data-dir", str(self.data), "--segment-bytes", str(self.seg), *self.args],
            stdout=out, stderr=out,
        )  # fmt: skip
        out.close()
        return wait_port(self.port, self.proc)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.logf.read_text(errors="replace")
