"""Hostile peers: 10,000 connections of garbage, truncated frames, 4 GiB headers, HELLOs
that never finish. Each is closed promptly, the broker's memory stays flat, and a
well-behaved client that works all along loses nothing. Also: TLS with a certificate made
at test time.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

import pigeon
from pigeon.protocol import MAGIC, VERSION, Hello
from pigeon.protocol.wire import encode_frame
from tests._services import free_port, start_broker
from tests.faults._wire import send_until_closed

CONNECTIONS = int(os.environ.get("PIGEON_HOSTILE_CONNECTIONS", "10000"))
AT_ONCE = 200


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


HELLO = encode_frame(Hello(MAGIC, VERSION, "hostile"))


def attack(kind: int, rng: random.Random) -> tuple[bytes, bool]:
    """(bytes to send, whether to HELLO first)."""
    if kind == 0:  # random garbage in binary mode
        return b"\x00" + rng.randbytes(rng.randint(1, 300)), False
    if kind == 1:  # a truncated frame: header promises 100 bytes, 10 come
        return b"\x00\x00\x00\x64" + rng.randbytes(10), False
    if kind == 2:  # a 4 GiB header after a proper HELLO
        return b"\xff\xff\xff\xff", True
    if kind == 3:  # HELLO never finished
        return HELLO[: rng.randint(1, len(HELLO) - 1)], False
    return b"\xff" + rng.randbytes(rng.randint(1, 200)) + b"\n", False  # not a UTF-8 line


async def one(port: int, kind: int, rng: random.Random) -> float:
    data, hello = attack(kind, rng)
    return await send_until_closed(port, (HELLO if hello else b"") + data, timeout=10)


async def flood(port: int, total: int) -> list[float]:
    rng = random.Random(42)
    sem = asyncio.Semaphore(AT_ONCE)

    async def guarded(i: int) -> float:
        async with sem:
            return await one(port, i % 5, rng)

    return await asyncio.gather(*(guarded(i) for i in range(total)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ten_thousand_hostile_connections() -> None:
    port = free_port()
    broker = start_broker(port, "--memory", "--handshake-timeout", "1")
    url = f"pigeon://127.0.0.1:{port}/calm"
    stop = threading.Event()
    sent: list[int] = []
    got: list[int] = []

    def good_client() -> None:
        with pigeon.Queue(url) as q:
            i = 0
            while not stop.is_set():
                q.put(i)
                sent.append(i)
                got.append(q.get(timeout=30))
                i += 1
                time.sleep(0.005)

    try:
        # warm up, then measure the broker's resident memory
        asyncio.run(flood(port, 200))
        before = rss(broker.pid)
        t = threading.Thread(target=good_client)
        t.start()
        durations = asyncio.run(flood(port, CONNECTIONS))
        time.sleep(0.5)
        after = rss(broker.pid)
        stop.set()
        t.join(60)
    finally:
        broker.kill()
        broker.wait(10)
    growth = after - before
    p50 = sorted(durations)[len(durations) // 2]
    print(
        f"\n{CONNECTIONS} hostile connections: closed after p50 {p50:.3f} s, "
        f"max {max(durations):.3f} s; broker RSS {before / 2**20:.1f} -> {after / 2**20:.1f} "
        f"MiB; good client moved {len(got)} items"
    )
    assert max(durations) < 5.0  # every one closed by the broker, none left hanging
    assert growth < 16 * 2**20, f"broker memory grew by {growth / 2**20:.1f} MiB"
    assert got == sent and len(got) > 10


def test_tls_with_a_certificate_made_at_test_time(tmp_path: Path) -> None:
    import trustme  # a dev dependency: CI has it, so no silent skip

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    port = free_port()
    broker = start_broker(port, "--memory", "--tls-cert", str(cert_pem), "--tls-key", str(key_pem))
    try:
        url = f"pigeon+tls://127.0.0.1:{port}/secure?cafile={ca_pem}"
        with pigeon.Queue(url) as q:
            q.put("over TLS")
            assert q.get(timeout=5) == "over TLS"

        async def via_asyncio() -> str:
            async with pigeon.AsyncQueue(url) as aq:
                await aq.put("async TLS")
                return await aq.get(timeout=5)  # type: ignore[no-any-return]

        assert asyncio.run(via_asyncio()) == "async TLS"
        # without the CA the certificate is refused
        with pytest.raises(pigeon.BrokenResourceError, match="TLS handshake"):
            pigeon.Queue(f"pigeon+tls://127.0.0.1:{port}/secure").put(1, timeout=1)
        # a plain client gets nothing useful from a TLS port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"PING\n")
            s.settimeout(5)
            try:
                assert b"+PONG" not in s.recv(1024)
            except (ConnectionResetError, TimeoutError, ssl.SSLError):
                pass
    finally:
        broker.kill()
        broker.wait(10)
