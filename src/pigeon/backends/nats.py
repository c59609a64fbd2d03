"""The nats:// backend: one JetStream work-queue stream per queue, a durable pull
consumer per priority.

Features
    ``put``/``put_many`` (publish, waiting for JetStream's ack), ``get``/``get_many``
    (fetch and ack), ``get_message`` with ``ack``, ``nack(requeue, delay)`` (NAK with a
    delay), ``extend`` (in-progress: the lease, AckWait, starts again), ``delivery_count``
    (the consumer's delivery count, less hand-outs before a message was due), dead
    letters after ``max_deliveries``, ``maxsize`` (MaxMsgs with DiscardNew: a full queue
    refuses puts), ``qsize``/``empty``/``full``, ``shutdown`` for every client,
    iteration; every message option: ``delay``, ``ttl``, ``priority``, ``dedup_id``,
    ``headers`` (layout in ``_natsmsg``); items of any size up to ``max_item_size``
    (those over the server's ``max_payload`` in chunks). ``task_done``/``join`` raise
    ``Unsupported``: JetStream has no server-side wait on a counter. ``pigeon.AsyncQueue``
    runs the same code on asyncio; the blocking face runs it on pigeon's private I/O loop,
    never on a loop the caller is running.

Connection URL
    ``nats://[USER:PASSWORD@|TOKEN@]HOST[:PORT]/QUEUE[?lease=S&max_deliveries=N&
    dedup_window=S&max_item_size=BYTES]``; ``nats+tls://`` (or ``?tls=1``) for TLS. The
    queue ``jobs`` is the stream ``PIGEON_jobs`` on the subjects ``pigeon.jobs`` (priority 0) and
    ``pigeon-p1.jobs`` ... ``pigeon-p9.jobs``; its large items' chunks are in
    ``PIGEON-CHUNKS_jobs``, its dedup ids (for their window, across a server restart) in
    the key-value bucket ``PIGEON-IDS_jobs``.

Options
    ``maxsize``, ``serializer`` (``"msgpack"``), ``lease`` (30 s; the consumer's AckWait
    is the longest lease a handle opened with - raised, never lowered - and a shorter one
    is kept on its handle by a NAK: docs/backends.md),
    ``max_deliveries`` (20), ``dedup_window`` (the stream's duplicate window, 300 s for a
    new stream; 0: no dedup ids sent), ``reconnect_timeout`` (30 s), ``connect_timeout`` (10 s,
    each attempt at a server), ``max_item_size`` (bytes, 64 MiB); ``lease``,
    ``max_deliveries`` and ``dedup_window`` also in the URL, the keyword winning
    (``QueueOptions.from_url``).

Delivery guarantees
    At-least-once for ``get_message``: JetStream redelivers a message that is not acked
    within the lease, whether its consumer died (then after AckWait) or is only slow. A lease asked
    for one message (``get_message(lease=)``, ``extend(seconds)``) means exactly "now +
    seconds": a longer one is kept by in-progress signals sent on pigeon's I/O loop, a
    shorter one ends with a NAK (if the holder dies first, AckWait applies). An ack, nack
    or extend is for one delivery: JetStream would act on a late one sent on an old
    delivery's reply subject, so once this delivery's AckWait may have run out pigeon
    first asks (one round trip; none within the lease) whether the message was delivered
    again - each redelivery records its delivery count (``_claim``) - and then refuses
    it with ``LocalProtocolError``, changing nothing, as on pigeon:// and redis://; a
    late call before anyone took it again still counts. Plain
    ``get`` acks on receipt, once the payload decoded (an undecodable one goes to
    ``QUEUE.dead``, reason ``undecodable``; the rest of its batch is redelivered). A
    batch put on a bounded queue is all or none even with concurrent producers (a short
    lock per queue in the ``PIGEON_LOCKS`` key-value bucket). Higher priority first, FIFO
    within one. A delayed message is never handed to a caller before it is due (a reader
    handed it early gives it back with a NAK delayed until then); one past its ttl goes
    to ``QUEUE.dead`` (reason ``expired``) when a reader meets it. An item stored in
    chunks is delivered whole or not at all: its manifest, published last, is what
    readers take. Headers travel exactly: those NATS would alter go escaped
    (``_natsheaders``). ``qsize`` counts what waits, delayed messages and those given
    back by a nack included (a mark in the ``PIGEON-NACKED`` stream until fetched again).
    Durability is JetStream's: file storage, synced to disk every two minutes by default
    (``sync_interval`` in the server's configuration; ``always`` for every write); delays
    and expiries are in the stored messages and survive a restart. A shut-down queue
    takes no more puts (its stream stops listening on its subjects) and readers stop once
    it is drained; waits run in slices of at most 0.2 s so a blocked reader sees the
    shutdown - and a message of priority above 0 put or come due - within that. FIFO per
    priority except redeliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import quote

from pigeon._queue_base import deadline_from
from pigeon.backends._admin import PEEK_BYTES, check_move, check_peek, shown_message
from pigeon.backends._asyncbase import EngineQueue, within
from pigeon.backends._natsheaders import OWN, block_size, from_nats, to_nats
from pigeon.backends._natsmsg import (
    CHUNKED,
    DUE,
    EXPIRES,
    LEVELS,
    Manifest,
    chunk_bounds,
    level_durable,
    level_of,
    level_subject,
    read_time,
    timing,
)
from pigeon.backends._natspull import ConsumerMissing, Pulls, asked_at
from pigeon.backends._retry import Backoff, reply_deadline
from pigeon.backends._settle import stale_delivery
from pigeon.backends._syncface import SyncFace
from pigeon.backends._url import QueueURL
from pigeon.errors import (
    BrokenResourceError,
    ClosedResourceError,
    Empty,
    Full,
    InvalidURL,
    LocalProtocolError,
    PigeonError,
    ShutDown,
    TooLarge,
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
from pigeon.protocol.rules import MAX_SECONDS, check_seconds
from pigeon.serializers import SerializerLike, get_serializer

T = TypeVar("T")
log = logging.getLogger("pigeon.nats")

DURABLE = level_durable(0)
LOCKS = "PIGEON_LOCKS"  # key-value bucket: one short lock per bounded queue, for batches
LOCK_TTL = 30.0  # seconds: a producer that dies holding the lock holds it no longer
SLICE = 0.2
_FIT_TRIES = 8  # reads of a consumer's AckWait at open, each after a raise
ACK_WAIT_REREAD = 1.0  # seconds: a handle reads its consumers' AckWait again this often
SHUTDOWN_MARK = "pigeon: shut down"
DEFAULT_MAX_ITEM_SIZE = 64 * 2**20  # bytes: items beyond the server's max_payload go in chunks
CHUNKS_IN_FLIGHT = 8  # chunks published (or read) at once: memory stays a few MiB
# Deliveries given back by a nack (delayed or not) are in no count JetStream gives - not
# pending, only "ack pending" like the ones held - so each leaves a mark here, one subject
# per message (pigeon-nacked.STREAM.SEQ), until it is fetched again: qsize counts them.
# A delayed message handed out before it was due leaves another, pigeon-nacked.STREAM.
# early.SEQ, holding JetStream's delivery count at that hand-out: those deliveries reached
# no handler, so Message.delivery_count leaves them out. A message delivered again leaves
# a third, pigeon-nacked.STREAM.held.SEQ, holding JetStream's delivery count of the
# delivery that holds it now: a settle from an earlier delivery, whose lease ran out, is
# refused (JetStream itself acts on any delivery's ack). No queue's stream is named so
# (theirs start with "PIGEON_").
NACKED = "PIGEON-NACKED"
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_\-.]+$")


def stream_name(queue: str) -> str:
    """A JetStream stream name for ``queue`` (no dots or wildcards; unique per queue)."""
    safe = re.sub(r"[^A-Za-z0-9_\-]", "_", queue)
    if safe != queue:
        safe += "_" + hashlib.sha1(queue.encode()).hexdigest()[:8]
    return f"PIGEON_{safe}"


def chunk_stream_name(queue: str) -> str:
    """The stream that holds the chunks of ``queue``'s large items."""
    return "PIGEON-CHUNKS" + stream_name(queue).removeprefix("PIGEON")


def ids_bucket_name(queue: str) -> str:
    """The key-value bucket that remembers ``queue``'s dedup ids for its window (its
    stream is ``KV_`` and this name)."""
    return "PIGEON-IDS" + stream_name(queue).removeprefix("PIGEON")


