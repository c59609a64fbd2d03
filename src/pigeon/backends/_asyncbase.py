"""What the asyncio implementations of the engine backends (Redis, NATS) share: the
methods defined by the ones each engine provides (``_put``, ``get``, ``qsize``), and
``within``, which cuts an attempt at its call's deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from pigeon.backends._retry import REPLY_GRACE
from pigeon.errors import BrokenResourceError, DecodeError, TooLarge, Unsupported
from pigeon.options import check_dedup_ids, put_options
from pigeon.protocol.messages import PutOptions

T = TypeVar("T")
log = logging.getLogger("pigeon.options")


class within:  # lower case, as contextlib.suppress: ``async with within(until, engine):``
    """Run the block until ``until`` at most (a call's ``reply_deadline``; None: no
    bound); past it, ``BrokenResourceError``: the server did not answer in time."""

    __slots__ = ("_cut", "engine", "until")

    def __init__(self, until: float | None, engine: str) -> None:
        self.until = until
        self.engine = engine
        self._cut: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        if self.until is not None:
            self._cut = asyncio.timeout(self.until - time.monotonic())
            await self._cut.__aenter__()

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> bool | None:
        if self._cut is None:
            return None
        try:
            await self._cut.__aexit__(kind, exc, tb)
        except TimeoutError:
            if not self._cut.expired():
                raise
            raise BrokenResourceError(
                f"{self.engine}: no answer by the call's deadline (its timeout plus "
                f"{REPLY_GRACE:g} s): the server may be stalled or out of reach"
            ) from None
        return None


class EngineQueue(Generic[T]):
    """Base of ``AsyncRedisQueue`` and ``AsyncNatsQueue``."""

    name: str
    engine: str
    maxsize: int
    _ser: Any
    _closed: bool
    _settling: set[asyncio.Future[None]]

    @property
    def closed(self) -> bool:
        return self._closed

    def _track(self, fut: asyncio.Future[None]) -> asyncio.Future[None]:
        """Remember a settle in flight: ``aclose`` lets it finish before it closes."""
        self._settling.add(fut)
        fut.add_done_callback(self._settling.discard)
        return fut

    def _decode_all(
        self, payloads: list[bytes]
    ) -> tuple[list[tuple[bytes, Any]], list[tuple[bytes, BaseException]]]:
        """(payload, body) of those that decode, (payload, error) of those that do not."""
        good: list[tuple[bytes, Any]] = []
        bad: list[tuple[bytes, BaseException]] = []
        for p in payloads:
            try:
                good.append((p, self._ser.loads(p)))
            except Exception as exc:
                bad.append((p, exc))
        return good, bad

    def _decode_error(
        self, bad: list[tuple[bytes, BaseException]], total: int, gave_back: bool
    ) -> DecodeError:
        raw, cause = bad[0]
        name = str(getattr(self._ser, "name", type(self._ser).__name__))
        err = DecodeError(
            f"queue {self.name!r}: {len(bad)} of {total} message(s) cannot be decoded with "
            f"serializer={name!r} ({cause}); moved to {self.name + '.dead'!r} (reason "
            f"'undecodable'){'; the others were given back' if gave_back else ''}",
            raw=raw,
            queue=self.name,
            serializer=name,
        )
        err.__cause__ = cause
        return err

    async def _cancel_safe(self, fetch: Any, give_back: Any) -> Any:
        """Await ``fetch``; if the caller is cancelled meanwhile, the fetch still finishes
        (it may already have taken messages at the server) and what it took goes back
        through ``give_back(result)``, tracked like a settle so ``aclose`` waits for it."""
        task = asyncio.ensure_future(fetch)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def done(t: asyncio.Future[Any]) -> None:
                if not t.cancelled() and t.exception() is None and t.result():
                    self._track(asyncio.ensure_future(give_back(t.result())))

            task.add_done_callback(done)
            raise

    async def extend_held(self, message: Any, seconds: float) -> None:
        """Extend a message taken through another client of the same queue."""
        await message.extend(seconds)

    async def _put(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
    ) -> None:
        raise NotImplementedError

    # what of PutOptions this engine honours ("delay", "ttl", "dedup", "priority", "headers")
    supports: ClassVar[frozenset[str]] = frozenset()
    _why_not: ClassVar[dict[str, str]] = {}  # option -> why the engine cannot honour it

    def _check_options(self, options: PutOptions | None, dedup_ids: Any = None) -> None:
        """Raise ``Unsupported`` for an option given that this engine cannot honour."""
        if options is None and dedup_ids is None:
            return
        given = []
        if options is not None:
            given = [
                name
                for name, on in (
                    ("delay", options.delay),
                    ("ttl", options.ttl),
                    ("dedup", options.dedup_id),
                    ("priority", options.priority),
                    ("headers", options.headers),
                )
                if on
            ]
        if dedup_ids is not None:
            given.append("dedup")
        for name in given:
            if name not in self.supports:
                label = "dedup_id" if name == "dedup" else name
                raise Unsupported(
                    f"{self.engine}:// cannot honour {label}= ({self._why_not.get(name, '')}); "
                    "use a pigeon:// queue for it"
                )

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        raise NotImplementedError

    async def qsize(self) -> int:
        raise NotImplementedError

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
        self._check_options(opts)
        await self._put_traced([self._ser.dumps(item)], block, timeout, opts, None, headers)

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
        payloads = [self._ser.dumps(i) for i in items]
        ids = check_dedup_ids(dedup_ids, len(payloads))
        self._check_options(opts, ids)
        if payloads:
            if self.maxsize and len(payloads) > self.maxsize:
                raise ValueError(
                    f"put_many of {len(payloads)} items can never fit in maxsize={self.maxsize}"
                )
            await self._put_traced(payloads, block, timeout, opts, ids, headers)

    async def _put_traced(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None,
        dedup_ids: list[str] | None,
        given: dict[str, str] | None,
    ) -> None:
        """``_put``; if the trace context ``put_options`` added to the caller's headers
        (``given``) makes the message too large for the engine (``TooLarge``, raised
        before anything is sent: a NATS server's max_payload counts headers), the put
        goes again untraced - tracing never makes a valid put fail."""
        try:
            await self._put(payloads, block, timeout, options, dedup_ids)
        except TooLarge:
            added = [k for k in (options.headers if options else {}) if k not in (given or {})]
            if options is None or not added:
                raise
            log.debug("no room for the trace context (%s) in this put: it goes untraced", added)
            kept = {k: v for k, v in options.headers.items() if k not in added}
            untraced = msgspec.structs.replace(options, headers=kept)
            await self._put(payloads, block, timeout, untraced, dedup_ids)

    async def get_nowait(self) -> T:
        return await self.get(block=False)

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def task_done(self) -> None:
        raise Unsupported(
            f"task_done() is not available on {self.engine}://: it has no server-side wait "
            "on a counter; settle work with get_message() and ack() instead"
        )

    async def join(self, timeout: float | None = None) -> None:
        raise Unsupported(
            f"join() is not available on {self.engine}://: it has no server-side wait on a "
            "counter; use get_message()/ack() and your own completion signal"
        )
