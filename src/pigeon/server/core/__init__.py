"""The broker's rules as a sans-IO package: messages in, replies out, time passed in.

One concept a module, each depending only on those above it in this list (no cycle,
tests/server/core/test_layers.py):

- ``model``: the data - messages, deliveries in flight, parked requests, a queue's
  ready messages (``Ready``) and its state (``QueueState``), a message's reply cost;
- ``storage``: the ``Store`` interface the broker calls, and the memory store;
- ``deadlines``: the four deadline heaps;
- ``state``: ``BrokerState``, what every rule reads (queues, connections, limits, clocks);
- ``holdings``: what a connection holds (parked requests, deliveries, JOINs), CANCEL;
- ``placement``: where a put's messages go (priority, delay, ttl, dedup ids);
- ``requeue``: a message given back, delayed, or dead-lettered;
- ``delivery``: GET, taking and serving within the reply and unacked budgets;
- ``admission``: PUT - stored now, parked for room, or refused;
- ``tasks``: TASK_DONE and JOIN; ``settlement``: ACK, NACK, EXTEND;
- ``settings``: DECLARE and INFO; ``admin``: SHUTDOWN, PURGE, DELETE, MOVE, PEEK, STATS;
- ``recovery``: a store's contents at start;
- ``broker``: ``Broker`` - ``handle``, ``tick``, the connections' comings and goings.
"""

from __future__ import annotations

from pigeon.server.core.broker import Broker
from pigeon.server.core.model import (
    DEAD_SUFFIX,
    DELIVERY_OVERHEAD,
    Extra,
    InFlight,
    QueueState,
    Ready,
    Stored,
    headers_size,
    reply_cost,
)
from pigeon.server.core.state import BrokerState, Conn, Out
from pigeon.server.core.storage import NO_TRANSACTION, Store

__all__ = [
    "DEAD_SUFFIX",
    "DELIVERY_OVERHEAD",
    "NO_TRANSACTION",
    "Broker",
    "BrokerState",
    "Conn",
    "Extra",
    "InFlight",
    "Out",
    "QueueState",
    "Ready",
    "Store",
    "Stored",
    "headers_size",
    "reply_cost",
]

_DELIVERY_OVERHEAD = DELIVERY_OVERHEAD  # the name the tests have imported it by
