"""``PigeonBroker``: a ``dramatiq.Broker`` on pigeon's broker (``pigeon serve``)."""

from __future__ import annotations

import threading
from typing import Any

from dramatiq import Broker, Consumer, Message
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

import pigeon
from pigeon.backends.pigeon import BrokerQueue
from pigeon.errors import BrokenResourceError
from pigeon.integrations.dramatiq._errors import connection_closed, join_timeout
from pigeon.integrations.dramatiq._mapping import broker_url, put_args, queue_url
from pigeon.integrations.dramatiq.consumer import PigeonConsumer

__all__ = ["PigeonBroker"]

# Seconds a taken message stays with a worker process that stopped renewing it. A process
# that dies gives its messages back at once (its connection drops), so the lease only
# covers one that stops running Python but keeps its connection: SIGSTOP, or a C call
# holding the GIL. Long, because the second is a task, not a fault (dramatiq#692: Redis
# requeued CPU-bound tasks whose worker could not send its heartbeat).
DEFAULT_LEASE = 600.0


class PigeonBroker(Broker):
    """A Dramatiq broker whose queues live on a pigeon broker.

    >>> broker = PigeonBroker(url="pigeon://127.0.0.1:7878")
    >>> dramatiq.set_broker(broker)

    Parameters:
      url: ``pigeon://[TOKEN@]HOST[:PORT]`` or ``pigeon+tls://...``; query options apply
        to every queue (``?max_deliveries=N&dedup_window=S``, as in ``pigeon.Queue``).
      middleware: as for every Dramatiq broker.
      namespace: prefix of the pigeon queue names (``"dramatiq:"``: actor queue
        ``default`` is pigeon queue ``dramatiq:default``, its dead letters
        ``dramatiq:default.dead``); ``""`` for none.
      lease: seconds a taken message stays with a worker process that stopped renewing
        it (600; a live worker renews it as long as the task runs; a dead one's
        connection drops and gives it back at once).
      reconnect_timeout: seconds a call (a ``send``, an ack) retries while the broker
        is down before it raises ``ConnectionClosed`` (30; 0: one new connection at once,
        then raise - a send from a web request fails fast during a broker restart).

    Raises:
      pigeon.InvalidURL: not a pigeon URL, or one that names a queue.
    """

    def __init__(
        self,
        *,
        url: str = "pigeon://127.0.0.1:7878",
        middleware: list[Middleware] | None = None,
        namespace: str = "dramatiq:",
        lease: float = DEFAULT_LEASE,
        reconnect_timeout: float = 30.0,
    ) -> None:
        super().__init__(middleware=middleware)
        self._scheme, self._netloc, self._query = broker_url(url)
        self.url = url
        self.namespace = namespace
        self.lease = float(lease)
        self.reconnect_timeout = float(reconnect_timeout)
        self.queues: set[str] = set()
        self._senders: dict[str, BrokerQueue[bytes]] = {}
        self._lock = threading.Lock()

    # --- queues ------------------------------------------------------------------------------

    def pigeon_queue_name(self, queue_name: str) -> str:
        """The pigeon queue that holds Dramatiq queue ``queue_name``."""
        return self.namespace + q_name(queue_name)

    def _open(self, queue_name: str) -> BrokerQueue[bytes]:
        """A new handle on the queue (its own connections, one per thread that uses it)."""
        name = self.pigeon_queue_name(queue_name)
        url = queue_url(self._scheme, self._netloc, self._query, name)
        q: pigeon.Queue[bytes] = pigeon.Queue(
            url, serializer="raw", reconnect_timeout=self.reconnect_timeout
        )
        assert isinstance(q, BrokerQueue)
        return q

    def _sender(self, queue_name: str) -> BrokerQueue[bytes]:
        """The handle this broker puts, joins and flushes with (shared by every thread)."""
        with self._lock:
            q = self._senders.get(queue_name)
            if q is None:
                q = self._senders[queue_name] = self._open(queue_name)
            return q

    def declare_queue(self, queue_name: str) -> None:
        """Declare a Dramatiq queue. No delay queue (``.DQ``) is declared: the broker holds
        delayed messages itself, so workers run no consumer for one."""
        queue_name = q_name(queue_name)
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    # --- messages ----------------------------------------------------------------------------

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Put a message on its queue; with ``delay`` (milliseconds), the broker holds it
        until it is due: it is not delivered, so never leased, before then.

        Message options read here: ``broker_priority`` (0-9, higher first; otherwise the
        actor's ``priority`` maps to ``9 - priority``), ``dedup_id`` (a repeat within the
        queue's dedup window is confirmed, not stored again), ``headers`` (str -> str,
        carried beside the body and back in ``message.options["headers"]``).

        Raises:
          ValueError, TypeError: a delay beyond 366 days, a ``broker_priority`` outside
            0-9, headers or a dedup id pigeon does not accept (nothing was sent).
          dramatiq.errors.ConnectionClosed: the broker could not be reached.
        """
        queue_name = q_name(message.queue_name)
        fields = message.asdict()
        sent: Message[Any] = Message(
            **{**fields, "queue_name": queue_name, "options": dict(message.options)}
        )
        self.logger.debug("Enqueueing message %r on queue %r.", sent.message_id, queue_name)
        self.emit_before("enqueue", sent, delay)  # middleware may still change its options
        actor = self.actors.get(sent.actor_name)
        args = put_args(sent.options, delay, actor.priority if actor else 0)
        body: Message[Any] = Message(
            **{**fields, "queue_name": queue_name, "options": args.options}
        )
        try:
            self._sender(queue_name).put(
                body.encode(),
                delay=args.delay,
                priority=args.priority,
                dedup_id=args.dedup_id,
                headers=args.headers,
            )
        except BrokenResourceError as exc:
            raise connection_closed(exc) from exc
        self.emit_after("enqueue", sent, delay)
        return sent

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A consumer for a worker: it holds at most ``prefetch`` messages unacked and
        returns None after ``timeout`` milliseconds without one."""
        return PigeonConsumer(self._open(queue_name), prefetch, timeout, self.lease)

    # --- for tests and operators -------------------------------------------------------------

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until every message put on the queue was processed: acked after its task
        ran, or dead-lettered. A retry is put before the failed try is acked and a delayed
        message counts while it waits, so join() returns only when the retries are done
        too (pigeon's ``join()``: the broker counts unfinished messages; no polling).

        Raises:
          dramatiq.errors.QueueJoinTimeout: ``timeout`` milliseconds passed first.
        """
        try:
            self._sender(queue_name).join(timeout=None if timeout is None else timeout / 1000)
        except TimeoutError:
            raise join_timeout(queue_name) from None
        except BrokenResourceError as exc:
            raise connection_closed(exc) from exc

    def flush(self, queue_name: str) -> None:
        """Drop the messages waiting on the queue (ready and delayed) and its dead letters."""
        q = self._sender(queue_name)
        dead = self._open(queue_name + ".dead")
        try:
            q.purge()
            dead.purge()
        except BrokenResourceError as exc:
            raise connection_closed(exc) from exc
        finally:
            dead.close()

    def flush_all(self) -> None:
        for queue_name in self.get_declared_queues():
            self.flush(queue_name)

    def close(self) -> None:
        """Close this process's connections (consumers close their own)."""
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for q in senders:
            q.close()
