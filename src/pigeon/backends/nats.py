"""The nats:// backend: one JetStream work-queue stream per queue, one durable pull consumer.

Features
    ``put``/``put_many`` (publish, waiting for JetStream's ack), ``get``/``get_many``
    (fetch and ack), ``get_message`` with ``ack``, ``nack(requeue, delay)`` (NAK with a
    delay), ``extend`` (in-progress: the lease, AckWait, starts again), ``delivery_count``
    (the consumer's delivery count), dead letters after ``max_deliveries``, ``maxsize``
    (MaxMsgs with DiscardNew: a full queue refuses puts), ``qsize``/``empty``/``full``,
    ``shutdown`` for every client, iteration. ``task_done``/``join`` raise
    ``Unsupported``: JetStream has no server-side wait on a counter. ``pigeon.AsyncQueue``
    runs the same code on asyncio; the blocking face runs it on pigeon's private I/O loop,
    never on a loop the caller is running.

Connection URL
    ``nats://[USER:PASSWORD@|TOKEN@]HOST[:PORT]/QUEUE[?lease=S&max_deliveries=N]``;
    ``nats+tls://`` (or ``?tls=1``) for TLS. The queue ``jobs`` is the stream
    ``PIGEON_jobs`` on the subject ``pigeon.jobs``.

Options
    ``maxsize``, ``serializer`` (``"msgpack"``), ``lease`` (AckWait, 30 s),
    ``max_deliveries`` (20), ``reconnect_timeout`` (30 s).

Delivery guarantees
    At-least-once for ``get_message``: JetStream redelivers a message that is not acked
    within the lease (AckWait), whether its consumer died or is only slow. A lease asked
    for one message (``get_message(lease=)``, ``extend(seconds)``) means exactly "now +
    seconds": a longer one is kept by in-progress signals sent on pigeon's I/O loop, a
    shorter one ends with a NAK (if the holder dies first, AckWait applies). Plain
    ``get`` acks on receipt, once the payload decoded (an undecodable one goes to
    ``QUEUE.dead``, reason ``undecodable``; the rest of its batch is redelivered). A
    batch put on a bounded queue is all or none even with concurrent producers (a short
    lock per queue in the ``PIGEON_LOCKS`` key-value bucket). Items that do not fit the
    server's ``max_payload`` (1 MiB by default) with their headers are refused before
    anything is sent, with ``pigeon.TooLarge``. Headers travel exactly: those NATS would
    alter go escaped (``_natsheaders``). ``qsize`` counts what waits, a message given back
    by a nack included (a mark in the ``PIGEON-NACKED`` stream until it is fetched
    again). Durability is JetStream's: file storage, synced to disk every two minutes by
    default (``sync_interval`` in the server's configuration; ``always`` for
    every write). A shut-down queue takes no more puts (its stream stops listening on
    the subject) and readers stop once it is drained; waits run in slices of at most 0.2 s
    so a blocked reader sees the shutdown within that. FIFO per queue except redeliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, Generic, TypeVar

from pigeon._queue_base import deadline_from
from pigeon.backends._asyncbase import EngineQueue, within
from pigeon.backends._natsheaders import OWN, block_size, from_nats, to_nats
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
    TooLarge,
    Unsupported,
)
from pigeon.options import DEFAULT_LEASE, DEFAULT_MAX_DELIVERIES, DEFAULT_RECONNECT_TIMEOUT
from pigeon.protocol.messages import PutOptions
from pigeon.protocol.rules import MAX_SECONDS, check_seconds
from pigeon.serializers import SerializerLike, get_serializer

T = TypeVar("T")
log = logging.getLogger("pigeon.nats")

DURABLE = "pigeon"
LOCKS = "PIGEON_LOCKS"  # key-value bucket: one short lock per bounded queue, for batches
LOCK_TTL = 30.0  # seconds: a producer that dies holding the lock holds it no longer
SLICE = 0.2
SHUTDOWN_MARK = "pigeon: shut down"
# Deliveries given back by a nack (delayed or not) are in no count JetStream gives - not
# pending, only "ack pending" like the ones held - so each leaves a mark here, one subject
# per message (pigeon-nacked.STREAM.SEQ), until it is fetched again: qsize counts them.
# No queue's stream is named so (theirs start with "PIGEON_").
NACKED = "PIGEON-NACKED"
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_\-.]+$")


def stream_name(queue: str) -> str:
    """A JetStream stream name for ``queue`` (no dots or wildcards; unique per queue)."""
    safe = re.sub(r"[^A-Za-z0-9_\-]", "_", queue)
    if safe != queue:
        safe += "_" + hashlib.sha1(queue.encode()).hexdigest()[:8]
    return f"PIGEON_{safe}"


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
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        check_maxsize(maxsize)
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
        self._lease_given = ep.seconds("lease", lease)
        self.lease = self._lease_given or DEFAULT_LEASE
        self.max_deliveries = int(
            ep.count("max_deliveries", max_deliveries, DEFAULT_MAX_DELIVERIES) or 0
        )
        tls = ep.scheme == "nats+tls" or ep.flag("tls")
        scheme = "tls" if tls else "nats"
        # every seed server of a cluster; the client follows the cluster from there
        self._servers = [f"{scheme}://{h}:{p}" for h, p in ep.hosts]
        self._hostlist = ",".join(f"{h}:{p}" for h, p in ep.hosts)
        self.replicas = int(ep.count("replicas", None, 1) or 1)
        self._user = ep.username
        self._password = ep.password
        self.serializer = serializer if serializer is not None else "msgpack"
        self._ser = get_serializer(self.serializer)
        self.maxsize = maxsize
        self.reconnect_timeout = reconnect_timeout
        self.subject = f"pigeon.{self.name}"
        self.stream = stream_name(self.name)
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
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
                    "connect_timeout": 5,
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
                except BaseException:
                    await nc.close()
                    raise
                self._nc, self._js, self._sub = nc, js, None
        return self._js

    async def _ensure(self, js: Any) -> None:
        """Create (or adopt) the stream and the durable pull consumer."""
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            DiscardPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )
        from nats.js.errors import NotFoundError

        try:
            info = await js.stream_info(self.stream)
            config = info.config
            if self.maxsize and config.max_msgs != self.maxsize:
                config.max_msgs = self.maxsize
                config.discard = DiscardPolicy.NEW
                await js.update_stream(config)
            elif not self.maxsize and config.max_msgs and config.max_msgs > 0:
                self.maxsize = int(config.max_msgs)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.stream, subjects=[self.subject],
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                    max_msgs=self.maxsize or -1, discard=DiscardPolicy.NEW,
                    num_replicas=self.replicas,
                )
            )  # fmt: skip
        consumer = ConsumerConfig(
            durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.lease, max_deliver=-1, filter_subject=self.subject,
            max_ack_pending=-1,
        )  # fmt: skip
        try:
            current = (await js.consumer_info(self.stream, DURABLE)).config
        except NotFoundError:
            await js.add_consumer(self.stream, consumer)
        else:
            if self._lease_given is not None and current.ack_wait != self.lease:
                await js.add_consumer(self.stream, consumer)  # the queue's lease, for all
            elif self._lease_given is None and current.ack_wait:
                self.lease = float(current.ack_wait)

    async def _do(self, fn: Any, deadline: float | None = None) -> Any:
        """Run ``fn(jetstream)``; translate nats-py errors; retry until the call's deadline
        (or ``reconnect_timeout``), each attempt cut at its reply deadline."""
        import nats.js.errors as jerr

        _LOST_CONNECTION = _lost_connection()
        _BUSY = _busy()

        backoff = Backoff(deadline, self.reconnect_timeout)
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
            except jerr.APIError as exc:
                raise PigeonError(f"JetStream refused the request: {exc}") from exc

    async def _reset(self) -> None:
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None:
            try:
                await nc.close()
            except Exception:  # closing a broken connection: nothing more to lose, but
                _finish_close(nc)  # what nats-py left undone when it stopped at the error

    async def _subscription(self, js: Any) -> Any:
        if self._sub is None:
            self._sub = await js.pull_subscribe(self.subject, durable=DURABLE, stream=self.stream)
        return self._sub

    # --- the contract ---------------------------------------------------------------------

    supports: ClassVar[frozenset[str]] = frozenset({"dedup", "headers"})
    _why_not: ClassVar[dict[str, str]] = {
        "delay": "JetStream has no per-message delay",
        "ttl": "JetStream's per-message TTL deletes the message; it cannot dead-letter it",
        "priority": "a JetStream stream is one sequence; it has no priorities",
    }

    async def _put(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
        *,
        own: dict[str, str] | None = None,
    ) -> None:
        """``own``: pigeon's headers (``Pigeon-*``), sent as they are."""
        import nats.errors as nerr
        import nats.js.errors as jerr

        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "nats"):
            # A publish whose ack was lost (a node died, a leader changed) is sent again with
            # the same id: JetStream keeps one copy (its duplicate window is two minutes). A
            # dedup_id is that id: a repeat within the stream's duplicate window is confirmed
            # and not stored again.
            if options is not None and options.dedup_id:
                dedup_ids = [options.dedup_id]
            ids = dedup_ids or _msg_ids(len(payloads))
            extra = to_nats(options.headers) if options is not None and options.headers else {}
            extra.update(own or {})
            # every header the server gets is here, so the size check counts them all
            hdrs = [{**extra, "Nats-Msg-Id": i, "Nats-Expected-Stream": self.stream} for i in ids]
            await self._do(lambda js: self._check_sizes(payloads, hdrs), deadline)
            if self.maxsize and len(payloads) > 1:
                await self._put_batch_locked(payloads, hdrs, deadline)
                return
            delay = 0.001
            sent = 0
            unanswered = Backoff(deadline, self.reconnect_timeout)
            while True:

                async def publish(js: Any) -> None:
                    nonlocal sent
                    if len(payloads) - sent > 1:  # many in flight, then gather the acks
                        acks = [
                            await js.publish_async(self.subject, p, headers=h)
                            for p, h in zip(payloads[sent:], hdrs[sent:], strict=True)
                        ]
                        await asyncio.gather(*acks)
                        sent = len(payloads)
                        return
                    while sent < len(payloads):
                        await js.publish(self.subject, payloads[sent], headers=hdrs[sent])
                        sent += 1

                try:
                    await self._do(
                        lambda js: self._with_room(js, len(payloads) - sent, publish), deadline
                    )
                    return
                except _NoRoom:
                    pass
                except (nerr.NoRespondersError, jerr.NoStreamResponseError) as exc:
                    if await self._is_shut_down(deadline):
                        raise ShutDown("the queue was shut down; put refused") from None
                    # no stream leader right now (a cluster electing one): try again
                    if (wait := unanswered.next_delay()) is None:
                        raise BrokenResourceError(
                            f"nats: no stream answers {self.subject}"
                        ) from exc
                    await asyncio.sleep(wait)
                    continue
                if await self._is_shut_down(deadline):
                    raise ShutDown("the queue was shut down; put refused")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Full(f"queue {self.name!r} is full (maxsize={self.maxsize})")
                await asyncio.sleep(min(delay, max(0.0, (deadline or 1e18) - time.monotonic())))
                delay = min(delay * 2, 0.05)

    async def _check_sizes(self, payloads: list[bytes], hdrs: list[dict[str, str]]) -> None:
        """Refuse, before anything is sent, a message the server would refuse: it counts
        the headers with the payload against ``max_payload`` (and drops the connection)."""
        await self._jetstream()
        limit = int(getattr(self._nc, "max_payload", 0) or 0)
        if not limit:
            return
        size, item, head = max(
            (len(p) + block_size(h), len(p), block_size(h))
            for p, h in zip(payloads, hdrs, strict=True)
        )
        if size > limit:
            raise TooLarge(
                f"an item of {item} bytes with {head} bytes of headers is larger than the "
                f"NATS server's max_payload={limit} (it counts both); raise max_payload in "
                "the server's configuration (up to 64 MB), or put smaller items; nothing "
                "was sent"
            )

    async def _put_batch_locked(
        self, payloads: list[bytes], hdrs: list[dict[str, str]], deadline: float | None
    ) -> None:
        """A batch on a bounded queue, all or none: under a per-queue lock, check the room,
        then publish; concurrent batches take turns instead of splitting each other."""
        delay = 0.005
        while True:
            async with self._lock_queue(deadline):
                info = await self._do(lambda js: js.stream_info(self.stream), deadline)
                if info.config.description == SHUTDOWN_MARK:
                    raise ShutDown("the queue was shut down; put refused")
                if info.state.messages + len(payloads) <= self.maxsize:

                    async def publish(js: Any) -> None:
                        acks = [
                            await js.publish_async(self.subject, p, headers=h)
                            for p, h in zip(payloads, hdrs, strict=True)
                        ]
                        await asyncio.gather(*acks)

                    await self._do(publish, deadline)
                    return
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

    async def _fetch(self, n: int, block: bool, timeout: float | None) -> list[Any]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_items must be an int >= 1, not {n!r}")
        deadline = deadline_from(block, timeout)
        async with within(reply_deadline(deadline), "nats"):
            while True:
                remaining = SLICE if deadline is None else deadline - time.monotonic()
                wait = max(0.01, min(SLICE, remaining))

                async def fetch(js: Any, wait: float = wait) -> list[Any]:
                    sub = await self._subscription(js)
                    try:
                        return list(await sub.fetch(n, timeout=wait))
                    except TimeoutError:  # nats-py's, or asyncio's from inside its fetch
                        return []

                got = await self._do(fetch, deadline)
                again = [m for m in got if m.metadata.num_delivered > 1]
                if again:  # given back earlier, perhaps by a nack: no longer waiting
                    await self._unmark(again, deadline)
                live = []
                for msg in got:
                    if msg.metadata.num_delivered > self.max_deliveries:
                        await self._dead_letter(msg)
                    else:
                        live.append(msg)
                if live:
                    return live
                if got:
                    continue
                info = await self._do(lambda js: js.stream_info(self.stream), deadline)
                if info.config.description == SHUTDOWN_MARK and info.state.messages == 0:
                    raise ShutDown("the queue was shut down and is drained")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Empty(f"queue {self.name!r} is empty")

    async def _dead_letter(self, msg: Any, reason: str = "max_deliveries") -> None:
        dead = AsyncNatsQueue[Any](
            f"nats://{self._hostlist}/{self.name}.dead?replicas={self.replicas}",
            serializer="raw", reconnect_timeout=self.reconnect_timeout,
        )  # fmt: skip
        dead._user, dead._password = self._user, self._password
        kept = from_nats(msg.headers)
        options = PutOptions(headers=kept) if kept else None
        why = {OWN + "Origin": self.name, OWN + "Reason": _quote_reason(reason)}
        try:
            try:
                await dead._put([msg.data], True, 10, options, own=why)
            except TooLarge:  # no room for the reason: the message matters more
                await dead._put([msg.data], True, 10, options)
        finally:
            await dead.aclose()
        await msg.term()
        log.info("nats: a message of %r moved to %r (%s)", self.name, dead.name, reason)

    async def get(self, timeout: float | None = None, *, block: bool = True) -> T:
        return (await self._take(1, block, timeout))[0]  # type: ignore[no-any-return]

    async def _take(self, n: int, block: bool, timeout: float | None) -> list[Any]:
        """Fetch, decode, then ack; an undecodable payload is dead-lettered and the rest
        redelivered (NAK) before ``DecodeError`` is raised."""
        msgs = await self._cancel_safe(self._fetch(n, block, timeout), self._nak_all)
        good, bad = self._decode_all([m.data for m in msgs])
        if bad:
            broken = {id(raw) for raw, _ in bad}
            for m in msgs:
                if id(m.data) in broken:
                    await self._dead_letter(m, "undecodable")
                else:
                    await m.nak()
            raise self._decode_error(bad, len(msgs), bool(good))
        await self._ack_all(msgs)
        return [body for _, body in good]

    async def _nak_all(self, msgs: list[Any]) -> None:
        """Messages fetched for a caller that was cancelled: redelivered at once."""
        for m in msgs:
            await m.nak()

    async def _ack_all(self, msgs: list[Any]) -> None:
        """Ack a batch with one round trip: send every ack, then a flush (PING/PONG), so
        the room they free is there for the next put."""
        for m in msgs:
            await m.ack()
        if self._nc is not None:
            await self._nc.flush()

    async def get_many(
        self, max_items: int, timeout: float | None = None, *, block: bool = True
    ) -> list[T]:
        return await self._take(max_items, block, timeout)

    async def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncNatsMessage[T]:
        msg = (await self._cancel_safe(self._fetch(1, True, timeout), self._nak_all))[0]
        good, bad = self._decode_all([msg.data])
        if bad:
            await self._dead_letter(msg, "undecodable")
            raise self._decode_error(bad, 1, False)
        message = AsyncNatsMessage(self, msg, good[0][1])
        if lease is not None:
            message._keep(check_seconds("lease", lease, positive=True) or self.lease)
        return message

    async def qsize(self) -> int:
        """Messages waiting: not yet delivered, or given back by a nack (delayed or not)
        and not fetched again - not those held (nor, as JetStream does not tell them
        apart, those whose lease ended)."""
        return int(await self._do(self._count))

    async def _count(self, js: Any) -> int:
        from nats.js.errors import NotFoundError

        info = await js.consumer_info(self.stream, DURABLE)
        try:
            marks = await js.stream_info(NACKED, subjects_filter=f"{self._nacked}.*")
        except NotFoundError:  # nothing was ever nacked
            return int(info.num_pending)
        first = (await js.stream_info(self.stream)).state.first_seq
        # a mark below the queue's first message is stale (that message is gone)
        seqs = [int(subject.rsplit(".", 1)[1]) for subject in marks.state.subjects or {}]
        return int(info.num_pending) + sum(1 for seq in seqs if seq >= first)

    @property
    def _nacked(self) -> str:
        return f"pigeon-nacked.{self.stream}"

    async def _mark(self, js: Any, msg: Any) -> None:
        """``msg`` is given back: counted as waiting until it is fetched again."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NoStreamResponseError

        subject = f"{self._nacked}.{msg.metadata.sequence.stream}"
        try:
            await js.publish(subject, b"")
        except NoStreamResponseError:  # the first nack here: make the stream of marks
            with contextlib.suppress(BadRequestError):  # made by another client meanwhile
                await js.add_stream(
                    StreamConfig(
                        name=NACKED, subjects=["pigeon-nacked.>"], storage=StorageType.FILE,
                        max_msgs_per_subject=1, num_replicas=self.replicas,
                        max_age=MAX_SECONDS,  # no delay is longer: older marks are stale
                    )
                )  # fmt: skip
            await js.publish(subject, b"")

    async def _unmark(self, msgs: list[Any], deadline: float | None) -> None:
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
        """The queue's lease: its durable consumer's AckWait; for ``pigeon.consume``."""
        info = await self._do(
            lambda js: js.consumer_info(self.stream, DURABLE), time.monotonic() + timeout
        )
        return float(info.config.ack_wait or self.lease)

    async def full(self) -> bool:
        if not self.maxsize:
            return False
        info = await self._do(lambda js: js.stream_info(self.stream))
        return bool(info.state.messages >= self.maxsize)

    async def shutdown(self, immediate: bool = False) -> None:
        async def run(js: Any) -> None:
            info = await js.stream_info(self.stream)
            config = info.config
            # Stop listening on the subject: puts find no stream; the stored messages
            # stay and the consumer keeps delivering them.
            config.subjects = [f"pigeon-shutdown.{self.name}"]
            config.description = SHUTDOWN_MARK
            await js.update_stream(config)
            if immediate:
                await js.purge_stream(self.stream)

        await self._do(run)

    async def aclose(self) -> None:
        if self._settling:  # acks and nacks sent without waiting: let them land first
            await asyncio.gather(*self._settling, return_exceptions=True)
        if not self._closed:
            self._closed = True
            await self._reset()


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


class AsyncNatsMessage(Generic[T]):
    """A JetStream message held by this consumer until acked, nacked or AckWait ends."""

    def __init__(self, queue: AsyncNatsQueue[T], msg: Any, body: T) -> None:
        self._queue = queue
        self._msg = msg
        self.body = body
        self.delivery_count = int(msg.metadata.num_delivered)
        self._identity = int(msg.metadata.sequence.stream)  # the same on every redelivery
        self.headers: dict[str, str] = from_nats(msg.headers)
        self._settled = False
        self._keeper: asyncio.Task[None] | None = None

    def _check(self) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")

    def _keep(self, seconds: float) -> None:
        """Make the lease end ``seconds`` from now: in-progress signals while more than
        the consumer's AckWait is left, a NAK when it ends sooner than AckWait would."""
        self._stop_keeping()
        deadline = time.monotonic() + seconds
        ack_wait = self._queue.lease
        msg = self._msg

        async def keep() -> None:
            with contextlib.suppress(Exception):  # the message was settled meanwhile
                while True:
                    left = deadline - time.monotonic()
                    if left > ack_wait:
                        await asyncio.sleep(min(left - ack_wait, ack_wait / 2))
                        await msg.in_progress()  # AckWait counts again from now
                        continue
                    if left > 0:
                        await asyncio.sleep(left)
                    if not self._settled and left < ack_wait:
                        await msg.nak()  # the lease is over before AckWait: release it
                        self._settled = True
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
        self._stop_keeping()
        return self._queue._track(asyncio.ensure_future(self._translate(self._msg.ack_sync())))

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> Awaitable[None]:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._check()
        self._settled = True
        self._stop_keeping()
        if not requeue:
            return self._queue._track(
                asyncio.ensure_future(self._queue._dead_letter(self._msg, reason or "rejected"))
            )
        return self._queue._track(asyncio.ensure_future(self._give_back(delay)))

    async def _give_back(self, delay: float) -> None:
        q = self._queue
        try:
            await q._do(lambda js: q._mark(js, self._msg))  # counted by qsize from now
        except PigeonError as exc:  # qsize's bookkeeping: the nack itself matters more
            log.debug("nats: a nacked message left unmarked: %s", exc)
        await self._translate(self._msg.nak(delay=delay or None))

    def extend(self, seconds: float) -> Awaitable[None]:
        """The lease ends ``seconds`` from now (an in-progress signal restarts AckWait;
        a keeper task does the rest, see ``_keep``)."""
        seconds = check_seconds("seconds", seconds) or 0.0
        self._check()
        self._keep(seconds)
        return self._queue._track(asyncio.ensure_future(self._translate(self._msg.in_progress())))


class NatsQueue(SyncFace[T]):
    """The blocking face of ``AsyncNatsQueue`` (see the module docstring)."""

    impl_class = AsyncNatsQueue
    own_loops = False
