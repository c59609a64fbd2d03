"""The pigeon:// backend: a client of ``pigeon serve``, with a blocking and an asyncio face.

Features
    The whole ``pigeon.Queue`` contract. ``put`` returns once the broker confirmed;
    ``put_many``/``get_many`` cost one round trip; ``get_message`` gives at-least-once
    delivery with ``ack``/``nack(requeue, delay)``/``extend``; ``task_done``/``join`` and
    ``shutdown`` act on the broker's queue, for every client. ``pigeon.AsyncQueue(url)``
    pipelines concurrent calls over one connection.

Connection URL
    ``pigeon://[TOKEN@]HOST[:PORT]/QUEUE[?lease=S&max_deliveries=N]`` (port 7878 by
    default). The token may also be given as the password: ``pigeon://:TOKEN@host/q``.

Options
    ``maxsize`` (declares the queue's capacity), ``serializer`` (``"msgpack"`` by
    default), ``lease`` (seconds before an unacked message returns, default 30),
    ``max_deliveries`` (then it moves to ``QUEUE.dead``, default 20),
    ``reconnect_timeout`` (seconds to keep retrying when no timeout was given, 30).

Delivery guarantees
    At-least-once for ``get_message``: an unacked message comes back at once when its
    consumer's connection drops, or when its lease runs out. Plain ``get`` acks on
    receipt (at-most-once if the consumer crashes after it). A ``put`` whose confirmation
    was lost to a broken connection is retried after reconnecting, so it may be stored
    twice: duplicates are possible, losses of confirmed puts are not (with a durable
    broker). FIFO per queue except redeliveries, which go to the front.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pigeon._queue_base import Message, Queue, deadline_from
from pigeon.backends._retry import Backoff
from pigeon.backends._url import QueueURL, check_maxsize
from pigeon.errors import (
    AuthError,
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Full,
    LocalProtocolError,
    PigeonError,
    RemoteProtocolError,
    ShutDown,
)
from pigeon.framing import LengthPrefixed
from pigeon.protocol import (
    MAGIC,
    VERSION,
    Ack,
    ClientCodec,
    Declare,
    Deliver,
    Delivery,
    Error,
    Extend,
    Get,
    Goodbye,
    Hello,
    Info,
    Join,
    Nack,
    Ok,
    Ping,
    Pong,
    Put,
    PutBatch,
    QueueShutdown,
    Shutdown,
    TaskDone,
    Welcome,
)
from pigeon.protocol.wire import encode_message
from pigeon.serializers import SerializerLike, get_serializer
from pigeon.streams import FramedSocket

T = TypeVar("T")

__all__ = ["BrokerMessage", "BrokerQueue", "Endpoint", "parse_url", "raise_for"]

DEFAULT_PORT = 7878
_HEARTBEAT_MISSES = 3  # heartbeats without a byte from the broker before it counts as gone


class Endpoint(QueueURL):
    """What a pigeon:// URL says; the token is the password (or the user name)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, ("pigeon", "pigeon+tls"), DEFAULT_PORT)
        self.tls = self.scheme == "pigeon+tls"
        self.token = self.password or self.username


def parse_url(url: str) -> Endpoint:
    return Endpoint(url)


_ERRORS: dict[str, Callable[[str], BaseException]] = {
    "empty": Empty,
    "full": Full,
    "shutdown": ShutDown,
    "timeout": TimeoutError,
    "auth": AuthError,
    "protocol": RemoteProtocolError,
    "bad_request": ValueError,
    "value": ValueError,
    "limit": BrokenResourceError,
    "unavailable": BrokenResourceError,
}


def raise_for(err: Error) -> None:
    """Raise the pigeon exception an ERROR reply stands for."""
    factory = _ERRORS.get(err.code, PigeonError)
    raise factory(err.message)


def check_unknown(reply: Ok, what: str) -> None:
    unknown = reply.value.get("unknown") if isinstance(reply.value, dict) else None
    if unknown:
        raise LocalProtocolError(
            f"cannot {what} delivery {unknown[0]}: the broker no longer holds it for this "
            "client (its lease ran out or its connection dropped), so it was or will be "
            "redelivered"
        )


