"""The pigeon:// client at its edges, the same scenarios through the blocking and the
asyncio face: lost replies, cancelled gets, reconnects, undecodable payloads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.errors import BrokenResourceError, DecodeError, InvalidURL
from pigeon.testing.broker import BrokerThread
from tests._proxy import CuttingProxy
from tests._services import free_port, require_service, start_broker


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(heartbeat=1.0) as b:
        yield b


class Face:
    """One scenario step, run on the blocking queue or through AsyncQueue(url)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def run(self, url: str, fn: Callable[[Any], Any], **options: Any) -> Any:
        if self.name == "sync":
            with pigeon.Queue(url, **options) as q:
                return fn(q)

        async def main() -> Any:
            async with pigeon.AsyncQueue(url, **options) as aq:
                result = fn(aq)
                return await result if asyncio.iscoroutine(result) else result

        return asyncio.run(main())


FACES = [Face("sync"), Face("async")]


def _get(q: Any) -> Any:
    return q.get(timeout=10)


def _get_many(q: Any) -> Any:
    return q.get_many(10, timeout=10)


@pytest.mark.parametrize("face", FACES, ids=repr)
@pytest.mark.parametrize("call", [_get, _get_many], ids=["get", "get_many"])
def test_a_delivery_lost_on_the_way_is_not_lost(
    broker: BrokerThread, face: Face, call: Callable[[Any], Any]
) -> None:
    """The proxy closes both sides instead of forwarding the broker's first DELIVER: the
    item comes back (the broker still held it) and the retried get returns it."""
    with pigeon.Queue(broker.url("cut"), serializer="raw") as q:
        q.put(b"precious")
    proxy = CuttingProxy(broker.port)
    try:
        url = f"pigeon://127.0.0.1:{proxy.port}/cut"
        got = face.run(url, call, serializer="raw", reconnect_timeout=10)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert got in (b"precious", [b"precious"])


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_an_undecodable_payload_is_dead_lettered_and_the_rest_given_back(
    broker: BrokerThread, face: Face
) -> None:
    with pigeon.Queue(broker.url("mixed")) as q:
        q.put_many(["one", "two"])
    with socket.create_connection(("127.0.0.1", broker.port)) as s:  # typed by a human
        s.sendall(b"PUT mixed not msgpack\nQUIT\n")
        s.recv(100)
    with pigeon.Queue(broker.url("mixed")) as q:
        q.put("four")

    def take(q: Any) -> Any:
        return q.get_many(10, timeout=5)

    with pytest.raises(DecodeError) as info:
        face.run(broker.url("mixed"), take)
    err = info.value
    assert err.raw == b"not msgpack" and err.queue == "mixed" and err.serializer == "msgpack"
    assert "moved to 'mixed.dead'" in str(err)
    with pigeon.Queue(broker.url("mixed")) as q:
        assert q.get_many(10, timeout=5) == ["one", "two", "four"]
    with pigeon.Queue(broker.url("mixed.dead"), serializer="raw") as dead:
        assert dead.get(timeout=5) == b"not msgpack"
    assert broker.server is not None
    died = broker.server.broker.queues["mixed.dead"]
    assert died.acked_total == 1


