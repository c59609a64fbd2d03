"""Celery's own worker on a real ``pigeon serve``: ``celery -A celery_app worker``.

Every worker here is the Celery CLI in a subprocess, its app configured with the one line
(``broker="pigeon://..."`` after ``import pigeon.integrations.celery``); the broker is a
``pigeon serve`` subprocess with its durable store. Tasks write what they saw to a log
file (``celery_app.record``). The shared worker runs with a 1 s lease, so every test on
it also shows that nothing is redelivered while a live worker holds it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

import pigeon
from tests._services import require_service
from tests.integrations._celery import Setup
from tests.integrations._support import HERE, SRC, require, setup_fixtures, tag, wait_for

require("celery", "celery", "kombu")

# the shared worker: prefork, 2 processes, with a 1 s lease
shared, own = setup_fixtures(lambda url, d: Setup(url, d, lease=1.0),
                             "--pool", "prefork", "--concurrency", "2")  # fmt: skip


def test_plain_task_runs_on_the_celery_worker(shared: Setup) -> None:
    with shared.producer() as app:
        res = app.send_task("celery_app.add", (2, 3))
    runs = wait_for("add(2, 3)", lambda: shared.events("add", id=res.id))
    assert [r["result"] for r in runs] == [5]


def test_retries_run_each_attempt_after_its_countdown(shared: Setup) -> None:
    t = tag()
    with shared.producer() as app:
        app.send_task("celery_app.flaky", (t, 2, 1.5))
    runs = wait_for("three attempts", lambda: len(shared.events("flaky", tag=t)) >= 3 and 1)
    runs = shared.events("flaky", tag=t)
    assert [r["retries"] for r in runs] == [0, 1, 2]
    # each retry was due 1.5 s after the attempt before it raised
    assert runs[1]["t"] - runs[0]["t"] >= 1.5
    assert runs[2]["t"] - runs[1]["t"] >= 1.5


def test_countdown_past_the_lease_is_held_by_the_broker_and_runs_once_when_due(
    shared: Setup,
) -> None:
    t_countdown, t_eta = tag(), tag()
    with shared.producer() as app:
        sent = time.time()
        app.send_task("celery_app.stamp", (t_countdown,), countdown=4)
        app.send_task("celery_app.stamp", (t_eta,), eta=datetime.now(UTC) + timedelta(seconds=3))
    time.sleep(1.5)  # past the 1 s lease
    info = shared.info()
    # in the broker, delayed: not delivered, so not leased, so never redelivered
    assert (info["delayed"], info["in_flight"]) == (2, 0), info
    wait_for("the countdown task", lambda: shared.events("stamp", tag=t_countdown), timeout=20)
    time.sleep(3)  # three more leases: nothing runs a second time
    (countdown_run,) = shared.events("stamp", tag=t_countdown)
    (eta_run,) = shared.events("stamp", tag=t_eta)
    assert countdown_run["t"] >= sent + 4
    assert eta_run["t"] >= sent + 3
    assert countdown_run["eta"] is not None  # the worker still sees the task's eta
    assert countdown_run["redelivered"] is False


def test_task_running_longer_than_the_lease_runs_once(shared: Setup) -> None:
    t = tag()
    with shared.producer() as app:
        app.send_task("celery_app.slow", (t, 3.5))  # 3.5 leases; acks_late
    wait_for("the slow task's end", lambda: shared.events("end", tag=t), timeout=30)
    time.sleep(1.5)
    assert len(shared.events("start", tag=t)) == 1
    assert shared.info()["redelivered_total"] == 0


def test_headers_round_trip_to_the_task(shared: Setup) -> None:
    t = tag()
    headers = {"tenant": "acme", "n": [1, 2], "nested": {"a": None, "b": 1.5}}
    with shared.producer() as app:
        app.send_task("celery_app.stamp", (t,), headers=headers)
    (run,) = wait_for("the task", lambda: shared.events("stamp", tag=t))
    assert run["headers"] == headers


def test_dedup_id_stores_a_task_once_and_its_retries_still_run(shared: Setup) -> None:
    t = tag()
    with shared.producer() as app:
        for _ in range(3):
            app.send_task("celery_app.flaky", (t, 1, 0.2), dedup_id=f"order-{t}")
    wait_for("the retry", lambda: len(shared.events("flaky", tag=t)) >= 2 and 1)
    time.sleep(1.5)
    # one task, not three; its retry is a new message without the dedup id, so it runs
    assert [r["retries"] for r in shared.events("flaky", tag=t)] == [0, 1]


def test_reject_on_worker_lost_requeues_a_task_whose_pool_process_died(shared: Setup) -> None:
    t = tag()
    with shared.producer() as app:
        app.send_task("celery_app.dies_once", (t,))
    runs = wait_for(
        "the second delivery", lambda: len(shared.events("dies_once", tag=t)) >= 2 and 1
    )
    runs = shared.events("dies_once", tag=t)
    assert [r["redelivered"] for r in runs] == [False, True]


def test_failed_task_without_acks_on_failure_is_dead_lettered(shared: Setup) -> None:
    t = tag()
    with shared.producer() as app:
        app.send_task("celery_app.fails", (t,))
    wait_for("the failure", lambda: shared.events("fails", tag=t))
    dead = shared.broker_url.rstrip("/") + f"/{shared.queue}.dead"
    with pigeon.Queue(dead, serializer="raw") as q:
        shown = wait_for(
            "the dead letter", lambda: [m for m in q.peek(100) if t.encode() in m["payload"]]
        )
    assert [m["reason"] for m in shown] == ["rejected"]


def test_priorities_are_honoured(own: Setup) -> None:
    order = [(i, p) for i, p in enumerate([0, 5, 9, 1, 9, 3, 7, 0, 5, 8])]
    random.shuffle(order)
    with own.producer() as app:
        for i, p in order:
            app.send_task("celery_app.stamp", (f"p{p}-{i}",), priority=p)
    assert own.info()["depth"] == len(order)
    own.worker("--pool", "solo")
    runs = wait_for("all ten", lambda: len(own.events("stamp")) == len(order) and 1)
    runs = own.events("stamp")
    ran = [r["tag"] for r in runs]
    # higher first; within a priority, in the order they were sent
    expected = [f"p{p}-{i}" for i, p in sorted(order, key=lambda ip: -ip[1])]
    assert ran == expected
    assert [r["priority"] for r in runs] == sorted((p for _, p in order), reverse=True)


@pytest.mark.slow
def test_worker_sigkilled_mid_task_gives_its_tasks_back_at_once(own: Setup) -> None:
    slow_tag, quick = tag(), [tag(), tag()]
    first = own.worker("--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "2")
    with own.producer() as app:
        app.send_task("celery_app.slow", (slow_tag, 60.0, 0.1))  # 60 s, then 0.1 s
        for t in quick:
            app.send_task("celery_app.slow", (t, 0.1))
    wait_for("the slow task's start", lambda: own.events("start", tag=slow_tag))
    held = wait_for("two held by the worker", lambda: own.info()["in_flight"] == 2 and 1)
    assert held
    first.kill()
    # its connection is gone: the broker has both back, before any lease could run out
    info = wait_for("both back", lambda: (i := own.info())["in_flight"] == 0 and i, timeout=5)
    assert info["depth"] == 3
    own.worker("--pool", "prefork", "--concurrency", "1")
    done = [slow_tag, *quick]
    wait_for("every task done", lambda: all(own.events("end", tag=t) for t in done), timeout=60)
    starts = own.events("start", tag=slow_tag)
    assert [s["redelivered"] for s in starts] == [False, True]  # it ran again, to its end
    assert [len(own.events("end", tag=t)) for t in done] == [1, 1, 1]


def test_fanout_is_declared_unsupported_and_celery_inspect_says_why(shared: Setup) -> None:
    from kombu import Connection

    import pigeon.integrations.celery  # noqa: F401

    with Connection(shared.broker_url) as conn:
        assert not conn.supports_exchange_type("fanout")
        assert conn.transport.implements.exchange_type == frozenset({"direct", "topic"})
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_app", "inspect", "ping"],
        cwd=HERE,
        env=shared.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "pigeon:// has no fanout exchange (exchange 'celery.pidbox')" in out.stdout + out.stderr
    # the worker left its remote-control consumer out, as Celery does without fanout
    assert "pidbox" not in shared.workers[0].log()


def test_broker_transport_setting_finds_the_transport_without_the_import(shared: Setup) -> None:
    script = (
        "import sys\n"
        "from celery import Celery\n"
        "app = Celery('x', broker=sys.argv[1], set_as_current=False)\n"
        "app.conf.broker_transport = 'pigeon.integrations.celery:Transport'\n"
        "with app.connection_for_write() as conn:\n"
        "    q = conn.SimpleQueue('probe-' + sys.argv[2])\n"
        "    q.put({'ok': 1})\n"
        "    m = q.get(timeout=10)\n"
        "    m.ack()\n"
        "    print(type(conn.transport).__module__, m.payload)\n"
        "    q.close()\n"
        "assert 'pigeon.integrations.celery' not in sys.modules or True\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, shared.broker_url, tag()],
        env=shared.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["pigeon.integrations.celery.transport", "{'ok':", "1}"]


@pytest.mark.slow
def test_benchmark_runs_with_a_small_count() -> None:
    require_service("Redis", 6379)
    require_service("RabbitMQ", 5672)
    bench = HERE.parent.parent / "benchmarks"
    out = subprocess.run(
        [sys.executable, "celery_tasks.py", "--tasks", "100", "--rounds", "1"],
        cwd=bench,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for broker in ("pigeon", "redis", "rabbitmq"):
        assert f"(round 1/1) {broker}:" in out.stdout
    assert "plot written" in out.stdout
