"""Operating a broker (issue 12): metrics, health checks, the dashboard in a real browser,
configuration from file, environment and command line, JSON logs, SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pigeon
from pigeon.server.http import HttpSideDoor
from tests._services import free_port, skip_or_fail, start_broker, wait_for_port


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sample(text: str, name: str, queue: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("queue") == queue:
                return float(s.value)
    raise AssertionError(f"no {name}{{queue={queue!r}}} in /metrics")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, int, Any]]:
    port, http = free_port(), free_port()
    # SQLite: another process can make it fail to commit (a lock), which /readyz must show
    proc = start_broker(
        port, "--data-dir", str(tmp_path), "--http", f"127.0.0.1:{http}", "--store", "sqlite"
    )
    wait_for_port(http)
    yield port, http, proc
    proc.kill()
    proc.wait()


def test_metrics_health_and_stats_over_http(served: tuple[int, int, Any], tmp_path: Path) -> None:
    port, http, _ = served
    with pigeon.Queue(f"pigeon://127.0.0.1:{port}/jobs") as q:
        for i in range(5):
            q.put(i)
        q.get(timeout=5)
        q.get(timeout=5)
        status, body = get(f"http://127.0.0.1:{http}/metrics")
        assert status == 200
        text = body.decode()
        assert sample(text, "pigeon_queue_depth", "jobs") == 3
        assert sample(text, "pigeon_messages_put_total", "jobs") == 5
        assert sample(text, "pigeon_messages_acked_total", "jobs") == 2
        assert "pigeon_connections " in text and "pigeon_store_commit_seconds_bucket" in text
        assert float(text.split("\npigeon_store_disk_bytes ")[1].split()[0]) > 0
        assert get(f"http://127.0.0.1:{http}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{http}/readyz") == (200, b'{"ready": true, "reason": "ok"}')
        stats = json.loads(get(f"http://127.0.0.1:{http}/api/stats")[1])
        assert stats["queues"]["jobs"]["depth"] == 3
        # the store cannot commit: not ready (503 with the reason), healthy all the same
        db = sqlite3.connect(tmp_path / "pigeon.sqlite3", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        t = threading.Thread(target=lambda: q.put("waits for the store"))
        t.start()
        deadline = time.monotonic() + 10
        status, body = get(f"http://127.0.0.1:{http}/readyz")
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            status, body = get(f"http://127.0.0.1:{http}/readyz")
        assert status == 503 and b"has not been able to commit" in body
        assert get(f"http://127.0.0.1:{http}/healthz")[0] == 200
        db.execute("ROLLBACK")
        db.close()
        t.join(30)
        deadline = time.monotonic() + 10
        while get(f"http://127.0.0.1:{http}/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get(f"http://127.0.0.1:{http}/readyz")[0] == 200


def test_http_on_a_non_loopback_address_needs_the_token() -> None:
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "pigeon", "serve", "--memory", "--port", str(port),
         "--http", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0 and "without a token" in out.stderr

    class FakeServer:
        pass

    with pytest.raises(PermissionError, match="without a token"):
        HttpSideDoor(FakeServer(), "10.1.2.3", 0, None)  # type: ignore[arg-type]
    door = HttpSideDoor(FakeServer(), "10.1.2.3", 0, "s3cret")  # type: ignore[arg-type]
    assert not door._authorized([])
    assert not door._authorized([(b"authorization", b"Bearer wrong")])
    assert door._authorized([(b"authorization", b"Bearer s3cret")])


def test_settings_come_from_command_line_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "pigeon.toml"
    config.write_text('max-queues = 5\nmax_connections = 6\nheartbeat = 7.0\nlog_format = "json"\n')
    env = {**os.environ, "PIGEON_MAX_CONNECTIONS": "60", "PIGEON_HEARTBEAT": "70"}
    out = subprocess.run(
        [sys.executable, "-m", "pigeon", "serve", "--config", str(config), "--print-config",
         "--heartbeat", "700"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()}
    assert "5" in lines["max_queues"] and "(config file)" in lines["max_queues"]
    assert "60" in lines["max_connections"] and "(environment)" in lines["max_connections"]
    assert "700.0" in lines["heartbeat"] and "(command line)" in lines["heartbeat"]
    assert "(default)" in lines["port"]
    config.write_text("no_such_option = 1\n")
    out = subprocess.run([sys.executable, "-m", "pigeon", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode != 0 and "unknown setting(s) 'no_such_option'" in out.stderr


def test_json_logs_and_sighup_reload_the_token(tmp_path: Path) -> None:
    config = tmp_path / "pigeon.toml"
    config.write_text('token = "first"\n')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--memory", "--port", str(port), "--config",
         str(config), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port)
        kept = pigeon.Queue(f"pigeon://:first@127.0.0.1:{port}/jobs")
        kept.put(1)
        config.write_text('token = "second"\n')
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with pigeon.Queue(f"pigeon://:second@127.0.0.1:{port}/jobs") as q:
            assert q.get(timeout=5) == 1
        with pytest.raises(pigeon.AuthError):
            pigeon.Queue(f"pigeon://:first@127.0.0.1:{port}/jobs").put(2)
        kept.put(3)  # a client connected before the reload is not dropped
        kept.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and {"time", "level", "logger", "message"} <= set(records[0])
    assert any("reloaded the token" in r["message"] for r in records)


def test_sighup_after_the_token_is_taken_out_of_the_config_file_runs_without_one(
    tmp_path: Path,
) -> None:
    # The settings the file no longer names fall back to their defaults: no token, no TLS
    # files (click >= 8.2 reports "no default" as a truthy sentinel, which was taken for
    # a token and for a certificate pair)
    config = tmp_path / "pigeon.toml"
    config.write_text('token = "first"\n')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--memory", "--port", str(port), "--config",
         str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port)
        config.write_text("# no token now\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/open") as q:
            q.put(1)
            assert q.get(timeout=5) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "reload failed" not in err, err


def _chrome() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        skip_or_fail(
            "the dashboard test needs Debian's chromium and chromium-driver (.ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(driver)), options=options)


def _depth_shown(browser: Any, queue: str) -> str | None:
    """The depth the page shows for ``queue`` (read in one script: the table is redrawn
    every second, so elements found one call earlier may be gone)."""
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#queues tbody tr'))"
        ".map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    for cells in rows:
        if cells and cells[0] == queue:
            return str(cells[1])
    return None


@pytest.mark.slow
def test_the_dashboard_in_a_real_browser_follows_the_queue(served: tuple[int, int, Any]) -> None:
    port, http, _ = served
    browser = _chrome()
    try:
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/orders") as q:
            q.put_many(range(4))
            browser.get(f"http://127.0.0.1:{http}/")
            deadline = time.monotonic() + 10
            while _depth_shown(browser, "orders") != "4" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _depth_shown(browser, "orders") == "4"
            q.put_many(range(10))  # no reload: the page must follow
            t = time.monotonic()
            while _depth_shown(browser, "orders") != "14" and time.monotonic() - t < 3:
                time.sleep(0.1)
            assert _depth_shown(browser, "orders") == "14"
            assert browser.execute_script("return document.querySelector('#chart canvas') !== null")
    finally:
        browser.quit()


def test_the_http_side_door_caps_connections_and_times_out_idle_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    import pigeon.server.http as http_module
    from pigeon.testing.broker import BrokerThread

    monkeypatch.setattr(http_module, "REQUEST_TIMEOUT", 1.0)
    with BrokerThread(http="127.0.0.1:0") as b:
        assert b.server is not None and b.server.http is not None
        door = b.server.http
        door.max_connections = 4
        idle = [socket.create_connection(("127.0.0.1", door.port)) for _ in range(4)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", door.port))
        extra.settimeout(5)
        assert extra.recv(100) == b""  # over the cap: closed at once
        extra.close()
        for s in idle:  # nothing sent within REQUEST_TIMEOUT: closed
            s.settimeout(5)
            assert s.recv(100) == b""
            s.close()
        time.sleep(0.2)
        assert door.connections == 0
        assert get(f"{b.http_url}healthz")[0] == 200


def test_the_dashboard_history_keeps_a_few_numbers_a_sample_however_many_queues() -> None:
    from pigeon.testing.broker import BrokerThread

    with BrokerThread(http="127.0.0.1:0") as b:
        assert b.server is not None and b.server.http is not None
        door = b.server.http
        for i in range(40):
            with pigeon.Queue(b.url(f"q{i}")) as q:
                q.put_many(range(5))
        door._sample_now()
        with pigeon.Queue(b.url("q0")) as q:
            q.put_many(range(7))
            q.get_many(3)
        sample = door._sample_now()
        assert sample.keys() == {"t", "dt", "put", "delivered", "acked"}
        assert (sample["put"], sample["delivered"], sample["acked"]) == (7, 3, 3)
        door.history.append(sample)
        status, body = get(f"{b.http_url}api/history")
        assert status == 200 and json.loads(body)["samples"][-1] == sample
