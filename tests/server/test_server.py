"""The broker over real sockets: text mode, hostile bytes, auth, kills, restarts, load."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pigeon
from pigeon.errors import AuthError, BrokenResourceError
from pigeon.testing.broker import BrokerThread
from tests._services import free_port, start_broker


@pytest.fixture
def broker_process() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = start_broker(port, "--heartbeat", "0.5")
    yield port, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(heartbeat=0.5) as b:
        yield b


def text_session(port: int, lines: bytes, settle: float = 0.3) -> str:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(lines)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        time.sleep(settle)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_text_mode_for_humans(broker: BrokerThread) -> None:
    out = text_session(
        broker.port, b"PUT jobs hello world\r\nQSIZE jobs\nGET jobs\nGET jobs\nPING\nQUIT\n"
    )
    assert out.splitlines() == [
        "+OK",
        ":1",
        "+hello world",
        "-EMPTY queue 'jobs' is empty",
        "+PONG",
        "+BYE",
    ]


def test_text_and_binary_clients_share_queues(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("mixed"), serializer="raw") as q:
        q.put(b"from python")
        assert text_session(broker.port, b"GET mixed\nQUIT\n").startswith("+from python")
        text_session(broker.port, b"PUT mixed from nc\nQUIT\n")
        assert q.get(timeout=5) == b"from nc"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05hello",  # a frame that is not HELLO
        b"\x00\xff\xff\xff" + b"x" * 100,  # a 16 MiB header before HELLO
        b"\xff\xfe\xfd\n",  # text mode, but not a UTF-8 line
        b"\x00\x00\x00\x03\x93\x01\x02",  # truncated HELLO array
    ],
)
def test_garbage_closes_that_connection_and_others_go_on(
    broker: BrokerThread, garbage: bytes
) -> None:
    with pigeon.Queue(broker.url("calm")) as q:
        q.put("before")
        with socket.create_connection(("127.0.0.1", broker.port)) as s:
            s.sendall(garbage)
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(65536):
                    pass  # the broker closes it; recv returns b""
        q.put("after")
        assert q.get_many(5, timeout=5) == ["before", "after"]


def test_header_of_4_gib_after_hello_is_refused_before_reading_the_body(
    broker: BrokerThread,
) -> None:
    from pigeon.protocol import MAGIC, VERSION, Hello
    from pigeon.protocol.wire import encode_frame

    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        s.sendall(encode_frame(Hello(MAGIC, VERSION, "fuzz")))
        s.settimeout(5)
        s.recv(65536)  # WELCOME
        s.sendall(b"\xff\xff\xff\xff")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert b"exceeds max_frame_size" in data


def test_handshake_timeout_closes_silent_connections() -> None:
    with (
        BrokerThread(handshake_timeout=0.3) as b,
        socket.create_connection(("127.0.0.1", b.port)) as s,
    ):
        s.settimeout(5)
        s.sendall(b"\x00\x00")  # binary mode, HELLO never finished
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert b"handshake not completed in time" in data


def test_token_is_required_when_set() -> None:
    with BrokerThread(token="s3cret") as b:
        with pigeon.Queue(b.url("safe")) as q:  # the URL carries the token
            q.put(1)
            assert q.get(timeout=5) == 1
        bad = f"pigeon://:wrong@127.0.0.1:{b.port}/safe"
        with pytest.raises(AuthError, match="authentication failed"):
            pigeon.Queue(bad).put(1)
        assert text_session(b.port, b"PUT safe x\n").startswith("-ERR auth")
        # only the wrong token counts as a failed login; a line typed before AUTH does not
        assert b.server is not None and b.server.auth.failures == 1


def test_non_loopback_bind_without_token_is_refused() -> None:
    with pytest.raises(PermissionError, match="not a loopback address, without a token"):
        BrokerThread(host="0.0.0.0").start()


def _consume_and_hang(url: str, got: Any) -> None:
    q = pigeon.Queue(url)
    msg = q.get_message(timeout=10)
    got.put(msg.body)
    time.sleep(60)  # SIGKILLed before it acks


def test_consumer_killed_before_ack_is_redelivered_at_once(
    broker_process: tuple[int, Any],
) -> None:
    port, _ = broker_process
    url = f"pigeon://127.0.0.1:{port}/work?lease=60"
    ctx = mp.get_context("spawn")
    with pigeon.Queue(url) as q:
        q.put("job-1")
        got = ctx.SimpleQueue()
        p = ctx.Process(target=_consume_and_hang, args=(url, got))
        p.start()
        assert got.get() == "job-1"
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(10)
        # the lease is 60 s: getting it now proves the redelivery came from the drop
        msg = q.get_message(timeout=10)
        assert msg.body == "job-1" and msg.delivery_count == 2
        msg.ack()


def test_lease_expiry_redelivers_over_the_network(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("leases")) as q:
        q.put("slow job")
        first = q.get_message(timeout=5, lease=0.2)  # type: ignore[call-arg]
        again = q.get_message(timeout=5)
        assert again.body == "slow job" and again.delivery_count == 2
        again.ack()
        with pytest.raises(pigeon.LocalProtocolError, match="no longer holds it"):
            first.ack()


def test_poison_message_ends_in_the_dead_letter_queue(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("poison"), max_deliveries=2) as q:  # type: ignore[call-arg]
        q.put("bad")
        for _ in range(2):
            q.get_message(timeout=5).nack()
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.1)
        with pigeon.Queue(broker.url("poison.dead")) as dead:
            assert dead.get(timeout=5) == "bad"


def test_broker_restart_clients_reconnect_and_go_on() -> None:
    port = free_port()
    proc = start_broker(port)
    try:
        with pigeon.Queue(f"pigeon://127.0.0.1:{port}/restart") as q:
            q.put("before")
            assert q.get(timeout=5) == "before"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0  # graceful stop exits 0
            proc = start_broker(port)  # binds at once: SO_REUSEADDR despite TIME_WAIT
            q.put("after", timeout=20)
            assert q.get(timeout=20) == "after"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("store", ["log", "sqlite"])
def test_tasks_taken_and_not_yet_done_survive_kill_9_and_sigterm(store: str, tmp_path: Any) -> None:
    # Round 6, FINDINGS-nemesis.md #2: a restart (kill -9 or SIGTERM) set a queue's
    # unfinished count to the messages it held: the producer's join() returned at once,
    # the consumer's next task_done() raised ValueError.
    port = free_port()
    args = ("--data-dir", str(tmp_path), "--store", store, "--fsync", "always")
    proc = start_broker(port, *args)
    try:
        for how in (signal.SIGKILL, signal.SIGTERM):
            url = f"pigeon://127.0.0.1:{port}/jobs-{how.name}"
            with pigeon.Queue(url) as producer, pigeon.Queue(url) as consumer:
                producer.put_many([1, 2, 3])
                assert [consumer.get(timeout=5) for _ in range(3)] == [1, 2, 3]
                consumer.task_done()  # one of three done; two taken and not done
                proc.send_signal(how)
                proc.wait(15)
                proc = start_broker(port, *args)
                assert producer._info()["unfinished"] == 2  # type: ignore[attr-defined]
                with pytest.raises(TimeoutError):
                    producer.join(timeout=0.5)
                consumer.task_done()
                consumer.task_done()
                producer.join(timeout=5)
                with pytest.raises(ValueError, match="more times than there were items"):
                    consumer.task_done()
    finally:
        proc.kill()
        proc.wait(10)


def test_client_gives_up_with_broken_resource_when_its_timeout_runs_out() -> None:
    port = free_port()
    with pytest.raises(BrokenResourceError, match=f"cannot connect to 127.0.0.1:{port}"):
        pigeon.Queue(f"pigeon://127.0.0.1:{port}/none").put(1, timeout=0.5)


def _word_writer(url: str) -> None:
    with pigeon.Queue(url) as q:
        for w in ["java", "Python", "JavaScript"]:
            q.put_nowait(w)
        q.shutdown()


def _word_reader(url: str, out: Any) -> None:
    with pigeon.Queue(url) as q:
        out.put(list(q))


def test_two_processes_exchange_the_seed_words_through_the_broker(
    broker_process: tuple[int, Any],
) -> None:
    port, _ = broker_process
    url = f"pigeon://127.0.0.1:{port}/seed"
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    r = ctx.Process(target=_word_reader, args=(url, out))
    r.start()
    w = ctx.Process(target=_word_writer, args=(url,))
    w.start()
    assert out.get() == ["java", "Python", "JavaScript"]
    w.join(20)
    r.join(20)


def test_stats_show_connections_and_tcp_state(broker: BrokerThread) -> None:
    from click.testing import CliRunner

    from pigeon.cli import cli

    with pigeon.Queue(broker.url("seen")) as q:
        q.put(1)
        result = CliRunner().invoke(cli, ["stats", "--json", "--url", broker.url("x")])
        assert result.exit_code == 0, result.output
        assert '"tcp_state": "ESTABLISHED"' in result.output
        assert '"seen"' in result.output


def test_cli_put_and_get(broker: BrokerThread) -> None:
    from click.testing import CliRunner

    from pigeon.cli import cli

    url = broker.url("cli")
    runner = CliRunner()
    assert runner.invoke(cli, ["put", url, "java", "Python"]).exit_code == 0
    assert runner.invoke(cli, ["put", url], input="JavaScript\n").exit_code == 0
    result = runner.invoke(cli, ["get", url, "-n", "3", "--ack"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["java", "Python", "JavaScript"]
    result = runner.invoke(cli, ["get", url, "--timeout", "0.1"])
    assert result.exit_code == 1 and "no item within 0.1 s" in result.output


def test_500_concurrent_connections(broker_process: tuple[int, Any]) -> None:
    port, _ = broker_process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))

    async def main() -> list[int]:
        queues = [pigeon.AsyncQueue(f"pigeon://127.0.0.1:{port}/many") for _ in range(500)]
        await asyncio.gather(*(aq.put(i) for i, aq in enumerate(queues)))
        got = await asyncio.gather(*(aq.get(timeout=30) for aq in queues))
        await asyncio.gather(*(aq.aclose() for aq in queues))
        return sorted(got)

    assert asyncio.run(main()) == list(range(500))


def test_raw_protocol_frames_by_hand(broker: BrokerThread) -> None:
    """docs/protocol.md's example, byte for byte: a client in any language does this."""
    import msgspec

    def frame(*fields: Any) -> bytes:
        body = msgspec.msgpack.encode(list(fields))
        return struct.pack(">I", len(body)) + body

    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        s.sendall(frame(0x01, "PGN", 1, "by-hand", None))
        s.sendall(frame(0x10, 1, "hand", b"hi", 0.0))
        s.sendall(frame(0x20, 2, "hand", 1, 0.0, False, None))
        s.settimeout(5)
        replies: list[Any] = []
        buf = b""
        while len(replies) < 3:
            buf += s.recv(65536)
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                n = struct.unpack(">I", buf[:4])[0]
                replies.append(msgspec.msgpack.decode(buf[4 : 4 + n]))
                buf = buf[4 + n :]
    assert replies[0][0] == 0x02  # WELCOME
    assert replies[1] == [0x80, 1, 1]  # OK to PUT 1: one item stored
    assert replies[2] == [0x81, 2, [[0, 1, b"hi"]]]  # DELIVER to GET 2


