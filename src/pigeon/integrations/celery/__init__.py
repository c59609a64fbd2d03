"""Celery on pigeon's broker: ``pip install 'pigeon-queue[celery]'``, then one line.

```python
import pigeon.integrations.celery  # registers pigeon:// with kombu
app = Celery("proj", broker="pigeon://127.0.0.1:7878//")
```

or, without the import, ``broker_transport = "pigeon.integrations.celery:Transport"``
in the app's configuration. kombu finds transports by URL scheme in
``kombu.transport.TRANSPORT_ALIASES`` and has no entry point for third-party ones, so
importing this module adds ``pigeon`` there. The transport is
``pigeon.integrations.celery.transport`` (docs/integrations/celery.md).
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from pigeon.integrations.celery.transport import Channel, Transport

__all__ = ["Channel", "Transport"]

TRANSPORT_ALIASES.setdefault("pigeon", "pigeon.integrations.celery:Transport")
