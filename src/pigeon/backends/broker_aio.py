"""The asyncio face of the pigeon:// backend: one connection, requests pipelined.

# Strategy:
# One ``FramedStream`` per queue handle; a reader task resolves each reply's future by
# request id, answers heartbeats, and fails every pending future with
# BrokenResourceError when the connection ends or the broker is silent for three
# heartbeats. Each call retries on a fresh connection with backoff until its deadline
# (or ``reconnect_timeout``), like the blocking face. Concurrent calls share the
# connection, so ``asyncio.gather(*(aq.put(x) for x in items))`` sends every put before
# the first confirmation comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from pigeon._queue_base import deadline_from
from pigeon.backends._retry import Backoff
from pigeon.backends._url import check_maxsize
from pigeon.backends.broker import Endpoint, check_unknown, raise_for
from pigeon.errors import (
    AuthError,
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    PigeonError,
    RemoteProtocolError,
)
from pigeon.framing import LengthPrefixed
from pigeon.protocol import (
    MAGIC,
    VERSION,
    Ack,
    Cancel,
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
from pigeon.streams import FramedStream, open_framed_connection

T = TypeVar("T")


class _AsyncConnection:
    def __init__(self, stream: FramedStream, heartbeat: float, queue: str) -> None:
        self.stream = stream
        self.queue = queue
        self.heartbeat = heartbeat
        self.codec = ClientCodec()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.abandoned: set[int] = set()  # requests whose caller was cancelled
        self.broken: BaseException | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, ep: Endpoint, client: str, timeout: float) -> _AsyncConnection:
        ssl_ctx = None
        if ep.tls:
            from pigeon.backends._tls import client_context

            ssl_ctx = client_context(ep)
        try:
            async with asyncio.timeout(timeout):
                stream = await open_framed_connection(
                    ep.host, ep.port, LengthPrefixed(max_frame_size=2**31), ssl=ssl_ctx
                )
                codec = ClientCodec()
                await stream.send(encode_message(Hello(MAGIC, VERSION, client, ep.token)))
                frame = await stream.recv()
        except TimeoutError as exc:
            raise BrokenResourceError(f"no answer from {ep.host}:{ep.port} in {timeout} s") from exc
        except OSError as exc:
            raise BrokenResourceError(f"cannot connect to {ep.host}:{ep.port}: {exc}") from exc
        if frame is None:
            await stream.aclose()
            raise BrokenResourceError("the broker closed the connection during the handshake")
        reply = codec.decode(frame)
        if isinstance(reply, Error):
            await stream.aclose()
            if reply.code == "auth":
                raise AuthError(reply.message)
            raise BrokenResourceError(f"the broker refused: {reply.message}")
        if not isinstance(reply, Welcome):
            await stream.aclose()
            raise RemoteProtocolError(f"expected WELCOME, got {type(reply).__name__}")
        return cls(stream, reply.heartbeat, ep.queue)

    async def _read(self) -> None:
        try:
            while True:
                async with asyncio.timeout(self.heartbeat * 3):
                    frame = await self.stream.recv()
                if frame is None:
                    raise BrokenResourceError("the broker closed the connection")
                msg = self.codec.decode(frame)
                if isinstance(msg, Ping):
                    self.stream.send_nowait(encode_message(Pong(msg.nonce)))
                elif isinstance(msg, Goodbye):
                    raise BrokenResourceError(f"the broker said goodbye: {msg.reason}")
                elif isinstance(msg, QueueShutdown | Pong):
                    continue
                else:
                    req = getattr(msg, "req", 0)
                    fut = self.pending.pop(req, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    elif req in self.abandoned:
                        self.abandoned.discard(req)
                        self._give_back(msg)
        except TimeoutError:
            self._fail(BrokenResourceError(f"no word from the broker for {self.heartbeat * 3} s"))
        except (PigeonError, OSError) as exc:
            self._fail(exc if isinstance(exc, PigeonError) else BrokenResourceError(str(exc)))
        except asyncio.CancelledError:
            self._fail(BrokenResourceError("connection closed"))
            raise

    def _give_back(self, msg: Any) -> None:
        """Items delivered to a caller that gave up waiting go back to the queue."""
        if isinstance(msg, Deliver) and msg.messages and msg.messages[0].id:
            ids = [d.id for d in msg.messages]
            with contextlib.suppress(PigeonError):
                self.stream.send_nowait(encode_message(Nack(0, self.queue, ids, True, 0.0)))

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()
        self.stream.abort()

    async def request(self, msg: Any) -> Any:
        if self.broken is not None:
            raise BrokenResourceError(f"connection is broken: {self.broken}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[msg.req] = fut
        try:
            self.stream.send_nowait(encode_message(msg))
        except PigeonError as exc:
            self.pending.pop(msg.req, None)
            raise BrokenResourceError(str(exc)) from exc
        try:
            return await fut
        except asyncio.CancelledError:
            if self.broken is None:
                if fut.done() and not fut.cancelled():
                    self._give_back(fut.result())  # it came, but nobody will use it
                else:
                    self.abandoned.add(msg.req)
                    with contextlib.suppress(PigeonError):
                        self.stream.send_nowait(encode_message(Cancel(msg.req)))
            raise
        finally:
            self.pending.pop(msg.req, None)

    async def aclose(self) -> None:
        if self.broken is None:
            with contextlib.suppress(PigeonError, OSError):
                self.stream.send_nowait(encode_message(Goodbye("client closing")))
                await self.stream.shutdown_write()
                async with asyncio.timeout(1.0):
                    await self.reader
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, PigeonError):
            await self.reader
        with contextlib.suppress(PigeonError, OSError):
            await self.stream.aclose()


class AsyncBrokerQueue(Generic[T]):
    """The asyncio client of one broker queue (used through ``pigeon.AsyncQueue``)."""

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
    ) -> None:
        check_maxsize(maxsize)
        self._ep = Endpoint(url)
        self._ser = get_serializer(serializer if serializer is not None else "msgpack")
        self._lease = self._ep.number("lease", lease)
        md = self._ep.number("max_deliveries", max_deliveries)
        self._max_deliveries = int(md) if md is not None else None
        self._declare_maxsize = maxsize or None
        self._maxsize = maxsize
        self._needs_declare = bool(
            self._declare_maxsize or self._lease is not None or self._max_deliveries is not None
        )
        self._reconnect_timeout = reconnect_timeout
        self._connect_timeout = connect_timeout
        self._conn: _AsyncConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._req = 0
        self._closed = False

    @property
    def url(self) -> str:
        return self._ep.url

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    async def _connection(self) -> _AsyncConnection:
        if self._closed:
            raise ClosedResourceError("this AsyncQueue was closed")
        if self._conn is not None and self._conn.broken is None:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.broken is not None:
                self._conn = await _AsyncConnection.open(
                    self._ep, f"pigeon-py-async/{os.getpid()}", self._connect_timeout
                )
        return self._conn

    async def _call(self, build: Callable[[float | None], Any], deadline: float | None) -> Any:
        if self._needs_declare:
            self._needs_declare = False
            reply = await self._call(
                lambda _: Declare(self._next_req(), self._ep.queue, self._declare_maxsize,
                                  self._lease, self._max_deliveries),
                None,
            )  # fmt: skip
            self._maxsize = int(reply.value.get("maxsize", 0))
        backoff = Backoff(deadline, self._reconnect_timeout)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                conn = await self._connection()
                reply = await conn.request(build(remaining))
            except BrokenResourceError:
                if (wait := backoff.next_delay()) is None:
                    raise
                await asyncio.sleep(wait)
                continue
            if isinstance(reply, Error):
                raise_for(reply)
            return reply

    async def put(self, item: T, timeout: float | None = None, *, block: bool = True) -> None:
        payload = self._ser.dumps(item)
        deadline = deadline_from(block, timeout)
        await self._call(
            lambda w: Put(self._next_req(), self._ep.queue, payload, w if block else 0.0), deadline
        )

    async def put_nowait(self, item: T) -> None:
        await self.put(item, block=False)

    async def put_many(self, items: Iterable[T], timeout: float | None = None) -> None:
        payloads = [self._ser.dumps(i) for i in items]
        if payloads:
            deadline = deadline_from(True, timeout)
            await self._call(
                lambda w: PutBatch(self._next_req(), self._ep.queue, payloads, w), deadline
            )

    async def _get(
        self, n: int, block: bool, timeout: float | None, manual: bool, lease: float | None
    ) -> list[Delivery]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        reply = await self._call(
            lambda w: Get(self._next_req(), self._ep.queue, n, w if block else 0.0, manual, lease),
            deadline,
        )
        assert isinstance(reply, Deliver)
        return reply.messages

    async def _take(self, n: int, block: bool, timeout: float | None) -> list[Delivery]:
        # Taken as unacked and acked at once without waiting for the reply: if this
        # coroutine is cancelled while the items are on their way, they go back.
        got = await self._get(n, block, timeout, True, None)
        conn = self._conn
        if conn is not None and conn.broken is None:
            with contextlib.suppress(PigeonError):
                conn.stream.send_nowait(encode_message(Ack(0, self._ep.queue, [d.id for d in got])))
        return got

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        d = (await self._take(1, block, timeout))[0]
        return self._ser.loads(d.payload)  # type: ignore[no-any-return]

    async def get_nowait(self) -> T:
        return await self.get(block=False)

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        return [
            self._ser.loads(d.payload)
            for d in await self._get(max_items, True, timeout, False, None)
        ]

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncBrokerMessage[T]:
        d = (await self._get(1, True, timeout, True, lease))[0]
        return AsyncBrokerMessage(self, d, self._ser.loads(d.payload))

    async def _info(self) -> dict[str, Any]:
        reply = await self._call(lambda _: Info(self._next_req(), self._ep.queue), None)
        value: dict[str, Any] = reply.value
        if self._maxsize != value.get("maxsize", 0):
            self._maxsize = int(value.get("maxsize", 0))
        return value

    async def qsize(self) -> int:
        return int((await self._info())["depth"])

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def full(self) -> bool:
        info = await self._info()
        return bool(info["maxsize"]) and info["depth"] + info["in_flight"] >= info["maxsize"]

    async def task_done(self) -> None:
        await self._call(lambda _: TaskDone(self._next_req(), self._ep.queue, 1), None)

    async def join(self, timeout: float | None = None) -> None:
        deadline = deadline_from(True, timeout)
        await self._call(lambda w: Join(self._next_req(), self._ep.queue, w), deadline)

    async def shutdown(self, immediate: bool = False) -> None:
        await self._call(lambda _: Shutdown(self._next_req(), self._ep.queue, immediate), None)

    async def settle(self, msg: Any, what: str) -> None:
        reply: Ok = await self._call(lambda _: msg, None)
        check_unknown(reply, what)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None


class AsyncBrokerMessage(Generic[T]):
    """A message held for this client; ``ack``/``nack``/``extend`` are awaitable."""

    def __init__(self, queue: AsyncBrokerQueue[T], delivery: Delivery, body: T) -> None:
        self._queue = queue
        self.id = delivery.id
        self.delivery_count = delivery.delivery_count
        self.body = body
        self._settled = False

    def _send(self, build: Callable[[int, str], Any], what: str) -> asyncio.Task[None]:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        self._settled = what != "extend"
        q = self._queue
        return asyncio.get_running_loop().create_task(
            q.settle(build(q._next_req(), q._ep.queue), what)
        )

    def ack(self) -> asyncio.Task[None]:
        return self._send(lambda req, queue: Ack(req, queue, [self.id]), "ack")

    def nack(self, requeue: bool = True, delay: float = 0) -> asyncio.Task[None]:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        return self._send(lambda r, q: Nack(r, q, [self.id], requeue, float(delay)), "nack")

    def extend(self, seconds: float) -> asyncio.Task[None]:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        return self._send(lambda r, q: Extend(r, q, [self.id], float(seconds)), "extend")
