"""Redis Streams and NATS JetStream at their edges: leases, redelivery, dead letters,
reconnects, and the 1 MiB item on NATS."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pigeon
from tests._services import queue_name, require_service


def test_redis_consumers_leave_the_group_when_their_handles_close(redis_url: str) -> None:
    import redis

    for i in range(25):  # short-lived clients: processes, threads, restarts
        q = pigeon.Queue(redis_url)
        q.put(i)
        q.get_nowait()
        q.close()
    name = redis_url.rsplit("/", 1)[1]
    r = redis.Redis()
    try:
        assert len(r.xinfo_consumers(f"pigeon:{name}", "pigeon")) <= 1
    finally:
        r.close()


def test_redis_a_closed_handle_hands_back_what_it_held(redis_url: str) -> None:
    q = pigeon.Queue(redis_url)
    q.put("held")
    q.get_message(timeout=5)
    q.close()  # without settling
    with pigeon.Queue(redis_url) as other:
        again = other.get_message(timeout=5)  # at once, not after the 30 s lease
        assert again.body == "held" and again.delivery_count == 2
        again.ack()


@pytest.mark.parametrize("how", ["extend", "lease"])
def test_redis_lease_means_now_plus_seconds_beyond_the_queue_lease(
    redis_url: str, how: str
) -> None:
    url = redis_url + "?lease=1"
    with pigeon.Queue(url) as a, pigeon.Queue(url) as b:
        a.put("job")
        if how == "extend":
            msg = a.get_message(timeout=5)
            msg.extend(5)
        else:
            msg = a.get_message(timeout=5, lease=5)
        t = time.monotonic()
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=3.5)  # well past the queue's 1 s lease: still held
        again = b.get_message(timeout=10)
        assert time.monotonic() - t >= 3.5 and again.body == "job"
        again.ack()


def test_nats_lease_means_now_plus_seconds(nats_url: str) -> None:
    url = nats_url + "?lease=1"
    with pigeon.Queue(url) as a, pigeon.Queue(url) as b:
        a.put("job")
        a.get_message(timeout=5, lease=6)
        t = time.monotonic()
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=4.5)
        again = b.get_message(timeout=10)
        assert time.monotonic() - t >= 4.5 and again.body == "job"
        again.ack()


def test_nats_a_lease_changed_after_the_consumer_was_made_applies(nats_url: str) -> None:
    with pigeon.Queue(nats_url + "?lease=1") as first:
        first.put("x")
    with pigeon.Queue(nats_url + "?lease=10") as a, pigeon.Queue(nats_url) as b:
        a.get_message(timeout=5)
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=2.5)  # the 10 s lease now, not the first 1 s


def test_nats_an_item_over_max_item_size_is_refused_before_sending(nats_url: str) -> None:
    with pigeon.Queue(nats_url + "?max_item_size=2097152", serializer="raw") as q:
        with pytest.raises(pigeon.TooLarge, match="max_item_size=2097152"):
            q.put_many([b"small", b"x" * (2 << 20 | 1)])
        assert q.qsize() == 0  # all or none: the small one was not sent either


_FORKED_CHILDREN_THEN_CLOSE = r"""
import multiprocessing as mp, sys, time
import pigeon

def writer(q):
    for i in range(10):
        q.put(i)

def reader(q):
    for _ in range(10):
        q.get(timeout=10)

q = pigeon.Queue(sys.argv[1])
q.put("warm"); q.get(timeout=5)  # the parent's own client, on its loop
ctx = mp.get_context("fork")
children = [ctx.Process(target=writer, args=(q,)), ctx.Process(target=reader, args=(q,))]
for p in children:
    p.start()
for p in children:
    p.join(30)
assert [p.exitcode for p in children] == [0, 0]
t = time.monotonic()
q.close()
print(f"closed in {time.monotonic() - t:.2f} s")
"""


@pytest.mark.parametrize("engine", ["redis_url", "nats_url"])
def test_the_parent_closes_promptly_after_fork_children_used_the_queue(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """A fork child shares its parent's epoll instance: a client it drops must not
    unregister the parent's socket there (the parent's close() then waited forever)."""
    import subprocess
    import sys

    url = request.getfixturevalue(engine)
    r = subprocess.run([sys.executable, "-c", _FORKED_CHILDREN_THEN_CLOSE, url],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "closed in" in r.stdout, r.stderr[-3000:]


class PlugProxy:
    """Forwards 127.0.0.1:port <-> a server; ``pull()`` makes the server unreachable (every
    connection closed, new ones refused), ``stall()`` makes it silent (connections stay
    open, nothing is forwarded any more: a stopped or paused server)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.stalled = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [c, s]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if self.stalled.is_set():
                    continue  # swallowed: the server "never answers"
                b.sendall(data)
        for x in (a, b):
            with contextlib.suppress(OSError):
                x.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        self.stalled.set()

    def pull(self) -> None:
        with contextlib.suppress(OSError):
            self.ls.shutdown(socket.SHUT_RDWR)  # wakes the accept: nothing listens now
        self.ls.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.pull()
        for s in self.socks:
            s.close()


_CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("get", lambda q: q.get(timeout=0.5)),
    ("get_message", lambda q: q.get_message(timeout=0.5)),
    ("put", lambda q: q.put("late", timeout=0.5)),
]


@pytest.fixture(params=["redis", "nats"])
def engine_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    name, port = ("Redis", 6379) if request.param == "redis" else ("NATS", 4222)
    require_service(name, port)
    yield request.param, port


@pytest.mark.parametrize("fault", ["pull", "stall"])
@pytest.mark.parametrize(("call", "fn"), _CALLS, ids=[c for c, _ in _CALLS])
def test_a_calls_timeout_bounds_its_retries_when_the_server_is_out_of_reach(
    engine_server: tuple[str, int], fault: str, call: str, fn: Callable[[Any], Any]
) -> None:
    """Unreachable or silent, the server gets the call's timeout (plus the reply's 1 s
    grace), not the whole reconnect_timeout (10 s here) nor for ever."""
    scheme, port = engine_server
    proxy = PlugProxy(port)
    q = pigeon.Queue(f"{scheme}://127.0.0.1:{proxy.port}/{queue_name()}", reconnect_timeout=10)
    try:
        q.put("warm-up")
        assert q.get(timeout=5) == "warm-up"
        getattr(proxy, fault)()
        t = time.monotonic()
        with pytest.raises((pigeon.BrokenResourceError, pigeon.Empty, pigeon.Full)):
            fn(q)
        assert time.monotonic() - t < 0.5 + 1.0 + 2.0
    finally:
        proxy.close()
        q.close()


# --- NATS headers: every header the options accept, exactly --------------------------

_ODD_HEADERS = {
    "x-note": "  indented text  ",
    "x-subject": "line one\r\nline two",
    "x-empty": "",
    "x-tab": "a\tb",
    "x weird name": "1",
    "x:colon": "1",
    "x-näme": "é",
    "Nats-Looks-Like-Jetstream": "mine",
    "Status": "404",
    "Pigeon-Esc-x": "%41",
    "pigeon-reason": "mine too",
    "x-plain": "as it is",
}


def _nats_wire(headers: dict[str, str]) -> dict[str, str]:
    """What a NATS subscriber gets for ``headers`` published through nats-py: its send
    side (names checked and trimmed, values trimmed, CR/LF to spaces) and its parser."""
    from nats.aio.client import _HEADER_KEY_RE, _HEADER_VALUE_NEWLINES, Client

    block = bytearray(b"NATS/1.0\r\n")
    for k, v in headers.items():
        key = k.strip()
        assert _HEADER_KEY_RE.fullmatch(key), f"nats-py refuses the name {key!r}"
        block += key.encode() + b": " + v.strip().translate(_HEADER_VALUE_NEWLINES).encode()
        block += b"\r\n"
    block += b"\r\n"
    from pigeon.backends._natsheaders import block_size

    assert len(block) == block_size(headers)
    return Client._parse_header_lines(bytes(block[len(b"NATS/1.0\r\n") :]))


def test_headers_round_trip_exactly_through_the_nats_wire() -> None:
    from pigeon.backends._natsheaders import from_nats, to_nats

    assert from_nats(_nats_wire(to_nats(_ODD_HEADERS))) == _ODD_HEADERS
    assert to_nats({"x-plain": "as it is"}) == {"x-plain": "as it is"}  # readable as is


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec=None, categories=None), min_size=1, max_size=20),
        st.text(st.characters(codec=None, categories=None), max_size=40),
        max_size=8,
    )
)
def test_any_header_the_options_accept_round_trips_through_the_nats_wire(
    headers: dict[str, str],
) -> None:
    from pigeon.backends._natsheaders import from_nats, to_nats
    from pigeon.options import check_headers

    headers = check_headers(headers)
    assert from_nats(_nats_wire(to_nats(headers))) == headers


