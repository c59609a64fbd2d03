"""pigeon's errors as Dramatiq's (whose constructors carry no annotations: made here once)."""

from __future__ import annotations

from dramatiq.errors import ConnectionClosed, QueueJoinTimeout

__all__ = ["connection_closed", "join_timeout"]


def connection_closed(exc: BaseException) -> ConnectionClosed:
    """What a Dramatiq worker retries after: the broker could not be reached."""
    err: ConnectionClosed = ConnectionClosed(exc)  # type: ignore[no-untyped-call]
    err.__cause__ = exc
    return err


def join_timeout(queue_name: str) -> QueueJoinTimeout:
    err: QueueJoinTimeout = QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
    return err
