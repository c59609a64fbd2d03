"""The kombu transport for ``pigeon://``: Celery's worker and producers on pigeon's broker.

Features
    Queues on pigeon's broker; a direct exchange (Celery's default routing) and topic
    exchanges for the queues a process declared, as kombu's virtual transports route.
    Late acks are pigeon acks, a reject is a nack (``requeue``, or ``NAME.dead`` with reason
    ``rejected``), ``prefetch_count`` bounds the deliveries a channel holds unacked.
    Celery's ``eta``/``countdown`` is a broker-held ``delay`` (the task is not delivered,
    so never leased, before it is due), ``priority`` a pigeon priority, and
    ``apply_async(dedup_id=...)`` the put's ``dedup_id``. No fanout: ``implements`` says so,
    Celery leaves out remote control, and declaring a fanout exchange raises.

Connection URL
    ``pigeon://[:TOKEN@]HOST[:PORT][/VHOST]`` (port 7878; Celery writes ``pigeon://host:7878//``);
    a virtual host other than ``/`` prefixes queue names (``VHOST:celery``).
    ``broker_use_ssl`` (kombu's ``ssl``) speaks TLS: ``True``, or a dict with ``ca_certs``
    (a private CA) or ``cert_reqs=ssl.CERT_NONE`` (tests only).

Options (``broker_transport_options``)
    ``lease``: seconds each delivery is taken for, extended every third of it while the
    worker holds it (60). ``polling_interval``: how long a consumer of several queues
    parks on one of them before looking at the others (0.1 s, at least 0.05 s: 0 would
    spin; one queue is never polled). ``reconnect_timeout``: seconds a put, ack or other
    call retries a lost connection before it raises to kombu (0: one new connection at
    once), so Celery's own retry policies decide (``task_publish_retry_policy``,
    ``broker_connection_retry``), as on kombu's other transports.

Delivery guarantees
    At-least-once. A message stays the broker's until the worker acks it; a worker that
    dies (its connection drops) gives back at once what it held, prefetched or running.
    With Celery's default early ack a running task is acked as it starts, as on any
    broker; ``task_acks_late`` acks when it ends.

# Strategy:
# kombu's virtual transport (kombu/transport/virtual/base.py) supplies exchanges, routing
# and the Message; this module supplies storage (``_put``, ``_take``, ``_size``,
# ``_purge``, ``_delete``) through one ``pigeon.Queue`` handle per queue, shared by the
# process's threads (each thread has its own connection to the broker). The virtual
# transport polls its queues (``polling_interval`` sleeps between empty rounds, and the
# same sleep while the prefetch window is full); ``Transport.drain_events`` instead parks
# a GET at the broker, which answers the moment a message is due, and waits for an ack
# to free room in the window. Several queues cannot share one parked GET (the protocol's
# GET names one queue), so a consumer of several parks on each in turn.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import sys
import threading
import time
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

import pigeon
from pigeon.backends.pigeon import BrokerQueue
from pigeon.integrations.celery.mapping import (
    DEFAULT_LEASE,
    DEFAULT_RECONNECT_TIMEOUT,
    check_lease,
    check_reconnect_timeout,
    put_options,
    queue_name,
    queue_url,
)
from pigeon.integrations.celery.qos import QoS

__all__ = ["Channel", "Transport"]

logger = logging.getLogger(__name__)

# The least time a consumer of several queues parks on one of them (``polling_interval``)
MIN_POLLING_INTERVAL = 0.05

_NO_FANOUT = (
    "pigeon:// has no {type} exchange (exchange {exchange!r}): pigeon's broker delivers each "
    "message to one queue, so Celery's remote control (celery inspect, celery control, "
    "revoke), broadcast queues and event monitors are not available on it"
)


class Channel(virtual.Channel):
    """A kombu channel whose queues live on pigeon's broker."""

    QoS = QoS
    supports_fanout = False
    from_transport_options = (  # type: ignore[assignment]
        *virtual.Channel.from_transport_options,
        "lease",
        "reconnect_timeout",
    )
    lease = DEFAULT_LEASE
    # Seconds a call without a deadline of its own (a put, an ack) retries a lost
    # connection before it raises to kombu, whose retry policy (Celery's
    # task_publish_retry_policy, broker_connection_retry) decides what comes next, as
    # for kombu's other transports; 0: one new connection at once, then raise.
    reconnect_timeout = DEFAULT_RECONNECT_TIMEOUT

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.lease = check_lease(self.lease)
        self.reconnect_timeout = check_reconnect_timeout(self.reconnect_timeout)
        _note_foreign_options(self.connection.client.transport_options)
        client = self.connection.client
        self._vhost: str | None = client.virtual_host
        self._queues: dict[str, BrokerQueue[bytes]] = {}
        self._queues_lock = threading.Lock()
        self._top_priority: dict[str, int] = {}  # queue -> its x-max-priority
        self._no_ack: set[str] = set()
        self._tags = itertools.count(1)
        self._unrouted: set[str] = set()
        self._shut: set[str] = set()  # queues whose GET said shut down or deleted
        self.qos.on_room = self.connection.room_freed

    # --- the queues on the broker ---------------------------------------------------------

    def _queue(self, queue: str) -> BrokerQueue[bytes]:
        with self._queues_lock:
            handle = self._queues.get(queue)
            if handle is None:
                url = self.connection.queue_url(queue_name(queue, self._vhost))
                opened: pigeon.Queue[bytes] = pigeon.Queue(
                    url,
                    serializer="raw",
                    reconnect_timeout=self.reconnect_timeout,
                    client_name=_client_name(),
                )
                assert isinstance(opened, BrokerQueue)
                self._queues[queue] = handle = opened
            return handle

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> dict[str, Any]:
        """kombu's ``Queue(max_priority=N)`` as RabbitMQ's ``x-max-priority``: the top
        of the queue's priority scale, which ``_put`` maps onto pigeon's 0-9."""
        args = dict(arguments or {})
        if kwargs.get("max_priority") is not None:
            args.setdefault("x-max-priority", kwargs["max_priority"])
        return args

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        top = (kwargs.get("arguments") or {}).get("x-max-priority")
        if isinstance(top, int) and not isinstance(top, bool) and top > 0:
            self._top_priority[queue] = top

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True  # a pigeon queue exists as soon as it is named

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        opts = put_options(message, time.time(), self._top_priority.get(queue))
        if "dedup_id" in opts:
            _note_dedup_task_id(message, str(opts["dedup_id"]))
        self._queue(queue).put(dumps(message).encode(), **opts)  # type: ignore[arg-type]

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._take(queue, timeout or 0.0, queue in self._no_ack)

    def _take(self, queue: str, wait: float, no_ack: bool) -> dict[str, Any]:
        """The next message of ``queue`` within ``wait`` seconds, held until kombu settles
        it (or acked at once for a ``no_ack`` consumer); raises ``queue.Empty``."""
        try:
            message = self._queue(queue).get_message(timeout=wait, lease=self.lease)
        except pigeon.Empty:
            raise Empty() from None
        except pigeon.ShutDown as exc:
            # Deleted on the broker (the name serves again at once, as a new queue) or
            # shut down (for good): either way nothing to take now. Say so once, and wait
            # as a parked GET would, so a shut-down queue is not asked in a busy loop.
            if queue not in self._shut:
                self._shut.add(queue)
                logger.warning("pigeon: consuming from queue %r: %s", queue, exc)
            time.sleep(min(wait, 1.0))
            raise Empty() from None
        self._shut.discard(queue)
        try:
            payload = self._envelope(message.body)
        except Exception as exc:  # any bytes at all may be on the queue
            # Not kombu's envelope (another client's bytes, a truncated body, a `pigeon
            # move` from the wrong queue): raised from here it would end the worker, and
            # the message, given back unacked, the next one too. Dead-letter it instead,
            # as the Dramatiq adapter does, and carry on.
            why = f"undecodable: not a kombu message envelope ({type(exc).__name__}: {exc})"
            logger.error("pigeon: a message on queue %r moved to %r: %s", queue,
                         f"{queue_name(queue, self._vhost)}.dead", why)  # fmt: skip
            QoS.settle(message, "dead-letter", lambda: message.nack(False, reason=why[:500]))
            raise Empty() from None
        props = payload["properties"]
        tag = f"{self.channel_id}.{next(self._tags)}"
        props["delivery_tag"] = tag
        props.setdefault("delivery_info", {})["redelivered"] = message.delivery_count > 1
        if no_ack:
            message.ack()
        else:
            self.qos.hold(tag, message)
        return payload

    def _envelope(self, body: bytes) -> dict[str, Any]:
        """kombu's message envelope in ``body``, checked as far as kombu's ``Message``
        reads it; raises for anything else."""
        payload = loads(body)
        if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
            raise ValueError("no 'properties' object")
        headers = payload.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise ValueError("'headers' is not an object")
        if payload.get("body"):
            self.decode_body(payload["body"], payload["properties"].get("body_encoding"))
        return payload

    def _size(self, queue: str) -> int:
        return self._queue(queue).qsize()

    def _purge(self, queue: str) -> int:
        return self._queue(queue).purge()

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._queue(queue).delete()

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        # kombu's version deletes once per binding this process knows of, so a queue
        # declared elsewhere would stay; the broker's DELETE is one request.
        if if_empty and self._size(queue):
            return
        self.state.queue_bindings_delete(queue)
        self._delete(queue)

    # --- consuming --------------------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        else:
            self._no_ack.discard(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            message = self.Message(self._take(queue, 0.0, no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def consumable(self) -> list[str]:
        """The queues this channel consumes, if its prefetch window has room (once the
        Celery worker is stopping, only those whose messages need no ack)."""
        if self.closed or not self._consumers or not self.qos.can_consume():
            return []
        if _worker_stopping():  # no more tasks; an rpc:// reply (no_ack) still comes
            return [q for q in self._active_queues if q in self._no_ack]
        return list(self._active_queues)

    def deliver_from(self, queue: str, wait: float) -> bool:
        """Take one message from ``queue`` (parked up to ``wait`` s) and hand it to its
        consumer; False if none came, or if the worker began to stop meanwhile (the
        message goes back to the queue)."""
        try:
            payload = self._take(queue, wait, queue in self._no_ack)
        except Empty:
            return False
        if _worker_stopping() and queue not in self._no_ack:
            self.qos.give_back(payload["properties"]["delivery_tag"])
            return False
        self.connection._deliver(payload, queue)
        return True

    # --- exchanges: no fanout -----------------------------------------------------------

    def exchange_declare(
        self, exchange: str | None = None, type: str = "direct", *args: Any, **kwargs: Any
    ) -> None:
        kind = type or "direct"
        if kind not in self.connection.implements.exchange_type:
            raise NotImplementedError(_NO_FANOUT.format(type=kind, exchange=exchange))
        super().exchange_declare(exchange, type, *args, **kwargs)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> list[str]:
        queues: list[str] = super()._lookup(exchange, routing_key, default)
        if not queues and exchange not in self._unrouted:
            self._unrouted.add(exchange)
            # RabbitMQ drops such a message too; say it once per exchange, not never
            logger.warning(
                "pigeon: a message to exchange %r (routing key %r) reached no queue: pigeon "
                "routes only to queues this process declared (Celery declares a task's "
                "queue when it sends it); events for monitors (celery events, Flower) "
                "need fanout, which pigeon does not offer. Further messages to %r that "
                "reach no queue are dropped without this warning",
                exchange,
                routing_key,
                exchange,
            )
        return queues

    # --- closing ------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # cancels consumers, gives back what it held
        finally:
            self.qos.stop()
            with self._queues_lock:
                queues = list(self._queues.values())
                self._queues.clear()
            for q in queues:
                q.close()


_FOREIGN = {
    "visibility_timeout": "a dead worker's tasks come back when its connection drops, and "
    "'lease' bounds how long a frozen one keeps them",
    "priority_steps": "priorities are the broker's own, 0-9 (docs/integrations/celery.md)",
}
_noted: set[str] = set()


def _note_foreign_options(options: dict[str, Any]) -> None:
    """Say once that an option of kombu's Redis or SQS transport means nothing here."""
    for name in sorted(set(options) & set(_FOREIGN) - _noted):
        _noted.add(name)
        logger.warning(
            "pigeon: the transport option %r (kombu's Redis/SQS transports) has no effect "
            "on pigeon://: %s",
            name,
            _FOREIGN[name],
        )


_dedup_noted: list[bool] = []


def _note_dedup_task_id(message: dict[str, Any], dedup_id: str) -> None:
    """Say once that a dedup id without the same task id hands a repeat's caller an
    ``AsyncResult`` that never resolves: the broker confirms the repeat and stores
    nothing, but Celery made the task id before the put, and the task that runs is the
    first one, under its own id."""
    headers = message.get("headers") or {}
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if task_id is None or task_id == dedup_id or _dedup_noted:
        return
    _dedup_noted.append(True)
    logger.warning(
        "pigeon: apply_async(dedup_id=%r) with another task_id (%r): if the broker drops "
        "this send as a repeat, its AsyncResult never resolves (the first send's task is "
        "the one that runs); pass task_id=dedup_id too, so a repeat's result is the "
        "first one's on a result backend that stores results (docs/integrations/"
        "celery.md). Said once per process",
        dedup_id,
        task_id,
    )


def _worker_stopping() -> bool:
    """Has Celery's worker been asked to stop (SIGTERM, SIGQUIT)?

    Celery runs a synchronous transport (this one) in its fallback ``synloop``, which
    calls ``drain_events`` once more after a stop was asked (``try: maybe_shutdown()
    finally: drain``): a message taken then would run - with ``-P solo`` to its end -
    before the worker exits. The flags are those ``state.maybe_shutdown`` reads; kombu
    without Celery never sets them."""
    state = sys.modules.get("celery.worker.state")
    if state is None:
        return False
    stop = getattr(state, "should_stop", None)
    terminate = getattr(state, "should_terminate", None)
    return (stop is not None and stop is not False) or (
        terminate is not None and terminate is not False
    )


def _client_name() -> str:
    return f"kombu/{socket.gethostname()}/{os.getpid()}"


class Transport(virtual.Transport):
    """``pigeon://``: kombu, and so Celery, on pigeon's broker."""

    Channel = Channel

    default_port = 7878  # type: ignore[assignment]
    driver_type = "pigeon"
    driver_name = "pigeon"
    # Only a consumer of several queues polls (see the module's strategy).
    polling_interval = 0.1

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic"]),
        heartbeats=False,
    )

    connection_errors = (  # type: ignore[assignment]
        *virtual.Transport.connection_errors,
        pigeon.BrokenResourceError,  # Unavailable too
        pigeon.AuthError,
    )
    channel_errors = (*virtual.Transport.channel_errors, pigeon.PigeonError)  # type: ignore[assignment]

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._room = threading.Event()
        self._turn = itertools.count()

    def driver_version(self) -> str:
        return pigeon.__version__

    def queue_url(self, queue: str) -> str:
        """The ``pigeon://`` URL of ``queue`` on this connection's broker."""
        c: Any = self.client
        tls = c.ssl
        opts = tls if isinstance(tls, dict) else {}
        return queue_url(
            c.hostname or "127.0.0.1",
            int(c.port or self.default_port),
            queue,
            token=c.password or c.userid or None,
            tls=bool(tls),
            cafile=opts.get("ca_certs") or opts.get("cafile"),
            insecure=opts.get("cert_reqs") == ssl.CERT_NONE,
        )

    def establish_connection(self) -> Any:
        # Connect once, so a broker that is down or refuses the token is reported here,
        # where kombu and Celery retry a connection, and not at the first put.
        c: Any = self.client
        probe: pigeon.Queue[bytes] = pigeon.Queue(
            self.queue_url("kombu.probe"),
            serializer="raw",
            reconnect_timeout=0,
            connect_timeout=float(c.connect_timeout or 10),
            client_name=_client_name(),
        )
        try:
            probe.qsize()
        finally:
            probe.close()
        return super().establish_connection()

    def room_freed(self) -> None:
        self._room.set()

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        self._room.set()

    def drain_events(  # type: ignore[override]
        self, connection: Any, timeout: float | None = None
    ) -> None:
        """Deliver one message to its consumer; ``TimeoutError`` (``socket.timeout``) if none
        came in time.

        One consumed queue: a GET parked at the broker until a message is ready (a
        delayed one the moment it is due). Several: one look at each without waiting,
        then a park of ``polling_interval`` on each in turn. A full prefetch window waits
        for an ack, not for a poll.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._room.clear()
            ready = [(ch, q) for ch in list(self.channels) for q in ch.consumable()]
            remaining = 5.0 if deadline is None else deadline - time.monotonic()
            if not ready:
                if remaining <= 0 or _worker_stopping():
                    raise TimeoutError()
                self._room.wait(min(remaining, 5.0))
                continue
            start = next(self._turn) % len(ready)
            ready = ready[start:] + ready[:start]
            if len(ready) > 1:
                for ch, q in ready:
                    if ch.deliver_from(q, 0.0):
                        return
                # 0 (kombu's Redis/SQS meaning: no sleep between long polls) would make
                # this a busy loop of GETs that do not wait: parked GETs are the long poll
                park = min(remaining, max(self.polling_interval or 0.0, MIN_POLLING_INTERVAL))
            else:
                park = min(remaining, 5.0)
            ch, q = ready[0]
            if ch.deliver_from(q, max(park, 0.0)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError()
