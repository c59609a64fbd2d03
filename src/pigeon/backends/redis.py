"""The redis:// backend: Redis Streams, one consumer group, a stream per priority.

Features
    ``put``/``put_many`` (XADD inside a Lua script that checks ``maxsize`` and the
    shut-down flag atomically, never trimming unconsumed entries), ``get``/``get_many``,
    ``get_message`` with ``ack`` (XACK and XDEL), ``nack(requeue, delay)``, ``extend``,
    ``delivery_count`` from the pending entries list, dead letters after
    ``max_deliveries``, ``qsize``/``empty``/``full``, ``shutdown`` (for every client),
    iteration, and every message option: ``delay``, ``ttl``, ``priority``, ``dedup_id``,
    ``headers``. ``task_done``/``join`` raise ``Unsupported``: Redis has no server-side
    wait on a counter. ``pigeon.AsyncQueue(url)`` runs the same code on asyncio.

Connection URL
    ``redis://[[USER]:PASSWORD@]HOST[:PORT]/QUEUE[?db=N&lease=S&max_deliveries=N&
    dedup_window=S&wait=N&wait_timeout=S]``; ``rediss://`` for TLS;
    ``redis+cluster://H1:P1,H2:P2/QUEUE``, ``redis+sentinel://S1:P1,.../QUEUE?service=NAME``.
    Keys (all in one hash slot on a Cluster, ``pigeon:{QUEUE}...``; listed in
    ``_redis_lua``): ``pigeon:QUEUE`` (the stream of priority 0), ``pigeon:QUEUE:pN``
    (priority N, once used), ``pigeon:QUEUE:meta``, ``...:leases`` and ``...:released``
    per stream, ``pigeon:QUEUE:delayed``, ``pigeon:QUEUE:expiry``, ``pigeon:QUEUE.dead``.

Options
    ``maxsize`` (ready + delayed + held), ``serializer`` (``"msgpack"``), ``lease``
    (seconds, 30), ``max_deliveries`` (20), ``dedup_window`` (seconds, 300),
    ``reconnect_timeout`` (30 s), ``connect_timeout`` (10 s, each connection to a
    server); ``lease``, ``max_deliveries`` and ``dedup_window`` also in the URL, the
    keyword winning (``QueueOptions.from_url``).

Message options
    ``priority`` 0-9: a stream per priority; every take is one script that reads them
    highest first, so a higher priority wins within one call (``get_many`` too) and a
    message given back keeps its priority. ``delay``: a sorted set scored by the due time
    on Redis's clock; the take script moves due messages to their stream (at its tail)
    before it reads, so a delayed message is never delivered early, never leased while it
    waits, counted by ``qsize``, and kept by AOF and replication like any key. ``ttl``:
    the expiry (put + delay + ttl, Redis's clock) is a field of the entry and a sorted-set
    index; a message still waiting then - new, delayed or given back - goes to
    ``QUEUE.dead`` (reason ``expired``) in the same script that finds it, never to a
    handler; one held by a consumer does not expire while it is (if its lease ends past
    the ttl, it does). Expiries are collected by every take and ``qsize`` on the queue
    and by every reader of ``QUEUE.dead``. A message put into a dead-letter queue with a
    ttl is dropped when it ends.

Delivery guarantees
    At-least-once for ``get_message``: Redis does not redeliver by itself, so readers
    claim entries whose lease has ended. Every delivery's lease end is kept in a sorted
    set (``lease`` seconds after delivery, ``get_message(lease=)``, ``extend(seconds)``:
    exactly "now + seconds", longer or shorter than the queue's lease), recorded in the
    script that delivers it; an entry a blocked reader took but could not record (it died
    between its ``XREADGROUP`` and the script after it) comes back once it was idle for
    the queue's lease. An ack, nack or extend is for one delivery (the consumer that got it
    and its delivery count, checked against the pending entry in the same script): once
    the lease ran out and the message was taken again - by another consumer or the same
    one - the old delivery's call changes nothing and raises ``LocalProtocolError``, as
    on pigeon://; a late call before anyone took it again still counts. A handle that
    closes hands back what it holds (due at once) and leaves the consumer group. A
    consumer that dies is covered by its lease. Plain ``get`` acks on receipt, in the
    script that takes it (a blocked one: in the script right after its read, else back
    after the lease); a payload that does not decode
    goes to ``QUEUE.dead`` (reason ``undecodable``) and the others of its batch are put
    back, at the tail of their priority. Durability is Redis's own: with ``appendonly
    yes`` and ``appendfsync always`` a confirmed put - delayed or not - survives a crash
    of Redis; with ``everysec`` up to a second can be lost; without AOF only what the
    last snapshot held survives. Across a failover (Cluster, Sentinel) with ``?wait=N``
    a confirmed put, its delay, ttl and priority included, was on N replicas; what
    happened after it (a delayed message moved when due, a delivery, an ack) is
    replicated asynchronously, so a failover may deliver a message again, never lose it.
    Order: higher priority first; within one, FIFO except redeliveries, and a delayed
    message joins the tail of its priority when it comes due. A blocked ``get`` waits
    in ``XREADGROUP BLOCK`` on the streams of the priorities in use, in slices of at
    most 0.2 s (``SLICE``), each cut short at the earliest due time the last take saw (a
    delay, a nack's delay, a lease's end): a delayed message reaches a blocked reader
    within a round trip of its due time, or within 0.2 s when it was put during that
    reader's wait with a shorter delay than any it knew of (or at a priority first used
    then); ``shutdown`` reaches blocked readers within 0.2 s. A ``put`` on a full queue
    retries with backoff up to 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import msgspec

from pigeon._queue_base import deadline_from
from pigeon.backends import _redis_lua as lua
from pigeon.backends._admin import (
    ADMIN_BATCH,
    PEEK_BYTES,
    check_move,
    check_peek,
    shown_message,
)
from pigeon.backends._asyncbase import EngineQueue, within
from pigeon.backends._retry import Backoff, reply_deadline
from pigeon.backends._settle import stale_delivery
from pigeon.backends._syncface import SyncFace
from pigeon.backends._url import QueueURL
from pigeon.errors import (
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Full,
    Indeterminate,
    InvalidURL,
    LocalProtocolError,
    PigeonError,
    ShutDown,
    Unavailable,
    Unsupported,
)
from pigeon.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_RECONNECT_TIMEOUT,
    QueueOptions,
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
ORPHANS = "pigeon-orphans"  # the consumer a closing handle hands what it held to
GONE = "gone"  # ADOPT: an entry deleted before it was read
MAX_TAKE = 1000  # entries one take script returns at most (a get_many gets the rest later)
# (id, delivery count, payload, headers or b"", expiry in ms on Redis's clock or b"")
Entry = tuple[bytes, int, bytes, bytes, bytes]


class _Taken(NamedTuple):
    """What one run of the take script says (see ``_redis_lua.FETCH``)."""

    got: list[Entry]
    shut: bool  # shut down and drained
    due: int  # ms until the next delayed message, given-back one or lease end; -1: none
    more: bool  # work left over: take again at once
    levels: list[int]  # the priorities in use, highest first


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (a delay never ends early; 0.7 s is 700 ms, not
    701 as 0.7 * 1000 would round up; any time above 0 is at least 1 ms)."""
    ms = math.ceil(round(seconds * 1000, 6))
    return 1 if ms == 0 and seconds > 0 else ms


