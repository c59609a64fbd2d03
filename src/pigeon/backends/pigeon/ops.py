"""What a pigeon:// queue handle does, written once for the blocking and the asyncio face.

# Strategy:
# Each operation (put, take, settle, ...) is a generator that yields *effects* - ``Call``
# (send this request, resume me with its reply), ``Post`` (send it, nobody waits for the
# reply), ``Sleep`` - and never touches a socket or an event loop. The blocking client
# (``sync.py``) drives a generator with blocking reads, the asyncio client
# (``pigeon/aio.py``) with awaits; each driver is a dozen lines. So retrying with backoff
# after a lost connection, at-least-once gets (taken unacked, acked without waiting once
# decoded), undecodable payloads (dead-lettered, the rest of the batch given back),
# error codes and option checks exist in one place: httpcore gets the same from generating
# its sync code with unasync; pigeon gets it without generated code.
#
# A driver that loses its connection while a ``Call`` is outstanding throws ``Lost`` into
# the generator; ``established`` says whether that connection had worked (one new
# connection is then tried at once; the retry budget starts afresh if it had lived a
# while, ``WORKED``). A loss that a new connection would meet again (``Unretryable``: not
# a pigeon broker, or the broker refused our bytes) ends the call. A request the
# conversation refuses before sending (``TooLarge`` over the broker's ``max_frame_size``)
# is raised by the driver as it is.
#
# The call's deadline travels with it (``_retry``): each ``Call`` carries ``until``, when
# its driver stops waiting - for a new connection and its WELCOME, for room to send, for
# the reply. A driver that reaches ``until`` throws ``Lost`` like a broken connection, and
# ``Ops.call`` gives up because the deadline has passed. So ``get(timeout=1)`` against a
# broker that fell silent (stopped, paused, cut off) raises after about a second, not
# after the silence limit or ``connect_timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from pigeon._queue_base import deadline_from
from pigeon.backends._retry import Backoff, reply_deadline
from pigeon.backends._url import QueueURL
from pigeon.errors import BrokenResourceError, DecodeError, Indeterminate, LocalProtocolError
from pigeon.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_RECONNECT_TIMEOUT,
    QueueOptions,
)
from pigeon.protocol import (
    Ack,
    Declare,
    Deliver,
    Delivery,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Nack,
    Ok,
    Put,
    PutBatch,
    PutOptions,
    Shutdown,
    Stats,
    TaskDone,
)
from pigeon.protocol.client import Unretryable
from pigeon.protocol.codes import Code, exception_for
from pigeon.protocol.messages import PlainPut
from pigeon.protocol.rules import MAX_ITEMS, check_seconds
from pigeon.serializers import Serializer, SerializerLike, get_serializer

T = TypeVar("T")


@dataclass(slots=True)
class Call:
    msg: Any
    until: float | None = None  # monotonic: stop waiting for a connection or the reply


@dataclass(slots=True)
class Post:
    msg: Any


@dataclass(slots=True)
class Sleep:
    seconds: float


Effect = Call | Post | Sleep
Op = Generator[Effect, Any, T]


def advance(op: Op[Any], value: Any, error: BaseException | None) -> tuple[Effect | None, Any]:
    """Resume ``op`` with the outcome of its last effect: ``(next effect, None)``, or
    ``(None, result)`` once it has finished."""
    try:
        return (op.send(value) if error is None else op.throw(error)), None
    except StopIteration as stop:
        return None, stop.value


# Seconds a connection must have lived for its loss to start the retry budget afresh: a
# connection that broke at the first request may have been broken *by* it, and a
# request that ends every connection must not be sent again for ever.
WORKED = 1.0


class Lost(Exception):
    """The connection broke (or could not be made) while a call was outstanding."""

    def __init__(
        self, error: BaseException, established: bool, lived: float = 0.0, sent: bool = False
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.established = established  # it had been welcomed
        self.lived = lived  # seconds since then
        self.sent = sent  # the request was written: the broker may have acted on it


class Endpoint(QueueURL):
    """What a pigeon:// URL says; the token is the password (or the user name)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, ("pigeon", "pigeon+tls"), DEFAULT_PORT)
        self.tls = self.scheme == "pigeon+tls"
        self.token = self.password or self.username

    @property
    def peer(self) -> str:
        return f"the broker at {self.host}:{self.port}"


