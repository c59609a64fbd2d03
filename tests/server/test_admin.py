"""Queue administration (issue 12): peek, purge, delete, move, queues, backup, and queue
settings that survive a restart."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
from pigeon.server.store import SQLiteStore
from pigeon.testing.broker import BrokerThread
from tests._services import free_port, start_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(store=SQLiteStore(tmp_path, "batch")) as b:
        yield b


def pigeon_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pigeon", *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_peek_shows_without_delivering(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("jobs")) as q:
        q.put_many(["a", "b", "c"])
        q.get_message(timeout=5).nack()  # "a" delivered once
        shown = q.peek(10)  # type: ignore[attr-defined]
        assert [(m["body"], m["delivery_count"]) for m in shown] == [("a", 1), ("b", 0), ("c", 0)]
        assert [m["delivery_count"] for m in q.peek(10)] == [1, 0, 0]  # type: ignore[attr-defined]
        assert q.get_message(timeout=5).delivery_count == 2  # peek counted nothing


def test_dead_letters_show_where_they_came_from_and_move_back(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("jobs"), max_deliveries=1) as q:
        q.put("poison")
        q.get_message(timeout=5).nack()
        q.put("rejected")
        q.get_message(timeout=5).nack(requeue=False)
    out = pigeon_cli("peek", broker.url("jobs.dead"))
    assert out.returncode == 0, out.stderr
    assert "max_deliveries" in out.stdout and "rejected" in out.stdout and "jobs" in out.stdout
    out = pigeon_cli("move", broker.url("jobs.dead"), "--to", broker.url("jobs"), "--limit", "1")
    assert out.returncode == 0 and "moved 1 message(s) to jobs" in out.stdout, out.stderr
    with pigeon.Queue(broker.url("jobs")) as q:
        replayed = q.get_message(timeout=5)
        assert replayed.body == "poison" and replayed.delivery_count == 1  # counted afresh
        replayed.ack()
    with pigeon.Queue(broker.url("jobs.dead")) as dead:
        assert dead.qsize() == 1


def test_purge_and_delete(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("p"), maxsize=10) as q:
        q.put_many([1, 2, 3])
        held = q.get_message(timeout=5)
        out = pigeon_cli("purge", broker.url("p"), "--yes")
        assert "purged 2 message(s)" in out.stdout, out.stderr
        assert q.qsize() == 0
        held.ack()  # in flight: untouched by purge
        q.put(4)
        out = pigeon_cli("delete", broker.url("p"), "--yes")
        assert "deleted the queue and 1 message(s)" in out.stdout, out.stderr
        assert q._info()["maxsize"] == 0  # type: ignore[attr-defined]
    assert broker.server is not None and "p" not in broker.server.broker.queues


def test_queues_lists_every_queue(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("listed")) as q:
        q.put_many(range(3))
    out = pigeon_cli("queues", f"pigeon://127.0.0.1:{broker.port}", "--json")
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout)["listed"]["depth"] == 3


def test_declared_settings_and_shutdown_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    proc = start_broker(port, "--data-dir", str(tmp_path))
    url = f"pigeon://127.0.0.1:{port}/kept"
    try:
        with pigeon.Queue(url, maxsize=7, lease=12.5, max_deliveries=3) as q:
            q.put("x")
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/closed") as q:
            q.shutdown()
        proc.terminate()
        proc.wait(10)
        proc = start_broker(port, "--data-dir", str(tmp_path))
        with pigeon.Queue(url) as q:
            info = q._info()  # type: ignore[attr-defined]
            assert (info["maxsize"], info["lease"], info["max_deliveries"]) == (7, 12.5, 3)
            assert q.maxsize == 7 and q.get(timeout=5) == "x"
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/closed") as q, pytest.raises(pigeon.ShutDown):
            q.put(1)
    finally:
        proc.kill()
        proc.wait()


def test_backup_is_consistent_while_the_broker_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    proc = start_broker(port, "--data-dir", str(data))
    url = f"pigeon://127.0.0.1:{port}/busy"
    stop = threading.Event()
    confirmed: list[int] = []

    def produce() -> None:
        with pigeon.Queue(url) as q:
            i = 0
            while not stop.is_set():
                q.put(i)
                confirmed.append(i)
                i += 1

    t = threading.Thread(target=produce)
    t.start()
    try:
        while len(confirmed) < 200:
            threading.Event().wait(0.01)
        before = len(confirmed)
        out = pigeon_cli("backup", "--data-dir", str(data), "--to", str(tmp_path / "copy.sqlite3"))
        after = len(confirmed)
        stop.set()
        t.join(10)
        assert out.returncode == 0, out.stderr
        with contextlib.closing(sqlite3.connect(tmp_path / "copy.sqlite3")) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = db.execute("SELECT COUNT(*) FROM messages WHERE queue = 'busy'").fetchone()[0]
        assert before <= n <= after + 1  # every put confirmed before the copy began
        copy = tmp_path / "restored"
        copy.mkdir()
        (tmp_path / "copy.sqlite3").rename(copy / "pigeon.sqlite3")
        restored = SQLiteStore(copy)
        try:
            assert len(list(restored.recover())) == n  # a store a broker can start on
        finally:
            restored.close()
    finally:
        stop.set()
        proc.kill()
        proc.wait()
