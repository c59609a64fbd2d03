"""The pigeon:// backend: a client of ``pigeon serve``, with a blocking and an asyncio face.

Features
    The whole ``pigeon.Queue`` contract. ``put`` returns once the broker confirmed (on a
    durable broker: once stored); ``put_many``/``get_many`` cost one round trip;
    ``get_message`` gives at-least-once delivery with ``ack``/``nack(requeue, delay)``/
    ``extend``; ``task_done``/``join`` and ``shutdown`` act on the broker's queue, for
    every client. ``pigeon.AsyncQueue(url)`` pipelines concurrent calls over one
    connection (``pigeon/aio.py``).

Connection URL
    ``pigeon://[TOKEN@]HOST[:PORT]/QUEUE[?lease=S&max_deliveries=N]`` (port 7878 by
    default); ``pigeon+tls://`` for TLS. The token may also be given as the password:
    ``pigeon://:TOKEN@host/q``.

Options
    ``maxsize`` (declares the queue's capacity), ``serializer`` (``"msgpack"`` by
    default), ``lease`` (seconds before an unacked message returns, default 30),
    ``max_deliveries`` (then it moves to ``QUEUE.dead``, default 20),
    ``reconnect_timeout`` (seconds to keep retrying after a connection fails, when the
    call gave no timeout; 30), ``connect_timeout`` (10 s for connect and handshake).

Delivery guarantees
    At-least-once, for ``get``/``get_many`` as for ``get_message``: every message is taken
    unacked and stays the broker's until the client acknowledges it - ``get`` does so
    without waiting, once the payload decoded - so a reply lost to a broken connection
    comes back (at once, when the broker notices the connection is gone) instead of
    vanishing. A payload the serializer cannot decode raises ``pigeon.DecodeError`` and
    goes to ``QUEUE.dead``. A ``put`` whose confirmation was lost to a broken connection
    is retried after reconnecting, so it may be stored twice (once, with a ``dedup_id``):
    duplicates are possible, losses of confirmed puts are not (with a durable broker). A
    call with no time to wait (``put_nowait``) still gets one new connection when the
    broker had closed the thread's one (its idle timeout, a restart). A put larger than
    the broker's ``max_frame_size`` raises ``pigeon.TooLarge``, nothing sent. FIFO per
    queue; redelivered messages go back in their original order, ahead of newer ones.

# Strategy:
# Each thread has its own blocking connection (a socket plus a sans-IO
# ``protocol.client.ClientConnection``), released when the thread ends and never carried
# across a fork: the child closes its copies of the parent's sockets at once, so a parent
# SIGKILLed later still has its in-flight messages requeued immediately. Operations are
# the generators of ``ops``; ``_drive`` runs one with blocking reads.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pigeon._net import tune_tcp
from pigeon._pid import current_pid
from pigeon._queue_base import Message, Queue
from pigeon.backends._admin import check_move
from pigeon.backends._retry import REPLY_GRACE
from pigeon.backends.pigeon.ops import (
    Call,
    Endpoint,
    Lost,
    Op,
    Ops,
    Post,
    Sleep,
    Spec,
    advance,
    broken,
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
from pigeon.protocol.messages import Delete, Delivery, Move, Ok, Peek, Purge
from pigeon.serializers import SerializerLike

T = TypeVar("T")

__all__ = ["BrokerMessage", "BrokerQueue", "Endpoint"]

_RECV = 256 * 1024
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Link:
    """One blocking connection: a socket and its conversation, one request at a time.

    The socket is non-blocking and every wait is a ``poll`` bounded by a monotonic
    deadline: the call's (``Call.until``), and the silence limit (no byte from the broker
    for that long: it is gone). ``poll`` is what PEP 475 retries after a signal *with the
    time left* - a blocking ``recv`` under ``SO_RCVTIMEO`` is retried with the whole
    timeout again, so a process that takes a signal more often than that (a SIGALRM
    watchdog, SIGCHLD from its children) never noticed a silent broker. A round trip is
    ``send``, ``poll``, ``recv``: no system call to set a timeout, none to poll before
    sending.

    One thread uses a link at a time (``lock``): the thread whose link it is, or
    ``BrokerQueue.close`` once that thread is not in a call. A thread in a call when
    another closes the handle is woken by ``wake`` (polled beside the socket) and closes
    its link itself: GOODBYE, and the broker answers the request as it drains.
    """

    def __init__(
        self, spec: Spec, ops: Ops, client: str, wake: _Wake, until: float | None = None
    ) -> None:
        ep = spec.ep
        self.pid = current_pid()
        self.lock = threading.Lock()
        self.closing = False  # the handle was closed while this link was in a call
        self.welcomed = False
        self.connect_timeout = spec.options.connect_timeout
        self.silence = spec.options.connect_timeout  # until WELCOME tells the heartbeat
        now = time.monotonic()
        # the handshake is bounded by connect_timeout, and by the call that needs it
        handshake = now + spec.options.connect_timeout
        self.cut_by_call = until is not None and until < handshake
        if until is not None and until < handshake:
            handshake = until
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=max(handshake - now, 0.001))
        except OSError as exc:
            raise broken(f"cannot connect to {ep.host}:{ep.port}: {exc}", exc) from exc
        if ep.tls:
            from pigeon.backends._tls import client_context

            try:
                sock.settimeout(max(handshake - time.monotonic(), 0.001))
                sock = client_context(ep).wrap_socket(sock, server_hostname=ep.host)
            except OSError as exc:
                sock.close()
                raise broken(f"TLS handshake with {ep.host} failed: {exc}", exc) from exc
        tune_tcp(sock)
        sock.setblocking(False)
        self.sock = sock
        # TLS may hold decrypted bytes that poll cannot see
        self.pending = sock.pending if isinstance(sock, ssl.SSLSocket) else None
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self._wake = wake  # its pipe lives as long as a link polls it
        self.wake = wake.fd
        self.poller.register(self.wake, select.POLLIN)
        self.buf = bytearray(_RECV)
        self.conv = ClientConnection(client, ep.token, peer=ep.peer)
        _LIVE.add(self)
        try:
            # HELLO and DECLARE leave together: the handshake costs one round trip.
            declare = self.conv.request(spec.declare())
            self.flush(handshake)
            ops.declared(self.wait(declare, handshake))
        except BaseException:
            self.discard()
            raise
        self.silence = self.conv.silence_limit
        self.cut_by_call = False
        self.opened = time.monotonic()  # welcomed

    # --- moving bytes -----------------------------------------------------------------------

    def flush(self, until: float | None = None) -> None:
        data = self.conv.data_to_send()
        if data:
            try:
                sent = self.sock.send(data)
            except _WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                raise broken(f"connection to {self.conv.peer} broke: {exc}", exc) from exc
            if sent < len(data):
                self._send_rest(memoryview(data), sent, until)

    def _send_rest(self, data: memoryview, sent: int, until: float | None) -> None:
        """The socket's buffer is full: send the rest as the broker reads, giving up when
        nothing could be sent for the silence limit, or at ``until``."""
        out = select.poll()
        out.register(self.sock, select.POLLOUT)
        out.register(self.wake, select.POLLIN)
        while sent < len(data):
            end, why = self._limit(until)
            while not (ready := out.poll(max(end - time.monotonic(), 0.0) * 1000)):
                if time.monotonic() >= end:
                    raise self._timed_out(why, sending=True)
            if any(fd == self.wake for fd, _ in ready):  # closed mid-frame: no GOODBYE
                self.closing = True
                raise broken(f"this queue handle was closed while sending to {self.conv.peer}")
            try:
                sent += self.sock.send(data[sent:])
            except _WOULD_BLOCK:
                continue
            except OSError as exc:
                raise broken(f"connection to {self.conv.peer} broke: {exc}", exc) from exc

    def _read(self, until: float | None) -> int:
        """Receive into ``self.buf``: the number of bytes (0 at end of stream)."""
        while True:
            if self.pending is None or not self.pending():
                # poll returns nothing only once its time is up (PEP 475 resumes it after
                # a signal with the time left)
                if until is None or (left := until - time.monotonic()) >= self.silence:
                    if not (ready := self.poller.poll(self.silence * 1000)):
                        raise self._timed_out("silence")
                elif left <= 0 or not (ready := self.poller.poll(left * 1000)):
                    raise self._timed_out("call")
                if any(fd == self.wake for fd, _ in ready):
                    self._say_goodbye()
            try:
                return self.sock.recv_into(self.buf)
            except _WOULD_BLOCK:  # woken without a whole TLS record
                continue
            except OSError as exc:
                raise broken(f"connection to {self.conv.peer} broke: {exc}", exc) from exc

    def _limit(self, until: float | None) -> tuple[float, str]:
        """Until when the next wait to send may last, and what ends it: the silence limit
        from now, or the call's ``until`` if that comes first."""
        quiet = time.monotonic() + self.silence
        if until is not None and until < quiet:
            return until, "call"
        return quiet, "silence"

    def _timed_out(self, why: str, sending: bool = False) -> BrokenResourceError:
        peer = self.conv.peer
        if not self.welcomed:
            if self.cut_by_call:
                return broken(f"no WELCOME from {peer} before the call's timeout ran out")
            return broken(
                f"no WELCOME from {peer} within connect_timeout={self.connect_timeout:g} s: "
                "is a pigeon broker listening there?"
            )
        what = f"nothing could be sent to {peer}" if sending else f"no reply from {peer}"
        if why == "call":
            return broken(
                f"{what} by the call's deadline (its timeout plus {REPLY_GRACE:g} s): "
                "the broker may be stalled or cut off"
            )
        if sending:
            return broken(f"{what} for {self.silence:.0f} s")
        return broken(f"no word from {peer} for {self.silence:.0f} s")

    def wait(self, req: int, until: float | None = None) -> Any:
        """Read until the reply to ``req`` arrives; answer pings on the way."""
        while True:
            n = self._read(until)
            events = self.conv.receive_data(memoryview(self.buf)[:n])
            self.flush(until)
            for ev in events:
                if isinstance(ev, Reply) and ev.req == req:
                    return ev.message
                if isinstance(ev, Welcomed):
                    self.welcomed = True
                elif isinstance(ev, Closed):
                    raise ev.error or BrokenResourceError(f"{self.conv.peer} closed")

    def post(self, msg: Any) -> None:
        self.conv.post(msg)
        self.flush()

    def close(self) -> None:
        """GOODBYE, half-close, read what the broker still sends (its replies to our
        acks), then close: nothing we sent is lost to a reset."""
        # os.getpid(), not current_pid(): this runs inside os.fork in the child too, before
        # the fork hooks (the finalizers of other threads' locals), where only the kernel
        # knows it is a child.
        if self.pid == os.getpid():
            with contextlib.suppress(OSError, BrokenResourceError):
                self._say_goodbye()
                until = time.monotonic() + 1.0
                while self._read(until):
                    pass
        self.discard()

    def _say_goodbye(self) -> None:
        """GOODBYE and half-close (once); the wake no longer matters."""
        if self.wake >= 0:
            self.poller.unregister(self.wake)
            self.wake = -1
            self.closing = True
            self.conv.close()
            self.flush()
            self.sock.shutdown(socket.SHUT_WR)

    def discard(self) -> None:
        _LIVE.discard(self)
        self.sock.close()

    def forget_after_fork(self) -> None:
        """In a fork child: let go of the parent's connection without touching it."""
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, self.sock.fileno())
            finally:
                os.close(devnull)


