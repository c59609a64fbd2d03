"""The queue contract (pigeon.testing), one test per check, face and backend."""

from __future__ import annotations

import pytest

import pigeon
from pigeon.testing import ASYNC_CHECKS, SYNC_CHECKS, check_queue, run_check
from tests.conformance.conftest import OPTIONS, Backend


@pytest.mark.parametrize("check", list(SYNC_CHECKS), ids=str)
def test_sync(backend: Backend, check: str) -> None:
    run_check(SYNC_CHECKS[check], backend.make_queue, backend.unsupported)


@pytest.mark.parametrize("check", list(ASYNC_CHECKS), ids=str)
def test_async(backend: Backend, check: str) -> None:
    run_check(ASYNC_CHECKS[check], backend.make_queue, backend.unsupported)


def test_check_queue_reports_every_check(backend: Backend) -> None:
    report = check_queue(backend.make_queue, unsupported=backend.unsupported)
    assert len(report.passed) + len(report.unsupported) == len(SYNC_CHECKS) + len(ASYNC_CHECKS)


_ONE = {
    "delay": {"delay": 1.0},
    "ttl": {"ttl": 60.0},
    "dedup": {"dedup_id": "d-1"},
    "priority": {"priority": 5},
    "headers": {"headers": {"k": "v"}},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_a_declared_unsupported_option_is_refused_never_ignored(
    backend: Backend, option: str
) -> None:
    """A backend that cannot honour an option raises Unsupported at put() and stores
    nothing; one that can, stores the message."""
    q = backend.make_queue()
    try:
        if option in backend.unsupported:
            with pytest.raises(pigeon.Unsupported, match=option.replace("dedup", "dedup_id")):
                q.put("never", **_ONE[option])  # type: ignore[arg-type]
            assert q.qsize() == 0
        else:
            q.put("kept", **_ONE[option])  # type: ignore[arg-type]
            assert q.qsize() == 1
    finally:
        q.close()
