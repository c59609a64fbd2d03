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
    ``rediss://`` for TLS. Keys: ``pigeon:QUEUE`` (the stream), ``pigeon:QUEUE:meta``
    (maxsize, lease, shutdown), ``pigeon:QUEUE:leases`` (when each delivery's lease ends),
    ``pigeon:QUEUE:released`` (deliveries given back by a nack, until taken again).

Options
    ``maxsize``, ``serializer`` (``"msgpack"``), ``lease`` (seconds, 30),
    ``max_deliveries`` (20), ``reconnect_timeout`` (30 s).

Delivery guarantees
    At-least-once for ``get_message``: Redis does not redeliver by itself, so readers
    claim entries whose lease has ended. Every delivery's lease end is kept in a sorted
    set (``lease`` seconds after delivery, ``get_message(lease=)``, ``extend(seconds)``:
    exactly "now + seconds", longer or shorter than the queue's lease), and a claim script
    takes the entries that are due, plus any delivered entry without a deadline that was
    idle for the queue's lease (its reader died between reading and recording it). A
    handle that closes hands back what it holds (due at once) and leaves the consumer
    group. A consumer that dies is covered by its lease. Plain ``get`` acks on receipt, in
    the same round trip as the read; a payload that does not decode goes to
    ``QUEUE.dead`` (reason ``undecodable``) and the others of its batch are put back, at
    the tail. Durability is Redis's own: with ``appendonly yes`` and ``appendfsync
    always`` a confirmed put survives a crash of Redis; with ``everysec`` up to a second
    can be lost; without AOF only what the last snapshot held survives. FIFO per queue
    except redeliveries. Waiting is done in slices of at most 0.2 s (``XREADGROUP
    BLOCK``), so ``shutdown`` reaches blocked readers within that; a ``put`` on a full
    queue retries with backoff up to 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from pigeon._queue_base import deadline_from
from pigeon.backends._asyncbase import EngineQueue, within
from pigeon.backends._retry import Backoff, reply_deadline
from pigeon.backends._syncface import SyncFace
from pigeon.backends._url import QueueURL, check_maxsize
from pigeon.errors import (
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Full,
    InvalidURL,
    LocalProtocolError,
    PigeonError,
    ShutDown,
    Unavailable,
    Unsupported,
)
from pigeon.options import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_RECONNECT_TIMEOUT,
)
from pigeon.protocol.messages import PutOptions
from pigeon.serializers import SerializerLike, get_serializer

T = TypeVar("T")

SCHEMES = (
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
GROUP = "pigeon"
SLICE = 0.2  # seconds: the longest single XREADGROUP BLOCK
CLOSE_WAIT = 2.0  # seconds a closing handle waits to hand back what it holds

_PUT = """
if redis.call('HGET', KEYS[2], 'shutdown') == '1' then return 'SHUTDOWN' end
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize') or '0')
if maxsize > 0 and redis.call('XLEN', KEYS[1]) + #ARGV > maxsize then return 'FULL' end
for i = 1, #ARGV do redis.call('XADD', KEYS[1], '*', 'd', ARGV[i]) end
return 'OK'
"""

# A put with options: KEYS stream, meta, then (with dedup ids) one dedup key per payload;
# ARGV the dedup window in ms ('' without dedup ids), the headers in MessagePack ('' without
# headers), then the payloads. A payload whose key exists (put within the window, whatever
# became of it since) is confirmed and not stored; the keys expire on Redis's clock.
_PUT_OPTIONS = """
if redis.call('HGET', KEYS[2], 'shutdown') == '1' then return 'SHUTDOWN' end
local n = #ARGV - 2
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize') or '0')
if maxsize > 0 and redis.call('XLEN', KEYS[1]) + n > maxsize then return 'FULL' end
for i = 1, n do
    if ARGV[1] == '' or redis.call('SET', KEYS[i + 2], '1', 'NX', 'PX', ARGV[1]) then
        if ARGV[2] == '' then
            redis.call('XADD', KEYS[1], '*', 'd', ARGV[i + 2])
        else
            redis.call('XADD', KEYS[1], '*', 'd', ARGV[i + 2], 'h', ARGV[2])
        end
    end
end
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
        local d, h = nil, ''
        for i = 1, #fields, 2 do
            if fields[i] == 'd' then d = fields[i + 1]
            elseif fields[i] == 'h' then h = fields[i + 1] end
        end
        if d then
            out[#out + 1] = id
            out[#out + 1] = d
            out[#out + 1] = h
        end
    end
end
if #ids > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
    redis.call('XDEL', KEYS[1], unpack(ids))
end
return out
"""


# When the leases of deliveries end: ``ARGV[1]`` ms from now (or the queue's lease when
# empty) for each id in ``ARGV[2..]``. Redis's own clock, so clients need not agree.
_LEASE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ms = tonumber(ARGV[1]) or tonumber(redis.call('HGET', KEYS[2], 'lease') or ARGV[3])
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], now + ms, ARGV[i]) end
return now
"""

# Take over deliveries whose lease ended. KEYS: stream, leases, meta, released; ARGV:
# group, consumer, count, default lease ms. Returns [id, fields, delivery count, ...].
_CLAIM = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(redis.call('HGET', KEYS[3], 'lease') or ARGV[4])
local n = tonumber(ARGV[3])
local out = {}
local function take(id)
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    redis.call('ZREM', KEYS[4], id)
    if #got == 0 or not got[1] or not got[1][2] then
        redis.call('ZREM', KEYS[2], id)
        redis.call('XACK', KEYS[1], ARGV[1], id)
        return
    end
    redis.call('ZADD', KEYS[2], now + lease, id)
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    out[#out + 1] = got[1][1]
    out[#out + 1] = got[1][2]
    out[#out + 1] = p[1] and p[1][4] or 1
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, n)) do
    take(id)
end
if #out < 3 * n then
    for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', lease, '-', '+', n)) do
        if #out >= 3 * n then break end
        if not redis.call('ZSCORE', KEYS[2], e[1]) then take(e[1]) end
    end
end
return out
"""

