"""Faults on the Redis and NATS backends: a consumer killed before it acks, the server
restarted mid-stream (a scratch server on another port, with persistence), and errors of
the client libraries never escaping raw."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

import pytest

import pigeon
from tests._clusters import Scratch
from tests._services import free_port, require_service


def _hold_and_hang(url: str, got: Any) -> None:
    q = pigeon.Queue(url)
    msg = q.get_message(timeout=20)
    got.put(msg.body)
    time.sleep(60)  # SIGKILLed before it acks


@pytest.mark.parametrize(
    ("service", "port", "url"),
    [("Redis", 6379, "redis://127.0.0.1:6379/"), ("NATS", 4222, "nats://127.0.0.1:4222/")],
)
def test_consumer_killed_before_ack_is_redelivered(service: str, port: int, url: str) -> None:
    require_service(service, port)
    url = f"{url}kill-{os.getpid()}-{time.monotonic_ns()}?lease=1"
    ctx = mp.get_context("spawn")
    with pigeon.Queue(url) as q:
        q.put("job")
        got = ctx.SimpleQueue()
        p = ctx.Process(target=_hold_and_hang, args=(url, got))
        p.start()
        assert got.get() == "job"
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(10)
        msg = q.get_message(timeout=20)  # after the 1 s lease: neither engine sees the death
        assert msg.body == "job" and msg.delivery_count == 2
        msg.ack()


@pytest.mark.parametrize("engine", ["redis", "nats"])
def test_confirmed_messages_are_delivered_after_a_server_restart(
    engine: str, request: pytest.FixtureRequest
) -> None:
    server: Scratch = request.getfixturevalue(f"scratch_{engine}")
    url = f"{server.url}/restart"
    with pigeon.Queue(url, reconnect_timeout=30) as q:
        q.put_many([f"before-{i}" for i in range(100)])
        first = q.get_many(10, timeout=10)
        server.restart()  # Redis crashes (its AOF fsyncs every write); NATS stops cleanly
        q.put_many([f"after-{i}" for i in range(50)], timeout=30)
        rest: list[str] = []
        while len(first) + len(rest) < 150:
            rest += q.get_many(100, timeout=30)
    assert first + rest == [f"before-{i}" for i in range(100)] + [f"after-{i}" for i in range(50)]


@pytest.mark.parametrize("scheme", ["redis", "nats"])
def test_client_library_errors_are_translated(scheme: str) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(pigeon.BrokenResourceError) as info:
        pigeon.Queue(f"{scheme}://127.0.0.1:{port}/nowhere", reconnect_timeout=0.5)
    assert isinstance(info.value, pigeon.PigeonError)
    assert info.value.__cause__ is not None  # the library's own error, kept for debugging
