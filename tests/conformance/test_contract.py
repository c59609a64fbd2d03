"""The queue contract (pigeon.testing), one test per check, face and backend."""

from __future__ import annotations

import pytest

from pigeon.testing import ASYNC_CHECKS, SYNC_CHECKS, check_queue, run_check
from tests.conformance.conftest import Backend


@pytest.mark.parametrize("check", list(SYNC_CHECKS), ids=str)
def test_sync(backend: Backend, check: str) -> None:
    run_check(SYNC_CHECKS[check], backend.make_queue, backend.unsupported)


@pytest.mark.parametrize("check", list(ASYNC_CHECKS), ids=str)
def test_async(backend: Backend, check: str) -> None:
    run_check(ASYNC_CHECKS[check], backend.make_queue, backend.unsupported)


def test_check_queue_reports_every_check(backend: Backend) -> None:
    report = check_queue(backend.make_queue, unsupported=backend.unsupported)
    assert len(report.passed) + len(report.unsupported) == len(SYNC_CHECKS) + len(ASYNC_CHECKS)