# A handle closes: what its consumer holds is due at once (handed to a shared consumer
# name, so the entries stay claimable) and the consumer leaves the group.
# KEYS: stream, leases; ARGV: group, consumer, orphans.
_LEAVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
for _, e in ipairs(held) do
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, e[1], 'JUSTID')
    redis.call('ZADD', KEYS[2], now, e[1])
end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return #held
"""
ORPHANS = "pigeon-orphans"

# Settle: KEYS stream, leases, released; ARGV group, ids... -> how many were acked.
_SETTLE = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
redis.call('ZREM', KEYS[2], unpack(ARGV, 2))
redis.call('ZREM', KEYS[3], unpack(ARGV, 2))
return n
"""

# A delivery given back (nack with requeue): claimable ``ARGV[1]`` ms from now, and
# counted as waiting (``qsize``), not held, until it is taken again. KEYS leases,
# released; ARGV ms, ids...
_RELEASE = """
local t = redis.call('TIME')
local due = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], due, ARGV[i])
    redis.call('ZADD', KEYS[2], due, ARGV[i])
end
return #ARGV - 1
"""

# Where the messages are: in the stream and not held by a consumer - new, given back
# (due or delayed), or whose lease ended. KEYS stream, leases, released; ARGV group.
_QSIZE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
local free = redis.call('ZCOUNT', KEYS[2], '-inf', now)
free = free + redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
local held = pending - free
if held < 0 then held = 0 end
local n = redis.call('XLEN', KEYS[1]) - held
if n < 0 then n = 0 end
return n
"""

# Dead-letter one entry: KEYS stream, leases, dead, released; ARGV group, id, payload,
# origin, reason, headers ('' for none).
_DEAD = """
local fields = {'d', ARGV[3], 'origin', ARGV[4], 'reason', ARGV[5]}
if ARGV[6] and ARGV[6] ~= '' then fields[7] = 'h'; fields[8] = ARGV[6] end
redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""

