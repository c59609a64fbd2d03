"""taskiq on pigeon's broker: ``pip install 'pigeon-queue[taskiq]'``.

```python
from pigeon.integrations.taskiq import PigeonBroker

broker = PigeonBroker("pigeon://127.0.0.1:7878/taskiq")   # was ListQueueBroker("redis://...")
```
and ``taskiq worker app:broker`` as before.

Features
    ``kick``/``listen`` with acknowledgement: the worker's ack (``--ack-type``) is the
    pigeon ack, so a task in hand when its worker dies goes back to the queue the moment
    the worker's connection drops. Labels: ``delay`` is held by the broker (never
    delivered, so never leased, before it is due), ``priority`` 0-9 is a real priority,
    ``dedup_id`` a unique put, ``queue_name`` the queue it goes to.

Connection URL
    Any ``pigeon.AsyncQueue`` URL; built for ``pigeon://host:7878/QUEUE`` (``pigeon serve``),
    the queue ``taskiq`` when the URL names none.

Options
    ``lease`` (seconds a stuck worker may keep a task; 30), ``labels`` (other label names),
    and ``pigeon.AsyncQueue``'s (``maxsize``, ``max_deliveries``, ``dedup_window``, ...).

Delivery guarantees
    At least once: a task runs again only if its worker died, or was stuck for a whole
    lease, before the ack. A task whose worker dies ``max_deliveries`` times (20) goes to
    ``QUEUE.dead``. Not offered: results (use a result backend), broadcast to every
    worker (pigeon has no fanout), priorities above 9.
"""

from __future__ import annotations

from pigeon.integrations.taskiq.broker import DEFAULT_QUEUE, PigeonBroker
from pigeon.integrations.taskiq.labels import LabelNames

__all__ = ["DEFAULT_QUEUE", "LabelNames", "PigeonBroker"]