class _SyncConnection:
    """One blocking connection: HELLO, then one request at a time."""

    def __init__(self, ep: Endpoint, client: str, connect_timeout: float) -> None:
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=connect_timeout)
        except OSError as exc:
            raise BrokenResourceError(f"cannot connect to {ep.host}:{ep.port}: {exc}") from exc
        if ep.tls:
            from pigeon.backends._tls import client_context

            try:
                sock = client_context(ep).wrap_socket(sock, server_hostname=ep.host)
            except OSError as exc:
                sock.close()
                raise BrokenResourceError(f"TLS handshake with {ep.host} failed: {exc}") from exc
        from pigeon.server.app import keepalive

        keepalive(sock)
        self.pid = os.getpid()
        self.codec = ClientCodec()
        self.stream = FramedSocket(sock, LengthPrefixed(max_frame_size=2**31))
        self.heartbeat = 5.0
        self.shutdown_queues: set[str] = set()
        try:
            welcome = self._exchange(Hello(MAGIC, VERSION, client, ep.token), None)
        except BaseException:
            self.stream.close()
            raise
        if not isinstance(welcome, Welcome):
            self.stream.close()
            raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
        self.heartbeat = welcome.heartbeat
        sock.settimeout(self.heartbeat * _HEARTBEAT_MISSES)

    def _exchange(self, msg: Any, req: int | None) -> Any:
        try:
            self.stream.send(encode_message(msg))
            while True:
                frame = self.stream.recv()
                if frame is None:
                    raise BrokenResourceError("the broker closed the connection")
                reply = self.codec.decode(frame)
                if isinstance(reply, Ping):
                    self.stream.send(encode_message(Pong(reply.nonce)))
                    continue
                if isinstance(reply, QueueShutdown):
                    self.shutdown_queues.add(reply.queue)
                    continue
                if isinstance(reply, Pong):
                    continue
                if isinstance(reply, Goodbye):
                    raise BrokenResourceError(f"the broker said goodbye: {reply.reason}")
                if isinstance(reply, Error) and reply.req == 0:
                    if reply.code == "auth":
                        raise AuthError(reply.message)
                    raise BrokenResourceError(f"the broker refused: {reply.message}")
                if req is None or getattr(reply, "req", None) == req:
                    return reply
                # a late reply to an abandoned request: skip it
        except TimeoutError as exc:
            raise BrokenResourceError(
                f"no word from the broker for {self.heartbeat * _HEARTBEAT_MISSES:.0f} s"
            ) from exc
        except OSError as exc:
            raise BrokenResourceError(f"connection to the broker broke: {exc}") from exc

    def request(self, msg: Any) -> Any:
        return self._exchange(msg, msg.req)

    def close(self) -> None:
        if self.pid == os.getpid():
            try:
                self.stream.send(encode_message(Goodbye("client closing")))
                self.stream.shutdown_write()
                self.stream.sock.settimeout(1.0)
                while self.stream.recv() is not None:
                    pass
            except (PigeonError, OSError):
                pass
        self.stream.close()