def test_nats_keeps_odd_headers_exactly_through_delivery_and_dead_letters(
    nats_url: str,
) -> None:
    with pigeon.Queue(nats_url) as q, pigeon.Queue(nats_url + ".dead") as dead:
        q.put("odd", headers=_ODD_HEADERS)
        msg = q.get_message(timeout=10)
        assert msg.headers == _ODD_HEADERS
        msg.nack(requeue=False, reason="bad\r\ninput")
        gone = dead.get_message(timeout=10)
        assert (gone.body, gone.headers) == ("odd", _ODD_HEADERS)
        gone.ack()


def test_nats_dead_letters_carry_their_origin_and_reason(nats_url: str) -> None:
    import asyncio

    name = nats_url.rsplit("/", 1)[1]
    with pigeon.Queue(nats_url) as q:
        q.put("doomed")
        q.get_message(timeout=10).nack(requeue=False, reason="worker_died: killed by SIGKILL")

    async def raw_dead_letter() -> dict[str, str]:
        import nats

        from pigeon.backends.nats import stream_name

        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            js = nc.jetstream()
            stored = await js.get_last_msg(stream_name(name + ".dead"), f"pigeon.{name}.dead")
            return dict(stored.headers or {})
        finally:
            await nc.close()

    headers = asyncio.run(raw_dead_letter())
    assert headers["Pigeon-Origin"] == name
    assert headers["Pigeon-Reason"] == "worker_died: killed by SIGKILL"


def _max_payload() -> int:
    import asyncio

    import nats

    async def ask() -> int:
        nc = await nats.connect("nats://127.0.0.1:4222")
        limit = int(nc.max_payload)
        await nc.close()
        return limit

    return asyncio.run(ask())


def test_nats_takes_at_once_an_item_that_fits_only_without_its_headers(nats_url: str) -> None:
    """The server counts headers with the payload against max_payload (and drops a
    connection that sends more): such an item goes in chunks, never sent whole and
    retried until reconnect_timeout."""
    limit = _max_payload()
    with pigeon.Queue(nats_url, serializer="raw", reconnect_timeout=5) as q:
        t = time.monotonic()
        q.put(b"x" * (limit - 20))  # its Nats-Msg-Id alone is longer than 20 bytes
        q.put(b"y" * (limit - 4096), headers={"x-context": "c" * 8192})
        assert time.monotonic() - t < 4  # never refused by the server, never retried
        assert q.get(timeout=10) == b"x" * (limit - 20)
        msg = q.get_message(timeout=10)
        assert (msg.body, msg.headers) == (b"y" * (limit - 4096), {"x-context": "c" * 8192})
        msg.ack()


def _chunks_stored(queue: str) -> int:
    import asyncio

    import nats
    from nats.js.errors import NotFoundError

    from pigeon.backends.nats import chunk_stream_name

    async def ask() -> int:
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            return int((await nc.jetstream().stream_info(chunk_stream_name(queue))).state.messages)
        except NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_nats_takes_an_item_whose_headers_and_payload_make_exactly_max_payload(
    nats_url: str,
) -> None:
    from pigeon.backends._natsheaders import block_size
    from pigeon.backends.nats import stream_name

    limit = _max_payload()
    name = nats_url.rsplit("/", 1)[1]
    with pigeon.Queue(nats_url, serializer="raw", reconnect_timeout=2) as q:
        exact = limit - block_size(
            {"Nats-Msg-Id": "fits", "Nats-Expected-Stream": stream_name(name)}
        )
        q.put(b"x" * exact, dedup_id="fits")
        assert _chunks_stored(name) == 0  # one message, whole
        q.put(b"x" * (exact + 1), dedup_id="fits too")
        assert _chunks_stored(name) == 2  # one byte more: in chunks
        assert [len(q.get(timeout=10)) for _ in range(2)] == [exact, exact + 1]
        assert _chunks_stored(name) == 0  # taken for good: its chunks are gone