def test_frames_in_the_same_packet_as_hello_are_served(broker: BrokerThread) -> None:
    from pigeon.protocol import MAGIC, VERSION, Hello, Put
    from pigeon.protocol.wire import encode_frame

    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        big = b"x" * (100 * 1024)  # above the 64 KiB limit that applies before HELLO
        s.sendall(encode_frame(Hello(MAGIC, VERSION, "eager")) + encode_frame(Put(1, "eager", big)))
        s.settimeout(5)
        data = b""
        while data.count(b"\x93\xcc\x80\x01") == 0:  # OK req=1
            data += s.recv(65536)
    with pigeon.Queue(broker.url("eager"), serializer="raw") as q:
        assert q.get(timeout=5) == big


def test_a_reload_never_drops_the_token_of_a_non_loopback_broker() -> None:
    from pigeon.server.app import BrokerServer, ServerConfig

    async def main() -> None:
        server = BrokerServer(ServerConfig(host="0.0.0.0", token="s3cret"))  # never started
        for empty in (None, ""):
            with pytest.raises(PermissionError, match="not a loopback address, without a token"):
                server.reload(empty, None)
            assert server.config.token == "s3cret" and server.auth.token == "s3cret"
        server.reload("n3w", None)
        assert server.auth.token == "n3w"
        local = BrokerServer(ServerConfig(host="127.0.0.1", token="s3cret"))
        local.reload("", None)  # loopback: a token is the operator's choice
        assert local.auth.token is None

    asyncio.run(main())


