"""The old address of the broker's data types and of its ``Store`` interface, which are
now ``pigeon.server.core.model`` and ``pigeon.server.core.storage`` (re-exported by
``pigeon.server.core``).

Kept for code written against it before the split - the round-4 review scripts, branches
in flight; nothing in pigeon imports it (tests/server/core/test_layers.py), and new code
imports ``pigeon.server.core``.
"""

from __future__ import annotations

from pigeon.server.core.model import *  # noqa: F403
from pigeon.server.core.storage import *  # noqa: F403