class Spec:
    """One queue handle's settings, checked once: the URL and the options given."""

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
        self.options = QueueOptions.from_url(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        self.ep = Endpoint(url)
        self.queue = self.ep.queue
        self.ser: Serializer = get_serializer(self.options.serializer)

    @property
    def serializer_name(self) -> str:
        return str(getattr(self.ser, "name", type(self.ser).__name__))

    def declare(self) -> Declare:
        """Sent on every new connection right after HELLO: applies the options given (a
        DECLARE with none changes nothing) and tells the queue's maxsize."""
        o = self.options
        return Declare(0, self.queue, o.maxsize or None, o.lease, o.max_deliveries, o.dedup_window)


class Ops:
    """The queue operations over one ``Spec``; shells drive the generators."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.queue = spec.queue
        self.maxsize = spec.options.maxsize  # as the broker last told it

    # --- connection setup -------------------------------------------------------------------

    def declared(self, reply: Ok | Deliver | Error) -> None:
        """The reply to ``spec.declare()`` on a new connection."""
        if isinstance(reply, Error):
            raise exception_for(reply.code, reply.message)
        if isinstance(reply, Ok) and isinstance(reply.value, dict):
            self.maxsize = int(reply.value.get("maxsize", 0))

    # --- the retrying call ------------------------------------------------------------------

    def call(self, build: Callable[[float | None], Any], deadline: float | None) -> Op[Any]:
        """Send ``build(remaining wait)`` and return the reply (see ``call_tracked``)."""
        reply, _ = yield from self.call_tracked(build, deadline)
        return reply

    def call_tracked(
        self, build: Callable[[float | None], Any], deadline: float | None
    ) -> Op[tuple[Any, bool]]:
        """Send ``build(remaining wait)``; on a lost connection retry with backoff until
        ``deadline`` (or ``reconnect_timeout`` after the failure); raise for an ERROR. The
        driver waits for each reply until ``reply_deadline(deadline)`` at most.

        A connection that had worked and broke is followed by one new connection at once,
        before any backoff and whatever is left of ``deadline`` (within the reply grace):
        the broker may have closed a connection while it was not in use (its idle timeout,
        a restart), and a call with no time to wait - ``put_nowait`` - still deserves one
        fresh connection before it gives up.

        Returns ``(reply, resent)``: ``resent`` when an earlier send of the request was
        written before its connection broke, so the broker may have acted on it before
        it answered this one (a settle reads ``unknown`` differently then)."""
        backoff: Backoff | None = None  # made at the first failure: most calls have none
        until = reply_deadline(deadline)
        fresh = True  # the one new connection at once is still to be tried
        resent = False
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = yield Call(build(remaining), until)
            except Lost as lost:
                resent = resent or lost.sent
                if isinstance(lost.error, Unretryable):
                    raise lost.error from lost.error.__cause__
                if lost.established and fresh and (until is None or time.monotonic() < until):
                    fresh = False
                    continue
                if backoff is None:
                    backoff = Backoff(deadline, self.spec.options.reconnect_timeout)
                elif lost.established and lost.lived >= WORKED:
                    backoff.restart()
                if (wait := backoff.next_delay()) is None:
                    raise lost.error from lost.error.__cause__
                yield Sleep(wait)
                continue
            if isinstance(reply, Error):
                if reply.code == Code.UNAVAILABLE:  # the broker's store is busy, or it stops
                    backoff = backoff or Backoff(deadline, self.spec.options.reconnect_timeout)
                    if (wait := backoff.next_delay()) is not None:
                        yield Sleep(wait)
                        continue
                raise exception_for(reply.code, reply.message)
            return reply, resent

    # --- the contract -----------------------------------------------------------------------

    def put(
        self,
        payloads: list[bytes],
        block: bool,
        timeout: float | None,
        options: PutOptions | None = None,
        dedup_ids: list[str] | None = None,
        *,
        many: bool = False,
    ) -> Op[None]:
        """Put ``payloads`` (``options`` checked by ``pigeon.options``). A put with a
        ``dedup_id`` may be retried after a lost connection without being stored twice."""
        deadline = deadline_from(block, timeout)
        q = self.queue
        if len(payloads) == 1 and not many:
            p = payloads[0]
            if options is None:  # the short form: the bytes of a plain PUT never change
                yield from self.call(lambda w: PlainPut(0, q, p, w if block else 0.0), deadline)
            else:
                yield from self.call(lambda w: Put(0, q, p, w if block else 0.0, options), deadline)
        elif payloads:
            if self.maxsize and len(payloads) > self.maxsize:
                raise ValueError(
                    f"put_many of {len(payloads)} items can never fit in "
                    f"maxsize={self.maxsize}; split the batch"
                )
            yield from self.call(
                lambda w: PutBatch(0, q, payloads, w if block else 0.0, options, dedup_ids),
                deadline,
            )

    def take(
        self,
        n: int,
        block: bool,
        timeout: float | None,
        *,
        lease: float | None = None,
        settle: bool = True,
    ) -> Op[list[tuple[Delivery, Any]]]:
        """Up to ``n`` messages with their decoded bodies, taken unacked (at-least-once).

        ``settle``: ack them (without waiting for the reply) once decoded - plain get.
        A payload that does not decode goes to the dead-letter queue and the others are
        given back; then ``DecodeError`` is raised.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ITEMS:
            raise ValueError(f"max_items must be an int from 1 to {MAX_ITEMS}, not {n!r}")
        if lease is not None:
            lease = check_seconds("lease", lease, positive=True)
        deadline = deadline_from(block, timeout)
        q = self.queue
        # a message held to be settled later learns its id: what names it across
        # deliveries (pigeon.consume counts the worker processes it killed by it)
        reply = yield from self.call(
            lambda w: Get(0, q, n, w if block else 0.0, True, lease, not settle), deadline
        )
        assert isinstance(reply, Deliver)
        out, bad = self._decode(reply.messages)
        if bad:
            yield Post(Nack(0, q, [d.id for d, _ in bad], False, 0.0, "undecodable"))
            if out:
                yield Post(Nack(0, q, [d.id for d, _ in out], True, 0.0))
            first, cause = bad[0]
            name = self.spec.serializer_name
            raise DecodeError(
                f"queue {q!r}: {len(bad)} of {len(reply.messages)} message(s) cannot be decoded "
                f"with serializer={name!r} ({cause}); moved to {q + '.dead'!r} "
                f"(reason 'undecodable'){'; the others were given back' if out else ''}",
                raw=first.payload,
                queue=q,
                serializer=name,
            ) from cause
        if settle:
            yield Post(Ack(0, q, [d.id for d, _ in out]))
        return out

    def _decode(
        self, messages: list[Delivery]
    ) -> tuple[list[tuple[Delivery, Any]], list[tuple[Delivery, BaseException]]]:
        """The deliveries that decode, with their bodies, and those that do not (each
        payload decoded once: a pickle's side effects happen once)."""
        out: list[tuple[Delivery, Any]] = []
        bad: list[tuple[Delivery, BaseException]] = []
        append, loads = out.append, self.spec.ser.loads
        rest = iter(messages)
        while True:
            try:
                for d in rest:
                    append((d, loads(d.payload)))
                return out, bad
            except Exception as exc:
                bad.append((d, exc))

    def settle(self, msg: Ack | Nack | Extend, what: str, resent: bool = False) -> Op[None]:
        """ACK, NACK or EXTEND one delivery, re-sent on a new connection if its connection
        breaks. ``resent``: the caller had already written it on a connection that broke."""
        reply, again = yield from self.call_tracked(lambda _: msg, None)
        self.settled(reply, what, msg, resent or again)

    @staticmethod
    def settled(
        reply: Ok | Deliver | Error, what: str, msg: Ack | Nack | Extend, resent: bool = False
    ) -> None:
        """Raise if the reply to ``msg`` (an ACK, NACK or EXTEND) says it did not take.

        A delivery the broker does not hold (``unknown``) has ended: its lease ran out or
        its connection dropped, so it was or will be redelivered. Unless ``msg`` was sent
        before on a connection that broke (``resent``) and would itself have ended the
        delivery (an ACK, a NACK to the dead letters): then the first send may be what
        ended it, and ``Indeterminate`` says the outcome cannot be known. (An EXTEND or a
        requeueing NACK leaves the message to come back either way.)"""
        if isinstance(reply, Error):
            raise exception_for(reply.code, reply.message)
        unknown = (
            reply.value.get("unknown")
            if isinstance(reply, Ok) and isinstance(reply.value, dict)
            else None
        )
        if not unknown:
            return
        ends = isinstance(msg, Ack) or (isinstance(msg, Nack) and not msg.requeue)
        if resent and ends:
            done = "settled it" if isinstance(msg, Ack) else "moved it to the dead letters"
            raise Indeterminate(
                f"cannot tell whether the {what} of delivery {unknown[0]} took effect: the "
                f"connection broke after the {what} was sent, and on a new connection the "
                f"broker no longer holds the delivery: the first {what} {done}, or the "
                "broker had already taken it back and will deliver it again; handlers must "
                "be idempotent (at-least-once)"
            )
        raise LocalProtocolError(
            f"cannot {what} delivery {unknown[0]}: the broker no longer holds it for this "
            "client (its lease ran out or its connection dropped), so it was or will be "
            "redelivered"
        )

    def info(self, deadline: float | None = None) -> Op[dict[str, Any]]:
        reply = yield from self.call(lambda _: Info(0, self.queue), deadline)
        value: dict[str, Any] = reply.value
        self.maxsize = int(value.get("maxsize", 0))
        return value

    def stats(self) -> Op[dict[str, Any]]:
        """The broker's STATS document (queues, connections, server)."""
        reply = yield from self.call(lambda _: Stats(0), None)
        value: dict[str, Any] = reply.value
        return value

    # --- administration (pigeon:// only) ------------------------------------------------

    def admin(self, msg: Any) -> Op[Any]:
        reply = yield from self.call(lambda _: msg, None)
        return reply.value

    def qsize(self) -> Op[int]:
        info = yield from self.info()
        return int(info["depth"])

    def full(self) -> Op[bool]:
        """As the broker counts room: ready, delayed and in flight against maxsize."""
        info = yield from self.info()
        return bool(info["maxsize"]) and info["depth"] + info["in_flight"] >= info["maxsize"]

    def task_done(self) -> Op[None]:
        yield from self.call(lambda _: TaskDone(0, self.queue, 1), None)

    def join(self, timeout: float | None) -> Op[None]:
        deadline = deadline_from(True, timeout)
        try:
            yield from self.call(lambda w: Join(0, self.queue, w), deadline)
        except TimeoutError as exc:
            raise TimeoutError(f"join timed out: {exc}") from None

    def shutdown(self, immediate: bool) -> Op[None]:
        yield from self.call(lambda _: Shutdown(0, self.queue, immediate), None)


def settle_message(queue: str, what: str, id_: int, *args: Any) -> Ack | Nack | Extend:
    """The request that settles delivery ``id_`` (ack, nack or extend)."""
    if what == "ack":
        return Ack(0, queue, [id_])
    if what == "nack":
        requeue, delay, reason = args
        delay = check_seconds("delay", delay, positive=False) or 0.0
        return Nack(0, queue, [id_], bool(requeue), float(delay), str(reason)[:500])
    (seconds,) = args
    seconds = check_seconds("seconds", seconds, positive=False) or 0.0
    return Extend(0, queue, [id_], float(seconds))


def broken(text: str, cause: BaseException | None = None) -> BrokenResourceError:
    err = BrokenResourceError(text)
    err.__cause__ = cause
    return err
