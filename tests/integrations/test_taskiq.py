"""taskiq's own worker on a real ``pigeon serve``: ``taskiq worker taskiq_app:broker``.

Every worker here is taskiq's CLI in a subprocess (its supervisor and one worker process,
in a session of their own), its app configured with the one line
``PigeonBroker("pigeon://...")``; the broker is a ``pigeon serve`` subprocess with its
durable store. Tasks append what they saw to an events file (``taskiq_app.record``). The
shared worker holds each task with a 1 s lease, so every test on it also shows that
nothing is given to a second run while a live worker holds it.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pigeon
from tests.integrations import _support
from tests.integrations._support import HERE, cli, require, setup_fixtures, tag, wait_for

require("taskiq", "taskiq")

from taskiq.exceptions import SendTaskError  # noqa: E402

from pigeon.integrations.taskiq import PigeonBroker  # noqa: E402
from tests.integrations import taskiq_app  # noqa: E402


class Setup(_support.Setup):
    """One queue on the test broker, its events file and the workers started on it."""

    field = "kind"

    def __init__(self, base: str, directory: Path, lease: float = 1.0) -> None:
        super().__init__(base, directory, "taskiq")
        self.url = f"{base}/{self.queue}"
        self.lease = lease

    def worker(self, *args: str) -> _support.Worker:
        """``taskiq worker taskiq_app:broker --workers 1`` on this queue: its supervisor
        and one worker process."""
        env = _support.worker_env(
            TASKIQ_PIGEON_URL=self.url,
            TASKIQ_PIGEON_LEASE=str(self.lease),
            TASKIQ_EVENTS=str(self.events_path),
        )
        argv = [*cli("taskiq"), "worker", "taskiq_app:broker", "--app-dir", str(HERE),
                "--workers", "1", "--log-level", "DEBUG", *args]  # fmt: skip
        log = self.dir / f"{self.queue}.worker{len(self.workers)}.log"
        w = Worker(argv, env=env, log=log)
        self.workers.append(w)
        return w

    def kick(self, task: Any, *args: Any, **labels: Any) -> None:
        asyncio.run(kick(self.url, task, *args, **labels))


class Worker(_support.Worker):
    def stop(self, timeout: float = 30.0, *, group: bool = True) -> int | None:
        """SIGTERM to the supervisor and its worker process, as a user's Ctrl-C or a
        container stop; SIGKILL if it hangs."""
        return super().stop(timeout, group=group)


async def kick(url: str, task: Any, *args: Any, **labels: Any) -> None:
    """``task.kicker().with_labels(...).kiq(...)`` from a client of its own, as an app does."""
    client = PigeonBroker(url)
    await client.startup()
    try:
        kicker = task.kicker().with_broker(client)
        # not with_labels: before taskiq 0.12 a kicker shares (and with_labels changes) the
        # task's own labels, which would leak into the next test's kicks
        kicker.labels = {**kicker.labels, **labels}
        await kicker.kiq(*args)
    finally:
        await client.shutdown()


# the shared worker holds each task with a 1 s lease
shared, own = setup_fixtures(lambda url, d: Setup(url, d, lease=1.0))


def test_plain_task_runs_on_the_taskiq_worker(shared: Setup) -> None:
    t = tag()
    shared.kick(taskiq_app.add, t, 2, 3)
    (run,) = wait_for("add(2, 3)", lambda: shared.events("add", tag=t))
    assert run["result"] == 5


def test_retries_run_each_attempt_after_its_delay_held_by_the_broker(shared: Setup) -> None:
    t = tag()
    shared.kick(taskiq_app.flaky, t, 2)
    wait_for("three attempts", lambda: len(shared.events("flaky", tag=t)) >= 3)
    time.sleep(2)  # two more leases: no attempt runs twice
    runs = shared.events("flaky", tag=t)
    assert [r["attempt"] for r in runs] == [0, 1, 2]
    # SmartRetryMiddleware sends each retry with delay=1.5: the broker held it that long
    assert runs[1]["t"] - runs[0]["t"] >= 1.5
    assert runs[2]["t"] - runs[1]["t"] >= 1.5


def test_delay_past_the_lease_is_held_by_the_broker_and_runs_once_when_due(
    shared: Setup,
) -> None:
    t = tag()
    sent = time.time()
    shared.kick(taskiq_app.stamp, t, delay=4)
    time.sleep(1.5)  # past the worker's 1 s lease
    info = shared.info()
    # in the broker, delayed: not delivered, so not leased, so never given out twice
    assert (info["delayed"], info["in_flight"]) == (1, 0), info
    wait_for("the delayed task", lambda: shared.events("stamp", tag=t), timeout=20)
    time.sleep(3)  # three more leases: nothing runs a second time
    (run,) = shared.events("stamp", tag=t)
    assert run["t"] >= sent + 4


@pytest.mark.parametrize("task", ["slow", "blocking"])
def test_task_running_five_leases_runs_once(shared: Setup, task: str) -> None:
    t = tag()
    shared.kick(getattr(taskiq_app, task), t, 5.0)
    wait_for("the long task to end", lambda: shared.events(f"{task}-done", tag=t), timeout=30)
    time.sleep(2)
    assert len(shared.events(f"{task}-start", tag=t)) == 1
    assert shared.info()["in_flight"] == 0


def test_labels_round_trip_to_the_task(shared: Setup) -> None:
    t = tag()
    labels = {"tenant": "acme", "note": "héllo, wörld", "priority": 7}
    shared.kick(taskiq_app.stamp, t, **labels)
    (run,) = wait_for("the stamp task", lambda: shared.events("stamp", tag=t))
    seen = run["labels"]
    assert seen["tenant"] == "acme" and seen["note"] == "héllo, wörld"
    assert str(seen["priority"]) == "7"


def test_labels_become_pigeon_headers_for_tools_that_never_decode_the_task(own: Setup) -> None:
    t = tag()
    own.kick(taskiq_app.stamp, t, tenant="acme", note="héllo")
    with pigeon.Queue(own.url) as q:
        (peeked,) = q.peek(10)
    headers = peeked["headers"]
    assert headers["task_name"] == "stamp"
    assert len(headers["task_id"]) == 32
    assert (headers["tenant"], headers["note"]) == ("acme", "héllo")


def test_priorities_are_honoured_by_the_worker(own: Setup) -> None:
    t = tag()
    # queued before any worker listens: the broker alone decides the order
    for i in range(6):
        own.kick(taskiq_app.stamp, f"{t}-low{i}")
    for i in range(3):
        own.kick(taskiq_app.stamp, f"{t}-high{i}", priority=9)
    own.kick(taskiq_app.stamp, f"{t}-mid", priority=5)
    own.worker("--max-async-tasks", "1")
    wait_for("ten tasks", lambda: len(own.events("stamp")) == 10)
    order = [r["tag"].removeprefix(f"{t}-") for r in own.events("stamp")]
    assert order == [*(f"high{i}" for i in range(3)), "mid", *(f"low{i}" for i in range(6))]


def test_dedup_id_runs_a_task_once_and_still_lets_its_retries_through(own: Setup) -> None:
    t = tag()
    for _ in range(3):  # an app that sends the same job three times
        own.kick(taskiq_app.flaky, t, 1, dedup_id=f"job-{t}")
    own.worker()
    wait_for("two attempts", lambda: len(own.events("flaky", tag=t)) >= 2)
    time.sleep(2.5)
    # one job; its retry (attempt 1) carried the same dedup_id and was not taken for a repeat
    assert [r["attempt"] for r in own.events("flaky", tag=t)] == [0, 1]


@pytest.mark.slow
def test_worker_sigkilled_mid_task_gives_it_back_and_nothing_is_lost(own: Setup) -> None:
    t = tag()
    first = own.worker()
    own.kick(taskiq_app.slow, f"{t}-slow", 3.0)
    for i in range(5):
        own.kick(taskiq_app.add, f"{t}-add{i}", i, i)
    wait_for("the slow task to start", lambda: own.events("slow-start", tag=f"{t}-slow"))
    wait_for("the quick tasks", lambda: len(own.events("add")) == 5)
    for i in range(5, 10):  # queued while the worker dies
        own.kick(taskiq_app.add, f"{t}-add{i}", i, i)
    first.kill()
    assert not own.events("slow-done")
    # late ack: the broker got the slow task back the moment the connection dropped
    info = wait_for("the task back in the queue", lambda: (i := own.info())["in_flight"] == 0 and i)
    assert info["depth"] >= 1, info
    own.worker()
    wait_for("the slow task to end", lambda: own.events("slow-done"), timeout=30)
    wait_for("the quick tasks", lambda: len(own.events("add")) >= 10)
    starts = own.events("slow-start")
    assert len(starts) == 2 and starts[0]["pid"] != starts[1]["pid"]
    # nothing lost, and each worker ran each task at most once: a task that ran in the
    # killed worker just before the kill, its ack not yet at the broker, may run again
    # in the next one (at least once)
    runs = own.events("add")
    killed = [r["tag"] for r in runs if r["pid"] == starts[0]["pid"]]
    after = [r["tag"] for r in runs if r["pid"] != starts[0]["pid"]]
    assert set(killed) | set(after) == {f"{t}-add{i}" for i in range(10)}
    assert len(set(killed)) == len(killed) and len(set(after)) == len(after)
    assert len(own.events("slow-done")) == 1
    wait_for("nothing left", lambda: (i := own.info())["depth"] + i["in_flight"] == 0 or None)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"priority": 10}, r"label 'priority' must be an integer from 0 to 9"),
        ({"priority": "high"}, r"label 'priority' must be an integer from 0 to 9"),
        ({"delay": "soon"}, r"label 'delay' must be a number of seconds"),
        ({"delay": -1}, r"label 'delay' must be a number of seconds"),
    ],
)
def test_a_label_the_broker_cannot_honour_fails_the_kick(
    own: Setup, labels: dict[str, Any], match: str
) -> None:
    with pytest.raises(SendTaskError) as info:
        own.kick(taskiq_app.stamp, tag(), **labels)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert re.search(match, str(cause)), cause
    assert own.info().get("depth", 0) == 0  # nothing was stored


def test_queue_name_label_routes_to_another_queue_of_the_broker(own: Setup) -> None:
    other = f"{own.queue}-other"
    own.kick(taskiq_app.stamp, tag(), queue_name=other)
    with pigeon.Queue(own.url) as q:
        assert q.qsize() == 0
    with pigeon.Queue(own.url.replace(own.queue, other)) as q:
        (peeked,) = q.peek(1)
    assert peeked["headers"]["task_name"] == "stamp"


def test_the_example_app_runs_under_taskiq_worker(pigeon_url: str, tmp_path: Path) -> None:
    examples = HERE.parents[1] / "examples"
    url = f"{pigeon_url}/example-{tag()}"
    env = _support.worker_env(PIGEON_URL=url)
    worker = Worker([*cli("taskiq"), "worker", "taskiq_app:broker", "--app-dir", str(examples),
                     "--workers", "1"], env=env, log=tmp_path / "worker.log")  # fmt: skip
    try:
        sent = subprocess.run([sys.executable, str(examples / "taskiq_app.py")], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        wanted = ("reminder for ada", "report 4 rebuilt", "password reset for grace",
                  "order 42 charged", "flaky: attempt 1 succeeded")  # fmt: skip
        wait_for("the example's tasks", lambda: all(w in worker.output() for w in wanted))
        out = worker.output()
        assert out.count("order 42 charged") == 1
        waited = float(out.split("reminder for ada, ")[1].split(" s")[0])
        assert waited >= 3.0
    finally:
        worker.stop()


def test_a_message_the_worker_would_skip_is_not_held_by_it(own: Setup) -> None:
    from taskiq import BrokerMessage, TaskiqMessage

    own.worker()
    unknown = TaskiqMessage(task_id="x", task_name="newtask", labels={}, args=[], kwargs={})

    async def put() -> None:
        client = PigeonBroker(own.url)
        body = unknown.model_dump_json().encode()
        await client.kick(BrokerMessage(task_id="x", task_name="newtask", message=body, labels={}))
        await client.shutdown()

    with pigeon.Queue(own.url, serializer="raw") as q:
        q.put(b"garbage")
    asyncio.run(put())
    t = tag()
    own.kick(taskiq_app.add, t, 1, 2)
    wait_for("add", lambda: own.events("add", tag=t))
    with pigeon.Queue(f"{own.url}.dead", serializer="raw") as dead:
        (shown,) = wait_for("the dead letter", lambda: dead.peek(10))
    assert (shown["payload"], shown["reason"][:13]) == (b"garbage", "undecodable: ")
    # the unknown task waits in the queue for a worker that knows it, held by none
    info = wait_for("newtask given back", lambda: (i := own.info())["in_flight"] == 0 and i)
    assert info["depth"] == 1