# Add entries at the tail of KEYS[1] (and, with ARGV[1] > 0, the first ARGV[1] of them to
# the dead-letter stream KEYS[2] with origin ARGV[2] and reason "undecodable"); ARGV[3..]
# are (payload, headers or '') pairs.
_APPEND = """
local dead = tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV, 2 do
    n = n + 1
    local fields = {'d', ARGV[i]}
    if ARGV[i + 1] ~= '' then fields[3] = 'h'; fields[4] = ARGV[i + 1] end
    if n <= dead then
        fields[#fields + 1] = 'origin'; fields[#fields + 1] = ARGV[2]
        fields[#fields + 1] = 'reason'; fields[#fields + 1] = 'undecodable'
        redis.call('XADD', KEYS[2], '*', unpack(fields))
    else
        redis.call('XADD', KEYS[1], '*', unpack(fields))
    end
end
return n
"""

# Shut down: KEYS stream, meta; ARGV immediate.
_SHUTDOWN = """
redis.call('HSET', KEYS[2], 'shutdown', 1)
if ARGV[1] == '1' then redis.call('XTRIM', KEYS[1], 'MAXLEN', 0) end
return 1
"""


def key_names(queue: str, *, hash_tags: bool) -> tuple[str, str]:
    """The stream of ``queue`` and of its dead-letter queue. On a Redis Cluster every key
    of a queue and of its ``.dead`` queue shares one hash slot (the tag is the name without
    ``.dead``), so every script runs; a single server keeps the readable names
    ``pigeon:NAME`` and ``pigeon:NAME.dead``."""
    base = queue.removesuffix(DEAD_SUFFIX)
    prefix = f"pigeon:{{{base}}}" if hash_tags else f"pigeon:{base}"
    stream = prefix + (DEAD_SUFFIX if queue.endswith(DEAD_SUFFIX) else "")
    return stream, prefix + DEAD_SUFFIX


