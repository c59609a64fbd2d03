"""A broker that bad numbers, hostile peers, text-mode garbage and a busy disk cannot
wedge."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.protocol import MAGIC, VERSION, Hello, Put
from pigeon.protocol.wire import encode_frame
from tests._services import free_port, start_broker
from tests.faults._wire import send_until_closed
from tests.faults.test_hostile import rss


def stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def closed_within(s: socket.socket, seconds: float) -> bytes:
    """Read until the broker closes ``s``; fail if it is still open after ``seconds``."""
    s.settimeout(seconds)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s; got {out[:80]!r}") from None
    return out


HELLO = encode_frame(Hello(MAGIC, VERSION, "hostile"))


def hostile(kind: int, rng: random.Random) -> bytes:
    if kind == 0:  # a 4 GiB length header, first thing on the connection
        return b"\xff\xff\xff\xff"
    if kind == 1:  # random bytes, no newline
        return rng.randbytes(rng.randint(1, 400))
    if kind == 2:  # a truncated frame
        return b"\x00\x00\x00\x64" + rng.randbytes(10)
    if kind == 3:  # silence
        return b""
    return b"A" * (70 * 1024)  # an overlong line


async def _one(port: int, data: bytes) -> float:
    return await send_until_closed(port, data, timeout=30)


async def _flood(port: int, total: int) -> list[float]:
    rng = random.Random(7)
    sem = asyncio.Semaphore(500)

    async def guarded(i: int) -> float:
        async with sem:
            return await _one(port, hostile(i % 5, rng))

    return await asyncio.gather(*(guarded(i) for i in range(total)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_thousand_hostile_connections_at_default_settings_are_all_closed() -> None:
    port = free_port()
    broker = start_broker(port, "--memory")  # default handshake (10 s) and idle timeouts
    stop_good = threading.Event()
    sent: list[int] = []
    got: list[int] = []

    def good_client() -> None:
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/calm") as q:
            i = 0
            while not stop_good.is_set():
                q.put(i)
                sent.append(i)
                got.append(q.get(timeout=30))
                i += 1
                time.sleep(0.005)

    try:
        asyncio.run(_flood(port, 100))  # warm up
        before = rss(broker.pid)
        t = threading.Thread(target=good_client)
        t.start()
        durations = asyncio.run(_flood(port, 2000))
        time.sleep(5.5)  # a heartbeat: the broker hands freed memory back after a burst
        after = rss(broker.pid)
        stop_good.set()
        t.join(60)
    finally:
        stop(broker)
    print(
        f"\n2000 hostile connections: closed within max {max(durations):.2f} s; broker RSS "
        f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB; good client moved {len(got)} items"
    )
    assert max(durations) < 15.0
    assert after - before < 16 * 2**20
    assert got == sent and len(got) > 10


@pytest.fixture
def memory_broker() -> Iterator[int]:
    port = free_port()
    proc = start_broker(port, "--memory")
    yield port
    stop(proc)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"hello\x00world", b"\x01\x02\x03", b"PUT q \xc0\xaf"],
    ids=["4gib-header", "nul-in-text", "control-bytes", "never-utf8"],
)
def test_bytes_that_can_never_be_text_close_at_once(memory_broker: int, garbage: bytes) -> None:
    with socket.create_connection(("127.0.0.1", memory_broker)) as s:
        s.sendall(garbage)
        t = time.monotonic()
        out = closed_within(s, 3)
    assert time.monotonic() - t < 2
    assert b"protocol" in out


def test_a_text_client_always_gets_text() -> None:
    port = free_port()
    proc = start_broker(port, "--memory", "--max-connections", "1", "--token", "t0k",
                        "--handshake-timeout", "0.5")  # fmt: skip
    time.sleep(0.3)  # start_broker's probe connection is gone
    try:
        with socket.create_connection(("127.0.0.1", port)) as first:
            first.sendall(b"HELP\n")  # takes the only slot, never logs in
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port)) as second:
                second.sendall(b"PING\n")
                assert closed_within(second, 5).startswith(b"-ERR limit: too many connections")
            out = closed_within(first, 5)
        assert out.endswith(b"-ERR protocol: handshake not completed in time\r\n")
        assert b"\x00" not in out
    finally:
        stop(proc)


def test_a_peer_without_the_token_cannot_lock_out_one_with_it() -> None:
    port = free_port()
    proc = start_broker(port, "--memory", "--token", "right")
    try:
        for _ in range(3):  # a human typing before logging in: not counted
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"HELP\nPUT jobs x\nQUIT\n")
                assert b"send AUTH <token> first" in closed_within(s, 5)

        async def guess(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(encode_frame(Hello(MAGIC, VERSION, "guess", f"wrong{i}")))
            await reader.read()
            writer.close()

        async def many() -> None:
            await asyncio.gather(*(guess(i) for i in range(40)))

        asyncio.run(many())  # 40 wrong tokens from 127.0.0.1, at once
        t = time.monotonic()
        with pigeon.Queue(f"pigeon://:right@127.0.0.1:{port}/jobs") as q:
            q.put("let in")
            assert q.get(timeout=5) == "let in"
        assert time.monotonic() - t < 1.0  # the right token is never delayed
        with pytest.raises(pigeon.AuthError, match="wrong or missing token"):
            pigeon.Queue(f"pigeon://:wrong@127.0.0.1:{port}/jobs").put(1)
    finally:
        stop(proc)


def _silent_tls_peers(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_tls_handshake_timeout_and_connection_count_start_at_accept(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    proc = start_broker(port, "--memory", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key",
                        str(tmp_path / "k.pem"), "--handshake-timeout", "1",
                        "--max-connections", "20")  # fmt: skip
    url = f"pigeon+tls://127.0.0.1:{port}/tls?cafile={tmp_path / 'ca.pem'}"
    try:
        silent = _silent_tls_peers(port, 20)
        time.sleep(0.2)
        with pytest.raises(pigeon.BrokenResourceError, match="too many connections"):
            pigeon.Queue(url, reconnect_timeout=0).put(1)
        for s in silent:  # never started TLS: closed by the handshake timeout
            closed_within(s, 4)
            s.close()
        with pigeon.Queue(url) as q:
            q.put("room again")
            assert q.get(timeout=5) == "room again"
    finally:
        stop(proc)


def test_a_store_locked_by_another_process_does_not_wedge_the_broker(tmp_path: Path) -> None:
    """The SQLite store (the log store's failing disk: tests/server/test_log.py)."""
    port = free_port()
    proc = start_broker(port, "--data-dir", str(tmp_path), "--store", "sqlite")
    url = f"pigeon://127.0.0.1:{port}/jobs"
    try:
        with pigeon.Queue(url) as q:
            q.put("before")
        db = sqlite3.connect(tmp_path / "pigeon.sqlite3", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")  # a backup script, an sqlite3 shell...
        outcome: dict[str, Any] = {}

        def put_during() -> None:
            t = time.monotonic()
            try:
                with pigeon.Queue(url, reconnect_timeout=30) as q:
                    q.put("during")
                outcome["during"] = ("stored", time.monotonic() - t)
            except pigeon.PigeonError as exc:
                outcome["during"] = (type(exc).__name__, str(exc))

        t = threading.Thread(target=put_during)
        t.start()
        time.sleep(6)
        db.execute("ROLLBACK")
        db.close()
        released = time.monotonic()
        with pigeon.Queue(url) as q:
            q.put("after")
            after = time.monotonic() - released
            t.join(30)
            items = q.get_many(10, timeout=5)
        assert proc.poll() is None  # no restart needed
        assert after < 5
        assert outcome["during"][0] == "stored"  # returned once the store took it
        assert {"before", "during", "after"} <= set(items)
    finally:
        stop(proc)


def _cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(parts[13]) + int(parts[14])) / os.sysconf("SC_CLK_TCK")


def test_idle_timeout_zero_means_never_without_spinning() -> None:
    port = free_port()
    proc = start_broker(port, "--memory", "--idle-timeout", "0", "--heartbeat", "0.5")
    try:
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/idle") as q:
            q.put(1)
            c0 = _cpu_seconds(proc.pid)
            time.sleep(2)
            used = _cpu_seconds(proc.pid) - c0
            assert q.get(timeout=5) == 1  # still served
        assert used < 0.1  # under 5 % of a CPU
    finally:
        stop(proc)


def test_twenty_thousand_referenced_names_cost_no_memory_and_no_time() -> None:
    port = free_port()
    proc = start_broker(port, "--memory")
    url = f"pigeon://127.0.0.1:{port}/real"

    def round_trip(q: Any) -> float:
        t = time.perf_counter()
        for _ in range(200):
            q.put(b"x")
            q.get(timeout=5)
        return (time.perf_counter() - t) / 200

    try:
        with pigeon.Queue(url, serializer="raw") as q:
            before_rt = round_trip(q)
            before = rss(proc.pid)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"".join(f"QSIZE ref-{i}\n".encode() for i in range(20_000)) + b"QUIT\n")
                assert closed_within(s, 30).count(b":0\r\n") == 20_000
            after = rss(proc.pid)
            after_rt = round_trip(q)
            stats = q.stats()  # type: ignore[attr-defined]
        print(f"\nround trip {before_rt * 1e6:.0f} -> {after_rt * 1e6:.0f} us; RSS "
              f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB")  # fmt: skip
        assert not [n for n in stats["queues"] if n.startswith("ref-")]  # all forgotten
        assert after - before < 48 * 2**20
    finally:
        stop(proc)


def test_parked_put_payloads_are_bounded_per_connection() -> None:
    port = free_port()
    proc = start_broker(port, "--memory")
    try:
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/full", maxsize=1) as q:
            q.put("fills it")
        before = rss(proc.pid)
        payload = b"x" * 2**20
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(HELLO)
            wire = b"".join(encode_frame(Put(i + 1, "full", payload, None)) for i in range(300))
            s.sendall(wire)
            time.sleep(1.0)
            after = rss(proc.pid)
            s.shutdown(socket.SHUT_WR)
            out = closed_within(s, 10)
        assert out.count(b"max_parked_bytes_per_connection") >= 200  # the rest refused
        assert after - before < 160 * 2**20, f"grew {(after - before) / 2**20:.0f} MiB"
    finally:
        stop(proc)


def test_a_dead_letter_survives_nack_on_the_dead_queue(memory_broker: int) -> None:
    url = f"pigeon://127.0.0.1:{memory_broker}/jobs"
    with pigeon.Queue(url, max_deliveries=1) as q:
        q.put({"order": 42})
        q.get_message(timeout=5).nack()
    with pigeon.Queue(url + ".dead") as dead:
        for _ in range(3):
            msg = dead.get_message(timeout=5)
            assert msg.body == {"order": 42}
            msg.nack(requeue=False)  # rejected again: it stays
        assert dead.get_message(timeout=5).body == {"order": 42}