def test_pipelined_text_auth_lines_are_each_answered_in_order() -> None:
    with (
        BrokerThread(token="s3cret", auth_failure_delay=0.2) as b,
        socket.create_connection(("127.0.0.1", b.port)) as s,
    ):
        s.settimeout(10)
        s.sendall(b"AUTH wrong\r\nAUTH wrong2\r\nAUTH s3cret\r\nPING\r\n")  # one write
        data = b""
        while data.count(b"\r\n") < 4:
            chunk = s.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
    assert data == b"-ERR auth: wrong token\r\n-ERR auth: wrong token\r\n+OK\r\n+PONG\r\n"


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_quit_is_answered_before_the_broker_closes(token: str | None) -> None:
    with BrokerThread(token=token) as b:
        assert text_session(b.port, b"PING\nQUIT\nPING\n", settle=0) == (
            "+PONG\r\n+BYE\r\n" if token is None else f"{REFUSED}+BYE\r\n"
        )


REFUSED = "-ERR auth: this broker needs a token; send AUTH <token> first\r\n"


def test_lines_before_a_byte_that_is_never_text_are_answered_first(broker: BrokerThread) -> None:
    # The whole read was checked before any of its lines ran: a PING in the same read
    # as the garbage went unanswered, and which lines were answered depended on how
    # the bytes happened to be split into reads.
    out = text_session(broker.port, b"PING\r\nQSIZE jobs\n\x01PING\n")
    assert out == "+PONG\r\n:0\r\n-ERR protocol: byte 0x01 is not text\r\n"