# Every open link of this process: a fork child lets go of them all at once.
_LIVE: weakref.WeakSet[_Link] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for link in list(_LIVE):
        link.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Wake:
    """A pipe whose read end every link of a handle polls beside its socket (one per
    process: a fork child's handle gets its own). ``ring`` once the handle is closed: the
    end stays readable, so a thread in a call wakes, and so does one that made a link just
    as the handle closed."""

    def __init__(self) -> None:
        self.pid = current_pid()
        self.fd, self._w = os.pipe()
        os.set_blocking(self._w, False)
        weakref.finalize(self, _close_fds, self.fd, self._w)

    def ring(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"!")


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _ThreadLink:
    """Holds a thread's link; when the thread ends its locals go, and this closes it."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self._finalizer = weakref.finalize(self, link.close)


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
        dedup_window: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        client_name: str | None = None,
    ) -> None:
        self._spec = Spec(
            url, maxsize, serializer, lease=lease, max_deliveries=max_deliveries,
            dedup_window=dedup_window, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        self._ops = Ops(self._spec)
        self._client = client_name or f"pigeon-py/{os.getpid()}"
        self._local = threading.local()
        self._holders: weakref.WeakSet[_ThreadLink] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake: _Wake | None = None
        self._closed = False
        self._known = False  # the broker told us maxsize on some connection
        if (
            self._spec.options.maxsize
            or self._spec.options.lease
            or self._spec.options.max_deliveries
            or self._spec.options.dedup_window is not None
        ):
            # Options given: apply them now, so a refused one is an error here.
            self._drive(self._ops.call(lambda _: self._spec.declare(), None))
            self._known = True

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self._spec.ep.url, self._spec.options.kwargs()))

    @property
    def url(self) -> str:
        return self._spec.ep.url

    @property
    def options(self) -> QueueOptions:
        """The options this handle was opened with (URL parameters included)."""
        return self._spec.options

    @property
    def name(self) -> str:
        return self._spec.queue

    def async_options(self) -> dict[str, Any]:
        """How ``pigeon.AsyncQueue(q)`` opens the same queue on asyncio."""
        return self._spec.options.kwargs()

    # --- the driver -------------------------------------------------------------------------

    def _link(self, until: float | None = None) -> _Link:
        if self._closed:
            raise ClosedResourceError("this queue handle was closed")
        holder: _ThreadLink | None = getattr(self._local, "holder", None)
        if holder is not None and holder.link.pid == current_pid():
            return holder.link
        with self._lock:
            wake = self._wake
            if wake is None or wake.pid != current_pid():
                wake = self._wake = _Wake()
        link = _Link(self._spec, self._ops, self._client, wake, until)
        self._known = True
        holder = _ThreadLink(link)
        self._local.holder = holder
        with self._lock:
            self._holders.add(holder)
        return link

    def _drop(self, *, graceful: bool = False) -> None:
        holder: _ThreadLink | None = getattr(self._local, "holder", None)
        self._local.holder = None
        if holder is not None:
            holder._finalizer.detach()
            if graceful:
                holder.link.close()
            else:
                holder.link.discard()

    def _drive(self, op: Op[Any]) -> Any:
        """Run an operation: its requests on this thread's connection, blocking."""
        value: Any = None
        error: BaseException | None = None
        while True:
            effect, result = advance(op, value, error)
            if effect is None:
                return result
            value = error = None
            if isinstance(effect, Call):
                try:
                    link = self._link(effect.until)
                except BrokenResourceError as exc:
                    error = Lost(exc, False)
                    continue
                with link.lock:
                    value, error = self._exchange(link, effect)
            elif isinstance(effect, Post):
                holder = getattr(self._local, "holder", None)
                if holder is not None:  # no connection: the broker gave them back anyway
                    with holder.link.lock:
                        try:
                            holder.link.post(effect.msg)
                        except BrokenResourceError:
                            self._drop()
            elif isinstance(effect, Sleep):
                threading.Event().wait(effect.seconds)

    def _exchange(self, link: _Link, call: Call) -> tuple[Any, BaseException | None]:
        """Send ``call``'s request on ``link`` and wait for its reply: ``(reply, None)``,
        or ``(None, what to throw into the operation)``."""
        try:
            # a refusal here (too large, an option the broker lacks) sends nothing and
            # leaves the connection as it was: it propagates, nothing dropped
            req = link.conv.request(call.msg)
        except BrokenResourceError as exc:  # the conversation had ended
            self._drop()
            return None, Lost(exc, True, time.monotonic() - link.opened)
        try:
            link.flush(call.until)
            reply = link.wait(req, call.until)
        except BrokenResourceError as exc:  # the request may have reached the broker
            self._drop()
            return None, Lost(exc, True, time.monotonic() - link.opened, sent=True)
        except BaseException:
            # Interrupted mid-request (KeyboardInterrupt, a signal handler's exception):
            # the reply may still come. Drop the connection; the broker gives back
            # whatever it was about to hand us.
            self._drop()
            raise
        if not link.closing:
            return reply, None
        # Another thread closed the handle while this call waited: the link said GOODBYE
        # and the broker answered the request as it drains. A confirmation stands (a put
        # that was on its way is stored); anything else - a delivery that can no longer
        # be acked (it goes back to the queue with the connection), a parked request
        # ended by the drain - ends the call.
        self._drop(graceful=True)
        if isinstance(reply, Ok):
            return reply, None
        return None, ClosedResourceError("this queue handle was closed while the call waited")

    # --- the contract ---------------------------------------------------------------------

    @property
    def maxsize(self) -> int:
        if not self._known:
            self._drive(self._ops.info())
        return self._ops.maxsize

    def put(
        self,
        item: T,
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        opts = put_options(delay, ttl, dedup_id, priority, headers)
        self._drive(self._ops.put([self._spec.ser.dumps(item)], block, timeout, opts))

    def put_many(
        self,
        items: Iterable[T],
        block: bool = True,
        timeout: float | None = None,
        *,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str] | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        opts = put_options(delay, ttl, None, priority, headers)
        dumps = self._spec.ser.dumps
        payloads = [dumps(item) for item in items]
        ids = check_dedup_ids(dedup_ids, len(payloads))
        self._drive(self._ops.put(payloads, block, timeout, opts, ids, many=ids is not None))

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        return self._drive(self._ops.take(1, block, timeout))[0][1]  # type: ignore[no-any-return]

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        return [body for _, body in self._drive(self._ops.take(max_items, block, timeout))]

    def get_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> BrokerMessage[T]:
        """Take the next message; unacked, it returns after ``lease`` seconds (or the
        queue's lease) or at once if this client's connection drops."""
        d, body = self._drive(self._ops.take(1, True, timeout, lease=lease, settle=False))[0]
        return BrokerMessage(self, d, body)

    def qsize(self) -> int:
        return int(self._drive(self._ops.qsize()))

    def full(self) -> bool:
        return bool(self._drive(self._ops.full()))

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._drive(self._ops.info())
        return info

    def _queue_lease(self, timeout: float) -> float:
        """The queue's lease as the broker holds it (``pigeon.consume``'s lease keeper);
        raises if the broker does not answer within ``timeout`` seconds."""
        info = self._drive(self._ops.info(time.monotonic() + timeout))
        return float(info["lease"])

    def stats(self) -> dict[str, Any]:
        """The broker's statistics: every queue's info, the server's, the connections
        (what ``pigeon stats`` shows)."""
        stats: dict[str, Any] = self._drive(self._ops.stats())
        return stats

    # --- administration (redis:// and nats:// have the same: SyncFace) -----------------

    def peek(self, max_items: int = 10) -> list[dict[str, Any]]:
        """Up to ``max_items`` waiting messages, without delivering them (their delivery
        counts do not change): dicts with ``id``, ``delivery_count``, ``payload`` (bytes),
        ``body`` (decoded, or None if it does not decode), ``age`` (seconds), ``origin``
        and ``reason`` (a dead letter's), ``priority``, ``headers``; those a get would take
        now first, then the delayed ones, each with ``due`` (seconds from now)."""
        shown: list[dict[str, Any]] = self._drive(
            self._ops.admin(Peek(0, self._spec.queue, max_items))
        )
        for m in shown:
            try:
                m["body"] = self._spec.ser.loads(m["payload"])
            except Exception:
                m["body"] = None
        return shown

    def purge(self) -> int:
        """Drop every waiting message (not those in flight); returns how many."""
        return int(self._drive(self._ops.admin(Purge(0, self._spec.queue))))

    def delete(self) -> int:
        """Drop the queue: its messages (in flight too), settings and waiters."""
        return int(self._drive(self._ops.admin(Delete(0, self._spec.queue))))

    def move_to(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` waiting messages (all by default) to the tail of ``queue``
        on the same broker, delivery counts starting afresh: replays dead letters."""
        limit = check_move(self._spec.queue, queue, limit)
        return int(self._drive(self._ops.admin(Move(0, self._spec.queue, queue, limit))))

    def task_done(self) -> None:
        self._drive(self._ops.task_done())

    def join(self, timeout: float | None = None) -> None:
        self._drive(self._ops.join(timeout))

    def shutdown(self, immediate: bool = False) -> None:
        self._drive(self._ops.shutdown(immediate))

    def close(self) -> None:
        """Close every connection this handle opened, in any thread, gracefully. A call
        running in another thread meanwhile ends as the broker answers its request: a
        put on its way is confirmed; a get or a wait raises ``ClosedResourceError``, what
        it took going back to the queue."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            holders = list(self._holders)
            self._holders.clear()
            wake = self._wake
        if wake is not None and wake.pid != current_pid():
            wake = None  # the parent's: its links are not this process's
        for h in holders:
            if h.link.lock.acquire(blocking=False):
                try:
                    h._finalizer()
                finally:
                    h.link.lock.release()
            # else: in a call in another thread, which the wake makes close it
        if wake is not None:
            wake.ring()

    def __repr__(self) -> str:
        return f"<pigeon.Queue {self._spec.ep.url}>"


def _reopen(url: str, options: dict[str, Any]) -> BrokerQueue[Any]:
    return BrokerQueue(url, **options)


class BrokerMessage(Message[T]):
    """A message held for this client until ``ack``, ``nack`` or the end of its lease."""

    def __init__(self, queue: BrokerQueue[T], delivery: Delivery, body: T) -> None:
        self._queue = queue
        self.id = delivery.id
        self.delivery_count = delivery.delivery_count
        self.headers: dict[str, str] = delivery.headers or {}
        self.body = body
        self._settled = False
        self._identity = delivery.message_id or None  # 0: an older broker does not tell

    def _settle(self, what: str, *args: Any) -> None:
        if self._settled:
            raise LocalProtocolError("this message was already acked or nacked")
        q = self._queue
        msg = settle_message(q._spec.queue, what, self.id, *args)
        self._settled = what != "extend"
        q._drive(q._ops.settle(msg, what))

    def ack(self) -> None:
        self._settle("ack")

    def nack(self, requeue: bool = True, delay: float = 0, *, reason: str = "") -> None:
        self._settle("nack", requeue, delay, reason)

    def extend(self, seconds: float) -> None:
        self._settle("extend", seconds)
