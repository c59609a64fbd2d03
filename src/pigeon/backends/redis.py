"""The redis:// backend: one Redis Stream per queue, one consumer group.

Features
    ``put``/``put_many`` (XADD inside a Lua script that checks ``maxsize`` and the
    shut-down flag atomically, never trimming unconsumed entries), ``get``/``get_many``,
    ``get_message`` with ``ack`` (XACK and XDEL), ``nack(requeue, delay)``, ``extend``,
    ``delivery_count`` from the pending entries list, dead letters after
    ``max_deliveries``, ``qsize``/``empty``/``full``, ``shutdown`` (for every client),
    iteration. ``task_done``/``join`` raise ``Unsupported``: Redis has no server-side wait
    on a counter. ``pigeon.AsyncQueue(url)`` runs the same code on asyncio.

Connection URL
    ``redis://[[USER]:PASSWORD@]HOST[:PORT]/QUEUE[?db=N&lease=S&max_deliveries=N]``;
    ``rediss://`` for TLS. Keys: ``pigeon:QUEUE`` (the stream), ``pigeon:QUEUE:meta``.

Options
    ``maxsize``, ``serializer`` (``"msgpack"``), ``lease`` (seconds, 30),
    ``max_deliveries`` (20), ``reconnect_timeout`` (30 s).

Delivery guarantees
    At-least-once for ``get_message``: Redis does not redeliver by itself, so each reader
    first claims (XAUTOCLAIM) entries whose consumer has held them longer than the lease,
    then reads new ones; a consumer that dies is covered by its lease. Plain ``get`` acks
    on receipt. Durability is Redis's own: with ``appendonly yes`` and ``appendfsync
    always`` a confirmed put survives a crash of Redis; with ``everysec`` up to a second
    can be lost; without AOF only what the last snapshot held survives. FIFO per queue
    except redeliveries. Waiting is done in slices of at most 0.2 s (``XREADGROUP
    BLOCK``), so ``shutdown`` reaches blocked readers within that; a ``put`` on a full
    queue retries with backoff up to 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Generic, TypeVar

from pigeon._queue_base import deadline_from
from pigeon.backends._asyncbase import EngineQueue
from pigeon.backends._retry import Backoff
from pigeon.backends._syncface import SyncFace
from pigeon.backends._url import QueueURL, check_maxsize
from pigeon.errors import (
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Full,
    LocalProtocolError,
    PigeonError,
    ShutDown,
    Unsupported,
)
from pigeon.serializers import SerializerLike, get_serializer

T = TypeVar("T")

GROUP = "pigeon"
SLICE = 0.2  # seconds: the longest single XREADGROUP BLOCK
DEFAULT_LEASE = 30.0
DEFAULT_MAX_DELIVERIES = 20

_PUT = """
if redis.call('HGET', KEYS[2], 'shutdown') == '1' then return 'SHUTDOWN' end
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize') or '0')
if maxsize > 0 and redis.call('XLEN', KEYS[1]) + #ARGV > maxsize then return 'FULL' end
for i = 1, #ARGV do redis.call('XADD', KEYS[1], '*', 'd', ARGV[i]) end
return 'OK'
"""


# Plain get: read new entries and forget them in one round trip (XREADGROUP without
# BLOCK may run in a script).
_TAKE = """
local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[1], '>')
local out, ids = {}, {}
if not res then return out end
for _, entry in ipairs(res[1][2]) do
    local id, fields = entry[1], entry[2]
    ids[#ids + 1] = id
    if fields then
        for i = 1, #fields, 2 do
            if fields[i] == 'd' then
                out[#out + 1] = id
                out[#out + 1] = fields[i + 1]
            end
        end
    end
end
if #ids > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
    redis.call('XDEL', KEYS[1], unpack(ids))
end
return out
"""


def _client_error(exc: BaseException) -> PigeonError:
    err = BrokenResourceError(f"redis: {exc}")
    err.__cause__ = exc
    return err


class AsyncRedisQueue(EngineQueue[T]):
    """The asyncio implementation; ``RedisQueue`` is its blocking face."""

    def __init__(
        self,
        url: str,
        maxsize: int = 0,
        serializer: SerializerLike | None = None,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        reconnect_timeout: float = 30.0,
    ) -> None:
        check_maxsize(maxsize)
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            raise Unsupported("redis:// needs redis-py: pip install 'pigeon-queue[redis]'") from exc
        ep = QueueURL(url, ("redis", "rediss"), 6379)
        self.url = url
        self.engine = "redis"
        self.name = ep.queue
        self.host, self.port = ep.host, ep.port
        self.db = int(ep.number("db", None, 0) or 0)
        self.lease = float(ep.number("lease", lease, DEFAULT_LEASE) or 0.0)
        self.max_deliveries = int(
            ep.number("max_deliveries", max_deliveries, DEFAULT_MAX_DELIVERIES) or 0
        )
        self._password = ep.password
        self._username = ep.username
        self._tls = ep.scheme == "rediss"
        self.serializer = serializer if serializer is not None else "msgpack"
        self._ser = get_serializer(self.serializer)
        self.maxsize = maxsize
        self.reconnect_timeout = reconnect_timeout
        self.stream = f"pigeon:{self.name}"
        self.meta = f"pigeon:{self.name}:meta"
        self.dead = f"pigeon:{self.name}.dead"
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._r: Any = None
        self._put_script: Any = None
        self._take_script: Any = None
        self._last_claim = 0.0
        self._ready = False
        self._closed = False
        self._settling: set[asyncio.Future[None]] = set()  # acks not yet confirmed

    # --- plumbing -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (the blocking face does, to report a bad URL or server at once)."""
        await self._do(lambda r: r.ping())

    async def _redis(self) -> Any:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        if self._r is None:
            import redis.asyncio as aredis

            self._r = aredis.Redis(
                host=self.host, port=self.port, db=self.db, password=self._password,
                username=self._username, ssl=self._tls, decode_responses=False,
            )  # fmt: skip
            self._put_script = self._r.register_script(_PUT)
            self._take_script = self._r.register_script(_TAKE)
        if not self._ready:
            await self._setup(self._r)
        return self._r

    async def _setup(self, r: Any) -> None:
        import redis.exceptions as rex

        try:
            await r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self.maxsize:
            await r.hset(self.meta, "maxsize", self.maxsize)
        else:
            stored = await r.hget(self.meta, "maxsize")
            self.maxsize = int(stored or 0)
        self._ready = True

    async def _do(self, fn: Any, deadline: float | None = None) -> Any:
        """Run ``fn(redis)``; translate redis-py errors; retry lost connections until the
        deadline (or ``reconnect_timeout``)."""
        import redis.exceptions as rex

        backoff = Backoff(deadline, self.reconnect_timeout)
        while True:
            try:
                return await fn(await self._redis())
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                if (wait := backoff.next_delay()) is None:
                    raise _client_error(exc) from exc
                self._ready = False
                await asyncio.sleep(wait)
            except rex.RedisError as exc:
                raise PigeonError(f"redis refused the command: {exc}") from exc

    # --- the contract ---------------------------------------------------------------------

    async def _put(self, payloads: list[bytes], block: bool, timeout: float | None) -> None:
        deadline = deadline_from(block, timeout)
        delay = 0.001
        while True:
            result = await self._do(
                lambda r: self._put_script(keys=[self.stream, self.meta], args=payloads, client=r)
            )
            if result == b"OK":
                return
            if result == b"SHUTDOWN":
                raise ShutDown("the queue was shut down; put refused")
            if deadline is not None and time.monotonic() >= deadline:
                raise Full(f"queue {self.name!r} is full (maxsize={self.maxsize})")
            await asyncio.sleep(min(delay, max(0.0, (deadline or 1e18) - time.monotonic())))
            delay = min(delay * 2, 0.05)

    def _claim_due(self) -> bool:
        return time.monotonic() - self._last_claim > 1.0

    async def _read_now(self, r: Any, n: int, take: bool) -> list[tuple[bytes, int, bytes]]:
        """New entries without waiting; with ``take`` they are acked and deleted at once."""
        if not take:
            return await self._read_new(r, n, 0)
        flat = await self._take_script(keys=[self.stream], args=[GROUP, self.consumer, n], client=r)
        return [(flat[i], 1, flat[i + 1]) for i in range(0, len(flat), 2)]

    async def _fetch(
        self,
        n: int,
        block: bool,
        timeout: float | None,
        lease: float | None = None,
        take: bool = False,
    ) -> list[tuple[bytes, int, bytes]]:
        """Up to ``n`` entries as (id, delivery_count, payload): held by this consumer, or,
        with ``take``, already acked and deleted (plain ``get``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        while True:
            # New entries first, in one round trip (and, with ``take``, acked in the same
            # script); expired ones are claimed when there is nothing new, or once a
            # second, so a busy queue still gives back what a dead consumer held.
            got = [] if self._claim_due() else await self._do(lambda r: self._read_now(r, n, take))
            if not got:
                got = await self._do(lambda r: self._claim(r, n))
                self._last_claim = time.monotonic()
                if got and take:
                    await self._settle([g[0] for g in got])
            if not got:
                remaining = SLICE if deadline is None else deadline - time.monotonic()
                wait_ms = int(max(0.0, min(SLICE, remaining)) * 1000)
                got = await self._do(lambda r, w=wait_ms: self._read_new(r, n, w))
                if got and take:
                    await self._settle([g[0] for g in got])
            if got:
                if lease is not None and lease != self.lease:
                    await self._set_idle([g[0] for g in got], self.lease - lease)
                result: list[tuple[bytes, int, bytes]] = got
                return result
            if await self._do(lambda r: self._drained_and_shut(r)):
                raise ShutDown("the queue was shut down and is drained")
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty(f"queue {self.name!r} is empty")

    async def _set_idle(self, ids: list[bytes], idle: float) -> None:
        """Make entries claimable by others after ``lease - idle`` seconds from now."""
        ms = int(max(0.0, idle) * 1000)
        await self._do(
            lambda r: r.xclaim(self.stream, GROUP, self.consumer, 0, ids, idle=ms, justid=True)
        )

    async def _claim(self, r: Any, n: int) -> list[tuple[bytes, int, bytes]]:
        """Take over entries whose holder kept them past the lease (Redis will not)."""
        res = await r.xautoclaim(
            self.stream, GROUP, self.consumer, int(self.lease * 1000), "0-0", count=n
        )
        entries = [(eid, fields) for eid, fields in res[1] if fields]
        if not entries:
            return []
        pipe = r.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
        counts = await pipe.execute()
        out = []
        for (eid, fields), pending in zip(entries, counts, strict=True):
            deliveries = pending[0]["times_delivered"] if pending else 1
            if deliveries > self.max_deliveries:
                await self._dead_letter(r, eid, fields[b"d"])
                continue
            out.append((eid, deliveries, fields[b"d"]))
        return out

    async def _read_new(self, r: Any, n: int, wait_ms: int) -> list[tuple[bytes, int, bytes]]:
        res = await r.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=n, block=wait_ms if wait_ms else None
        )
        if not res:
            return []
        return [(eid, 1, fields[b"d"]) for eid, fields in res[0][1] if fields]

    async def _dead_letter(self, r: Any, eid: bytes, payload: bytes) -> None:
        pipe = r.pipeline(transaction=True)
        pipe.xadd(self.dead, {"d": payload})
        pipe.xack(self.stream, GROUP, eid)
        pipe.xdel(self.stream, eid)
        await pipe.execute()

    async def _drained_and_shut(self, r: Any) -> bool:
        if await r.hget(self.meta, "shutdown") != b"1":
            return False
        return int(await r.xlen(self.stream)) == 0

    async def _settle(self, ids: list[bytes]) -> int:
        async def run(r: Any) -> int:
            pipe = r.pipeline(transaction=True)
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            acked, _ = await pipe.execute()
            return int(acked)

        return int(await self._do(run))

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        got = await self._fetch(1, block, timeout, take=True)
        return self._ser.loads(got[0][2])  # type: ignore[no-any-return]

    async def get_many(
        self, max_items: int, timeout: float | None = None, *, block: bool = True
    ) -> list[T]:
        got = await self._fetch(max_items, block, timeout, take=True)
        return [self._ser.loads(g[2]) for g in got]

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncRedisMessage[T]:
        eid, count, payload = (await self._fetch(1, True, timeout, lease))[0]
        return AsyncRedisMessage(self, eid, count, payload, self._ser.loads(payload))

    async def qsize(self) -> int:
        async def run(r: Any) -> int:
            pipe = r.pipeline(transaction=False)
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, GROUP)
            length, pending = await pipe.execute()
            return max(0, int(length) - int(pending["pending"]))

        return int(await self._do(run))

    async def full(self) -> bool:
        if not self.maxsize:
            return False
        return int(await self._do(lambda r: r.xlen(self.stream))) >= self.maxsize

    async def shutdown(self, immediate: bool = False) -> None:
        async def run(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self.meta, "shutdown", 1)
            if immediate:
                pipe.xtrim(self.stream, maxlen=0, approximate=False)
            await pipe.execute()

        await self._do(run)

    async def aclose(self) -> None:
        if self._settling:  # acks and nacks sent without waiting: let them land first
            await asyncio.gather(*self._settling, return_exceptions=True)
        if not self._closed:
            self._closed = True
            if self._r is not None:
                await self._r.aclose()


class AsyncRedisMessage(Generic[T]):
    """A Redis stream entry held by this consumer until acked, nacked or its lease ends."""

    def __init__(
        self, queue: AsyncRedisQueue[T], eid: bytes, count: int, payload: bytes, body: T
    ) -> None:
        self._queue = queue
        self._payload = payload  # dead-lettered as received, not encoded again
        self.id = eid
        self.delivery_count = count
        self.body = body
        self._settled = False

    def _check(self) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")

    async def _ack(self) -> None:
        if await self._queue._settle([self.id]) == 0:
            raise LocalProtocolError(
                f"cannot ack {self.id.decode()}: its lease ran out and another consumer claimed it"
            )

    async def _nack(self, requeue: bool, delay: float) -> None:
        q = self._queue
        if not requeue:
            await q._do(lambda r: q._dead_letter(r, self.id, self._payload))
            return
        await q._set_idle([self.id], q.lease - delay)  # claimable once `delay` has passed

    async def _extend(self, seconds: float) -> None:
        q = self._queue
        await q._set_idle([self.id], q.lease - seconds)

    def ack(self) -> Awaitable[None]:
        self._check()
        self._settled = True
        return self._queue._track(asyncio.ensure_future(self._ack()))

    def nack(self, requeue: bool = True, delay: float = 0) -> Awaitable[None]:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._check()
        self._settled = True
        return self._queue._track(asyncio.ensure_future(self._nack(requeue, delay)))

    def extend(self, seconds: float) -> Awaitable[None]:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        self._check()
        return self._queue._track(asyncio.ensure_future(self._extend(seconds)))


class RedisQueue(SyncFace[T]):
    """The blocking face of ``AsyncRedisQueue`` (see the module docstring)."""

    impl_class = AsyncRedisQueue
