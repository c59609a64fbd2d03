"""Fixtures of the consume tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pigeon.testing.broker import BrokerThread
from tests.consume._support import SEEN, TRIES


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    from tests import _handlers

    SEEN.clear()
    TRIES.clear()
    _handlers.TRIED.clear()
    yield
    SEEN.clear()


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b
