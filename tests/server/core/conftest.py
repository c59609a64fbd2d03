from __future__ import annotations

import pytest

from pigeon.server.core import Broker
from tests.server.core._broker import A, B, C


@pytest.fixture
def broker() -> Broker:
    """A broker on the memory store with connections A, B and C."""
    b = Broker()
    for conn in (A, B, C):
        b.connection_made(conn)
    return b
