"""``pigeon://`` and ``pigeon+tls://``: the client of ``pigeon serve``.

Its conversation is ``pigeon.protocol.client.ClientConnection`` (sans-IO); each operation
is written once in ``ops.py`` as a generator of requests, driven by the blocking face
(``sync.py``: ``BrokerQueue``) with blocking reads and by the asyncio face (``aio.py``:
``AsyncBrokerQueue``) with awaits. See ``sync.py`` for Features, Connection URL, Options
and Delivery guarantees.
"""

from __future__ import annotations

from pigeon.backends.pigeon.aio import AsyncBrokerQueue
from pigeon.backends.pigeon.ops import Endpoint
from pigeon.backends.pigeon.sync import BrokerMessage, BrokerQueue

__all__ = ["AsyncBrokerQueue", "BrokerMessage", "BrokerQueue", "Endpoint"]