@pytest.mark.parametrize("delay", [0, 3])
def test_qsize_counts_a_message_given_back_until_it_is_taken_again(
    engine_server: tuple[str, int], delay: float
) -> None:
    """As on pigeon://: waiting (new, or given back by a nack, delayed or not) counts;
    held does not. `pigeon worker --drain` stops on qsize() == 0."""
    scheme, port = engine_server
    with pigeon.Queue(f"{scheme}://127.0.0.1:{port}/{queue_name()}") as q:
        q.put_many(["a", "b"])
        first = q.get_message(timeout=10)
        assert (first.body, q.qsize()) == ("a", 1)  # held: not waiting
        first.nack(delay=delay)
        assert q.qsize() == 2  # given back: waiting, due or not
        taken = [q.get_message(timeout=10)]
        assert q.qsize() == 1
        taken.append(q.get_message(timeout=10))  # "a" once its delay has passed
        assert sorted((m.body, m.delivery_count) for m in taken) == [("a", 2), ("b", 1)]
        assert q.qsize() == 0  # both held: taken again, no longer counted
        for m in taken:
            m.ack()
        assert q.qsize() == 0


def test_closing_a_handle_while_a_thread_waits_in_get_closes_that_threads_client(
    engine_server: tuple[str, int],
) -> None:
    """close() from another thread must not skip the client of a thread inside a call
    (its private loop running): the call ends, and that client is closed."""
    scheme, port = engine_server
    q: pigeon.Queue[Any] = pigeon.Queue(f"{scheme}://127.0.0.1:{port}/{queue_name()}")
    outcome: list[BaseException | str] = []

    def wait_forever() -> None:
        try:
            outcome.append(q.get())  # no timeout: only close() ends it
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    waiter.start()
    time.sleep(1.0)  # inside get, its loop running
    lanes = [h.lane for h in q._lanes]  # type: ignore[attr-defined]
    q.close()
    waiter.join(10)
    assert not waiter.is_alive(), "the get went on after close()"
    assert len(outcome) == 1 and isinstance(outcome[0], pigeon.ClosedResourceError)
    assert all(lane.impl.closed for lane in lanes)
    assert all(lane.loop is None or lane.loop.is_closed() for lane in lanes)


_FORK_WHILE_LOCKED = r"""
import asyncio, os, signal, sys, threading
from pigeon.backends import _loopthread

_loopthread.run(asyncio.sleep(0))  # the I/O thread runs
held, release = threading.Event(), threading.Event()

def holder():
    with _loopthread._lock:  # another thread inside loop() at the moment of the fork
        held.set()
        release.wait()

threading.Thread(target=holder, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a child blocked on the parent's lock dies of SIGALRM
    os._exit(0 if _loopthread.run(asyncio.sleep(0, result=7)) == 7 else 3)
release.set()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_fork_child_gets_the_io_loop_even_if_a_parent_thread_held_its_lock() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FORK_WHILE_LOCKED], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_private_loops_are_selector_loops_under_any_event_loop_policy(redis_url: str) -> None:
    """A fork child detaches every private loop from its parent's epoll instance, which
    only a selector loop allows: uvloop's, made by the policy, shares it for good."""
    import asyncio

    import uvloop

    from pigeon.backends import _loopthread

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        with pigeon.Queue(redis_url) as q:
            loop = q._local.own.lane.loop  # type: ignore[attr-defined]
            assert isinstance(loop, asyncio.SelectorEventLoop)
            assert loop in _loopthread._LOOPS
    finally:
        asyncio.set_event_loop_policy(old)


def test_a_timed_get_on_an_empty_queue_is_empty_every_time(
    engine_server: tuple[str, int],
) -> None:
    """Now that a call's timeout bounds its retries, an error an attempt took for a lost
    connection is no longer retried past the deadline: nats-py's fetch sometimes times
    out with asyncio's TimeoutError rather than its own (an OSError, like a lost
    connection), and must still mean "nothing came"."""
    scheme, port = engine_server
    with pigeon.Queue(f"{scheme}://127.0.0.1:{port}/{queue_name()}") as q:
        for _ in range(50):
            with pytest.raises(pigeon.Empty):
                q.get_many(5, timeout=0.1)


@pytest.mark.parametrize("engine", ["redis_url", "nats_url"])
def test_a_held_message_has_one_identity_on_every_delivery_and_twins_their_own(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """The stream entry (Redis) or stream sequence (NATS): what ``pigeon.consume`` counts
    a message's worker deaths by."""
    url = request.getfixturevalue(engine)
    with pigeon.Queue(url) as q:
        q.put_many(["same", "same"])
        a, b = q.get_message(timeout=5), q.get_message(timeout=5)
        a.nack()
        again = q.get_message(timeout=5)
        again.ack()
        b.ack()
    assert a.body == b.body == again.body == "same"
    assert a._identity is not None and a._identity != b._identity
    assert (again._identity, again.delivery_count) == (a._identity, 2)