class BrokerQueue(Queue[T]):
    """A queue on a pigeon broker (blocking face; safe to share between threads)."""

    def __init__(
        self,
        url: str,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        reconnect_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        client_name: str | None = None,
    ) -> None:
        check_maxsize(maxsize)
        self._ep = Endpoint(url)
        self._serializer_spec = serializer if serializer is not None else "msgpack"
        self._ser = get_serializer(self._serializer_spec)
        self._lease = self._ep.number("lease", lease)
        md = self._ep.number("max_deliveries", max_deliveries)
        self._max_deliveries = int(md) if md is not None else None
        self._declare_maxsize = maxsize or None
        self._reconnect_timeout = reconnect_timeout
        self._connect_timeout = connect_timeout
        self._client = client_name or f"pigeon-py/{os.getpid()}"
        self._local = threading.local()
        self._conns: set[_SyncConnection] = set()
        self._lock = threading.Lock()
        self._req = 0
        self._closed = False
        self._maxsize = maxsize
        self._declared = False
        if self._declare_maxsize or self._lease is not None or self._max_deliveries is not None:
            self._declare()

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _reopen,
            (self._ep.url, self._maxsize, self._serializer_spec, self._lease,
             self._max_deliveries, self._reconnect_timeout),
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self._ep.url

    def _async_options(self) -> dict[str, Any]:
        """How ``pigeon.AsyncQueue(q)`` opens the same queue on asyncio."""
        return {
            "maxsize": self._declare_maxsize or 0,
            "serializer": self._serializer_spec,
            "lease": self._lease,
            "max_deliveries": self._max_deliveries,
            "reconnect_timeout": self._reconnect_timeout,
        }

    @property
    def name(self) -> str:
        return self._ep.queue

    # --- plumbing -------------------------------------------------------------------------

    def _next_req(self) -> int:
        with self._lock:
            self._req += 1
            return self._req

    def _conn(self) -> _SyncConnection:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        conn: _SyncConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn
        conn = _SyncConnection(self._ep, self._client, self._connect_timeout)
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn

    def _drop(self, conn: _SyncConnection) -> None:
        self._local.conn = None
        with self._lock:
            self._conns.discard(conn)
        conn.stream.close()

    def _call(self, build: Callable[[float | None], Any], deadline: float | None) -> Any:
        """Send ``build(remaining wait)``; reconnect with backoff until ``deadline``."""
        backoff = Backoff(deadline, self._reconnect_timeout)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                conn = self._conn()
                try:
                    reply = conn.request(build(remaining))
                except BrokenResourceError:
                    raise
                except BaseException:
                    # Interrupted mid-request (KeyboardInterrupt, a timeout signal): the
                    # reply may still come. Drop the connection so the broker gives
                    # back whatever it was about to hand us.
                    self._drop(conn)
                    raise
            except BrokenResourceError:
                broken = getattr(self._local, "conn", None)
                if broken is not None:
                    self._drop(broken)
                if (wait := backoff.next_delay()) is None:
                    raise
                time.sleep(wait)
                continue
            if isinstance(reply, Error):
                raise_for(reply)
            return reply

    def _declare(self) -> None:
        reply = self._call(
            lambda _: Declare(self._next_req(), self._ep.queue, self._declare_maxsize,
                              self._lease, self._max_deliveries),
            None,
        )  # fmt: skip
        self._maxsize = int(reply.value.get("maxsize", 0))
        self._declared = True

    # --- the contract ---------------------------------------------------------------------

    @property
    def maxsize(self) -> int:
        if not self._declared:
            self._maxsize = int(self._info().get("maxsize", 0))
            self._declared = True
        return self._maxsize

    def _info(self) -> dict[str, Any]:
        reply = self._call(lambda _: Info(self._next_req(), self._ep.queue), None)
        value: dict[str, Any] = reply.value
        return value

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        payload = self._ser.dumps(item)
        deadline = deadline_from(block, timeout)
        self._call(
            lambda wait: Put(self._next_req(), self._ep.queue, payload, wait if block else 0.0),
            deadline,
        )

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        payloads = [self._ser.dumps(item) for item in items]
        if not payloads:
            return
        deadline = deadline_from(block, timeout)
        self._call(
            lambda wait: PutBatch(
                self._next_req(), self._ep.queue, payloads, wait if block else 0.0
            ),
            deadline,
        )

    def _get(
        self, n: int, block: bool, timeout: float | None, manual: bool, lease: float | None
    ) -> list[Delivery]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        reply = self._call(
            lambda wait: Get(
                self._next_req(), self._ep.queue, n, wait if block else 0.0, manual, lease
            ),
            deadline,
        )
        assert isinstance(reply, Deliver)
        return reply.messages

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        d = self._get(1, block, timeout, False, None)[0]
        return self._ser.loads(d.payload)  # type: ignore[no-any-return]

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        return [
            self._ser.loads(d.payload) for d in self._get(max_items, block, timeout, False, None)
        ]

    def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> BrokerMessage[T]:
        """Take the next message; unacked, it returns after ``lease`` seconds (or the
        queue's lease) or at once if this client's connection drops."""
        d = self._get(1, True, timeout, True, lease)[0]
        return BrokerMessage(self, d, self._ser.loads(d.payload))

    def _settle(self, msg: Any) -> Ok:
        reply: Ok = self._call(lambda _: msg, None)
        return reply

    def qsize(self) -> int:
        return int(self._info()["depth"])

    def task_done(self) -> None:
        self._call(lambda _: TaskDone(self._next_req(), self._ep.queue, 1), None)

    def join(self, timeout: float | None = None) -> None:
        deadline = deadline_from(True, timeout)
        try:
            self._call(lambda wait: Join(self._next_req(), self._ep.queue, wait), deadline)
        except TimeoutError as exc:
            raise TimeoutError(f"join timed out: {exc}") from None

    def shutdown(self, immediate: bool = False) -> None:
        self._call(lambda _: Shutdown(self._next_req(), self._ep.queue, immediate), None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            c.close()

    def __repr__(self) -> str:
        return f"<pigeon.Queue {self._ep.url}>"


def _reopen(
    url: str,
    maxsize: int,
    serializer: SerializerLike,
    lease: float | None,
    max_deliveries: int | None,
    reconnect_timeout: float,
) -> BrokerQueue[Any]:
    return BrokerQueue(
        url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
        reconnect_timeout=reconnect_timeout,
    )  # fmt: skip


class BrokerMessage(Message[T]):
    """A message held for this client until ``ack``, ``nack`` or the end of its lease."""

    def __init__(self, queue: BrokerQueue[T], delivery: Delivery, body: T) -> None:
        self._queue = queue
        self.id = delivery.id
        self.delivery_count = delivery.delivery_count
        self.body = body
        self._settled = False

    def _send(self, build: Callable[[int, str], Any], what: str) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        q = self._queue
        reply = q._settle(build(q._next_req(), q._ep.queue))
        self._settled = what != "extend"
        check_unknown(reply, what)

    def ack(self) -> None:
        self._send(lambda req, queue: Ack(req, queue, [self.id]), "ack")

    def nack(self, requeue: bool = True, delay: float = 0) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._send(lambda req, queue: Nack(req, queue, [self.id], requeue, float(delay)), "nack")

    def extend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        self._send(lambda req, queue: Extend(req, queue, [self.id], float(seconds)), "extend")
