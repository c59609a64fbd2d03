"""Celery's worker on pigeon when something goes wrong: bytes on a task queue that are
not kombu's, a warm shutdown of a ``-P solo`` worker, a broker that goes away while a
worker stops or a producer sends (review 6 of the framework integrations).

Real workers (``celery -A celery_app worker``); the outage tests run a ``pigeon serve`` of
their own, which they kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
from tests._services import free_port, start_broker
from tests.integrations._celery import Setup
from tests.integrations._support import require, setup_fixtures, tag, wait_for

require("celery", "celery", "kombu")

_shared, own = setup_fixtures(lambda url, d: Setup(url, d), "--pool", "solo")


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[tuple[Setup, subprocess.Popen[bytes]]]:
    """A broker of the test's own (to kill) and a setup on it."""
    port = free_port()
    proc = start_broker(port)
    setup = Setup(f"pigeon://127.0.0.1:{port}", tmp_path)
    try:
        yield setup, proc
    finally:
        setup.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_a_message_that_is_not_a_kombu_envelope_is_dead_lettered_and_the_worker_goes_on(
    own: Setup,
) -> None:
    with pigeon.Queue(f"{own.base}/{own.queue}", serializer="raw") as q:
        q.put(b"not json")
        q.put(b'{"body": "x"}')  # JSON, but no properties
    w = own.worker("--pool", "threads")
    with own.producer() as app:
        res = app.send_task("celery_app.add", (2, 3))
    wait_for("the good task", lambda: own.events("add", id=res.id))
    assert w.proc.poll() is None, w.log()
    with pigeon.Queue(f"{own.base}/{own.queue}.dead", serializer="raw") as dead:
        shown = wait_for("two dead letters", lambda: len(m := dead.peek(10)) == 2 and m)
    assert {m["payload"] for m in shown} == {b"not json", b'{"body": "x"}'}
    assert all(m["reason"].startswith("undecodable: not a kombu message") for m in shown)
    assert "Unrecoverable error" not in w.output()


def test_a_solo_worker_asked_to_stop_takes_no_other_task(own: Setup) -> None:
    first, second = tag(), tag()
    w = own.worker("--pool", "solo")
    with own.producer() as app:
        app.send_task("celery_app.slow", (first, 2.0))
        app.send_task("celery_app.slow", (second, 2.0))
    wait_for("the first task's start", lambda: own.events("start", tag=first))
    os.kill(w.pid, signal.SIGTERM)  # a warm shutdown
    assert w.wait(30) == 0
    assert own.events("end", tag=first)
    assert own.events("start", tag=second) == []  # left for another worker
    info = own.info()
    assert (info["depth"], info["in_flight"]) == (1, 0), info


def test_a_warm_shutdown_while_the_broker_is_down_does_not_wait_for_it(
    lone: tuple[Setup, subprocess.Popen[bytes]],
) -> None:
    setup, proc = lone
    w = setup.worker("--pool", "threads", "--concurrency", "2", "--prefetch-multiplier", "4")
    with setup.producer() as app:
        for _ in range(12):
            app.send_task("celery_app.slow", (tag(), 1.0))
    wait_for("two running", lambda: len(setup.events("start")) >= 2 and 1)
    wait_for("eight held", lambda: setup.info()["in_flight"] >= 8 and 1)
    proc.kill()
    proc.wait(30)
    stopped = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    w.wait(25)  # it was ~30 s a held message (each give-back waited for the broker)
    assert time.monotonic() - stopped < 20


def test_a_send_while_the_broker_is_down_follows_the_publish_retry_policy(
    lone: tuple[Setup, subprocess.Popen[bytes]],
) -> None:
    from kombu.exceptions import OperationalError

    setup, proc = lone
    with setup.producer(task_publish_retry=False) as app:
        app.send_task("celery_app.add", (1, 2))  # connected
        proc.kill()
        proc.wait(30)
        started = time.monotonic()
        with pytest.raises(OperationalError):
            app.send_task("celery_app.add", (1, 2))
        assert time.monotonic() - started < 5  # it was 30 s (the client's own reconnects)
    policy = {"max_retries": 2, "interval_start": 0.5, "interval_step": 0.5}
    with setup.producer(task_publish_retry_policy=policy) as app:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            app.send_task("celery_app.add", (1, 2))
        assert time.monotonic() - started < 10
