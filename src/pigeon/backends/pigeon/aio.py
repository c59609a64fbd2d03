"""The asyncio face of the pigeon:// backend: one connection per handle, requests pipelined.

# Strategy:
# A plain ``asyncio.Protocol`` feeds received bytes to the sans-IO ``ClientConnection``
# and resolves each request's future from the ``Reply`` events; no reader task. Every
# request's bytes are written when it is made (``request`` is synchronous), so an ack or
# nack that nobody awaits is on the wire before ``aclose`` says GOODBYE, and the broker
# answers everything sent before GOODBYE before it closes. A coroutine cancelled while its
# reply is on the way withdraws the request (CANCEL); if the reply comes anyway, its
# messages are handed back (NACK), whether it arrived before or after the cancellation.
# The operations themselves are the generators of ``ops``, driven by ``_drive``.
#
# A call's deadline (``Call.until``) bounds its wait for the connection and for its reply,
# never the connection itself: the handshake runs in a task of its own that every waiting
# call shares (one call's short timeout does not abort another's connection), and a call
# that stops waiting for its reply withdraws the request as a cancelled one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

from pigeon._net import tune_tcp
from pigeon._pid import current_pid
from pigeon.backends._retry import REPLY_GRACE
from pigeon.backends.pigeon.ops import (
    Call,
    Lost,
    Op,
    Ops,
    Post,
    Sleep,
    Spec,
    advance,
    settle_message,
)
from pigeon.errors import BrokenResourceError, ClosedResourceError, LocalProtocolError
from pigeon.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
    QueueOptions,
    check_dedup_ids,
    put_options,
)
from pigeon.protocol.client import ClientConnection, Closed, Reply, Welcomed
from pigeon.protocol.messages import Delivery
from pigeon.serializers import SerializerLike

T = TypeVar("T")


class _LinkProtocol(asyncio.Protocol):
    """One connection: bytes to the conversation, replies to the futures waiting."""

    def __init__(self, conv: ClientConnection, queue: str) -> None:
        self.conv = conv
        self.queue = queue
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.error: BaseException | None = None
        self.established = False
        self.opened = 0.0  # monotonic: when the WELCOME came
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.last_rx = time.monotonic()
        self._watchdog: asyncio.TimerHandle | None = None
        # the calls' deadlines: req -> (until, future); one timer for the nearest
        self.deadlines: dict[int, tuple[float, asyncio.Future[Any]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_tcp(sock)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        self._dispatch(self.conv.receive_data(data))

    def eof_received(self) -> bool:
        self._dispatch(self.conv.receive_data(b""))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            text = f"connection to {self.conv.peer} lost" + (f": {exc}" if exc else "")
            err = BrokenResourceError(text)
            err.__cause__ = exc
            self._fail(err)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    # the conversation

    def _dispatch(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Reply):
                fut = self.futures.pop(ev.req, None)
                if fut is None or fut.cancelled():
                    self.conv.give_back(ev)
                elif not fut.done():
                    fut.set_result(ev.message)
            elif isinstance(ev, Closed):
                self._fail(ev.error or BrokenResourceError(f"{self.conv.peer} closed"))
                if self.transport is not None:
                    self.transport.close()
            elif isinstance(ev, Welcomed) and not self.established:
                self.established = True
                self.opened = time.monotonic()
                self._watch()
        self.flush()

    def _watch(self) -> None:
        """Every heartbeat: has the broker been silent for too long?"""
        silent = time.monotonic() - self.last_rx
        limit = self.conv.silence_limit
        if silent > limit and self.error is None:
            self._fail(BrokenResourceError(f"no word from {self.conv.peer} for {silent:.0f} s"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._watchdog = self.loop.call_later(self.conv.heartbeat, self._watch)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(self.error)
        self.futures.clear()

    def flush(self) -> None:
        data = self.conv.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # what the queue does with it

    def request(self, msg: Any) -> tuple[int, asyncio.Future[Any]]:
        if self.error is not None:
            raise self.error
        req = self.conv.request(msg)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.futures[req] = fut
        self.flush()
        return req, fut

    def post(self, msg: Any) -> None:
        if self.error is None:
            self.conv.post(msg)
            self.flush()

    def expire(self, req: int, fut: asyncio.Future[Any], until: float) -> None:
        """At ``until`` (monotonic), if the reply to ``req`` has not come: withdraw the
        request and fail its caller as on a lost connection (the call's deadline).

        One timer for the nearest deadline, not one per call (a timer made and cancelled
        per call cost a tenth of a call): deadlines mostly come in order, so a new one
        rarely moves it."""
        self.deadlines[req] = (until, fut)
        if until < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweep_at = until
            self._sweeper = self.loop.call_later(until - time.monotonic(), self._sweep)

    def _sweep(self) -> None:
        self._sweeper, self._sweep_at = None, math.inf
        now = time.monotonic()
        nearest = math.inf
        for req, (until, fut) in list(self.deadlines.items()):
            if fut.done():
                del self.deadlines[req]
            elif until <= now:
                del self.deadlines[req]
                self._expired(req, fut)
            else:
                nearest = min(nearest, until)
        if nearest < math.inf:
            self._sweep_at = nearest
            self._sweeper = self.loop.call_later(nearest - now, self._sweep)

    def _expired(self, req: int, fut: asyncio.Future[Any]) -> None:
        self.abandon(req, fut)
        fut.set_exception(
            BrokenResourceError(
                f"no reply from {self.conv.peer} by the call's deadline (its timeout plus "
                f"{REPLY_GRACE:g} s): the broker may be stalled or cut off"
            )
        )

    def abandon(self, req: int, fut: asyncio.Future[Any]) -> None:
        """The caller of ``req`` was cancelled: withdraw it, or give back what came."""
        self.futures.pop(req, None)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.conv.give_back(Reply(req, fut.result(), self.queue))
        else:
            self.conv.cancel(req)
        self.flush()

    async def aclose(self, timeout: float = 5.0) -> None:
        """GOODBYE, half-close, and wait for the broker to answer everything and close."""
        t = self.transport
        if t is None:
            return
        if self.error is None and not t.is_closing():
            self.conv.close()
            self.flush()
            with contextlib.suppress(OSError):
                if t.can_write_eof():
                    t.write_eof()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    # shielded: a timeout must not cancel ``closed`` itself, which
                    # connection_lost resolves after the abort below
                    await asyncio.shield(self.closed)
        t.abort() if not self.closed.done() else t.close()
        await self.closed


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
        dedup_window: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._spec = Spec(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        self._ops = Ops(self._spec)
        self._link: _LinkProtocol | None = None
        self._opening: asyncio.Future[_LinkProtocol] | None = None
        self._closed = False
        self._pid = current_pid()

    @property
    def url(self) -> str:
        return self._spec.ep.url

    @property
    def options(self) -> QueueOptions:
        """The options this handle was opened with (URL parameters included)."""
        return self._spec.options

    @property
    def maxsize(self) -> int:
        """As the broker last told it (0 until the first call connected)."""
        return self._ops.maxsize

    # --- the driver -------------------------------------------------------------------------

    async def _connection(self, until: float | None = None) -> _LinkProtocol:
        """This handle's connection, made (or made again) if need be; waits until
        ``until`` at most for it."""
        if self._closed:
            raise ClosedResourceError("this AsyncQueue was closed")
        link = self._link
        if link is not None and link.error is None and self._pid == current_pid():
            return link
        opening = self._opening
        if opening is None or opening.done() or self._pid != current_pid():
            self._pid = current_pid()
            self._link = None
            opening = self._opening = asyncio.ensure_future(self._open())
            opening.add_done_callback(self._opened)
        try:
            if until is None:
                return await asyncio.shield(opening)
            async with asyncio.timeout(until - time.monotonic()):
                return await asyncio.shield(opening)
        except TimeoutError:
            raise BrokenResourceError(
                f"no WELCOME from {self._spec.ep.peer} before the call's timeout ran out"
            ) from None
        except asyncio.CancelledError:
            if opening.cancelled() and self._closed:  # aclose() abandoned the handshake
                raise ClosedResourceError("this AsyncQueue was closed") from None
            raise

    def _opened(self, opening: asyncio.Future[_LinkProtocol]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._link = opening.result()

    async def _open(self) -> _LinkProtocol:
        spec = self._spec
        ep = spec.ep
        ssl_ctx = None
        if ep.tls:
            from pigeon.backends._tls import client_context

            ssl_ctx = client_context(ep)
        conv = ClientConnection(f"pigeon-py-async/{os.getpid()}", ep.token, peer=ep.peer)
        declare = conv.request(spec.declare())  # leaves with HELLO, in one write
        loop = asyncio.get_running_loop()
        welcomed: asyncio.Future[Any] = loop.create_future()

        def protocol() -> _LinkProtocol:
            # The DECLARE's reply is awaited from before the first byte can arrive: uvloop
            # may deliver it before create_connection returns to this coroutine, and a
            # reply nobody awaits yet would be dropped (then connect_timeout runs out).
            proto = _LinkProtocol(conv, spec.queue)
            proto.futures[declare] = welcomed
            return proto

        link: _LinkProtocol | None = None
        limit = spec.options.connect_timeout
        try:
            try:
                async with asyncio.timeout(limit):
                    _, link = await loop.create_connection(protocol, ep.host, ep.port,
                                                           ssl=ssl_ctx)  # fmt: skip
                    self._ops.declared(await welcomed)
            finally:
                if not welcomed.done():
                    welcomed.cancel()
                elif not welcomed.cancelled():
                    welcomed.exception()  # retrieved: a failure is raised below
        except TimeoutError as exc:
            if link is not None and link.transport is not None:
                link.transport.abort()
            raise BrokenResourceError(
                f"no WELCOME from {ep.peer} within connect_timeout={limit:g} s: "
                "is a pigeon broker listening there?"
            ) from exc
        except OSError as exc:
            raise BrokenResourceError(f"cannot connect to {ep.host}:{ep.port}: {exc}") from exc
        except BaseException:
            if link is not None and link.transport is not None:
                link.transport.abort()
            raise
        return link

    async def _drive(self, op: Op[Any]) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            effect, result = advance(op, value, error)
            if effect is None:
                return result
            value = error = None
            if isinstance(effect, Call):
                link: _LinkProtocol | None = None
                sent = False  # written: the broker may act on it even if no reply comes
                try:
                    link = await self._connection(effect.until)
                    req, fut = link.request(effect.msg)
                    sent = True
                    if effect.until is not None:
                        link.expire(req, fut, effect.until)
                    try:
                        value = await fut
                    except asyncio.CancelledError:
                        link.abandon(req, fut)
                        op.close()
                        raise
                    finally:
                        if effect.until is not None:
                            link.deadlines.pop(req, None)
                except BrokenResourceError as exc:
                    lived = time.monotonic() - link.opened if link is not None else 0.0
                    error = Lost(exc, link is not None, lived, sent)
            elif isinstance(effect, Post):
                if self._link is not None:  # no connection: the broker gave them back
                    self._link.post(effect.msg)
            elif isinstance(effect, Sleep):
                await asyncio.sleep(effect.seconds)

    # --- the contract -----------------------------------------------------------------------

    async def put(
        self,
        item: T,
        timeout: float | None = None,
        *,
        block: bool = True,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        opts = put_options(delay, ttl, dedup_id, priority, headers)
        await self._drive(self._ops.put([self._spec.ser.dumps(item)], block, timeout, opts))

    async def put_nowait(self, item: T) -> None:
        await self.put(item, block=False)

    async def put_many(
        self,
        items: Iterable[T],
        timeout: float | None = None,
        *,
        block: bool = True,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str] | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        opts = put_options(delay, ttl, None, priority, headers)
        dumps = self._spec.ser.dumps
        payloads = [dumps(i) for i in items]
        ids = check_dedup_ids(dedup_ids, len(payloads))
        await self._drive(self._ops.put(payloads, block, timeout, opts, ids, many=ids is not None))

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        return (await self._drive(self._ops.take(1, block, timeout)))[0][1]  # type: ignore[no-any-return]

    async def get_nowait(self) -> T:
        return await self.get(block=False)

    async def get_many(
        self, max_items: int, timeout: float | None = None, *, block: bool = True
    ) -> list[T]:
        return [body for _, body in await self._drive(self._ops.take(max_items, block, timeout))]

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncBrokerMessage[T]:
        got = await self._drive(self._ops.take(1, True, timeout, lease=lease, settle=False))
        d, body = got[0]
        return AsyncBrokerMessage(self, d, body)

    async def qsize(self) -> int:
        return int(await self._drive(self._ops.qsize()))

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def full(self) -> bool:
        return bool(await self._drive(self._ops.full()))

    async def task_done(self) -> None:
        await self._drive(self._ops.task_done())

    async def join(self, timeout: float | None = None) -> None:
        await self._drive(self._ops.join(timeout))

    async def shutdown(self, immediate: bool = False) -> None:
        await self._drive(self._ops.shutdown(immediate))

    def settle_now(self, msg: Any, what: str) -> asyncio.Future[None]:
        """Write the settle at once (so ``aclose`` cannot overtake it); the future tells
        how it went."""
        link = self._link
        if link is not None and link.error is None and not self._closed:
            _, fut = link.request(msg)

            async def finish() -> None:
                try:
                    reply = await fut
                except BrokenResourceError:  # that connection is gone: try on a new one
                    await self._drive(self._ops.settle(msg, what, resent=True))
                else:
                    self._ops.settled(reply, what, msg)

            return asyncio.ensure_future(finish())
        return asyncio.ensure_future(self._drive(self._ops.settle(msg, what)))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        opening, self._opening = self._opening, None
        link = self._link
        if opening is not None:
            if not opening.done():
                opening.cancel()  # a handshake under way: abandoned, its transport aborted
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await opening
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                link = opening.result()  # made, and ``_opened`` may not have run yet
        if link is not None and self._pid == os.getpid():
            await link.aclose()
        self._link = None


class AsyncBrokerMessage(Generic[T]):
    """A message held for this client; ``ack``/``nack``/``extend`` are awaitable, and
    sent at once even if nobody awaits them."""

    def __init__(self, queue: AsyncBrokerQueue[T], delivery: Delivery, body: T) -> None:
        self._queue = queue
        self.id = delivery.id
        self.delivery_count = delivery.delivery_count
        self.headers: dict[str, str] = delivery.headers or {}
        self.body = body
        self._settled = False
        self._identity = delivery.message_id or None  # 0: an older broker does not tell

    def _settle(self, what: str, *args: Any) -> asyncio.Future[None]:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        q = self._queue
        msg = settle_message(q._spec.queue, what, self.id, *args)
        self._settled = what != "extend"
        return q.settle_now(msg, what)

    def ack(self) -> asyncio.Future[None]:
        return self._settle("ack")

    def nack(
        self, requeue: bool = True, delay: float = 0, *, reason: str = ""
    ) -> asyncio.Future[None]:
        return self._settle("nack", requeue, delay, reason)

    def extend(self, seconds: float) -> asyncio.Future[None]:
        return self._settle("extend", seconds)
