"""A pigeon:// call at the broker's limits, on a connection the broker closed, and on a
handle another thread closes: refused before anything is sent, not retried when the
broker refuses our bytes, one fresh connection for a call with no time to wait, and
ended as the broker answers it when the handle is closed under it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pigeon
from pigeon.errors import BrokenResourceError, ClosedResourceError, TooLarge
from pigeon.protocol import ClientCodec, Ok
from pigeon.testing.broker import BrokerThread
from tests._proxy import CuttingProxy
from tests._services import free_port
from tests.backends.test_broker_client import FACES, Face

MiB = 2**20


def _steps(face: Face, q: Any, *steps: Callable[[Any], Any]) -> Any:
    """Run ``steps`` one after the other on ``q`` (awaiting each on the asyncio face);
    the last one's result."""
    if face.name == "sync":
        result = None
        for step in steps:
            result = step(q)
        return result

    async def run() -> Any:
        result = None
        for step in steps:
            result = await step(q)
        return result

    return run()


def _refused_put(call: str) -> Callable[[Any], Any]:
    def put(q: Any) -> Any:
        if call == "put":
            return q.put(b"x" * (2 * MiB), timeout=5)
        return q.put_many([os.urandom(1024) for _ in range(1500)], timeout=5)

    return put


# --- the broker's max_frame_size, known from WELCOME -------------------------------------


@pytest.mark.parametrize("face", FACES, ids=repr)
@pytest.mark.parametrize("call", ["put", "put_many"])
def test_a_put_over_the_brokers_max_frame_size_is_too_large_and_never_sent(
    face: Face, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker would close the connection on the frame's header; the client knows the
    limit from WELCOME and refuses at once, and its connection goes on working."""
    caplog.set_level(logging.WARNING)
    with BrokerThread(max_frame_size=MiB) as b:
        put = _refused_put(call)

        def refused(q: Any) -> Any:
            if face.name == "sync":
                with pytest.raises(TooLarge, match=r"max_frame_size=1048576 .*nothing was sent"):
                    put(q)
                return None

            async def awaited() -> None:
                with pytest.raises(TooLarge, match=r"max_frame_size=1048576 .*nothing was sent"):
                    await put(q)

            return awaited()

        t = time.monotonic()
        size = face.run(
            b.url(f"big-{call}"),
            lambda q: _steps(face, q, refused, lambda q: q.put(b"small"), lambda q: q.qsize()),
            serializer="raw",
        )
        assert time.monotonic() - t < 4  # refused, not retried until the call's timeout
    assert size == 1
    assert not [r for r in caplog.records if "exceeds max_frame_size" in r.getMessage()]


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_put_no_reply_could_carry_is_too_large(face: Face) -> None:
    """A message that fits a frame but not one reply (``max_reply_bytes``, from
    --max-pending-output here) is refused by the broker with ``too_large``: TooLarge."""
    with BrokerThread(max_frame_size=MiB, max_pending_output=512 * 1024) as b:

        def refused(q: Any) -> Any:
            if face.name == "sync":
                with pytest.raises(TooLarge, match=r"more than one reply may carry"):
                    q.put(b"x" * (600 * 1024), timeout=5)
                return None

            async def awaited() -> None:
                with pytest.raises(TooLarge, match=r"more than one reply may carry"):
                    await q.put(b"x" * (600 * 1024), timeout=5)

            return awaited()

        size = face.run(
            b.url("reply"),
            lambda q: _steps(face, q, refused, lambda q: q.qsize()),
            serializer="raw",
        )
    assert size == 0


class RefusingBroker:
    """A fake broker that welcomes (announcing a large ``max_frame_size``), answers the
    DECLARE, then closes at the first request with ``ERROR(0, "protocol", ...)``, as the
    broker does when a frame passes its limit - or, with ``word=False``, without a word
    (a broker that crashes on the request, a proxy that resets it)."""

    TEXT = "frame of 2097169 bytes exceeds max_frame_size=1048576"

    def __init__(self, *, word: bool = True) -> None:
        self.word = word
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        from pigeon.protocol import VERSION, Error, Welcome
        from pigeon.protocol.wire import encode_frame

        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            with c, contextlib.suppress(OSError):
                c.recv(65536)  # HELLO and DECLARE (req 1)
                welcome = Welcome(VERSION, "fake", 10.0, 2**30, ["options"])
                c.sendall(encode_frame(welcome) + encode_frame(Ok(1, {"maxsize": 0})))
                c.recv(65536)  # the request
                if self.word:
                    c.sendall(encode_frame(Error(0, "protocol", self.TEXT)))

    def __enter__(self) -> RefusingBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.close()


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_broker_that_refuses_our_bytes_is_not_asked_again(face: Face) -> None:
    with RefusingBroker() as fake:
        t = time.monotonic()
        with pytest.raises(BrokenResourceError, match=RefusingBroker.TEXT):
            face.run(
                f"pigeon://127.0.0.1:{fake.port}/refused",
                lambda q: q.put(b"x" * 100, timeout=5),
                serializer="raw",
            )
        assert time.monotonic() - t < 4
        assert fake.connections == 1


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_request_that_ends_every_connection_is_not_sent_for_ever(face: Face) -> None:
    """Each new connection was welcomed, so each loss started the retry budget afresh: the
    call resent its request every 50 ms for ever. A connection that broke at once does not
    renew the budget (reconnect_timeout, 1 s here)."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            face.run(
                f"pigeon://127.0.0.1:{fake.port}/dropped",
                lambda q: q.put(b"x"),
                serializer="raw",
                reconnect_timeout=1,
            )
        except Exception as exc:
            out["error"] = exc

    with RefusingBroker(word=False) as fake:
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(15)
        assert not t.is_alive(), f"still resending after 15 s ({fake.connections} connections)"
    assert isinstance(out["error"], BrokenResourceError)
    assert fake.connections < 40