def test_cli_get_reports_an_undecodable_item_without_a_traceback(broker: BrokerThread) -> None:
    import subprocess
    import sys

    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        s.sendall(b"PUT typed hi\nQUIT\n")
        s.recv(100)
    r = subprocess.run(
        [sys.executable, "-m", "pigeon", "get", broker.url("typed")], capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot be decoded" in r.stderr


@pytest.mark.parametrize("call", ["get", "get_many", "get_message"])
def test_cancelled_async_gets_lose_nothing(broker: BrokerThread, call: str) -> None:
    """A get parked on an empty queue; a put; the caller gives up just as the item is on
    its way. Whichever wins, no item may vanish or stay stranded."""

    async def main() -> tuple[int, int]:
        url = broker.url(f"cancel-{call}")
        async with pigeon.AsyncQueue(url) as aq, pigeon.AsyncQueue(url) as prod:
            taken = 0
            for i in range(20):
                getter = getattr(aq, call)
                t = asyncio.ensure_future(getter(5) if call == "get_many" else getter())
                await asyncio.sleep(0.02)
                await prod.put(i)
                t.cancel()
                try:
                    got = await t
                except asyncio.CancelledError:
                    continue
                taken += len(got) if isinstance(got, list) else 1  # it won the race
                if call == "get_message":
                    await got.ack()
            await asyncio.sleep(0.2)
            return taken, await prod.qsize()

    taken, left = asyncio.run(main())
    assert taken + left == 20


def test_an_unawaited_ack_before_aclose_is_sent(broker: BrokerThread) -> None:
    async def main() -> None:
        aq = pigeon.AsyncQueue(broker.url("acks"))
        await aq.put("x")
        msg = await aq.get_message(timeout=5)
        msg.ack()  # not awaited
        await aq.aclose()

    asyncio.run(main())
    with pigeon.Queue(broker.url("acks")) as q:
        info = q._info()  # type: ignore[attr-defined]
    assert info["depth"] == 0 and info["in_flight"] == 0 and info["acked_total"] == 1


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_consumer_blocked_longer_than_reconnect_timeout_survives_a_restart(
    tmp_path: Path, face: Face
) -> None:
    port = free_port()
    data = str(tmp_path / "data")
    proc = start_broker(port, "--data-dir", data, "--heartbeat", "0.5")
    url = f"pigeon://127.0.0.1:{port}/restart"
    result: dict[str, Any] = {}

    def consume() -> None:
        def first(q: Any) -> Any:
            if face.name == "sync":
                return next(iter(q))

            async def one() -> Any:
                async for item in q:
                    return item

            return one()

        try:
            result["got"] = face.run(url, first, reconnect_timeout=2)
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(4)  # blocked twice as long as reconnect_timeout
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    proc = start_broker(port, "--data-dir", data, "--heartbeat", "0.5")
    try:
        with pigeon.Queue(url) as q:
            q.put("after restart")
        t.join(20)
    finally:
        proc.kill()
        proc.wait()
    assert result == {"got": "after restart"}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_connection_per_thread_is_released_when_the_thread_ends(broker: BrokerThread) -> None:
    q = pigeon.Queue(broker.url("threads"))
    q.put("warm")
    q.get(timeout=5)
    gc.collect()
    before = _open_fds()
    for _ in range(40):
        t = threading.Thread(target=lambda: q.put("x"))
        t.start()
        t.join()
    gc.collect()
    assert _open_fds() - before < 5
    deadline = time.monotonic() + 5
    assert broker.server is not None
    while len(broker.server.connections) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(broker.server.connections) == 1  # ours
    q.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_child_does_not_keep_the_parents_connection(broker: BrokerThread) -> None:
    """The parent takes a message and is SIGKILLed while its fork child lives on: the
    message must come back at once, not when the child exits or the lease ends."""
    import multiprocessing as mp

    with pigeon.Queue(broker.url("forked")) as q:
        q.put("held")
    ready = mp.get_context("fork").Event()

    def parent() -> None:
        q = pigeon.Queue(broker.url("forked"), lease=60)
        q.get_message(timeout=5)
        if os.fork() == 0:  # the child sleeps, holding whatever it inherited
            time.sleep(30)
            os._exit(0)
        ready.set()
        time.sleep(30)

    p = mp.get_context("fork").Process(target=parent)
    p.start()
    assert ready.wait(10)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    t = time.monotonic()
    with pigeon.Queue(broker.url("forked")) as q:
        assert q.get(timeout=10) == "held"
    assert time.monotonic() - t < 5


@pytest.mark.parametrize(("name", "port"), [("Redis", 6379), ("NATS", 4222)])
def test_a_pigeon_url_at_another_server_says_so_quickly(name: str, port: int) -> None:
    require_service(name, port)
    t = time.monotonic()
    with pytest.raises(BrokenResourceError, match=r"pigeon (broker|protocol)"):
        pigeon.Queue(f"pigeon://127.0.0.1:{port}/x", connect_timeout=2, reconnect_timeout=1).put(1)
    # NATS greets at once and is told apart at once, never retried; Redis says nothing to
    # a binary HELLO, so connect_timeout runs out (and, as for any silent peer, the
    # client retries until reconnect_timeout after that failure)
    assert time.monotonic() - t < (1.5 if name == "NATS" else 6)


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("lease=nan", "lease"),
        ("lease=-1", "lease"),
        ("lease=inf", "lease"),
        ("max_deliveries=1.9", "max_deliveries"),
        ("max_deliveries=inf", "max_deliveries"),
        ("max_deliveries=0", "max_deliveries"),
    ],
)
def test_bad_url_options_are_invalid_url_naming_the_option(query: str, option: str) -> None:
    with pytest.raises(InvalidURL, match=f"^{option} must be"):
        pigeon.Queue(f"pigeon://127.0.0.1:1/q?{query}")


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_bad_call_arguments_are_value_errors(broker: BrokerThread, face: Face) -> None:
    with pytest.raises(ValueError, match="lease must be"):
        face.run(broker.url("v"), lambda q: q.get_message(timeout=0.1, lease=float("nan")))  # type: ignore[no-any-return]