def _id_key(msg_id: str) -> str:
    """The key of a dedup id (as its ``Nats-Msg-Id``) in the id bucket: a key may hold
    only ``[-/_=.A-Za-z0-9]``, so the id's SHA-256, in hex."""
    return hashlib.sha256(msg_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass
class _Delivery:
    """A message as JetStream handed it to this consumer, read for pigeon."""

    msg: Any  # nats-py's Msg
    level: int  # its priority
    count: int  # pigeon's delivery count: JetStream's less the hand-outs before it was due
    early: int  # hand-outs before it was due (their mark goes once it is settled)
    payload: bytes  # the item (put back together when it was stored in chunks)
    manifest: Manifest | None = None  # where its chunks are, for one stored so
    asked: float = 0.0  # time.monotonic() when the pull that brought it was sent

    @property
    def delivered(self) -> int:
        """JetStream's delivery count (the hand-outs before it was due included)."""
        return self.count + self.early


@dataclasses.dataclass
class _Stored:
    """A message read from the queue's stream by sequence, for administration."""

    raw: Any  # nats-py's RawStreamMsg
    level: int
    count: int  # deliveries to a handler so far (a given-back message's mark says)
    due: float | None  # wall-clock time it is due, if later than now
    back: bool  # given back (nacked, or handed out before it was due)


def _stored_at(raw: Any) -> float:
    """When JetStream stored ``raw`` (epoch seconds; now if it does not say)."""
    when: Any = getattr(raw, "time", None)
    return float(when.timestamp()) if when is not None else time.time()


class AsyncNatsQueue(EngineQueue[T]):
    """The asyncio implementation; ``NatsQueue`` is its blocking face."""

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
        max_item_size: int | None = None,
    ) -> None:
        self.options = opts = QueueOptions.from_url(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        try:
            import nats  # noqa: F401
        except ImportError as exc:
            raise Unsupported("nats:// needs nats-py: pip install 'pigeon-queue[nats]'") from exc
        ep = QueueURL(url, ("nats", "nats+tls"), 4222, many=True)
        self.url = url
        self.engine = "nats"
        self.name = ep.queue
        if not _SUBJECT_TOKEN.match(self.name) or ".." in self.name:
            raise InvalidURL(
                f"{url!r} names no usable queue: write nats://HOST:4222/QUEUE, QUEUE made of "
                "letters, digits, '_', '-' and '.'"
            )
        # JetStream keeps durations in whole nanoseconds and reads 0 as "the default" (30 s
        # for AckWait, 2 min for the duplicate window): pigeon rounds them up to whole
        # milliseconds, as on redis://, so a short one never becomes a long one
        self._lease_given = _whole_ms(opts.lease)
        self.lease = self._lease_given or DEFAULT_LEASE
        # the stream's duplicate window; 0: this handle's dedup ids are not sent (no dedup)
        self._window_given = _whole_ms(opts.dedup_window, zero=True)
        self.dedup_window = self._window_given or DEFAULT_DEDUP_WINDOW
        self.max_deliveries = opts.max_deliveries or DEFAULT_MAX_DELIVERIES
        self.max_item_size = _max_item_size(ep, max_item_size)
        tls = ep.scheme == "nats+tls" or ep.flag("tls")
        scheme = "tls" if tls else "nats"
        # every seed server of a cluster; the client follows the cluster from there
        self._servers = [f"{scheme}://{h}:{p}" for h, p in ep.hosts]
        self._hostlist = ",".join(f"{h}:{p}" for h, p in ep.hosts)
        self.replicas = int(ep.count("replicas", 1) or 1)
        self._user = ep.username
        self._password = ep.password
        self._ser = get_serializer(opts.serializer)
        self.maxsize = opts.maxsize
        self.reconnect_timeout = opts.reconnect_timeout
        self.subject = level_subject(self.name, 0)
        self.stream = stream_name(self.name)
        self.chunk_stream = chunk_stream_name(self.name)
        self.ids_bucket = ids_bucket_name(self.name)
        self.server_version: tuple[int, int, int] = (0, 0, 0)  # of the server connected to
        self._nc: Any = None
        self._js: Any = None
        self._pulls: Pulls | None = None
        self._consumers: set[int] = set()  # levels whose consumer this handle made sure of
        # level -> its consumer's AckWait as last read (or set) here: a delivery is trusted
        # to hold its message no longer than that (``AsyncNatsMessage._fresh``)
        self._ack_waits: dict[int, float] = {}
        self._ack_waits_read = 0.0  # time.monotonic() of the last reading (``_reread``)
        # messages handed out and not settled: a shorter AckWait read lowers their trust
        self._held: weakref.WeakSet[AsyncNatsMessage[T]] = weakref.WeakSet()
        self._calm = False  # the last round saw no message above priority 0
        self._chunks_ready = False
        self._ids: Any = None  # the id bucket (nats-py's KeyValue), on this connection
        self._dead: AsyncNatsQueue[Any] | None = None  # NAME.dead, opened at its first use
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._settling: set[asyncio.Future[None]] = set()  # acks not yet confirmed

    # --- plumbing -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._do(lambda js: self._ensure(js))

    async def _jetstream(self) -> Any:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        if self._nc is not None and not self._nc.is_closed:
            return self._js
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # concurrent first calls share one connection
            if self._nc is None or self._nc.is_closed:
                import nats

                options: dict[str, Any] = {
                    "servers": self._servers,
                    "error_cb": _log_error,  # pigeon raises what matters, translated
                    "connect_timeout": self.options.connect_timeout,
                    # in a cluster the client moves to another server by itself; pigeon's
                    # own retry (Backoff) covers the rest
                    "max_reconnect_attempts": 2 * len(self._servers),
                    "reconnect_time_wait": 0.5,
                }
                if self._user and self._password is not None:
                    options.update(user=self._user, password=self._password)
                elif self._user:
                    options["token"] = self._user
                nc = await nats.connect(**options)
                js = nc.jetstream()
                try:
                    await self._ensure(js)
                    pulls = Pulls(nc, self.stream)
                    await pulls.start()
                except BaseException:
                    await nc.close()
                    raise
                version = nc.connected_server_version
                self.server_version = (version.major, version.minor, version.patch)
                self._nc, self._js, self._pulls = nc, js, pulls
        return self._js

    async def _ensure(self, js: Any) -> None:
        """Create (or adopt) the stream, with a subject per priority, and the durable pull
        consumer of priority 0 (those of the others are made when first needed)."""
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        subjects = [level_subject(self.name, level) for level in LEVELS]
        try:
            info = await js.stream_info(self.stream)
            config = info.config
            changed = False
            if self.maxsize and config.max_msgs != self.maxsize:
                config.max_msgs = self.maxsize
                config.discard = DiscardPolicy.NEW
                changed = True
            elif not self.maxsize and config.max_msgs and config.max_msgs > 0:
                self.maxsize = int(config.max_msgs)
            window = float(config.duplicate_window or 0)
            if self._window_given and abs(window - self._window_given) > 1e-6:
                config.duplicate_window = self._window_given  # for every client from now on
                changed = True
            elif self._window_given is None and window > 0:
                self.dedup_window = window
            missing = set(subjects) - set(config.subjects or [])
            if missing and config.description != SHUTDOWN_MARK:
                # a stream made before priorities: its level subjects are added (a shut-down
                # one listens on none and stays so)
                config.subjects = sorted({*(config.subjects or []), *subjects})
                changed = True
            if changed:
                await js.update_stream(config)
            if self._window_given and abs(window - self._window_given) > 1e-6:
                with contextlib.suppress(NotFoundError):  # no dedup put yet: no bucket
                    await self._fit_ids(js, await js.stream_info("KV_" + self.ids_bucket))
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.stream, subjects=subjects,
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                    max_msgs=self.maxsize or -1, discard=DiscardPolicy.NEW,
                    num_replicas=self.replicas, duplicate_window=self.dedup_window,
                )
            )  # fmt: skip
        self._consumers = set()
        await self._fit_consumer(js, 0)
        self._ack_waits_read = time.monotonic()

    def _consumer_config(self, level: int) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig

        return ConsumerConfig(
            durable_name=level_durable(level), ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.lease, max_deliver=-1,
            filter_subject=level_subject(self.name, level), max_ack_pending=-1,
        )  # fmt: skip

    async def _fit_consumer(self, js: Any, level: int) -> None:
        """Make sure of the consumer of ``level``: made with this handle's lease as its
        AckWait if missing; an existing one's AckWait is raised to this handle's lease,
        never lowered. The consumer is shared by every handle on the queue: lowering it
        would end the deliveries other handles hold sooner than they count on (they would
        settle what another consumer holds by then). A lease shorter than the AckWait is
        kept on this handle, by a NAK when it ends (``AsyncNatsMessage._keep``)."""
        from nats.js.errors import NotFoundError

        # Read, raise if lower, read again: two handles that open at once each write what
        # they read, so the last write may be the shorter lease (review 7b #3); the one
        # whose lease is longer reads that and raises it again, until what is read holds.
        for _ in range(_FIT_TRIES):
            try:
                current = (await js.consumer_info(self.stream, level_durable(level))).config
            except NotFoundError:
                await js.add_consumer(self.stream, self._consumer_config(level))
                continue  # read what was made (another handle may have made it at once)
            ack_wait = float(current.ack_wait or DEFAULT_LEASE)
            if self._lease_given is not None and ack_wait < self.lease - 1e-6:
                await js.add_consumer(self.stream, self._consumer_config(level))  # raised
                continue
            if self._lease_given is None and level == 0:
                self.lease = ack_wait  # no lease asked for: the queue's
            break
        else:
            raise Unavailable(
                f"nats: the consumer of {self.name!r} kept an AckWait shorter than this "
                f"handle's lease ({self.lease:g} s) after {_FIT_TRIES} raises: another "
                "program lowers it (an older pigeon, `nats consumer edit`); give every "
                "handle on the queue the same lease"
            )
        self._learn(level, ack_wait)
        self._consumers.add(level)

    async def _ensure_level(self, js: Any, level: int) -> None:
        """The consumer of ``level``, made (with this handle's lease) when first needed."""
        if level not in self._consumers:
            await self._fit_consumer(js, level)

    def _ack_wait(self, level: int) -> float:
        """The AckWait of ``level``'s consumer as last read here."""
        return self._ack_waits.get(level, self.lease)

    def _learn(self, level: int, ack_wait: float) -> None:
        """``level``'s consumer has AckWait ``ack_wait`` now. Shorter than read before
        (set so by something other than a pigeon handle opening: an older pigeon, an
        administrator): the messages held here trust their delivery no longer than it."""
        before = self._ack_waits.get(level)
        self._ack_waits[level] = ack_wait
        if before is not None and ack_wait < before:
            for m in list(self._held):
                if m._delivery.level == level:
                    m._distrust(ack_wait)

    async def _reread(self, js: Any) -> None:
        """Read the AckWait of the consumers this handle uses again (at most once every
        ``ACK_WAIT_REREAD`` seconds, alongside a fetch): another client may have changed
        it - raised it (a handle opened with a longer lease), or, outside pigeon's own
        open path, lowered it."""
        from nats.js.errors import NotFoundError

        self._ack_waits_read = time.monotonic()
        levels = sorted(self._consumers)

        async def one(level: int) -> float | None:
            try:
                info = await js.consumer_info(self.stream, level_durable(level))
            except NotFoundError:
                return None
            return float(info.config.ack_wait or DEFAULT_LEASE)

        try:
            found = await asyncio.gather(*(one(lv) for lv in levels))
        except Exception as exc:  # the fetch goes on; read again at the next round
            log.debug("nats: the consumers' AckWait not read again: %s", exc)
            self._ack_waits_read = 0.0
            return
        for level, ack_wait in zip(levels, found, strict=True):
            if ack_wait is not None:
                self._learn(level, ack_wait)
                if self._lease_given is None and level == 0:
                    self.lease = ack_wait

    def _reread_due(self) -> bool:
        return time.monotonic() - self._ack_waits_read >= ACK_WAIT_REREAD

    def _kept_fresh(self, level: int) -> float:
        """How long a delivery taken but not handed out yet is kept (``Pulls.pull``)."""
        return min(self.lease, self._ack_wait(level)) / 2

    async def _do(self, fn: Any, deadline: float | None = None) -> Any:
        """Run ``fn(jetstream)``; translate nats-py errors; retry until the call's deadline
        (or ``reconnect_timeout``), each attempt cut at its reply deadline."""
        import nats.js.errors as jerr

        _LOST_CONNECTION = _lost_connection()
        _BUSY = _busy()

        backoff = Backoff(deadline, self.reconnect_timeout)
        remade = False
        while True:
            try:
                return await fn(await self._jetstream())
            except _LOST_CONNECTION as exc:
                if (wait := backoff.next_delay()) is None:
                    raise BrokenResourceError(f"nats: {exc or type(exc).__name__}") from exc
                await self._reset()
                await asyncio.sleep(wait)
            except _BUSY as exc:
                # a stream or meta leader is being elected (a node died): ask again soon
                if (wait := backoff.next_delay()) is None:
                    raise BrokenResourceError(
                        f"nats: JetStream did not answer ({exc or type(exc).__name__})"
                    ) from exc
                await asyncio.sleep(wait)
            except jerr.NotFoundError as exc:
                if not remade and await self._stream_gone():
                    # the queue was deleted (``delete``) under this handle: made again
                    remade = True
                    await self._reset()
                    continue
                raise PigeonError(f"JetStream refused the request: {exc}") from exc
            except jerr.APIError as exc:
                raise PigeonError(f"JetStream refused the request: {exc}") from exc

    async def _stream_gone(self) -> bool:
        """Is the queue's stream missing (deleted while this handle was open)?"""
        from nats.js.errors import NotFoundError

        if self._js is None:
            return False
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            return True
        except Exception:
            return False
        return False

    async def _reset(self) -> None:
        nc, self._nc, self._pulls, self._ids = self._nc, None, None, None
        if nc is not None:
            try:
                await nc.close()
            except Exception:  # closing a broken connection: nothing more to lose, but
                _finish_close(nc)  # what nats-py left undone when it stopped at the error

    # --- the contract ---------------------------------------------------------------------

    supports: ClassVar[frozenset[str]] = frozenset({"delay", "ttl", "dedup", "priority", "headers"})

    async def _put(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
        *,
        own: dict[str, str] | None = None,
        remember: bool = True,
    ) -> None:
        """``own``: pigeon's headers (``Pigeon-*``), sent as they are. ``remember``: the
        ``dedup_ids`` are a caller's, kept in the id bucket too (pigeon's own ids, for a
        move or a dead letter sent again, need JetStream's window only)."""
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "nats"):
            # A publish whose ack was lost (a node died, a leader changed) is sent again with
            # the same id: JetStream keeps one copy (within the stream's duplicate window,
            # the queue's dedup_window). A dedup_id is that id: a repeat within the window is
            # confirmed and not stored again. With dedup_window=0 it is not sent. JetStream
            # rebuilds its duplicate map after a restart from the messages still stored only,
            # so a dedup_id is also kept in the queue's id bucket (file storage, ttl = the
            # window): looked up before the publish, recorded after it (see _recall).
            if options is not None and options.dedup_id:
                dedup_ids = [options.dedup_id]
            if self._window_given == 0:
                dedup_ids = None
            ids = [_msg_id(i) for i in dedup_ids] if dedup_ids else _msg_ids(len(payloads))
            remember = remember and bool(dedup_ids)
            payloads = list(payloads)
            if remember:
                known = await self._do(lambda js: self._recall(js, ids), deadline)
                if known:  # repeats within the window: confirmed, not stored again
                    keep = [i for i in range(len(ids)) if i not in known]
                    payloads, ids = [payloads[i] for i in keep], [ids[i] for i in keep]
                    if not ids:
                        return
            extra = to_nats(options.headers) if options is not None and options.headers else {}
            extra.update(timing(options, time.time()))
            extra.update(own or {})
            subject = level_subject(self.name, (options.priority or 0) if options else 0)
            # every header the server gets is here, so the size check counts them all
            hdrs = [{**extra, "Nats-Msg-Id": i, "Nats-Expected-Stream": self.stream} for i in ids]
            large = await self._do(lambda js: self._large(payloads, hdrs), deadline)
            stored: list[tuple[int, Manifest]] = []
            try:
                for i in large:  # every chunk stored before its manifest is published
                    manifest = await self._do(
                        lambda js, p=payloads[i]: self._store_chunks(js, p), deadline
                    )
                    stored.append((i, manifest))
                    payloads[i] = manifest.encode()
                    hdrs[i] = {**hdrs[i], CHUNKED: "1"}
                acks = await self._publish(subject, payloads, hdrs, deadline)
            except BaseException:
                if stored:  # nothing refers to them: they go (a crash leaves them unseen)
                    await self._drop_chunks([m for _, m in stored])
                raise
            repeated = {i for i, ack in enumerate(acks) if getattr(ack, "duplicate", False)}
            if remember:
                fresh = [i for i in range(len(acks)) if i not in repeated]
                pairs = [(ids[i], int(acks[i].seq)) for i in fresh]
                late = await self._do(lambda js: self._record(js, pairs), deadline)
                repeated |= {i for i in fresh if int(acks[i].seq) in late}
            repeats = [m for i, m in stored if i in repeated]
            if repeats:  # a dedup_id repeated: the first put's item is the one kept
                await self._drop_chunks(repeats)

    async def _id_bucket(self, js: Any) -> Any:
        """The queue's id bucket (made at its first dedup put), its ttl the window."""
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BadRequestError, NotFoundError

        if self._ids is None:
            try:
                await self._fit_ids(js, await js.stream_info("KV_" + self.ids_bucket))
            except NotFoundError:
                with contextlib.suppress(BadRequestError):  # made by another client meanwhile
                    await js.create_key_value(
                        KeyValueConfig(
                            bucket=self.ids_bucket, history=1, ttl=_ids_ttl(self.dedup_window),
                            storage=StorageType.FILE, replicas=self.replicas,
                        )
                    )  # fmt: skip
            self._ids = await js.key_value(self.ids_bucket)
        return self._ids

    async def _fit_ids(self, js: Any, info: Any) -> None:
        """Give the id bucket (``info``: its stream's) the queue's window as its ttl."""
        config = info.config
        ttl = _ids_ttl(self.dedup_window)
        if abs(float(config.max_age or 0) - ttl) > 1e-6:
            config.max_age = ttl
            config.duplicate_window = min(float(config.duplicate_window or ttl), ttl)
            await js.update_stream(config)

    async def _recall(self, js: Any, ids: list[str]) -> set[int]:
        """Which of ``ids`` (``Nats-Msg-Id`` values) the id bucket holds: put within the
        window, whatever the server forgot in a restart since."""
        from nats.js.errors import KeyNotFoundError

        kv = await self._id_bucket(js)

        async def held(msg_id: str) -> bool:
            try:
                await kv.get(_id_key(msg_id))
            except KeyNotFoundError:
                return False
            return True

        found = await asyncio.gather(*(held(i) for i in ids))
        return {i for i, yes in enumerate(found) if yes}

    async def _record(self, js: Any, stored: list[tuple[str, int]]) -> set[int]:
        """Keep the ids of messages just stored (id, stream sequence) in the id bucket,
        each created only if absent (an atomic test-and-set). One already there for
        another message - a put of the same id between this put's look-up and now, across
        a restart - makes this message the repeat: deleted (unless a reader took it
        already); the sequences of those deleted. Recorded after the publish, so a crash
        between the two loses no message: it leaves the id to JetStream's window only."""
        import nats.errors as nerr
        from nats.js.errors import (
            KeyNotFoundError,
            KeyWrongLastSequenceError,
            NoStreamResponseError,
            NotFoundError,
        )

        kv = await self._id_bucket(js)

        async def one(msg_id: str, seq: int) -> int | None:
            key, mine = _id_key(msg_id), str(seq).encode()
            try:
                await kv.create(key, mine)
                return None
            except KeyWrongLastSequenceError:
                try:
                    if (await kv.get(key)).value == mine:
                        return None  # this put's own record (an attempt whose reply was lost)
                except KeyNotFoundError:
                    return None  # that record's window ended just now: this message stays
            with contextlib.suppress(NotFoundError):  # taken meanwhile: a repeat delivered
                await js.delete_msg(self.stream, seq)
            return seq

        done = await asyncio.gather(*(one(i, seq) for i, seq in stored), return_exceptions=True)
        if any(isinstance(d, nerr.NoRespondersError | NoStreamResponseError) for d in done):
            # the bucket went (the queue was deleted) since this handle opened it: made
            # again, and every id recorded anew
            self._ids = None
            kv = await self._id_bucket(js)
            done = await asyncio.gather(*(one(i, seq) for i, seq in stored))
        for d in done:
            if isinstance(d, BaseException):
                raise d
        return {d for d in done if isinstance(d, int)}

    async def _publish(
        self, subject: str, payloads: list[bytes], hdrs: list[dict[str, str]],
        deadline: float | None,
    ) -> list[Any]:  # fmt: skip
        """Publish, waiting for room on a bounded queue; JetStream's acks, in order."""
        import nats.errors as nerr
        import nats.js.errors as jerr

        if self.maxsize and len(payloads) > 1:
            return await self._put_batch_locked(subject, payloads, hdrs, deadline)
        delay = 0.001
        acks: list[Any] = []
        unanswered = Backoff(deadline, self.reconnect_timeout)
        while True:

            async def publish(js: Any) -> None:
                rest = list(zip(payloads[len(acks) :], hdrs[len(acks) :], strict=True))
                if len(rest) > 1:  # many in flight, then gather the acks
                    pending = [await js.publish_async(subject, p, headers=h) for p, h in rest]
                    acks.extend(await asyncio.gather(*pending))
                    return
                for p, h in rest:
                    acks.append(await js.publish(subject, p, headers=h))

            try:
                await self._do(
                    lambda js: self._with_room(js, len(payloads) - len(acks), publish), deadline
                )
                return acks
            except _NoRoom:
                pass
            except (nerr.NoRespondersError, jerr.NoStreamResponseError) as exc:
                if await self._is_shut_down(deadline):
                    raise ShutDown("the queue was shut down; put refused") from None
                # no stream leader right now (a cluster electing one): try again
                if (wait := unanswered.next_delay()) is None:
                    raise BrokenResourceError(f"nats: no stream answers {subject}") from exc
                await asyncio.sleep(wait)
                continue
            if await self._is_shut_down(deadline):
                raise ShutDown("the queue was shut down; put refused")
            if deadline is not None and time.monotonic() >= deadline:
                raise Full(f"queue {self.name!r} is full (maxsize={self.maxsize})")
            await asyncio.sleep(min(delay, max(0.0, (deadline or 1e18) - time.monotonic())))
            delay = min(delay * 2, 0.05)

    async def _large(self, payloads: list[bytes], hdrs: list[dict[str, str]]) -> list[int]:
        """Which payloads go in chunks: those that do not fit the server's max_payload with
        their headers (it counts both, and drops a connection that sends more). Refuses,
        before anything is sent, an item over ``max_item_size``."""
        await self._jetstream()
        limit = int(getattr(self._nc, "max_payload", 0) or 0)
        for p in payloads:
            if len(p) > self.max_item_size:
                raise TooLarge(
                    f"an item of {len(p)} bytes is larger than max_item_size="
                    f"{self.max_item_size} (?max_item_size= in the URL, or the keyword, raises "
                    "it); nothing was sent"
                )
        if not limit:
            return []
        large = [i for i, (p, h) in enumerate(zip(payloads, hdrs, strict=True))
                 if len(p) + block_size(h) > limit]  # fmt: skip
        for i in large:
            head = block_size({**hdrs[i], CHUNKED: "1"})
            if head + 4096 > limit:  # room for a manifest, whatever the item's size
                raise TooLarge(
                    f"an item's {head} bytes of headers leave no room under the NATS "
                    f"server's max_payload={limit}; put fewer or smaller headers; nothing "
                    "was sent"
                )
        return large

    async def _ensure_chunks(self, js: Any) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError

        if self._chunks_ready:
            return
        try:
            await js.stream_info(self.chunk_stream)
        except NotFoundError:
            with contextlib.suppress(BadRequestError):  # made by another client meanwhile
                await js.add_stream(
                    StreamConfig(
                        name=self.chunk_stream, subjects=[f"pigeon-chunks.{self.name}.*"],
                        storage=StorageType.FILE, num_replicas=self.replicas,
                        allow_direct=True,  # chunks read from any replica, raw
                    )
                )  # fmt: skip
        self._chunks_ready = True

    async def _store_chunks(self, js: Any, payload: bytes) -> Manifest:
        """Store ``payload`` in chunks under a subject of its own; the manifest that names
        them. Each chunk has an id, so a retried attempt stores none twice."""
        await self._ensure_chunks(js)
        item = uuid.uuid4().hex
        subject = f"pigeon-chunks.{self.name}.{item}"

        def head(i: int) -> dict[str, str]:
            return {"Nats-Msg-Id": f"{item}-{i}", "Nats-Expected-Stream": self.chunk_stream}

        limit = int(self._nc.max_payload)
        bounds = chunk_bounds(len(payload), limit - block_size(head(len(payload))))
        seqs: list[int] = []
        for start in range(0, len(bounds), CHUNKS_IN_FLIGHT):
            pending = [
                await js.publish_async(subject, payload[a:b], headers=head(start + k))
                for k, (a, b) in enumerate(bounds[start : start + CHUNKS_IN_FLIGHT])
            ]
            seqs += [int(ack.seq) for ack in await asyncio.gather(*pending)]
        return Manifest(self.chunk_stream, subject, len(payload), tuple(seqs))

    async def _drop_chunks(self, manifests: list[Manifest]) -> None:
        """Delete the chunks of items taken for good (or never published). Housekeeping:
        it never fails the call (left over, they take room but nothing reads them)."""

        async def purge(js: Any) -> None:
            for m in manifests:
                await js.purge_stream(m.stream, subject=m.subject)

        try:
            await self._do(purge, time.monotonic() + 10)
        except (PigeonError, asyncio.CancelledError) as exc:
            log.warning("nats: chunks of %d item(s) left over: %s", len(manifests), exc)

    async def _assemble(self, m: Manifest) -> bytes | None:
        """The item ``m`` names, put back together; None if a chunk is gone (the item was
        taken for good by another consumer meanwhile: see ``_inspect``)."""
        from nats.js.errors import NotFoundError

        async def one(js: Any, seq: int) -> Any:
            try:  # any replica answers a direct get: one not caught up may not have it
                return await js.get_msg(m.stream, seq, direct=True)
            except NotFoundError:
                try:
                    return await js.get_msg(m.stream, seq)  # the stream's leader
                except NotFoundError:
                    return None

        parts: list[bytes] = []
        size = 0
        for start in range(0, len(m.seqs), CHUNKS_IN_FLIGHT):
            window = m.seqs[start : start + CHUNKS_IN_FLIGHT]
            got = await self._do(lambda js, w=window: asyncio.gather(*(one(js, s) for s in w)))
            for raw in got:
                if raw is None or raw.subject != m.subject:
                    return None
                data = raw.data or b""
                size += len(data)
                if size > m.size:
                    return None
                parts.append(data)
        return b"".join(parts) if size == m.size else None

    async def _put_batch_locked(
        self, subject: str, payloads: list[bytes], hdrs: list[dict[str, str]],
        deadline: float | None,
    ) -> list[Any]:  # fmt: skip
        """A batch on a bounded queue, all or none: under a per-queue lock, check the room,
        then publish; concurrent batches take turns instead of splitting each other."""
        delay = 0.005
        while True:
            async with self._lock_queue(deadline):
                info = await self._do(lambda js: js.stream_info(self.stream), deadline)
                if info.config.description == SHUTDOWN_MARK:
                    raise ShutDown("the queue was shut down; put refused")
                if info.state.messages + len(payloads) <= self.maxsize:

                    async def publish(js: Any) -> list[Any]:
                        acks = [
                            await js.publish_async(subject, p, headers=h)
                            for p, h in zip(payloads, hdrs, strict=True)
                        ]
                        return list(await asyncio.gather(*acks))

                    result: list[Any] = await self._do(publish, deadline)
                    return result
            if deadline is not None and time.monotonic() >= deadline:
                raise Full(f"queue {self.name!r} is full (maxsize={self.maxsize})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    @contextlib.asynccontextmanager
    async def _lock_queue(self, deadline: float | None) -> AsyncIterator[None]:
        from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError

        async def bucket(js: Any) -> Any:
            try:
                return await js.key_value(LOCKS)
            except BucketNotFoundError:
                from nats.js.api import KeyValueConfig

                return await js.create_key_value(
                    KeyValueConfig(bucket=LOCKS, ttl=LOCK_TTL, replicas=self.replicas)
                )

        kv = await self._do(bucket, deadline)
        delay = 0.002
        while True:
            try:
                revision = await kv.create(self.stream, b"locked")
                break
            except KeyWrongLastSequenceError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise Full(
                        f"queue {self.name!r}: another producer's batch held it past the timeout"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await kv.delete(self.stream, last=revision)

    async def _with_room(self, js: Any, n: int, publish: Any) -> None:
        # A batch goes in whole or not at all: check the room first (DiscardNew would
        # otherwise keep the first items of a batch that does not fit).
        if self.maxsize:
            info = await js.stream_info(self.stream)
            if info.config.description == SHUTDOWN_MARK:
                raise _NoRoom
            if info.state.messages + n > self.maxsize:
                raise _NoRoom
        try:
            await publish(js)
        except Exception as exc:  # JetStream's "maximum messages exceeded"
            if "maximum messages" in str(exc):
                raise _NoRoom from exc
            raise

    async def _is_shut_down(self, deadline: float | None = None) -> bool:
        info = await self._do(lambda js: js.stream_info(self.stream), deadline)
        return bool(info.config.description == SHUTDOWN_MARK)

    # --- taking ---------------------------------------------------------------------------

    async def _fetch(self, n: int, block: bool, timeout: float | None) -> list[_Delivery]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "nats"):
            while True:
                left = SLICE if deadline is None else deadline - time.monotonic()
                wait = min(SLICE, left) if left > 0.005 else 0.0
                got, info = await self._do(lambda js, w=wait: self._pull(js, n, w), deadline)
                live = [d for d in [await self._inspect(lv, m) for lv, m in got] if d is not None]
                if live:
                    return live
                if got:
                    continue
                if info.config.description == SHUTDOWN_MARK and info.state.messages == 0:
                    raise ShutDown("the queue was shut down and is drained")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Empty(f"queue {self.name!r} is empty")

    async def _pull(self, js: Any, n: int, wait: float) -> tuple[list[tuple[int, Any]], Any]:
        """One round: up to ``n`` messages, from the highest priority holding any down;
        waiting up to ``wait`` seconds on priority 0 when none is there at all (a message
        of another priority put meanwhile, or coming due there, is seen when the wait
        ends, within ``SLICE``). Also the stream's state, for the caller."""
        assert self._pulls is not None
        if self._reread_due():  # alongside this round's first round trip: no wait added
            reread = asyncio.ensure_future(self._reread(js))
            try:
                got = await self._pull_round(js, n, wait)
            except BaseException:
                reread.cancel()
                with contextlib.suppress(BaseException):
                    await reread
                raise
            await reread  # before the deliveries are handed out: they trust what it read
            return got
        return await self._pull_round(js, n, wait)

    async def _pull_round(self, js: Any, n: int, wait: float) -> tuple[list[tuple[int, Any]], Any]:
        assert self._pulls is not None
        if self._calm:
            # The last round saw nothing above priority 0: ask which levels hold messages
            # and take from 0 at once, in one round trip. Should a level above hold some
            # now, what came from 0 is kept for later and those go first.
            info, got = await asyncio.gather(
                js.stream_info(self.stream, subjects_filter=">"),
                self._pulls.pull(DURABLE, n, 0.0, self._kept_fresh(0)),
            )
            if not self._above_zero(info):
                if got or wait <= 0:
                    return [(0, m) for m in got], info
            else:
                self._pulls.keep(DURABLE, got)
                self._calm = False
        info = await js.stream_info(self.stream, subjects_filter=">")
        got = await self._pull_levels(js, n, info, wait)
        if wait > 0 and got and got[0][0] == 0:
            # Waited on priority 0 and something came: if a message of a higher one came
            # (or came due) meanwhile, it goes first; what came on 0 is kept for the next.
            info = await js.stream_info(self.stream, subjects_filter=">")
            higher = await self._pull_levels(js, n, info, 0.0, above=0)
            if higher:
                room = n - len(higher)
                self._pulls.keep(DURABLE, [m for _, m in got[room:]])
                got = higher + got[:room]
        self._calm = not self._above_zero(info)
        return got, info

    def _above_zero(self, info: Any) -> bool:
        """Does the stream hold messages of a priority above 0 (waiting, held or due)?"""
        return any(
            stored and level_of(subject, self.name) != 0
            for subject, stored in (info.state.subjects or {}).items()
        )

    async def _pull_levels(
        self, js: Any, n: int, info: Any, wait: float, above: int = -1
    ) -> list[tuple[int, Any]]:
        held = {level_of(s, self.name): c for s, c in (info.state.subjects or {}).items()}
        assert self._pulls is not None
        got: list[tuple[int, Any]] = []
        for level in LEVELS:
            if len(got) >= n or level <= above:
                break
            last = level == 0 and not got
            if not held.get(level) and not (last and wait > 0):
                continue  # nothing stored at this level: nothing to ask for
            try:
                await self._ensure_level(js, level)
                msgs = await self._pulls.pull(
                    level_durable(level),
                    n - len(got),
                    wait if last else 0.0,
                    self._kept_fresh(level),
                )
            except ConsumerMissing:  # deleted behind this handle's back: made again
                self._consumers.discard(level)
                continue
            got += [(level, m) for m in msgs]
        return got

    async def _inspect(self, level: int, msg: Any) -> _Delivery | None:
        """What a message handed to this consumer is for pigeon: one to deliver, or None
        when it went elsewhere - given back until it is due, moved to the dead letters
        (``max_deliveries``, ``expired``, ``too_large``), or dropped (its chunks are gone:
        another consumer took the same item for good after its lease here ran out)."""
        now = time.time()
        headers = msg.headers or {}
        delivered = int(msg.metadata.num_delivered)
        due = read_time(headers, DUE)
        if due is not None and due > now:
            await self._hold_back(msg, due - now)
            return None
        early = await self._early(msg) if due is not None and delivered > 1 else 0
        if delivered > 1:  # given back earlier, perhaps by a nack: no longer waiting; and
            # this delivery holds it now, not the one whose lease ran out
            await asyncio.gather(self._unmark([msg]), self._claim(msg))
        d = _Delivery(msg, level, delivered - early, early, msg.data, asked=asked_at(msg))
        if headers.get(CHUNKED):
            try:
                d.manifest = Manifest.decode(msg.data)
            except ValueError as exc:
                log.warning("nats: a message of %r has a broken manifest: %s", self.name, exc)
                await self._dead_letter(d, "undecodable")
                return None
            if d.manifest.size > self.max_item_size:  # checked before any allocation
                await self._dead_letter(d, "too_large")
                return None
        expires = read_time(headers, EXPIRES)
        reason = (
            "expired" if expires is not None and expires <= now
            else "max_deliveries" if d.count > self.max_deliveries
            else None
        )  # fmt: skip
        if d.manifest is not None:
            whole = await self._assemble(d.manifest)
            if whole is None:
                log.info("nats: an item of %r was already taken (its chunks are gone)", self.name)
                with contextlib.suppress(Exception):
                    await msg.term()
                return None
            d.payload = whole
        if reason is not None:
            await self._dead_letter(d, reason)
            return None
        return d

    async def _hold_back(self, msg: Any, delay: float) -> None:
        """A delayed message handed out before it is due: back until then, never to a
        handler; counted by qsize meanwhile, and its hand-out left out of its count."""
        seq = msg.metadata.sequence.stream
        count = str(msg.metadata.num_delivered).encode()
        marks = [(f"{self._nacked}.{seq}", b""), (f"{self._nacked}.early.{seq}", count)]
        for subject, payload in marks:
            try:
                await self._do(lambda js, s=subject, p=payload: self._mark(js, s, p))
            except PigeonError as exc:  # bookkeeping: the delay itself matters more
                log.debug("nats: a delayed message left unmarked: %s", exc)
        await msg.nak(delay=delay)

    async def _early(self, msg: Any) -> int:
        """JetStream's delivery count at this message's last hand-out before it was due
        (every delivery before that one was early too), or 0."""
        from nats.js.errors import NotFoundError

        subject = f"{self._nacked}.early.{msg.metadata.sequence.stream}"

        async def read(js: Any) -> int:
            try:
                raw = await js.get_last_msg(NACKED, subject)
            except NotFoundError:
                return 0
            try:
                return max(0, int(raw.data or b"0"))
            except ValueError:
                return 0

        try:
            early: int = await self._do(read)
        except PigeonError as exc:
            if not isinstance(exc.__cause__, NotFoundError):  # else: no mark stream yet
                log.debug("nats: early hand-outs of a message unknown: %s", exc)
            return 0
        return min(early, int(msg.metadata.num_delivered) - 1)

    async def _claim(self, msg: Any) -> None:
        """``msg``, a message delivered again, is held by this delivery now: its record
        says so, and a settle from an earlier delivery is refused (``_holds``)."""
        seq, delivered = msg.metadata.sequence.stream, int(msg.metadata.num_delivered)
        subject = f"{self._nacked}.held.{seq}"
        try:
            await self._do(lambda js: self._mark(js, subject, str(delivered).encode()))
        except PigeonError as exc:  # the fetch goes on: a stale settle may then act on it
            log.warning("nats: a redelivered message left unrecorded: %s", exc)

    async def _holds(self, d: _Delivery) -> int:
        """Whether delivery ``d``, whose lease may have run out, still holds its message:
        HELD (nobody took it again: a settle still counts), GONE (no longer stored:
        settled, dead-lettered or expired by another delivery, or purged) or STALE (taken
        again: a later delivery holds it, see ``_claim``). JetStream settles by stream
        sequence whatever delivery an ack came from, so this is asked before one is sent."""
        from nats.js.errors import NotFoundError

        seq = int(d.msg.metadata.sequence.stream)

        async def stored(js: Any) -> bool:
            try:
                await js.get_msg(self.stream, seq)
            except NotFoundError:
                return False
            return True

        async def holder(js: Any) -> int:
            try:
                raw = await js.get_last_msg(NACKED, f"{self._nacked}.held.{seq}")
            except NotFoundError:  # never delivered again (or no record stream yet)
                return 0
            try:
                return int(raw.data or b"0")
            except ValueError:
                return 0

        async def look(js: Any) -> tuple[bool, int]:
            there, latest = await asyncio.gather(stored(js), holder(js))
            return there, latest

        there, latest = await self._do(look)
        if latest > d.delivered:
            return STALE
        return HELD if there else GONE

    async def _settled(self, ds: list[_Delivery]) -> None:
        """Messages taken for good: their chunks, early marks and holder records go."""
        manifests = [d.manifest for d in ds if d.manifest is not None]
        if manifests:
            await self._drop_chunks(manifests)
        marks = [
            f"{self._nacked}.{kind}.{d.msg.metadata.sequence.stream}"
            for d in ds
            for kind, there in (("early", d.early), ("held", d.delivered > 1))
            if there
        ]
        if marks:

            async def purge(js: Any) -> None:
                for subject in marks:
                    await js.purge_stream(NACKED, subject=subject)

            try:
                await self._do(purge, time.monotonic() + 10)
            except PigeonError as exc:
                log.debug("nats: early marks or holder records left over: %s", exc)

    async def _dead_queue(self) -> AsyncNatsQueue[Any]:
        if self._dead is None:
            self._dead = AsyncNatsQueue[Any](
                f"nats://{self._hostlist}/{self.name}.dead?replicas={self.replicas}",
                serializer="raw", reconnect_timeout=self.reconnect_timeout,
                connect_timeout=self.options.connect_timeout,
                max_item_size=max(self.max_item_size, DEFAULT_MAX_ITEM_SIZE),
            )  # fmt: skip
            self._dead._user, self._dead._password = self._user, self._password
        return self._dead

    async def _dead_letter(self, d: _Delivery, reason: str = "max_deliveries") -> None:
        """Move ``d`` to ``NAME.dead`` (its headers and priority kept), then terminate it
        here. The dead letter's id is made of the message's place in this stream, so if
        this process dies between the two and the message comes back, the second copy
        is dropped by the dead queue's duplicate window (two minutes)."""
        dead = await self._dead_queue()
        meta = d.msg.metadata
        kept = from_nats(d.msg.headers)
        options = PutOptions(priority=d.level, headers=kept) if kept or d.level else None
        ids = [f"pigeon-dead.{self.stream}.{meta.sequence.stream}.{meta.timestamp}"]
        why = {OWN + "Origin": self.name, OWN + "Reason": _quote_reason(reason)}
        moved = reason == "too_large" and d.manifest is not None
        if moved:  # not read here: its manifest goes as it is, naming the same chunks
            why[CHUNKED] = "1"
        await dead._put([d.payload], True, 10, options, ids, own=why, remember=False)
        await d.msg.term()
        if not moved:
            await self._settled([d])
        elif d.early or d.delivered > 1:
            await self._settled([dataclasses.replace(d, manifest=None)])
        log.info("nats: a message of %r moved to %r (%s)", self.name, dead.name, reason)

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        return (await self._take(1, block, timeout))[0]  # type: ignore[no-any-return]

    async def _take(self, n: int, block: bool, timeout: float | None) -> list[Any]:
        """Fetch, decode, then ack; an undecodable payload is dead-lettered and the rest
        redelivered (NAK) before ``DecodeError`` is raised."""
        ds: list[_Delivery] = await self._cancel_safe(self._fetch(n, block, timeout), self._nak_all)
        good, bad = self._decode_all([d.payload for d in ds])
        if bad:
            broken = {id(raw) for raw, _ in bad}
            for d in ds:
                if id(d.payload) in broken:
                    await self._dead_letter(d, "undecodable")
                else:
                    await d.msg.nak()
            raise self._decode_error(bad, len(ds), bool(good))
        await self._ack_all(ds)
        return [body for _, body in good]

    async def _nak_all(self, ds: list[_Delivery]) -> None:
        """Messages fetched for a caller that was cancelled: redelivered at once."""
        for d in ds:
            await d.msg.nak()

    async def _ack_all(self, ds: list[_Delivery]) -> None:
        """Ack a batch with one round trip: send every ack, then a flush (PING/PONG), so
        the room they free is there for the next put."""
        for d in ds:
            await d.msg.ack()
        if self._nc is not None:
            await self._nc.flush()
        if any(_leaves_marks(d) for d in ds):
            await self._settled(ds)

    async def get_many(
        self, max_items: int, timeout: float | None = None, *, block: bool = True
    ) -> list[T]:
        return await self._take(max_items, block, timeout)

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncNatsMessage[T]:
        d: _Delivery = (await self._cancel_safe(self._fetch(1, True, timeout), self._nak_all))[0]
        good, bad = self._decode_all([d.payload])
        if bad:
            await self._dead_letter(d, "undecodable")
            raise self._decode_error(bad, 1, False)
        message = AsyncNatsMessage(self, d, good[0][1])
        if lease is not None:
            message._keep(check_seconds("lease", lease, positive=True) or self.lease)
        elif abs(self.lease - self._ack_wait(d.level)) > 1e-6:
            # the consumer's AckWait is another handle's (longer) lease, or was set
            # shorter behind this handle: this handle's lease is kept here
            message._keep(self.lease)
        return message

    async def qsize(self) -> int:
        """Messages waiting: not yet delivered (delayed ones included), or given back by a
        nack or before they were due, and not fetched again - not those held (nor, as
        JetStream does not tell them apart, those whose lease ended)."""
        return int(await self._do(self._count))

    async def _count(self, js: Any) -> int:
        from nats.js.errors import NotFoundError

        info = await js.stream_info(self.stream, subjects_filter=">")
        pending = 0
        for subject, stored in (info.state.subjects or {}).items():
            level = level_of(subject, self.name)
            if level is None or not stored:
                continue
            try:
                pending += int(
                    (await js.consumer_info(self.stream, level_durable(level))).num_pending
                )
            except NotFoundError:  # nobody took from this priority yet: all of it waits
                pending += int(stored)
        try:
            marks = await js.stream_info(NACKED, subjects_filter=f"{self._nacked}.*")
        except NotFoundError:  # nothing was ever nacked
            return pending
        first = info.state.first_seq
        # a mark below the queue's first message is stale (that message is gone)
        seqs = [int(subject.rsplit(".", 1)[1]) for subject in marks.state.subjects or {}]
        return pending + sum(1 for seq in seqs if seq >= first)

    @property
    def _nacked(self) -> str:
        return f"pigeon-nacked.{self.stream}"

    async def _mark(self, js: Any, subject: str, payload: bytes = b"") -> None:
        """Publish a mark (the last one per subject is kept)."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NoStreamResponseError

        try:
            await js.publish(subject, payload)
        except NoStreamResponseError:  # the first nack here: make the stream of marks
            with contextlib.suppress(BadRequestError):  # made by another client meanwhile
                await js.add_stream(
                    StreamConfig(
                        name=NACKED, subjects=["pigeon-nacked.>"], storage=StorageType.FILE,
                        max_msgs_per_subject=1, num_replicas=self.replicas,
                        max_age=MAX_SECONDS,  # no delay is longer: older marks are stale
                    )
                )  # fmt: skip
            await js.publish(subject, payload)

    async def _unmark(self, msgs: list[Any], deadline: float | None = None) -> None:
        """The marks of ``msgs`` go: they were fetched again. Bookkeeping for qsize only,
        so it never fails the fetch (a mark left over counts until the queue's first
        message passes it)."""
        from nats.js.errors import NotFoundError

        async def purge(js: Any) -> None:
            for m in msgs:
                subject = f"{self._nacked}.{m.metadata.sequence.stream}"
                await js.purge_stream(NACKED, subject=subject)

        try:
            await self._do(purge, deadline)
        except PigeonError as exc:
            if not isinstance(exc.__cause__, NotFoundError):  # else: nothing ever nacked
                log.debug("nats: marks of nacked messages left over: %s", exc)

    async def queue_lease(self, timeout: float) -> float:
        """The lease a message taken here holds, for ``pigeon.consume``: this handle's
        (kept here when the consumer's AckWait differs), or, when it asked for none, its
        durable consumer's AckWait, read again."""
        await self._do(self._reread, time.monotonic() + timeout)
        return self.lease

    async def full(self) -> bool:
        if not self.maxsize:
            return False
        info = await self._do(lambda js: js.stream_info(self.stream))
        return bool(info.state.messages >= self.maxsize)

    async def shutdown(self, immediate: bool = False) -> None:
        from nats.js.errors import NotFoundError

        async def run(js: Any) -> None:
            info = await js.stream_info(self.stream)
            config = info.config
            # Stop listening on the subjects: puts find no stream; the stored messages
            # stay and the consumers keep delivering them.
            config.subjects = [f"pigeon-shutdown.{self.name}"]
            config.description = SHUTDOWN_MARK
            await js.update_stream(config)
            if immediate:
                await js.purge_stream(self.stream)
                with contextlib.suppress(NotFoundError):  # no item was ever large
                    await js.purge_stream(self.chunk_stream)

        await self._do(run)

    # --- administration (``pigeon peek | purge | delete | move``) -----------------------

    async def _waiting(self, limit: int | None) -> list[_Stored]:
        """The stored messages that wait, read by sequence (nothing delivered, no count
        changed): those no consumer was handed yet, and those given back (a mark in
        ``PIGEON-NACKED``); not those held, nor - JetStream does not tell them apart - those
        whose lease ended. Priority 9 down to 0, given back first, then by sequence; then
        the delayed ones by due time. At most ``limit`` (None: all)."""
        from nats.js.errors import NotFoundError

        async def scan(js: Any) -> list[_Stored]:
            info = await js.stream_info(self.stream, subjects_filter=">")
            stored = {level_of(s, self.name): n for s, n in (info.state.subjects or {}).items()}
            marks = await self._marks(js)
            now, found, ready = time.time(), [], 0
            for level in LEVELS:  # highest first: a limit is reached in delivery order
                if not stored.get(level) or (limit is not None and ready >= limit):
                    continue
                try:
                    c = await js.consumer_info(self.stream, level_durable(level))
                    delivered = int(c.delivered.stream_seq or 0)
                except NotFoundError:
                    delivered = 0
                seq, subject = int(info.state.first_seq or 1), level_subject(self.name, level)
                while limit is None or ready < limit:
                    try:
                        raw = await js.get_msg(self.stream, seq, subject=subject, next=True)
                    except NotFoundError:
                        break
                    seq = int(raw.seq) + 1
                    back = marks.get(int(raw.seq))
                    if int(raw.seq) <= delivered and back is None:
                        continue  # held by a consumer
                    due = read_time(raw.headers, DUE)
                    if back is not None and back[1] is not None:
                        due = max(due or 0.0, back[1])
                    waits = due is not None and due > now
                    ready += not waits
                    count = back[0] if back else 0
                    found.append(
                        _Stored(raw, level, count, due if waits else None, back is not None)
                    )
            return found

        found: list[_Stored] = await self._do(scan)
        ready = sorted(
            (f for f in found if f.due is None), key=lambda f: (-f.level, not f.back, f.raw.seq)
        )
        later = sorted((f for f in found if f.due is not None), key=lambda f: f.due or 0.0)
        out = ready + later
        return out if limit is None else out[:limit]

    async def _marks(self, js: Any) -> dict[int, tuple[int, float | None]]:
        """The messages given back (seq -> their delivery count, when due again)."""
        from nats.js.errors import NotFoundError

        try:
            info = await js.stream_info(NACKED, subjects_filter=f"{self._nacked}.*")
        except NotFoundError:
            return {}
        out: dict[int, tuple[int, float | None]] = {}
        for subject in info.state.subjects or {}:
            seq = int(subject.rsplit(".", 1)[1])
            try:
                raw = await js.get_last_msg(NACKED, subject)
                count, _, due = (raw.data or b"").decode().partition(" ")
                out[seq] = (int(count or 0), float(due) if due else None)
            except (NotFoundError, ValueError):
                out[seq] = (0, None)
        return out

    async def _whole(self, raw: Any) -> bytes | None:
        """A stored message's item (put back together from its chunks), or None."""
        data = raw.data or b""
        if not (raw.headers or {}).get(CHUNKED):
            return data
        try:
            return await self._assemble(Manifest.decode(data))
        except ValueError:
            return None

    async def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        """Up to ``max_items`` waiting messages as they are, delayed ones last with a
        ``due`` key (seconds from now); nothing is delivered, no delivery count changes.
        See ``pigeon.Queue.peek``."""
        n = check_peek(max_items)
        shown: list[dict[str, Any]] = []
        room = PEEK_BYTES
        now = time.time()
        for f in await self._waiting(n):
            payload = await self._whole(f.raw)
            if payload is None:
                continue  # its chunks are gone: taken meanwhile
            room -= len(payload)
            if room < 0 and shown:
                break
            headers = f.raw.headers or {}
            m = shown_message(
                self._ser, int(f.raw.seq), f.count, payload, max(0.0, now - _stored_at(f.raw)),
                headers.get(OWN + "Origin", ""), headers.get(OWN + "Reason", ""), f.level,
                from_nats(headers),
            )  # fmt: skip
            if f.due is not None:
                m["due"] = round(f.due - now, 3)
            shown.append(m)
        return shown

    async def _forget(self, found: list[_Stored], chunks: bool = True) -> int:
        """Delete stored messages by sequence, with their marks (and chunks); how many
        were still there."""
        from nats.js.errors import NotFoundError

        gone = 0
        manifests = []
        for f in found:
            try:
                await self._do(lambda js, seq=f.raw.seq: js.delete_msg(self.stream, seq))
            except PigeonError as exc:
                if not isinstance(exc.__cause__, NotFoundError):
                    raise
                continue  # taken meanwhile
            gone += 1
            if chunks and (f.raw.headers or {}).get(CHUNKED):
                with contextlib.suppress(ValueError):
                    manifests.append(Manifest.decode(f.raw.data or b""))
        back = [f for f in found if f.back or (f.raw.headers or {}).get(DUE)]

        async def unmark(js: Any) -> None:
            for f in back:
                for kind in ("", "early.", "held."):
                    subject = f"{self._nacked}.{kind}{f.raw.seq}"
                    with contextlib.suppress(NotFoundError):
                        await js.purge_stream(NACKED, subject=subject)

        if back:
            with contextlib.suppress(PigeonError):
                await self._do(unmark)
        if manifests:
            await self._drop_chunks(manifests)
        return gone

    async def purge(self) -> int:
        """Drop every waiting message, delayed ones too (not those held); how many."""
        return await self._forget(await self._waiting(None))

    async def delete(self) -> int:
        """Delete the queue (its stream, with held messages, its chunks and marks); how
        many messages it held. Handles still open on it make it again when next used."""
        from nats.js.errors import NotFoundError

        async def wipe(js: Any) -> int:
            try:
                n = int((await js.stream_info(self.stream)).state.messages)
                await js.delete_stream(self.stream)
            except NotFoundError:
                return 0
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(self.chunk_stream)
            with contextlib.suppress(NotFoundError):  # its dedup ids, as on the other engines
                await js.delete_stream("KV_" + self.ids_bucket)
            with contextlib.suppress(NotFoundError):
                await js.purge_stream(NACKED, subject=f"{self._nacked}.>")
            return n

        n = int(await self._do(wipe))
        self._chunks_ready = False
        await self._reset()  # its consumers went with it: made again at the next call
        return n

    async def move_to(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` waiting messages (all by default; not delayed ones) to the
        tail of ``queue`` on the same server, each with its priority and headers and its
        delivery count afresh, as many as ``queue`` has room for; how many. Each message
        is published to ``queue`` before it is deleted here, with an id made of its place
        here: moved again after a crash between the two, it is kept once (within
        ``queue``'s dedup window)."""
        limit = check_move(self.name, queue, limit)
        target = AsyncNatsQueue[Any](
            f"nats://{self._hostlist}/{queue}?replicas={self.replicas}", serializer="raw",
            reconnect_timeout=self.reconnect_timeout,
            max_item_size=max(self.max_item_size, DEFAULT_MAX_ITEM_SIZE),
        )  # fmt: skip
        target._user, target._password = self._user, self._password
        moved = 0
        try:
            for f in await self._waiting(limit):
                if f.due is not None:
                    break  # delayed: they stay (as on pigeon://)
                payload = await self._whole(f.raw)
                if payload is None:
                    continue
                headers = from_nats(f.raw.headers)
                options = PutOptions(priority=f.level, headers=headers)
                ids = [f"pigeon-move.{self.stream}.{f.raw.seq}"]
                try:
                    await target._put([payload], False, 0, options, ids, remember=False)
                except Full:
                    break
                moved += await self._forget([f])
        finally:
            await target.aclose()
        return moved

    async def aclose(self) -> None:
        if self._settling:  # acks and nacks sent without waiting: let them land first
            await asyncio.gather(*self._settling, return_exceptions=True)
        if not self._closed:
            if self._pulls is not None:  # taken, never handed out: back at once
                for msg in self._pulls.kept():
                    with contextlib.suppress(Exception):
                        await msg.nak()
            self._closed = True
            if self._dead is not None:
                await self._dead.aclose()
            await self._reset()


def _max_item_size(ep: QueueURL, given: int | None) -> int:
    """``max_item_size`` (bytes, >= 1): the keyword (ValueError), else ``?max_item_size=``
    (InvalidURL), else 64 MiB."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"max_item_size must be an int >= 1 (bytes), not {given!r}")
        return given
    raw = ep.params.get("max_item_size")
    if raw is None:
        return DEFAULT_MAX_ITEM_SIZE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidURL(f"max_item_size must be an int >= 1 (bytes), not {raw!r} (in {ep.url!r})")
    return value


async def _log_error(exc: Exception) -> None:
    """nats-py's errors in the background (a reconnect refused, a reset): by default it
    logs each with a traceback; pigeon retries and raises what matters itself."""
    log.debug("nats-py: %s: %s", type(exc).__name__, exc)


def _finish_close(nc: Any) -> None:
    """nats-py's ``close()`` stops at its first error (flushing to a transport already
    lost raises ConnectionResetError) before it cancels its subscriptions' tasks and
    closes the transport: those would outlive the client ("Task was destroyed but it is
    pending"). Do the rest of it."""
    for sub in list(getattr(nc, "_subs", {}).values()):
        task = getattr(sub, "_wait_for_msgs_task", None)
        if task is not None and not task.done():
            task.cancel()
    getattr(nc, "_subs", {}).clear()
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


def _quote_reason(reason: str) -> str:
    """A dead letter's reason as one header line (as the broker keeps it: 500 characters)."""
    text = "".join(c if c.isprintable() else " " for c in str(reason)[:500])
    return " ".join(text.split()) or "rejected"


def _whole_ms(seconds: float | None, *, zero: bool = False) -> float | None:
    """``seconds`` rounded up to whole milliseconds (0 stays 0 with ``zero``)."""
    if seconds is None or (zero and seconds == 0):
        return seconds
    ms = math.ceil(round(seconds * 1000, 6))  # 0.7 s is 700 ms, not 701
    return max(ms, 1) / 1000  # and 1e-10 s is 1 ms, not 0


_ESCAPED_ID = "pigeon-id:"


def _msg_id(dedup_id: str) -> str:
    """A dedup id as a ``Nats-Msg-Id`` header value: as it is when NATS carries it
    unchanged (nats-py trims a value; CR/LF would end the header), else escaped - so ``a``
    and `` a`` stay two ids."""
    plain = dedup_id.isprintable() and dedup_id == dedup_id.strip()
    if plain and not dedup_id.startswith(_ESCAPED_ID):
        return dedup_id
    return _ESCAPED_ID + quote(dedup_id, safe="", errors="surrogatepass")


def _ids_ttl(window: float) -> float:
    """The id bucket's max age for a dedup window (JetStream takes no less than 0.1 s)."""
    return max(window, 0.1)


def _msg_ids(n: int) -> list[str]:
    base = uuid.uuid4().hex
    return [f"{base}-{i}" for i in range(n)]


class _NoRoom(Exception):
    pass


def _busy() -> tuple[type[BaseException], ...]:
    """JetStream did not answer in time: a leader is being elected. (No responders at all
    is left to the caller: for a publish it may mean the queue was shut down.)"""
    import nats.errors as nerr

    return (nerr.TimeoutError,)


def _lost_connection() -> tuple[type[BaseException], ...]:
    import nats.errors as nerr
    import nats.js.errors as jerr

    return (
        nerr.ConnectionClosedError,
        nerr.NoServersError,
        nerr.StaleConnectionError,
        nerr.ConnectionReconnectingError,
        OSError,
        jerr.ServiceUnavailableError,
    )


HELD, GONE, STALE = 1, 0, -1  # what ``_holds`` found of a delivery whose lease may have run out


def _leaves_marks(d: _Delivery) -> bool:
    """Does settling ``d`` leave anything for ``_settled`` to clear?"""
    return d.manifest is not None or bool(d.early) or d.delivered > 1


def _margin(ack_wait: float) -> float:
    """How long before its AckWait runs out (counted from the pull's send) a delivery is
    asked whether it still holds its message, not trusted to: clock drift, and a
    delivery routed to a later pull after its own was given up."""
    return min(1.0, ack_wait / 10)


def _held_or_raise(what: str, queue: str, seq: int, count: int, held: int) -> None:
    """Raise unless ``held`` (``_holds``) says delivery ``count`` of message ``seq`` still
    holds it, so that ``what`` (ack, nack, extend) may be sent."""
    if held == HELD:
        return
    name = f"message {seq} of {queue!r}"
    if held == STALE:
        raise stale_delivery(what, name, count)
    raise LocalProtocolError(
        f"cannot {what} {name}: it is no longer in the queue: its lease ran out and another "
        "delivery of it was settled, it was dead-lettered or expired, or the queue was "
        f"purged or deleted; the {what} changed nothing"
    )


class AsyncNatsMessage(Generic[T]):
    """A JetStream message held by this consumer until acked, nacked or AckWait ends.

    JetStream settles by stream sequence whatever delivery an ack, NAK, TERM or
    in-progress came from (nats-server 2.9 checked): a late one from a delivery whose
    AckWait ran out would act on the redelivery another consumer holds. So a settle is
    sent without asking only while this delivery's AckWait surely runs (``_fresh``:
    counted from when its pull was sent, or from this delivery's last in-progress sent in
    time); after that, ``_holds`` is asked first (one round trip) and a delivery taken
    again is refused with ``LocalProtocolError``. (The check and the send are two steps:
    a redelivery in the few milliseconds between them is not seen.)"""

    def __init__(self, queue: AsyncNatsQueue[T], delivery: _Delivery, body: T) -> None:
        self._queue = queue
        self._delivery = delivery
        self._msg = delivery.msg
        self.body = body
        self.delivery_count = delivery.count
        # the same on every redelivery: the manifest's or the message's stream sequence
        self._identity = int(delivery.msg.metadata.sequence.stream)
        self.headers: dict[str, str] = from_nats(delivery.msg.headers)
        self._settled = False
        self._keeper: asyncio.Task[None] | None = None
        # counted from the pull's send (or this delivery's last in-progress) against the
        # consumer's AckWait as this handle last read it - not this handle's lease: the
        # server redelivers after its AckWait whatever lease the holder asked for (a
        # shorter lease ends sooner, by the keeper's NAK, which ends this too)
        self._since = delivery.asked
        ack_wait = queue._ack_wait(delivery.level)
        self._fresh_until = self._since + ack_wait - _margin(ack_wait)
        queue._held.add(self)

    def _check(self) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")

    def _fresh(self) -> bool:
        """Does this delivery surely still hold the message (its AckWait has not run out,
        so JetStream cannot have delivered it again)?"""
        return time.monotonic() < self._fresh_until

    def _distrust(self, ack_wait: float) -> None:
        """The consumer's AckWait was read shorter (``ack_wait``) than this delivery
        counted on: it holds the message no longer than that."""
        self._fresh_until = min(self._fresh_until, self._since + ack_wait - _margin(ack_wait))

    async def _in_progress(self) -> None:
        """An in-progress signal: AckWait counts again from when the server reads it - if
        this delivery still held the message when it was sent (else it is not trusted)."""
        sent, fresh, before = time.monotonic(), self._fresh(), self._fresh_until
        await self._msg.in_progress()
        if fresh and self._fresh_until == before:  # (not ended by the keeper meanwhile)
            ack_wait = self._queue._ack_wait(self._delivery.level)
            self._since, self._fresh_until = sent, sent + ack_wait - _margin(ack_wait)

    async def _still_held(self, what: str) -> None:
        """Raise unless this delivery still holds the message (asked only once its
        AckWait may have run out)."""
        if self._fresh():
            return
        q = self._queue
        held = await q._holds(self._delivery)
        _held_or_raise(what, q.name, self._identity, self.delivery_count, held)

    def _keep(self, seconds: float) -> None:
        """Make the lease end ``seconds`` from now: in-progress signals while more than
        the consumer's AckWait is left, a NAK when it ends sooner than AckWait would.
        Neither is sent once AckWait may have run out: another delivery may hold the
        message then. (AckWait as this handle last read it: see ``AsyncNatsQueue._reread``.)
        """
        self._stop_keeping()
        deadline = time.monotonic() + seconds
        q, level = self._queue, self._delivery.level
        msg = self._msg

        async def keep() -> None:
            with contextlib.suppress(Exception):  # the message was settled meanwhile
                while True:
                    ack_wait = q._ack_wait(level)
                    left = deadline - time.monotonic()
                    if left > ack_wait:
                        await asyncio.sleep(min(left - ack_wait, ack_wait / 2))
                        if not self._fresh():  # (the loop stalled): not ours to extend
                            return
                        await self._in_progress()  # AckWait counts again from now
                        continue
                    if left > 0:
                        await asyncio.sleep(left)
                    if not self._settled and left < ack_wait:
                        if self._fresh():
                            await msg.nak()  # the lease is over before AckWait: release it
                            # nats-py then refuses any other settle of it; pigeon asks
                            # first whether this delivery still holds it (``_still_held``)
                            msg._ackd = False
                        # over: a settle from now on asks whether it was taken again
                        self._fresh_until = -math.inf
                    return

        self._keeper = asyncio.get_running_loop().create_task(keep())

    def _stop_keeping(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None

    async def _translate(self, coro: Awaitable[Any]) -> None:
        try:
            await coro
        except Exception as exc:
            raise BrokenResourceError(f"nats: cannot settle the message: {exc}") from exc

    def ack(self) -> Awaitable[None]:
        self._check()
        self._settled = True
        self._queue._held.discard(self)
        self._stop_keeping()
        return self._queue._track(asyncio.ensure_future(self._ack()))

    async def _ack(self) -> None:
        await self._still_held("ack")
        await self._translate(self._msg.ack_sync())
        if _leaves_marks(self._delivery):
            await self._queue._settled([self._delivery])

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> Awaitable[None]:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._check()
        self._settled = True
        self._queue._held.discard(self)
        self._stop_keeping()
        if not requeue:
            return self._queue._track(asyncio.ensure_future(self._reject(reason or "rejected")))
        return self._queue._track(asyncio.ensure_future(self._give_back(delay)))

    async def _reject(self, reason: str) -> None:
        await self._still_held("nack")
        await self._queue._dead_letter(self._delivery, reason)

    async def _give_back(self, delay: float) -> None:
        await self._still_held("nack")
        q = self._queue
        subject = f"{q._nacked}.{self._msg.metadata.sequence.stream}"
        # the mark says the delivery count and when it is due again (for peek)
        mark = f"{self.delivery_count} {time.time() + delay:.3f}".encode()
        try:
            await q._do(lambda js: q._mark(js, subject, mark))  # counted by qsize from now
        except PigeonError as exc:  # qsize's bookkeeping: the nack itself matters more
            log.debug("nats: a nacked message left unmarked: %s", exc)
        await self._translate(self._msg.nak(delay=delay or None))

    def extend(self, seconds: float) -> Awaitable[None]:
        """The lease ends ``seconds`` from now (an in-progress signal restarts AckWait;
        a keeper task does the rest, see ``_keep``)."""
        seconds = check_seconds("seconds", seconds) or 0.0
        self._check()
        return self._queue._track(asyncio.ensure_future(self._extend(seconds)))

    async def _extend(self, seconds: float) -> None:
        await self._still_held("extend")
        await self._translate(self._in_progress())
        self._keep(seconds)


class NatsQueue(SyncFace[T]):
    """The blocking face of ``AsyncNatsQueue`` (see the module docstring)."""

    impl_class = AsyncNatsQueue
    own_loops = False
    engine_options = frozenset({"max_item_size"})
