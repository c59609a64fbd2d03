"""Dramatiq on pigeon: Dramatiq's own worker (its CLI, ``dramatiq APP``, in a subprocess)
against a real ``pigeon serve`` subprocess, running the tasks of ``dramatiq_app.py``.

Each test has queues of its own (a namespace) and a file the tasks write what they did to.
The tests that need no worker check what the broker refuses, the join timeout and the
mapping of options.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pigeon
from tests._services import free_port, require_service, start_broker
from tests.integrations import _support
from tests.integrations._support import ROOT, Worker, cli, read_events, require

require("dramatiq", "dramatiq")

APP = "tests.integrations.dramatiq_app"


class App:
    """One test's view of the app: its namespace, its events, its workers."""

    def __init__(self, url: str, tmp: Path) -> None:
        from tests.integrations import dramatiq_app

        self.url = url
        self.namespace = f"t{uuid.uuid4().hex[:8]}:"
        self.events_file = tmp / "events.jsonl"
        self.tmp = tmp
        self.tasks = dramatiq_app
        # The sending side: the app's actors, on a broker with this test's namespace.
        from pigeon.integrations.dramatiq import PigeonBroker

        self.broker = PigeonBroker(url=url, namespace=self.namespace)
        for actor in dramatiq_app.broker.actors.values():
            self.broker.declare_actor(actor)
        self.workers: list[Worker] = []

    def send(self, actor: Any, *args: Any, delay: int | None = None, **options: Any) -> Any:
        return self.broker.enqueue(actor.message_with_options(args=args, **options), delay=delay)

    def queue(self, name: str = "default") -> Any:
        """A plain pigeon handle on one of this test's queues."""
        return pigeon.Queue(f"{self.url}/{self.namespace}{name}", serializer="raw")

    def worker(self, *, threads: int = 2, lease: float = 600.0, prefetch: int = 0) -> Worker:
        """``dramatiq tests.integrations.dramatiq_app``, one worker process; ``prefetch``
        (Dramatiq's ``dramatiq_queue_prefetch``; 0: its default, twice the threads)."""
        env = _support.worker_env(
            PIGEON_URL=self.url,
            DRAMATIQ_NAMESPACE=self.namespace,
            PIGEON_LEASE=str(lease),
            EVENTS=str(self.events_file),
            dramatiq_queue_prefetch=str(prefetch),
        )
        argv = [*cli("dramatiq"), APP, "--processes", "1", "--threads", str(threads)]
        log = self.tmp / f"worker-{len(self.workers)}.log"
        self.workers.append(w := Worker(argv, env=env, log=log, cwd=ROOT))
        return w

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_events(self.events_file, "event", kind)

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Until ``ready()``; a failure, with the workers' output, if the latest worker
        exits first."""

        def check() -> bool:
            if ready():
                return True
            if any(w.proc.poll() is not None for w in self.workers[-1:]):
                raise AssertionError(f"{what}: the worker exited")
            return False

        try:
            _support.wait_for(what, check, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(w.output()[-3000:] for w in self.workers)

    def stop(self, worker: Worker) -> int:
        """SIGTERM, as a supervisor stops Dramatiq: it finishes its tasks and exits."""
        code = worker.stop(60)
        if code is None:
            raise AssertionError(f"the worker did not stop on SIGTERM\n{self.logs()}")
        return code

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.broker.close()


@pytest.fixture
def app(pigeon_url: str, tmp_path: Path) -> Iterator[App]:
    a = App(pigeon_url, tmp_path)
    try:
        yield a
    finally:
        a.close()


# --- the worker, run by Dramatiq's CLI ------------------------------------------------------


def test_tasks_retries_and_dead_letters_under_the_dramatiq_cli_and_join_waits_for_retries(
    app: App,
) -> None:
    t = app.tasks
    worker = app.worker()
    for n in range(20):
        app.send(t.plain, n)
    app.send(t.flaky, "f1", 2)  # fails twice, succeeds on its third attempt
    app.send(t.doomed, "d1")  # fails for good: Dramatiq nacks it

    app.broker.join("default", timeout=60_000)

    # join returned only once the retries had run: nothing is left to wait for
    assert sorted(e["n"] for e in app.events("plain")) == list(range(20))
    assert [e["attempt"] for e in app.events("flaky")] == [0, 1, 2]
    assert len(app.events("doomed")) == 1
    with app.queue("default.dead") as dead:
        (letter,) = dead.peek()
    assert json.loads(letter["payload"])["actor_name"] == "doomed"
    assert letter["reason"] == "ValueError: d1 cannot succeed"
    assert app.stop(worker) == 0


def test_a_delay_longer_than_the_lease_runs_once_and_not_before_it_is_due(app: App) -> None:
    t = app.tasks
    worker = app.worker(lease=1.0)  # a message taken is leased for 1 s (and renewed)
    app.send(t.due, "now")
    app.wait_for("the worker runs", lambda: bool(app.events("due")))
    sent = time.time()
    app.send(t.due, "later", delay=3_000)  # three leases long
    with app.queue() as q:
        assert q.qsize() == 1  # held by the broker, counted, not delivered
    app.wait_for("the delayed task runs", lambda: len(app.events("due")) == 2)
    time.sleep(2.5)  # more than two leases: a leased delay would have run again by now

    later = [e for e in app.events("due") if e["key"] == "later"]
    assert len(later) == 1
    assert later[0]["at"] >= sent + 3.0
    with app.queue() as q:
        queues = q.stats()["queues"]
    assert not [name for name in queues if name.startswith(app.namespace) and ".DQ" in name]
    assert app.stop(worker) == 0


def test_a_task_longer_than_the_lease_runs_once_while_its_worker_lives(app: App) -> None:
    t = app.tasks
    worker = app.worker(lease=2.0, threads=2)  # a free thread would take a redelivery
    app.send(t.sleepy, "s", 5.0)
    app.wait_for("the task ends", lambda: bool(app.events("sleepy-done")))
    time.sleep(2.5)
    assert len(app.events("sleepy-start")) == 1  # its lease was renewed while it ran
    assert app.stop(worker) == 0


def test_priorities_are_the_brokers_across_everything_waiting(app: App) -> None:
    t = app.tasks
    for n in range(8):
        app.send(t.routine, n)  # Dramatiq priority 10: pigeon's 0
    for n in range(4):
        app.send(t.plain, n, broker_priority=5)  # explicit: pigeon's 5
    for n in range(8):
        app.send(t.urgent, n)  # Dramatiq priority 0: pigeon's 9, sent last
    # One message held at a time: the order is the broker's alone (with more, the worker
    # orders what it holds by the actor's priority, and Dramatiq 1.x not FIFO within one).
    worker = app.worker(threads=1, prefetch=1)
    app.wait_for("all ran", lambda: len(app.events()) == 20)

    order = [e["event"] for e in app.events()]
    assert order == ["urgent"] * 8 + ["plain"] * 4 + ["routine"] * 8
    assert [e["n"] for e in app.events("urgent")] == list(range(8))  # FIFO within one
    assert app.stop(worker) == 0


def test_headers_travel_beside_the_body_and_a_dedup_id_stores_one_message(app: App) -> None:
    t = app.tasks
    headers = {"tenant": "acme", "note": "two words, ünïcode"}
    app.send(t.echo, "h", headers=headers)
    app.send(t.echo, "once", dedup_id="order-7")
    app.send(t.echo, "once", dedup_id="order-7")  # a repeat: confirmed, not stored
    with app.queue() as q:
        waiting = q.peek()
    assert [m["headers"] for m in waiting] == [headers, {}]
    assert "headers" not in json.loads(waiting[0]["payload"])["options"]  # not in the body
    assert "dedup_id" not in json.loads(waiting[1]["payload"])["options"]

    worker = app.worker()
    app.wait_for("both ran", lambda: len(app.events("echo")) == 2)
    time.sleep(0.5)
    seen = {e["key"]: e["headers"] for e in app.events("echo")}
    assert seen == {"h": headers, "once": None}
    assert app.stop(worker) == 0


@pytest.mark.slow
def test_a_worker_sigkilled_mid_task_loses_nothing_and_the_task_runs_again(app: App) -> None:
    t = app.tasks
    worker = app.worker(threads=1, lease=300.0)  # the lease cannot be what brings it back
    app.send(t.slow, "s")
    for n in range(5):
        app.send(t.plain, n)
    app.wait_for("the slow task starts", lambda: bool(app.events("slow-start")))
    (start,) = app.events("slow-start")
    assert start["pid"] != worker.pid  # Dramatiq forks: kill the process running the task
    os.kill(start["pid"], signal.SIGKILL)

    # The broker sees the connection drop: the task (and what was prefetched) is back.
    with app.queue() as q:
        name = app.namespace + "default"
        deadline = time.monotonic() + 20
        while q.stats()["queues"][name]["in_flight"]:
            assert time.monotonic() < deadline, "the killed worker's messages did not come back"
            time.sleep(0.05)
    worker.wait(60)  # Dramatiq's main process stops once a worker process died
    assert app.events("slow-done") == []

    again = app.worker(threads=1)
    app.wait_for("the task runs again", lambda: bool(app.events("slow-done")))
    app.wait_for("all ran", lambda: len(app.events("plain")) == 5)
    assert [e["delivery_count"] for e in app.events("slow-start")] == [1, 2]
    assert sorted(e["n"] for e in app.events("plain")) == list(range(5))  # each exactly once
    app.broker.join("default", timeout=30_000)
    assert app.stop(again) == 0


@pytest.mark.slow
def test_a_broker_restart_mid_run_loses_no_task(tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(port)  # durable: its data directory is kept for the restart
    a = App(f"pigeon://127.0.0.1:{port}", tmp_path)
    try:
        a.worker(threads=2)
        for n in range(10):
            a.send(a.tasks.sleepy, str(n), 0.3)
        a.wait_for("tasks start", lambda: bool(a.events("sleepy-start")))
        broker.terminate()
        broker.wait(30)
        broker = start_broker(port)
        a.wait_for("every task ran", lambda: len({e["key"] for e in a.events("sleepy-done")}) == 10)
        a.broker.join("default", timeout=60_000)  # nothing is left unfinished
    finally:
        a.close()
        broker.terminate()
        broker.wait(30)


def test_the_example_runs_under_the_dramatiq_cli(pigeon_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PIGEON_URL": pigeon_url}
    worker = Worker([sys.executable, "-m", "dramatiq", "dramatiq_app", "--path", "examples"],
                    env=env, log=tmp_path / "worker.log", cwd=ROOT)  # fmt: skip
    try:
        sent = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "dramatiq_app.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        worker.stop(60)
    out = worker.output()
    assert sent.returncode == 0, sent.stderr + out
    assert "all done" in sent.stdout
    assert out.count("order 7 charged") == 1
    assert "acme synced" in out and "reminder for ada" in out and "password reset" in out


@pytest.mark.slow
def test_the_benchmark_runs_on_pigeon_redis_and_rabbitmq_at_a_tiny_size() -> None:
    require_service("Redis", 6379)
    require_service("RabbitMQ", 5672)
    out = subprocess.run(
        [sys.executable, "dramatiq_tasks.py", "--tasks", "50", "--paced", "10", "--rate", "50"],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("pigeon", "pigeon-memory", "redis", "rabbitmq"):
        assert f"{name}: " in out.stdout
    assert "plot written" in out.stdout


# --- what the broker refuses, and the mapping (no worker) -----------------------------------


def test_enqueue_refuses_what_pigeon_cannot_hold_and_stores_nothing(app: App) -> None:
    t = app.tasks
    with pytest.raises(ValueError, match="priority must be an int from 0 to 9, not 10"):
        app.send(t.plain, 1, broker_priority=10)
    with pytest.raises(ValueError, match="longest delay pigeon's broker holds"):
        app.send(t.plain, 1, delay=367 * 86_400_000)
    with pytest.raises(TypeError, match="header"):
        app.send(t.plain, 1, headers={"n": 1})
    with app.queue() as q:
        assert q.qsize() == 0


def test_a_url_that_is_not_a_pigeon_broker_is_refused() -> None:
    from pigeon.integrations.dramatiq import PigeonBroker

    with pytest.raises(pigeon.InvalidURL, match="use dramatiq's own RedisBroker"):
        PigeonBroker(url="redis://127.0.0.1:6379")
    with pytest.raises(pigeon.InvalidURL, match="names a queue"):
        PigeonBroker(url="pigeon://127.0.0.1:7878/jobs")


def test_join_times_out_as_dramatiq_says_when_nothing_processes(app: App) -> None:
    from dramatiq.errors import QueueJoinTimeout

    app.send(app.tasks.plain, 1)
    with pytest.raises(QueueJoinTimeout):
        app.broker.join("default", timeout=200)


def test_options_a_middleware_sets_before_enqueue_reach_the_broker(app: App) -> None:
    from dramatiq import Middleware

    class Tenant(Middleware):
        def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
            message.options["headers"] = {"tenant": "acme"}
            message.options["broker_priority"] = 7

    app.broker.add_middleware(Tenant())
    sent = app.send(app.tasks.plain, 1)
    with app.queue() as q:
        (waiting,) = q.peek()
    assert (waiting["headers"], waiting["priority"]) == ({"tenant": "acme"}, 7)
    assert sent.options["headers"] == {"tenant": "acme"}  # the message as sent


def test_a_body_dramatiq_cannot_decode_is_dead_lettered_as_undecodable(app: App) -> None:
    with app.queue() as q:
        q.put(b"not a dramatiq message")
    consumer = app.broker.consume("default", prefetch=2, timeout=200)
    try:
        assert next(consumer) is None
    finally:
        consumer.close()
    with app.queue("default.dead") as dead:
        (letter,) = dead.peek()
    assert letter["reason"].startswith("undecodable: ")


def test_the_consumer_holds_at_most_prefetch_and_gives_back_what_it_did_not_start(
    app: App,
) -> None:
    t = app.tasks
    for n in range(3):
        app.send(t.plain, n)
    consumer = app.broker.consume("default", prefetch=2, timeout=200)
    try:
        held = [next(consumer), next(consumer)]
        assert next(consumer) is None  # two held: the third stays on the broker
        assert [m.args for m in held if m is not None] == [(0,), (1,)]
        consumer.requeue([m for m in held if m is not None])
        with app.queue() as q:
            info = q.stats()["queues"][app.namespace + "default"]
        assert (info["depth"], info["in_flight"]) == (3, 0)
        again = next(consumer)
        assert again is not None and again.args == (0,) and again.redelivered
    finally:
        consumer.close()


def test_no_delay_queue_is_declared_and_flush_drops_waiting_and_dead(app: App) -> None:
    t = app.tasks
    assert app.broker.get_declared_delay_queues() == set()
    app.send(t.plain, 1)
    app.send(t.plain, 2, delay=60_000)
    with app.queue("default.dead") as dead:
        dead.put(b"x")
        app.broker.flush("default")
        assert dead.qsize() == 0
    with app.queue() as q:
        assert q.qsize() == 0


def test_dramatiq_priority_maps_to_ten_levels_higher_first() -> None:
    from pigeon.integrations.dramatiq._mapping import pigeon_priority

    assert [pigeon_priority(p) for p in (-5, 0, 1, 8, 9, 10, 100)] == [9, 9, 8, 1, 0, 0, 0]
    assert pigeon_priority(100, broker_priority=7) == 7


@given(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40))
def test_a_lower_dramatiq_priority_is_never_delivered_after_a_higher_one(a: int, b: int) -> None:
    from pigeon.integrations.dramatiq._mapping import pigeon_priority

    if a <= b:  # a comes first in Dramatiq, so never later in pigeon
        assert pigeon_priority(a) >= pigeon_priority(b)
    assert 0 <= pigeon_priority(a) <= 9


def test_a_send_while_the_broker_is_down_fails_within_reconnect_timeout() -> None:
    import dramatiq
    from dramatiq.errors import ConnectionClosed

    from pigeon.integrations.dramatiq import PigeonBroker

    port = free_port()
    proc = start_broker(port)
    broker = PigeonBroker(url=f"pigeon://127.0.0.1:{port}", reconnect_timeout=0)
    try:
        actor = dramatiq.actor(lambda: None, actor_name="noop", broker=broker)
        actor.send()  # connected
        proc.kill()
        proc.wait(30)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            actor.send()
        assert time.monotonic() - started < 5  # the default, 30 s, rides out a restart
    finally:
        broker.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