def test_peer_timeout_socket_options_are_set(broker: BrokerThread) -> None:
    with pigeon.Queue(broker.url("opts")) as q:
        q.put(1)
        link = q._local.holder.link  # type: ignore[attr-defined]
        sock = link.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


class SilentBroker:
    """A fake broker that welcomes every connection (``heartbeat`` seconds), answers the
    DECLARE, then says nothing more: a broker stopped, paused or cut off while its kernel
    still accepts and acknowledges. With ``welcome=False`` not even the WELCOME comes."""

    def __init__(self, heartbeat: float = 10.0, *, welcome: bool = True) -> None:
        self.heartbeat = heartbeat
        self.welcome = welcome
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, queue: str) -> str:
        return f"pigeon://127.0.0.1:{self.port}/{queue}"

    def _serve(self) -> None:
        from pigeon.protocol import VERSION, Ok, Welcome
        from pigeon.protocol.wire import encode_frame

        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.welcome:
                c.recv(65536)  # HELLO and DECLARE (req 1)
                hello = Welcome(VERSION, "fake", self.heartbeat, 2**20, ["options"])
                c.sendall(encode_frame(hello) + encode_frame(Ok(1, {"maxsize": 0})))
            # then nothing: not an answer, not a heartbeat; only the client's close is
            # noticed (so that closing does not wait for the broker to answer GOODBYE)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    @staticmethod
    def _drain(c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while c.recv(65536):
                pass
            c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> SilentBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.close()
        for c in self.conns:
            c.close()


def test_a_broker_that_falls_silent_is_given_up_after_the_silence_limit() -> None:
    # A broker that welcomes, then never answers, must count as gone after its heartbeat
    # times HEARTBEAT_MISSES, not hang.
    from pigeon.protocol.client import HEARTBEAT_MISSES

    with SilentBroker(heartbeat=0.3) as fake:
        q = pigeon.Queue(fake.url("quiet"), reconnect_timeout=0)
        t = time.monotonic()
        try:
            with pytest.raises(BrokenResourceError, match="no word from"):
                q.put(1)
            waited = time.monotonic() - t
            assert 0.3 * HEARTBEAT_MISSES * 0.8 < waited < 5
        finally:
            q.close()


def _timed_calls() -> list[tuple[str, Callable[[Any, float], Any]]]:
    return [
        ("get", lambda q, t: q.get(timeout=t)),
        ("get_message", lambda q, t: q.get_message(timeout=t)),
        ("put", lambda q, t: q.put("x", timeout=t)),
        ("put_many", lambda q, t: q.put_many(["x", "y"], timeout=t)),
    ]


@pytest.mark.parametrize("face", FACES, ids=repr)
@pytest.mark.parametrize(("call", "fn"), _timed_calls(), ids=[c for c, _ in _timed_calls()])
@pytest.mark.parametrize("welcome", [True, False], ids=["silent-after-welcome", "no-welcome"])
def test_a_call_gives_up_by_its_timeout_when_the_broker_falls_silent(
    face: Face, call: str, fn: Callable[[Any, float], Any], welcome: bool
) -> None:
    """The call's timeout bounds the wait for the reply and for a new connection's
    WELCOME, not the silence limit (30 s here) nor connect_timeout (20 s): the stdlib's
    "blocks at most timeout seconds", plus the reply's grace (REPLY_GRACE, 1 s)."""
    took: list[float] = []

    def timed(q: Any) -> Any:  # the call alone, not the handle's close
        t = time.monotonic()
        try:
            result = fn(q, 0.5)
        finally:
            took.append(time.monotonic() - t)
        if not asyncio.iscoroutine(result):
            return result

        async def awaited() -> Any:
            t = time.monotonic()
            try:
                return await result
            finally:
                took.append(time.monotonic() - t)

        return awaited()

    with (
        SilentBroker(heartbeat=10.0, welcome=welcome) as fake,
        pytest.raises(BrokenResourceError, match=r"call's (deadline|timeout)"),
    ):
        face.run(fake.url("stalled"), timed, connect_timeout=20)
    assert 0.5 <= max(took) < 0.5 + 1.0 + 2.0


def test_a_silent_broker_is_noticed_while_signals_keep_interrupting_the_wait() -> None:
    """A signal whose handler returns interrupts the blocked read; it must resume with the
    time that was left, not the whole silence limit again (SO_RCVTIMEO did), or a process
    with a SIGALRM watchdog never notices a silent broker."""

    class Hung(Exception):
        pass

    started = time.monotonic()

    def watchdog(signum: int, frame: object) -> None:
        if time.monotonic() - started > 15:
            raise Hung  # the read was restarted for good: stop the test here

    old = signal.signal(signal.SIGALRM, watchdog)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)  # ten times in every 0.9 s limit
    try:
        with SilentBroker(heartbeat=0.3) as fake:
            q = pigeon.Queue(fake.url("signals"), reconnect_timeout=0)
            try:
                with pytest.raises(BrokenResourceError, match="no word from"):
                    q.put(1)
            finally:
                q.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - started < 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_child_knows_its_own_pid_and_opens_its_own_connection(
    broker: BrokerThread,
) -> None:
    """The clients keep the process id instead of asking the kernel on every request; a
    fork child must still see its own id and so open a connection of its own."""
    from pigeon._pid import current_pid

    assert current_pid() == os.getpid()
    q = pigeon.Queue(broker.url("forkpid"), serializer="raw")
    q.put(b"parent")
    link = q._link()  # type: ignore[attr-defined]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            ok = current_pid() == os.getpid() and q._link() is not link  # type: ignore[attr-defined]
            q.put(b"child")
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q._link() is link  # type: ignore[attr-defined]
    assert sorted(q.get_many(2, timeout=5)) == [b"child", b"parent"]
    q.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_does_not_close_another_threads_connection(broker: BrokerThread) -> None:
    """Inside ``os.fork`` the child drops the other threads' locals - their connections'
    finalizers run there, before any fork hook. They must not say GOODBYE on the socket
    the parent still uses: the parent's unacked message would be taken back."""
    with pigeon.Queue(broker.url("forkthread")) as q:
        q.put("held")
    q = pigeon.Queue(broker.url("forkthread"), lease=60)
    taken, forked, acked = threading.Event(), threading.Event(), []

    def holder() -> None:
        msg = q.get_message(timeout=5)
        taken.set()
        forked.wait(10)
        msg.ack()  # raises if the broker no longer holds it for this connection
        acked.append(msg.body)

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.2)  # a GOODBYE from the child would have reached the broker by now
    forked.set()
    t.join(10)
    assert acked == ["held"]
    q.close()