# --- a connection the broker closed while it was not in use ------------------------------


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def broker_any() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


@pytest.fixture
def idle_broker() -> Iterator[BrokerThread]:
    with BrokerThread(idle_timeout=1.0, heartbeat=0.2) as b:
        yield b


def _put_nowait(q: Any) -> Any:
    q.put_nowait("second")
    return ["first", "second"]


def _put_no_block(q: Any) -> Any:
    q.put("second", block=False)
    return ["first", "second"]


def _get_nowait(q: Any) -> Any:
    assert q.get_nowait() == "first"
    return []


def _get_no_time(q: Any) -> Any:
    assert q.get(timeout=0) == "first"
    return []


@pytest.mark.parametrize(
    "call",
    [_put_nowait, _put_no_block, _get_nowait, _get_no_time],
    ids=["put_nowait", "put(block=False)", "get_nowait", "get(timeout=0)"],
)
def test_a_zero_wait_call_after_the_broker_closed_the_idle_connection_reconnects(
    idle_broker: BrokerThread, call: Callable[[Any], Any]
) -> None:
    """The broker closed this thread's connection (its idle timeout): the call finds it
    closed and gets one new connection at once, though it has no time to wait; what the
    broker never received is sent once."""
    server = idle_broker.server
    assert server is not None
    with pigeon.Queue(idle_broker.url("stale")) as q:
        q.put("first")
        _wait_for(lambda: not server.connections, "the idle close")
        left = call(q)
        if left:
            assert q.get_many(10, timeout=0.5) == left
        else:
            assert q.qsize() == 0


def test_a_zero_wait_put_after_a_broker_restart_is_stored_once() -> None:
    port = free_port()
    with pigeon.Queue(f"pigeon://127.0.0.1:{port}/restart") as q:
        with BrokerThread(port=port):
            q.put_nowait("before")
        # stopped: the thread's connection holds the broker's GOODBYE, unread
        with BrokerThread(port=port):
            q.put_nowait("after")
            assert q.get_many(10, timeout=0.5) == ["after"]


def _put_ok(frame: bytes) -> bool:
    """The broker's OK to a PUT (its value: the number stored), not the DECLARE's."""
    try:
        msg = ClientCodec().decode(frame)
    except Exception:
        return False
    return isinstance(msg, Ok) and msg.value == 1


@pytest.mark.parametrize("face", FACES, ids=repr)
def test_a_zero_wait_put_whose_confirmation_was_lost_is_stored_once_by_its_dedup_id(
    face: Face,
) -> None:
    """The broker stored the put; the connection broke before its OK came. The call sends
    it again on a new connection, and the dedup id keeps it stored once."""
    with BrokerThread() as b:
        proxy = CuttingProxy(b.port, cut=_put_ok)
        try:
            face.run(
                f"pigeon://127.0.0.1:{proxy.port}/lost-ok",
                lambda q: q.put("job", timeout=0, dedup_id="job-42"),
            )
        finally:
            proxy.close()
        assert proxy.cuts == 1
        with pigeon.Queue(b.url("lost-ok")) as q:
            assert q.get_many(10, timeout=0.5) == ["job"]


# --- the handle closed by another thread while a call runs -------------------------------


def test_closing_the_handle_ends_a_get_blocked_in_another_thread(broker_any: BrokerThread) -> None:
    """The closing thread does not touch the link in use (it raised "concurrent poll()
    invocation"); the blocked thread wakes, says GOODBYE, and ends with
    ClosedResourceError. Nothing it might have taken is kept from the queue."""
    q = pigeon.Queue(broker_any.url("close-get"))
    q.qsize()  # the main thread's own link, idle: closed by close() itself
    out: dict[str, Any] = {}

    def blocked() -> None:
        try:
            out["got"] = q.get()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=blocked)
    t.start()
    _wait_for(lambda: _parked(broker_any, "close-get") == 1, "the get parking")
    q.close()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(out.get("error"), ClosedResourceError), out
    with pigeon.Queue(broker_any.url("close-get")) as other:
        other.put("after")
        assert other.get(timeout=5) == "after"


def _parked(b: BrokerThread, queue: str) -> int:
    with pigeon.Queue(b.url(queue)) as q:
        return int(q._info()["consumers_waiting"])  # type: ignore[attr-defined]


def _put_until_closed(q: pigeon.Queue[int], outcomes: list[tuple[int, str]]) -> None:
    for i in itertools.count():
        try:
            q.put(i)
        except ClosedResourceError:
            outcomes.append((i, "closed"))
            return
        outcomes.append((i, "ok"))


def test_closing_the_handle_under_running_puts_loses_no_confirmed_put(
    broker_any: BrokerThread,
) -> None:
    for trial in range(10):
        name = f"close-puts-{trial}"
        q: pigeon.Queue[int] = pigeon.Queue(broker_any.url(name))
        outcomes: list[tuple[int, str]] = []
        t = threading.Thread(target=_put_until_closed, args=(q, outcomes))
        t.start()
        _wait_for(lambda out=outcomes: len(out) > 20, "some puts")
        q.close()  # never raises, whatever the other thread is doing
        t.join(10)
        assert not t.is_alive() and outcomes[-1][1] == "closed"
        confirmed = {i for i, how in outcomes if how == "ok"}
        with pigeon.Queue(broker_any.url(name)) as check:
            stored = set(check.get_many(10_000, timeout=1))
        assert stored == confirmed  # the call that ended closed stored nothing
