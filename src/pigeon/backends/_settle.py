"""What a settle refused for a stale delivery says, the same on every backend that checks
the holder (redis://, nats://; pigeon:// refuses it in the broker)."""

from __future__ import annotations

from pigeon.errors import LocalProtocolError


def stale_delivery(what: str, name: str, count: int) -> LocalProtocolError:
    """The error for ``what`` (ack, nack, extend) of delivery ``count`` of message ``name``
    after its lease ran out and it was delivered again: the settle changed nothing."""
    return LocalProtocolError(
        f"cannot {what} {name}: delivery {count} of it no longer holds it: its lease ran "
        "out and it was delivered again (to this or another consumer), which holds it "
        f"now; the {what} changed nothing. Work that may outlast the lease needs a "
        "longer one (get_message(lease=), ?lease=) or extend() in time; handlers must "
        "be idempotent (at-least-once)"
    )