DEAD_SUFFIX = ".dead"
Entry = tuple[bytes, int, bytes, bytes]  # (entry id, delivery count, payload, headers or b"")
_encode_headers = msgspec.msgpack.Encoder().encode
_decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode
_MOVED = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "READONLY")


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
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        check_maxsize(maxsize)
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            raise Unsupported("redis:// needs redis-py: pip install 'pigeon-queue[redis]'") from exc
        ep = QueueURL(url, SCHEMES, 6379, many=True)
        self.kind = "cluster" if "+cluster" in ep.scheme else (
            "sentinel" if "+sentinel" in ep.scheme else "single"
        )  # fmt: skip
        if self.kind == "single" and len(ep.hosts) > 1:
            raise InvalidURL(
                f"{url!r} names several hosts: write redis+cluster:// for a Redis Cluster or "
                "redis+sentinel:// for Sentinel"
            )
        self.hosts = ep.hosts
        self.service = ep.params.get("service", "mymaster")
        self.wait_replicas = int(ep.params.get("wait", "0") or 0)
        if self.wait_replicas < 0 or str(self.wait_replicas) != ep.params.get("wait", "0"):
            raise InvalidURL(
                f"wait={ep.params.get('wait')!r} in {url!r}: a number of replicas >= 0"
            )
        self.wait_timeout_ms = int((ep.seconds("wait_timeout", None, 5.0) or 5.0) * 1000)
        window = ep.seconds("dedup_window", None, DEFAULT_DEDUP_WINDOW, positive=False)
        self.dedup_window_ms = int((window if window is not None else 300.0) * 1000)
        self.url = url
        self.engine = "redis"
        self.name = ep.queue
        self.host, self.port = ep.host, ep.port
        self.db = int(ep.number("db", None, 0) or 0)
        self._lease_given = ep.seconds("lease", lease)
        self.lease = self._lease_given or DEFAULT_LEASE
        self.max_deliveries = int(
            ep.count("max_deliveries", max_deliveries, DEFAULT_MAX_DELIVERIES) or 0
        )
        self._password = ep.password
        self._username = ep.username
        self._tls = ep.scheme.startswith("rediss")
        self.serializer = serializer if serializer is not None else "msgpack"
        self._ser = get_serializer(self.serializer)
        self.maxsize = maxsize
        self.reconnect_timeout = reconnect_timeout
        self.stream, self.dead = key_names(self.name, hash_tags=self.kind == "cluster")
        self.meta = f"{self.stream}:meta"
        self.leases = f"{self.stream}:leases"
        self.released = f"{self.stream}:released"  # given back by nack, not yet taken again
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._r: Any = None
        self._put_script: Any = None
        self._put_options_script: Any = None
        self._take_script: Any = None
        self._lease_script: Any = None
        self._claim_script: Any = None
        self._leave_script: Any = None
        self._last_claim = 0.0
        self._ready = False
        self._closed = False
        self._settling: set[asyncio.Future[None]] = set()  # acks not yet confirmed
        self._master: Any = None  # cluster with ?wait=: a client of the slot's master
        self._sentinel: Any = None  # sentinel: the clients of the sentinels themselves

    # --- plumbing -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (the blocking face does, to report a bad URL or server at once)."""
        await self._do(lambda r: r.ping())

    async def _redis(self) -> Any:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        if self._r is None:
            import redis.asyncio as aredis

            self._r = self._client(aredis)
            self._put_script = self._r.register_script(_PUT)
            self._put_options_script = self._r.register_script(_PUT_OPTIONS)
            self._take_script = self._r.register_script(_TAKE)
            self._lease_script = self._r.register_script(_LEASE)
            self._claim_script = self._r.register_script(_CLAIM)
            self._leave_script = self._r.register_script(_LEAVE)
            self._settle_script = self._r.register_script(_SETTLE)
            self._dead_script = self._r.register_script(_DEAD)
            self._release_script = self._r.register_script(_RELEASE)
            self._qsize_script = self._r.register_script(_QSIZE)
            self._append_script = self._r.register_script(_APPEND)
            self._shutdown_script = self._r.register_script(_SHUTDOWN)
        if not self._ready:
            await self._setup(self._r)
        return self._r

    def _client(self, aredis: Any) -> Any:
        auth: dict[str, Any] = {"password": self._password, "username": self._username}
        if self.kind == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            cluster = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self.hosts], ssl=self._tls,
                decode_responses=False, **auth,
            )  # fmt: skip
            retiring = _retiring_nodes_manager()
            if retiring is not None:
                cluster.nodes_manager.__class__ = retiring
            return cluster
        if self.kind == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(self.hosts, socket_timeout=5.0)  # type: ignore[no-untyped-call]
            self._sentinel = sentinel
            return sentinel.master_for(
                self.service, db=self.db, ssl=self._tls, decode_responses=False, **auth
            )
        return aredis.Redis(
            host=self.host, port=self.port, db=self.db, ssl=self._tls, decode_responses=False,
            **auth,
        )  # fmt: skip

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
        if self._lease_given is not None:  # the queue's lease, for every client from now on
            await r.hset(self.meta, "lease", int(self._lease_given * 1000))
        else:
            stored = await r.hget(self.meta, "lease")
            if stored:
                self.lease = int(stored) / 1000
        self._ready = True

    async def _do(self, fn: Any, deadline: float | None = None) -> Any:
        """Run ``fn(redis)``; translate redis-py errors; retry lost connections until the
        call's deadline (or ``reconnect_timeout``). A call with a deadline runs ``within`` its
        reply deadline as a whole (``_put``, ``_fetch``): a stalled attempt is cut there."""
        import redis.exceptions as rex

        backoff = Backoff(deadline, self.reconnect_timeout)
        while True:
            try:
                return await fn(await self._redis())
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                if (wait := backoff.next_delay()) is None:
                    raise _client_error(exc) from exc
                self._ready = False
                if self._master is not None and self._r is not None:
                    await self._forget_master(self._r)
                await asyncio.sleep(wait)
            except rex.RedisError as exc:
                raise PigeonError(f"redis refused the command: {exc}") from exc

    # --- the contract ---------------------------------------------------------------------

    supports: ClassVar[frozenset[str]] = frozenset({"dedup", "headers"})
    _why_not: ClassVar[dict[str, str]] = {
        "delay": "a stream has no per-entry delay; pigeon:// has",
        "ttl": "a stream has no per-entry expiry that dead-letters; pigeon:// has",
        "priority": "a Redis stream is one sequence; it has no priorities",
    }

    async def _put(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
    ) -> None:
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "redis"):
            if options is not None and options.dedup_id:
                dedup_ids = [options.dedup_id]
            headers = _encode_headers(options.headers) if options and options.headers else None
            delay = 0.001
            while True:
                result = await self._do(
                    lambda r: self._put_now(r, payloads, dedup_ids, headers), deadline
                )
                if result == b"OK":
                    return
                if result == b"SHUTDOWN":
                    raise ShutDown("the queue was shut down; put refused")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Full(f"queue {self.name!r} is full (maxsize={self.maxsize})")
                await asyncio.sleep(min(delay, max(0.0, (deadline or 1e18) - time.monotonic())))
                delay = min(delay * 2, 0.05)

    async def _put_now(
        self,
        r: Any,
        payloads: list[bytes],
        dedup_ids: list[str] | None = None,
        headers: bytes | None = None,
    ) -> Any:
        """The put script; with ``?wait=N``, on the same connection, ``WAIT N`` for N
        replicas to have it before the put counts as confirmed."""
        script, keys = self._put_script, [self.stream, self.meta]
        args: list[Any] = payloads
        if dedup_ids is not None or headers is not None:
            script = self._put_options_script
            window: Any = ""
            if dedup_ids is not None:  # one key per id, in the queue's hash slot
                keys = [*keys, *(f"{self.stream}:dedup:{d}" for d in dedup_ids)]
                window = self.dedup_window_ms
            args = [window, headers or b"", *payloads]
        if not self.wait_replicas:
            return await script(keys=keys, args=args, client=r)
        import redis.exceptions as rex

        node = await self._master_client(r)
        try:
            async with node.pipeline(transaction=False) as pipe:
                await script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                result, acked = await pipe.execute()
        except rex.ResponseError as exc:
            if self.kind == "cluster" and str(exc).split(" ", 1)[0] in _MOVED:
                await self._forget_master(r)  # the slot moved (a failover): find it again
                raise rex.ConnectionError(str(exc)) from exc
            raise
        if result == b"OK" and int(acked) < self.wait_replicas:
            raise Unavailable(
                f"redis: the put reached {acked} of {self.wait_replicas} replica(s) within "
                f"{self.wait_timeout_ms} ms (?wait=); it may be lost if the master dies now; "
                "retrying may store it twice"
            )
        return result

    async def _master_client(self, r: Any) -> Any:
        """The client whose connection the write and its WAIT share: on a cluster, a plain
        client of the master that holds the queue's slot."""
        if self.kind != "cluster":
            return r
        if self._master is None:
            import redis.asyncio as aredis

            node = r.get_node_from_key(self.stream)
            self._master = aredis.Redis(
                host=node.host, port=node.port, ssl=self._tls, decode_responses=False,
                password=self._password, username=self._username,
            )  # fmt: skip
        return self._master

    async def _forget_master(self, r: Any) -> None:
        master, self._master = self._master, None
        if master is not None:
            with contextlib.suppress(Exception):
                await master.aclose()
        with contextlib.suppress(Exception):
            await r.nodes_manager.initialize()

    def _claim_due(self) -> bool:
        return time.monotonic() - self._last_claim > 1.0

    async def _read_now(self, r: Any, n: int, take: bool) -> list[Entry]:
        """New entries without waiting; with ``take`` they are acked and deleted at once."""
        if not take:
            return await self._read_new(r, n, 0)
        flat = await self._take_script(keys=[self.stream], args=[GROUP, self.consumer, n], client=r)
        return [(flat[i], 1, flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]

    async def _fetch(
        self,
        n: int,
        block: bool,
        timeout: float | None,
        lease: float | None = None,
        take: bool = False,
    ) -> list[Entry]:
        """Up to ``n`` entries as (id, delivery_count, payload): held by this consumer, or,
        with ``take``, already acked and deleted (plain ``get``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "redis"):
            while True:
                # New entries first, in one round trip (and, with ``take``, acked in the same
                # script); expired ones are claimed when there is nothing new, or once a
                # second, so a busy queue still gives back what a dead consumer held.
                got = (
                    []
                    if self._claim_due()
                    else await self._do(lambda r: self._read_now(r, n, take), deadline)
                )
                if not got:
                    got = await self._do(lambda r: self._claim(r, n), deadline)
                    self._last_claim = time.monotonic()
                    if got and take:
                        await self._settle([g[0] for g in got], deadline)
                if not got:
                    remaining = SLICE if deadline is None else deadline - time.monotonic()
                    wait_ms = int(max(0.0, min(SLICE, remaining)) * 1000)
                    got = await self._do(lambda r, w=wait_ms: self._read_new(r, n, w), deadline)
                    if got and take:
                        await self._settle([g[0] for g in got], deadline)
                if got:
                    if not take:  # held: its lease ends `lease` (or the queue's) from now
                        await self._set_lease([g[0] for g in got], lease, deadline)
                    result: list[Entry] = got
                    return result
                if await self._do(lambda r: self._drained_and_shut(r), deadline):
                    raise ShutDown("the queue was shut down and is drained")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Empty(f"queue {self.name!r} is empty")

    async def _set_lease(
        self, ids: list[bytes], seconds: float | None, deadline: float | None = None
    ) -> None:
        """The leases of ``ids`` end ``seconds`` from now (None: the queue's lease)."""
        ms = "" if seconds is None else str(int(seconds * 1000))
        await self._do(
            lambda r: self._lease_script(
                keys=[self.leases, self.meta],
                args=[ms, "", int(self.lease * 1000), *ids],
                client=r,
            ),
            deadline,
        )

    async def _claim(self, r: Any, n: int) -> list[Entry]:
        """Take over entries whose lease ended (Redis will not redeliver by itself)."""
        flat = await self._claim_script(
            keys=[self.stream, self.leases, self.meta, self.released],
            args=[GROUP, self.consumer, n, int(self.lease * 1000)],
            client=r,
        )
        out = []
        for i in range(0, len(flat), 3):
            eid, raw, deliveries = flat[i], flat[i + 1], int(flat[i + 2])
            fields = dict(zip(raw[::2], raw[1::2], strict=True))
            if b"d" not in fields:
                continue
            if deliveries > self.max_deliveries:
                await self._dead_letter(r, eid, fields[b"d"], "max_deliveries", fields.get(b"h"))
                continue
            out.append((eid, deliveries, fields[b"d"], fields.get(b"h", b"")))
        return out

    async def _read_new(self, r: Any, n: int, wait_ms: int) -> list[Entry]:
        res = await r.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=n, block=wait_ms if wait_ms else None
        )
        if not res:
            return []
        return [
            (eid, 1, fields[b"d"], fields.get(b"h", b"")) for eid, fields in res[0][1] if fields
        ]

    async def _dead_letter(
        self, r: Any, eid: bytes, payload: bytes, reason: str, headers: bytes | None = None
    ) -> None:
        await self._dead_script(
            keys=[self.stream, self.leases, self.dead, self.released],
            args=[GROUP, eid, payload, self.name, reason, headers or b""],
            client=r,
        )

    async def _drained_and_shut(self, r: Any) -> bool:
        if await r.hget(self.meta, "shutdown") != b"1":
            return False
        return int(await r.xlen(self.stream)) == 0

    async def _settle(self, ids: list[bytes], deadline: float | None = None) -> int:
        async def run(r: Any) -> int:
            acked = await self._settle_script(
                keys=[self.stream, self.leases, self.released], args=[GROUP, *ids], client=r
            )
            return int(acked)

        return int(await self._do(run, deadline))

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        return (await self.get_many(1, timeout, block=block))[0]

    async def get_many(
        self, max_items: int, timeout: float | None = None, *, block: bool = True
    ) -> list[T]:
        got = await self._cancel_safe(
            self._fetch(max_items, block, timeout, take=True), self._put_back
        )
        return await self._decode_taken(got)

    async def extend_held(self, message: Any, seconds: float) -> None:
        await self._set_lease([message.id], seconds)

    async def _hand_back(self, got: list[Entry]) -> None:
        """Held entries taken for a caller that was cancelled: their leases end now."""
        await self._set_lease([g[0] for g in got], 0.0)

    async def _put_back(self, got: list[Entry]) -> None:
        """Items taken (acked and deleted) for a caller that was cancelled: back, at the tail."""
        pairs = [x for g in got for x in (g[2], g[3])]
        await self._do(
            lambda r: self._append_script(
                keys=[self.stream, self.dead], args=[0, self.name, *pairs], client=r
            )
        )

    async def _decode_taken(self, got: list[Entry]) -> list[Any]:
        """Bodies of entries already acked; undecodable ones are dead-lettered, and then
        the good ones are put back (at the tail) before ``DecodeError`` is raised."""
        good: list[tuple[Entry, Any]] = []
        bad: list[tuple[Entry, BaseException]] = []
        for g in got:
            try:
                good.append((g, self._ser.loads(g[2])))
            except Exception as exc:
                bad.append((g, exc))
        if bad:
            back = [g for g, _ in bad] + [g for g, _ in good]
            pairs = [x for g in back for x in (g[2], g[3])]  # each with its headers
            await self._do(
                lambda r: self._append_script(
                    keys=[self.stream, self.dead], args=[len(bad), self.name, *pairs], client=r
                )
            )
            raise self._decode_error([(g[2], e) for g, e in bad], len(got), bool(good))
        return [body for _, body in good]

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncRedisMessage[T]:
        got = await self._cancel_safe(self._fetch(1, True, timeout, lease), self._hand_back)
        eid, count, payload, headers = got[0]
        try:
            body = self._ser.loads(payload)
        except Exception as exc:
            await self._do(lambda r: self._dead_letter(r, eid, payload, "undecodable", headers))
            raise self._decode_error([(payload, exc)], 1, False) from exc
        return AsyncRedisMessage(self, eid, count, payload, body, headers)

    async def qsize(self) -> int:
        """Messages waiting: new ones, and those given back (a nack, delayed or not; a
        lease that ended) until a consumer takes them again - not those held."""
        return int(
            await self._do(
                lambda r: self._qsize_script(
                    keys=[self.stream, self.leases, self.released], args=[GROUP], client=r
                )
            )
        )

    async def _release(self, ids: list[bytes], delay: float) -> None:
        """Give ``ids`` back: claimable ``delay`` seconds from now, counted by qsize."""
        await self._do(
            lambda r: self._release_script(
                keys=[self.leases, self.released], args=[int(delay * 1000), *ids], client=r
            )
        )

    async def queue_lease(self, timeout: float) -> float:
        """The queue's lease as Redis holds it (its meta hash: the URL's ``?lease=`` of the
        client that declared it last), else this handle's; for ``pigeon.consume``."""
        stored = await self._do(lambda r: r.hget(self.meta, "lease"), time.monotonic() + timeout)
        return int(stored) / 1000 if stored else self.lease

    async def full(self) -> bool:
        if not self.maxsize:
            return False
        return int(await self._do(lambda r: r.xlen(self.stream))) >= self.maxsize

    async def shutdown(self, immediate: bool = False) -> None:
        await self._do(
            lambda r: self._shutdown_script(
                keys=[self.stream, self.meta], args=[1 if immediate else 0], client=r
            )
        )

    async def aclose(self) -> None:
        if self._settling:  # acks and nacks sent without waiting: let them land first
            await asyncio.gather(*self._settling, return_exceptions=True)
        if not self._closed:
            if self._r is not None and self._ready:
                # hand back what this consumer holds, then leave the group (a server out
                # of reach is not waited for: the leases bring the entries back)
                with contextlib.suppress(Exception):
                    async with within(time.monotonic() + CLOSE_WAIT, "redis"):
                        await self._leave_script(
                            keys=[self.stream, self.leases],
                            args=[GROUP, self.consumer, ORPHANS],
                            client=self._r,
                        )
            self._closed = True
            if self._master is not None:
                await self._master.aclose()
            if self._r is not None:
                await self._r.aclose()
                if self.kind == "cluster":
                    # redis-py closes a cluster client's nodes only if it finished
                    # initializing; connections made by a failed attempt must go too
                    manager = self._r.nodes_manager
                    await manager.aclose()
                    await manager.aclose("startup_nodes")
                    # nodes a failover removed: stop waiting for them, disconnect now
                    retiring = list(getattr(manager, "_background_tasks", ()))
                    for task in retiring:
                        task.cancel()
                    await asyncio.gather(*retiring, return_exceptions=True)
            if self._sentinel is not None:
                for client in self._sentinel.sentinels:
                    await client.aclose()


@functools.cache
def _retiring_nodes_manager() -> type | None:
    """A redis-py ``NodesManager`` that closes every node it stops using (leaks seen in CI).

    Two ways redis-py (7.x) loses a node with open connections after a failover:

    * On re-initialising it keeps the node object it already had under a name but routes the
      slots to the freshly made one, so commands open connections on a node that is in the
      slot table and not in the node table, which ``aclose`` walks. Here the slot table is
      pointed back at the nodes the manager knows.
    * A node that left the topology is dropped with only its idle connections closed; one in
      use at that moment is merely marked for reconnect. Here every removed node gets a task,
      kept in the manager's background-task set, that waits for its commands to finish and
      then disconnects it; closing the queue cancels the wait and disconnects at once.
    """
    from redis.asyncio.cluster import NodesManager

    if "_background_tasks" not in getattr(NodesManager, "__slots__", ()):
        return None  # an older redis-py: it keeps its own ways

    class RetiringNodesManager(NodesManager):
        __slots__ = ()  # same layout, so an existing manager can take this class

        def set_nodes(
            self, old: dict[str, Any], new: dict[str, Any], remove_old: bool = False
        ) -> None:
            if remove_old:
                for name, node in old.items():
                    if name not in new:
                        task = asyncio.create_task(_retire(node))
                        self._background_tasks.add(task)
                        task.add_done_callback(self._background_tasks.discard)
            if old is self.nodes_cache:
                for name, node in new.items():
                    if name in old:
                        old[name].server_type = node.server_type  # a failover swaps roles
            super().set_nodes(old, new, remove_old)
            if old is self.nodes_cache:
                known, done = self.nodes_cache, set()
                for nodes in self.slots_cache.values():  # one list shared by a slot range
                    if id(nodes) not in done:
                        done.add(id(nodes))
                        nodes[:] = [known.get(node.name, node) for node in nodes]

    return RetiringNodesManager


async def _retire(node: Any) -> None:
    try:
        for _ in range(1200):  # a minute at most for commands still running on it
            if len(node._free) >= len(node._connections):
                break
            await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(Exception):
            await node.disconnect()


class AsyncRedisMessage(Generic[T]):
    """A Redis stream entry held by this consumer until acked, nacked or its lease ends."""

    def __init__(
        self,
        queue: AsyncRedisQueue[T],
        eid: bytes,
        count: int,
        payload: bytes,
        body: T,
        headers: bytes = b"",
    ) -> None:
        self._queue = queue
        self._payload = payload  # dead-lettered as received, not encoded again
        self._headers = headers
        self.id = eid
        self._identity = eid  # a redelivery is the same stream entry
        self.delivery_count = count
        self.headers: dict[str, str] = _decode_headers(headers) if headers else {}
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

    async def _nack(self, requeue: bool, delay: float, reason: str = "") -> None:
        q = self._queue
        if not requeue:
            why = reason or "rejected"
            await q._do(lambda r: q._dead_letter(r, self.id, self._payload, why, self._headers))
            return
        await q._release([self.id], delay)  # claimable once `delay` has passed

    async def _extend(self, seconds: float) -> None:
        await self._queue._set_lease([self.id], seconds)

    def ack(self) -> Awaitable[None]:
        self._check()
        self._settled = True
        return self._queue._track(asyncio.ensure_future(self._ack()))

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> Awaitable[None]:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._check()
        self._settled = True
        return self._queue._track(asyncio.ensure_future(self._nack(requeue, delay, reason)))

    def extend(self, seconds: float) -> Awaitable[None]:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        self._check()
        return self._queue._track(asyncio.ensure_future(self._extend(seconds)))


class RedisQueue(SyncFace[T]):
    """The blocking face of ``AsyncRedisQueue`` (see the module docstring)."""

    impl_class = AsyncRedisQueue