def test_a_wrong_text_auth_is_still_answered_when_the_broker_stops() -> None:
    # Stopping cancelled the timer that answers a wrong AUTH after its delay: its reply
    # never came, the broker waited out its grace, and the client got a bare FIN.
    with (
        BrokerThread(token="s3cret", auth_failure_delay=0.3) as b,
        socket.create_connection(("127.0.0.1", b.port)) as s,
    ):
        s.settimeout(10)
        s.sendall(b"AUTH wrong\r\nPING\r\n")
        time.sleep(0.1)  # the broker has read it and waits out the delay
        b.stop()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"-ERR auth: wrong token\r\n-ERR broker stopping\r\n"


def test_security_doc_describes_the_login_throttle_the_code_has() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert "no lockout" in doc and "10 failures within a minute is refused" not in doc
    with BrokerThread(token="s3cret", auth_failure_delay=0.3) as b:
        for _ in range(12):  # many failures from one address ...
            t = time.monotonic()
            with pytest.raises(AuthError):
                pigeon.Queue(f"pigeon://:wrong@127.0.0.1:{b.port}/q", reconnect_timeout=0).put(1)
            assert time.monotonic() - t >= 0.3  # ... each answered only after the delay
        with pigeon.Queue(b.url("q")) as q:  # ... and the right token still gets in at once
            q.put(1)
        assert b.server is not None and b.server.auth.failures == 12