def test_aclose_during_a_handshake_ends_the_calls_waiting_for_it() -> None:
    async def main() -> tuple[BaseException | None, float]:
        with SilentBroker(welcome=False) as fake:
            aq = pigeon.AsyncQueue(fake.url("closing"), connect_timeout=20)
            getter = asyncio.ensure_future(aq.get())  # waits for a WELCOME that never comes
            await asyncio.sleep(0.3)
            t = time.monotonic()
            await aq.aclose()
            try:
                await asyncio.wait_for(getter, 10)
            except pigeon.ClosedResourceError as exc:
                return exc, time.monotonic() - t
            return None, time.monotonic() - t

    error, took = asyncio.run(main())
    assert isinstance(error, pigeon.ClosedResourceError) and took < 2


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_held_message_has_one_identity_on_every_delivery_and_twins_their_own(
    broker: BrokerThread, face: Face
) -> None:
    """``get_message`` asks the broker for message ids: what ``pigeon.consume`` counts a
    message's worker deaths by (its bytes would merge twins)."""
    with pigeon.Queue(broker.url("ids")) as q:
        q.put_many(["same", "same"])

    def held(q: Any) -> Any:
        if face.name == "sync":
            a, b = q.get_message(timeout=5), q.get_message(timeout=5)
            a.nack()
            again = q.get_message(timeout=5)
            again.ack()
            b.ack()
            return a, b, again

        async def run() -> Any:
            a, b = await q.get_message(timeout=5), await q.get_message(timeout=5)
            await a.nack()
            again = await q.get_message(timeout=5)
            await again.ack()
            await b.ack()
            return a, b, again

        return run()

    a, b, again = face.run(broker.url("ids"), held)
    assert a.body == b.body == again.body == "same"
    assert isinstance(a._identity, int) and a._identity != b._identity
    assert (again._identity, again.delivery_count) == (a._identity, 2)
