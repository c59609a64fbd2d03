"""Dramatiq on pigeon's broker: ``PigeonBroker(url="pigeon://127.0.0.1:7878")``.

Features
    A ``dramatiq.Broker`` whose queues are pigeon queues (``dramatiq:QUEUE``). ``delay``
    (``send_with_options(delay=ms)``, retries' backoff) is held by the broker: the message
    is not delivered, so never leased, before it is due, and no ``.DQ`` queue or in-worker
    delay queue exists. Priorities are the broker's: ``broker_priority`` 0-9 (higher
    first), else the actor's ``priority`` as ``9 - priority`` (0 -> 9, 9 and above -> 0).
    Message options ``dedup_id`` (unique sends) and ``headers`` (str -> str, back in
    ``message.options["headers"]``). ``join(queue)`` is pigeon's ``join()``: it returns
    once every message put was acked after its task ran, or dead-lettered, retries
    included. ``flush`` purges a queue and its dead letters.

Connection URL
    ``pigeon://[TOKEN@]HOST[:PORT]`` (``pigeon+tls://`` for TLS), no queue name: each
    actor's ``queue_name`` names one. Query options apply to every queue:
    ``?max_deliveries=N&dedup_window=S``.

Options
    ``namespace`` (``"dramatiq:"``), ``lease`` (600 s: how long a taken message stays
    with a worker process that stopped renewing it), ``middleware``.

Delivery guarantees
    At-least-once, with late acks: a worker acks after the task ran. A worker process
    that dies (SIGKILL, OOM) gives its messages back the moment the broker sees its
    connection drop (about ten seconds when its host is unplugged); one that stops
    without dying gives them back when their lease ends. A failed message (retries
    exhausted, ``throws``, an unknown actor) goes to ``dramatiq:QUEUE.dead`` with the
    exception as its reason (``pigeon peek``); a message delivered ``max_deliveries``
    times (20) without an ack - one that kills its worker each time - goes there too.

What is not offered (docs/integrations/dramatiq.md): a results backend (pigeon holds
no key-value store; use Dramatiq's Redis or Memcached backend), delays beyond 366 days
and ``broker_priority`` outside 0-9 (``ValueError`` at send), other URL schemes
(``pigeon.InvalidURL``: use Dramatiq's own brokers for Redis and RabbitMQ).
"""

from __future__ import annotations

from pigeon.integrations.dramatiq.broker import PigeonBroker
from pigeon.integrations.dramatiq.consumer import PigeonConsumer, PigeonMessageProxy

__all__ = ["PigeonBroker", "PigeonConsumer", "PigeonMessageProxy"]