def _priority(eid: bytes) -> int:
    """The priority in a message id (``N:ID`` above 0)."""
    return int(eid[:1]) if eid[1:2] == b":" else 0


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
        dedup_window: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.options = opts = QueueOptions.from_url(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
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
        self.wait_timeout_ms = int((ep.seconds("wait_timeout", 5.0) or 5.0) * 1000)
        window = DEFAULT_DEDUP_WINDOW if opts.dedup_window is None else opts.dedup_window
        # whole ms, rounded up (a window of 0.4 ms is 1 ms, not 0); 0: no dedup - an id
        # remembered earlier is still a repeat, no new one is remembered (as pigeon://)
        self.dedup_window_ms = _ms(window)
        self.url = url
        self.engine = "redis"
        self.name = ep.queue
        self.host, self.port = ep.host, ep.port
        self.db = int(ep.number("db", 0) or 0)
        self._lease_given = opts.lease
        self.lease = opts.lease or DEFAULT_LEASE
        self.max_deliveries = opts.max_deliveries or DEFAULT_MAX_DELIVERIES
        self._password = ep.password
        self._username = ep.username
        self._tls = ep.scheme.startswith("rediss")
        self._ser = get_serializer(opts.serializer)
        self.maxsize = opts.maxsize
        self.reconnect_timeout = opts.reconnect_timeout
        self.stream, self.dead = key_names(self.name, hash_tags=self.kind == "cluster")
        self.meta = f"{self.stream}:meta"
        self.is_dead = self.name.endswith(DEAD_SUFFIX)
        # a dead-letter queue collects its origin's expired messages before it is read
        self.origin = self.name.removesuffix(DEAD_SUFFIX) if self.is_dead else ""
        self.origin_base = (
            key_names(self.origin, hash_tags=self.kind == "cluster")[0] if self.is_dead else ""
        )
        # the priority streams a blocked take waits on (XREAD), 0 to 9
        self.levels = [self.stream] + [f"{self.stream}:p{p}" for p in range(1, 10)]
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._r: Any = None
        self._scripts: dict[str, Any] = {}
        self._last_orphan_scan = 0.0
        self._ready = False
        self._closed = False
        self._settling: set[asyncio.Future[None]] = set()  # acks not yet confirmed
        self._master: Any = None  # cluster with ?wait=: a client of the slot's master
        self._evicting = ""  # the server's maxmemory-policy if it may evict keys
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
            self._scripts = {
                name: self._r.register_script(getattr(lua, name)) for name in lua.__all__
            }
        if not self._ready:
            await self._setup(self._r)
        return self._r

    def _client(self, aredis: Any) -> Any:
        auth: dict[str, Any] = {
            "password": self._password, "username": self._username,
            "socket_connect_timeout": self.options.connect_timeout,
        }  # fmt: skip
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
        self._evicting = await _evicting(r)
        self._ready = True

    async def _do(
        self, fn: Any, deadline: float | None = None, lost: list[BaseException] | None = None
    ) -> Any:
        """Run ``fn(redis)``; translate redis-py errors; retry lost connections until the
        call's deadline (or ``reconnect_timeout``). A call with a deadline runs ``within`` its
        reply deadline as a whole (``_put``, ``_fetch``): a stalled attempt is cut there.
        ``lost`` collects the connection errors retried: an attempt they ended may have
        run on the server."""
        import redis.exceptions as rex

        backoff = Backoff(deadline, self.reconnect_timeout)
        regrouped = False
        while True:
            try:
                return await fn(await self._redis())
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                if lost is not None:
                    lost.append(exc)
                if (wait := backoff.next_delay()) is None:
                    raise _client_error(exc) from exc
                self._ready = False
                if self._master is not None and self._r is not None:
                    await self._forget_master(self._r)
                await asyncio.sleep(wait)
            except rex.ResponseError as exc:
                if "NOGROUP" in str(exc) and not regrouped:
                    # the queue was deleted (``delete``) under this handle: set it up again
                    self._ready, regrouped = False, True
                    continue
                raise self._refused(exc) from exc
            except rex.RedisError as exc:
                raise self._refused(exc) from exc

    @staticmethod
    def _refused(exc: Exception) -> PigeonError:
        """A command Redis refused, as pigeon says it."""
        if "OutOfMemory" in type(exc).__name__ or "> 'maxmemory'" in str(exc):
            return Unavailable(  # a script refused whole: no write of it is kept
                "redis is out of memory (used memory > maxmemory, maxmemory-policy "
                f"noeviction) and refused the command; nothing was changed: {exc}"
            )
        return PigeonError(f"redis refused the command: {exc}")

    # --- the contract ---------------------------------------------------------------------

    supports: ClassVar[frozenset[str]] = frozenset({"dedup", "headers", "delay", "ttl", "priority"})

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
            delay = 0.001
            while True:
                result = await self._do(
                    lambda r: self._put_now(r, payloads, options, dedup_ids), deadline
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
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
    ) -> Any:
        """The put script; with ``?wait=N``, on the same connection, ``WAIT N`` for N
        replicas to have it before the put counts as confirmed."""
        script, keys = self._scripts["PUT"], [self.stream, self.meta]
        args: list[Any] = payloads
        if dedup_ids is not None and self._evicting and self.dedup_window_ms:
            raise Unsupported(
                f"redis:// cannot honour dedup_id= on this server: its maxmemory-policy "
                f"{self._evicting} may evict the dedup keys (they have a ttl) before their "
                "window ends, and a repeat would be stored; set maxmemory-policy noeviction"
            )
        if dedup_ids is not None or options is not None:
            script = self._scripts["PUT_OPTIONS"]
            window: Any = ""
            if dedup_ids is not None:  # one key per id, in the queue's hash slot
                keys = [*keys, *(f"{self.stream}:dedup:{d}" for d in dedup_ids)]
                window = self.dedup_window_ms
            o = options or PutOptions()
            headers = _encode_headers(o.headers) if o.headers else b""
            # whole milliseconds, rounded up: never delivered early, never expired early
            args = [window, headers, _ms(o.delay), _ms(o.ttl), o.priority, *payloads]
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

    def _where(self) -> list[Any]:
        """The ARGV tail that says which queue a script works on: its name, whether it is
        a dead-letter queue, and (for one) its origin's stream and name."""
        return [self.name, int(self.is_dead), self.origin_base, self.origin]

    async def _take(self, r: Any, n: int, take: bool, lease: float | None) -> _Taken:
        """One run of the take script (see ``_redis_lua``)."""
        scan = time.monotonic() - self._last_orphan_scan > 1.0
        if scan:
            self._last_orphan_scan = time.monotonic()
        reply = await self._scripts["FETCH"](
            keys=[self.stream, self.dead],
            args=[
                self.consumer, n, int(take), "" if lease is None else _ms(lease),
                int(self.lease * 1000), self.max_deliveries, self.name, int(self.is_dead),
                int(scan), self.origin_base, self.origin,
            ],
            client=r,
        )  # fmt: skip
        flat, shut, due, more, levels = reply
        got = [
            (flat[i], int(flat[i + 1]), flat[i + 2], flat[i + 3], flat[i + 4])
            for i in range(0, len(flat), 5)
        ]
        return _Taken(got, bool(shut), int(due), bool(more), [int(p) for p in levels])

    async def _wait_new(
        self, n: int, take: bool, lease: float | None, levels: list[int], wait_ms: int,
        deadline: float | None,
    ) -> list[Entry]:  # fmt: skip
        """Block until a new entry comes at one of ``levels`` (``XREADGROUP BLOCK``: Redis
        hands each new entry to one waiting reader), then make what was read deliveries
        (the ADOPT script). [] when the wait ran out or nothing read was deliverable."""
        streams = {self.levels[p]: ">" for p in levels}
        res = await self._do(
            lambda r: r.xreadgroup(GROUP, self.consumer, streams, count=n, block=wait_ms),
            deadline,
        )
        if not res:
            return []
        read: list[tuple[Entry, bool]] = []  # (entry, still there when read)
        for key, entries in res:  # each stream's entries in put order
            p = self.levels.index(key.decode() if isinstance(key, bytes) else key)
            for eid, fields in entries:
                qid = eid if p == 0 else b"%d:%s" % (p, eid)
                f = fields or {}
                d, h, x = f.get(b"d"), f.get(b"h", b""), f.get(b"x", b"")
                read.append(((qid, 1, d or b"", h, x), d is not None))
        read.sort(key=lambda e: -_priority(e[0][0]))  # stable: put order within a priority
        args: list[Any] = [
            self.consumer, n, int(take), "" if lease is None else _ms(lease),
            int(self.lease * 1000), self.name, int(self.is_dead),
        ]  # fmt: skip
        for e, there in read:  # one deleted meanwhile: the script forgets it
            args += [e[0], e[4] if there else GONE]
        flags = await self._do(
            lambda r: self._scripts["ADOPT"](keys=[self.stream, self.dead], args=args, client=r),
            deadline,
        )
        return [e for (e, _), ok in zip(read, flags, strict=True) if ok]

    async def _fetch(
        self,
        n: int,
        block: bool,
        timeout: float | None,
        lease: float | None = None,
        take: bool = False,
    ) -> list[Entry]:
        """Up to ``n`` entries: held by this consumer, with a lease of ``lease`` seconds
        (None: the queue's), or, with ``take``, already acked and deleted (plain ``get``).

        Every take is one script (due delayed messages moved, expired ones dead-lettered,
        priorities highest first); when it finds nothing, a blocked call waits in
        ``XREADGROUP BLOCK`` for a new entry at any priority in use, at most until the
        earliest due time the script reported (a delay, a nack's delay, a lease's end)
        and ``SLICE``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        n = min(n, MAX_TAKE)  # a reply's size is bounded before Redis builds it
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "redis"):
            while True:
                t: _Taken = await self._do(lambda r: self._take(r, n, take, lease), deadline)
                if t.got:
                    return t.got
                if t.shut:
                    raise ShutDown("the queue was shut down and is drained")
                remaining = SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise Empty(f"queue {self.name!r} is empty")
                if t.more:
                    continue
                wait = min(SLICE, remaining) if t.due < 0 else min(SLICE, remaining, t.due / 1000)
                wait_ms = max(1, int(wait * 1000))  # BLOCK 0 would wait for ever
                got = await self._wait_new(n, take, lease, t.levels, wait_ms, deadline)
                if got:
                    return got

    # A settle (ack, nack, extend) names the delivery it is for: the message's id, the
    # consumer that got it and its delivery count. The scripts change nothing unless that
    # delivery still holds the message, and answer HELD, GONE (no longer pending) or
    # STALE (pending as another delivery: its lease ran out and it was taken again).

    async def _set_lease(
        self,
        held: list[tuple[bytes, int]],
        seconds: float | None,
        consumer: str | None = None,
        deadline: float | None = None,
    ) -> list[int]:
        """The leases of the deliveries ``held`` ((id, delivery count) of ``consumer``,
        this handle's by default) end ``seconds`` from now (None: the queue's lease);
        what each delivery is (HELD, GONE or STALE: only a held one is changed)."""
        ms = "" if seconds is None else _ms(seconds)
        args: list[Any] = [ms, int(self.lease * 1000), consumer or self.consumer]
        for eid, count in held:
            args += [eid, count]
        reply = await self._do(
            lambda r: self._scripts["LEASE"](keys=[self.stream], args=args, client=r), deadline
        )
        return [int(x) for x in reply]

    async def _dead_letter(
        self,
        r: Any,
        eid: bytes,
        payload: bytes,
        reason: str,
        headers: bytes | None,
        consumer: str,
        count: int,
    ) -> int:
        """Dead-letter the delivery (``eid``, ``count``) of ``consumer``: HELD, GONE or STALE."""
        return int(
            await self._scripts["DEAD"](
                keys=[self.stream, self.dead],
                args=[eid, payload, self.name, reason, headers or b"", consumer, count],
                client=r,
            )
        )

    async def _settle(
        self,
        eid: bytes,
        consumer: str,
        count: int,
        lost: list[BaseException] | None = None,
    ) -> int:
        """Ack the delivery (``eid``, ``count``) of ``consumer``: HELD (acked now), GONE
        or STALE."""

        async def run(r: Any) -> int:
            return int(
                await self._scripts["SETTLE"](
                    keys=[self.stream], args=[eid, consumer, count], client=r
                )
            )

        return int(await self._do(run, None, lost))

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
        """Extend a message another handle of this queue took (its delivery, not ours)."""
        (held,) = await self._set_lease(
            [(message.id, message.delivery_count)], seconds, message._queue.consumer
        )
        _settled_or_raise("extend", message.id, message.delivery_count, held)

    async def _hand_back(self, got: list[Entry]) -> None:
        """Held entries taken for a caller that was cancelled: their leases end now."""
        await self._set_lease([(g[0], g[1]) for g in got], 0.0)

    async def _append(self, got: list[Entry], dead: int) -> None:
        """Entries taken (acked and deleted) back at the tail of their priority, each with
        its headers and expiry; the first ``dead`` of them to the dead letters instead."""
        args: list[Any] = [dead, self.name]
        for g in got:
            args += [_priority(g[0]), g[2], g[3], g[4]]
        await self._do(
            lambda r: self._scripts["APPEND"](keys=[self.stream, self.dead], args=args, client=r)
        )

    async def _put_back(self, got: list[Entry]) -> None:
        """Items taken for a caller that was cancelled: back, at the tail."""
        await self._append(got, 0)

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
            await self._append([g for g, _ in bad] + [g for g, _ in good], len(bad))
            raise self._decode_error([(g[2], e) for g, e in bad], len(got), bool(good))
        return [body for _, body in good]

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncRedisMessage[T]:
        got = await self._cancel_safe(self._fetch(1, True, timeout, lease), self._hand_back)
        eid, count, payload, headers, expiry = got[0]
        try:
            body = self._ser.loads(payload)
        except Exception as exc:
            await self._do(
                lambda r: self._dead_letter(
                    r, eid, payload, "undecodable", headers, self.consumer, count
                )
            )
            raise self._decode_error([(payload, exc)], 1, False) from exc
        return AsyncRedisMessage(self, eid, count, payload, body, headers, expiry)

    async def _sizes(self) -> tuple[int, int]:
        """(waiting, all): see the QSIZE script."""
        waiting, everything = await self._do(
            lambda r: self._scripts["QSIZE"](
                keys=[self.stream, self.dead], args=self._where(), client=r
            )
        )
        return int(waiting), int(everything)

    async def qsize(self) -> int:
        """Messages waiting: new ones, delayed ones, and those given back (a nack, delayed
        or not; a lease that ended) until a consumer takes them again - not those held."""
        return (await self._sizes())[0]

    async def _release(
        self, eid: bytes, consumer: str, count: int, delay: float, expiry: bytes
    ) -> int:
        """Give the delivery (``eid``, ``count``) of ``consumer`` back: claimable ``delay``
        seconds from now, counted by qsize. HELD (given back now), GONE or STALE."""
        args: list[Any] = [_ms(delay), eid, consumer, count, expiry]
        return int(
            await self._do(
                lambda r: self._scripts["RELEASE"](keys=[self.stream], args=args, client=r)
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
        return (await self._sizes())[1] >= self.maxsize

    async def shutdown(self, immediate: bool = False) -> None:
        await self._do(
            lambda r: self._scripts["SHUTDOWN"](
                keys=[self.stream], args=[1 if immediate else 0], client=r
            )
        )

    # --- administration (``pigeon peek | purge | delete | move``) -----------------------

    async def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        """Up to ``max_items`` waiting messages as they are, taking nothing (no delivery
        count changes): those a take would deliver now, in that order, then the delayed
        ones (a ``due`` key: seconds from now) by due time. See ``pigeon.Queue.peek``."""
        n = check_peek(max_items)
        flat = await self._do(
            lambda r: self._scripts["PEEK"](keys=[self.stream], args=[n, PEEK_BYTES], client=r)
        )
        shown = []
        for i in range(0, len(flat), 8):
            eid, count, payload, headers, origin, reason, age, due = flat[i : i + 8]
            m = shown_message(
                self._ser, eid.decode(), int(count), payload, int(age) / 1000,
                origin.decode(), reason.decode(), _priority(eid),
                _decode_headers(headers) if headers else {},
            )  # fmt: skip
            if int(due) >= 0:
                m["due"] = int(due) / 1000
            shown.append(m)
        return shown

    async def purge(self) -> int:
        """Drop every waiting message, delayed ones too (not those held); how many."""
        dropped = 0
        while True:
            n, more = await self._do(
                lambda r: self._scripts["PURGE"](keys=[self.stream], args=[ADMIN_BATCH], client=r)
            )
            dropped += int(n)
            if not int(more):
                return dropped

    async def delete(self) -> int:
        """Delete the queue: its messages (held ones too), settings and dedup ids; how
        many messages it held. Handles still open on it set it up again when next used."""

        async def wipe(r: Any) -> int:
            n = int(await self._scripts["WIPE"](keys=[self.stream], client=r))
            batch = []
            async for key in r.scan_iter(match=f"{_glob(self.stream)}:dedup:*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await r.delete(*batch)
                    batch.clear()
            if batch:
                await r.delete(*batch)
            return n

        n = int(await self._do(wipe))
        self._ready = False  # the consumer group went with it
        return n

    async def move_to(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` waiting messages (all by default; not delayed ones) to the
        tail of ``queue`` on the same Redis, each with its priority and headers and its
        delivery count afresh, as many as ``queue`` has room for; how many. Each batch is
        one script: a message is in one queue or the other, never both or neither."""
        limit = check_move(self.name, queue, limit)
        same_slot = queue.removesuffix(DEAD_SUFFIX) == self.name.removesuffix(DEAD_SUFFIX)
        if self.kind == "cluster" and not same_slot:
            raise Unsupported(
                f"redis+cluster:// moves messages only between a queue and its dead-letter "
                f"queue (one hash slot, so one script); {self.name!r} and {queue!r} may be "
                "on two nodes"
            )
        target = key_names(queue, hash_tags=self.kind == "cluster")[0]
        moved = 0
        while limit is None or moved < limit:
            batch = ADMIN_BATCH if limit is None else min(ADMIN_BATCH, limit - moved)
            reply = await self._do(
                lambda r, b=batch: self._scripts["MOVE"](
                    keys=[self.stream, target], args=[b], client=r
                )
            )
            if reply == b"SHUTDOWN":
                raise ShutDown(f"queue {queue!r} was shut down; nothing more was moved")
            n, more = int(reply[0]), int(reply[1])
            moved += n
            if not more or not n:
                break
        return moved

    async def aclose(self) -> None:
        if self._settling:  # acks and nacks sent without waiting: let them land first
            await asyncio.gather(*self._settling, return_exceptions=True)
        if not self._closed:
            if self._r is not None and self._ready:
                # hand back what this consumer holds, then leave the group (a server out
                # of reach is not waited for: the leases bring the entries back)
                with contextlib.suppress(Exception):
                    async with within(time.monotonic() + CLOSE_WAIT, "redis"):
                        await self._scripts["LEAVE"](
                            keys=[self.stream], args=[self.consumer, ORPHANS], client=self._r
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


async def _evicting(r: Any) -> str:
    """The server's ``maxmemory-policy`` if it may evict keys (a ``maxmemory`` is set and
    the policy is not ``noeviction``), else ''. A server that does not say (INFO refused
    by an ACL) is taken at its word of nothing."""
    try:
        info = await r.info("memory")
    except Exception:
        return ""
    nodes = info.values() if info and all(isinstance(v, dict) for v in info.values()) else [info]
    for node in nodes:  # a cluster client may answer per node
        policy = str(node.get("maxmemory_policy", "noeviction"))
        if int(node.get("maxmemory", 0) or 0) > 0 and policy != "noeviction":
            return policy
    return ""


def _glob(key: str) -> str:
    """``key`` as a literal in a SCAN pattern (a Cluster's ``{NAME}`` has brackets)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in key)


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


HELD, GONE_ENTRY, STALE = 1, 0, -1  # what a settle script found (``holds`` in _redis_lua)


def _settled_or_raise(
    what: str, eid: bytes, count: int, held: int, lost: list[BaseException] | None = None
) -> None:
    """Raise unless ``held`` says the settle script found delivery ``count`` of ``eid``
    still holding it (and so did ``what``: ack, nack, extend). ``lost``: the connection
    broke after an earlier send of a settle that ends the delivery (an ack, a nack to the
    dead letters), which may have been what ended it."""
    if held == HELD:
        return
    name = eid.decode()
    if held == STALE:  # pending as another delivery: no send of ours settled it
        raise stale_delivery(what, name, count)
    if lost:
        done = "settled it" if what == "ack" else "moved it to the dead letters"
        raise Indeterminate(
            f"cannot tell whether the {what} of {name} took effect: the connection broke "
            f"after the {what} was sent, and on a new connection the entry is no longer "
            f"pending: the first {what} {done}, or another delivery of it (after its lease "
            "ran out) was settled; handlers must be idempotent (at-least-once)"
        )
    # (redis-py may have sent it again itself, after a connection error it retried)
    raise LocalProtocolError(
        f"cannot {what} {name}: it is no longer pending: its lease ran out and another "
        "delivery of it was settled, it was dead-lettered or expired, the queue was "
        "deleted, or an earlier send of this call, whose reply was lost, settled it"
    )


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
        expiry: bytes = b"",
    ) -> None:
        self._queue = queue
        self._payload = payload  # dead-lettered as received, not encoded again
        self._headers = headers
        self._expiry = expiry  # a ttl's end: it may expire once given back
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
        q, lost = self._queue, list[BaseException]()
        held = await q._settle(self.id, q.consumer, self.delivery_count, lost)
        _settled_or_raise("ack", self.id, self.delivery_count, held, lost)

    async def _nack(self, requeue: bool, delay: float, reason: str = "") -> None:
        q, count = self._queue, self.delivery_count
        if not requeue:
            why, lost = reason or "rejected", list[BaseException]()
            held = await q._do(
                lambda r: q._dead_letter(
                    r, self.id, self._payload, why, self._headers, q.consumer, count
                ),
                None,
                lost,
            )
            _settled_or_raise("nack", self.id, count, held, lost)
            return
        # claimable after `delay`
        held = await q._release(self.id, q.consumer, count, delay, self._expiry)
        _settled_or_raise("nack", self.id, count, held)

    async def _extend(self, seconds: float) -> None:
        q = self._queue
        (held,) = await q._set_lease([(self.id, self.delivery_count)], seconds, q.consumer)
        _settled_or_raise("extend", self.id, self.delivery_count, held)

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