def test_the_broker_raises_its_open_files_limit() -> None:
    import resource

    from pigeon.server.app import raise_descriptor_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = raise_descriptor_limit(max_connections=100)
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_what_expired_while_the_broker_was_down_moves_once_it_starts(tmp_path: Any) -> None:
    # Nothing ran the broker's timer until it had answered a first request: a first GET
    # after a restart could take a message whose ttl had passed.
    from pigeon.server.store import open_store

    with BrokerThread(store=open_store(tmp_path)) as b:
        q = pigeon.Queue(b.url("jobs"), serializer="raw")
        q.put(b"stale", ttl=0.3)
        q.close()
    time.sleep(0.5)
    with BrokerThread(store=open_store(tmp_path)) as b:
        assert b.server is not None
        deadline = time.monotonic() + 10
        while "jobs.dead" not in b.server.broker.queues and time.monotonic() < deadline:
            time.sleep(0.02)  # no request at all: the timer alone moves it
        dead = b.server.broker.queues["jobs.dead"]
        assert dead.depth == 1 and dead.ready.peek().reason == "expired"


def test_a_consumer_that_is_only_slow_to_read_keeps_its_connection_and_messages() -> None:
    # With TCP_USER_TIMEOUT on the broker's sockets, Linux ends a connection whose peer
    # keeps its receive window closed for that long: a busy consumer was reset and its
    # messages went to others, silently. A peer that acknowledges is alive.
    from pigeon.protocol import ClientCodec, Deliver, Get, Hello
    from pigeon.protocol.wire import encode_frame

    with BrokerThread(peer_timeout=1.0, heartbeat=0.3) as b:
        with pigeon.Queue(b.url("slow"), serializer="raw") as q:
            q.put_many([b"x" * 50_000] * 200)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", b.port))
        s.sendall(encode_frame(Hello("PGN", 1, "slow", None)))
        s.sendall(encode_frame(Get(1, "slow", 200, 0.0, True)))
        time.sleep(4.0)  # four times peer_timeout without reading: the window stays shut
        assert b.server is not None
        assert len(b.server.broker.queues["slow"].in_flight) == 200  # nothing given back
        codec, buf, got = ClientCodec(), bytearray(), 0
        s.settimeout(10)
        while not got:
            chunk = s.recv(1 << 20)
            assert chunk, "the broker closed the connection of a consumer that was alive"
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from(">I", buf)[0]:
                (n,) = struct.unpack_from(">I", buf)
                m = codec.decode(bytes(buf[4 : 4 + n]))
                del buf[: 4 + n]
                if isinstance(m, Deliver):
                    got = len(m.messages)
        s.close()
    assert got == 200


def test_a_text_client_that_reads_nothing_is_dropped_past_max_pending_output() -> None:
    # Text replies went around --max-pending-output: a text client held ~11 MB of them
    # under a 1 MiB limit while a binary client was dropped at 1 MiB.
    with BrokerThread(max_pending_output=100_000) as b:
        with pigeon.Queue(b.url("q")) as q:
            q.put(1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", b.port))
        s.settimeout(10)
        try:
            for _ in range(200):  # a reply far larger than each line: output piles up
                s.sendall(b"STATS\r\n" * 50)
        except OSError:
            pass  # dropped while sending: what this test wants
        assert b.server is not None
        deadline = time.monotonic() + 10
        while b.server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not b.server.connections  # dropped, not buffered without bound
        s.close()


def test_a_worker_busy_past_the_idle_timeout_keeps_its_message() -> None:
    # The blocking client reads only during a call: a job longer than --idle-timeout had
    # its connection closed as idle and its message handed out again - for ever.
    with (
        BrokerThread(idle_timeout=1.0, heartbeat=0.2) as b,
        pigeon.Queue(b.url("long"), serializer="raw") as q,
    ):
        q.put(b"a long job")
        msg = q.get_message(timeout=5)
        time.sleep(2.5)  # the job: past the idle timeout, not a byte sent
        assert b.server is not None and len(b.server.broker.queues["long"].in_flight) == 1
        msg.ack()
        assert q.qsize() == 0
