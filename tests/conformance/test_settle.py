"""A settle counts only for the delivery that holds the message. After its lease ran out
and another consumer got the message again, the first delivery's ack, nack or extend is
refused with ``LocalProtocolError`` and changes nothing; the new holder's ack settles it,
once. The same on pigeon://, redis:// (plain, Cluster, Sentinel: one set of scripts) and
nats:// (JetStream acts on any delivery's ack: pigeon asks first once the lease may have
run out)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pigeon
from tests.conformance.conftest import Backend

LEASE = 1.0  # the queue's lease: the whole of it runs out, no shorter one asked for
LONG = 10.0

_STALE: dict[str, Callable[[Any], None]] = {
    "ack": lambda m: m.ack(),
    "nack": lambda m: m.nack(requeue=True),
    "reject": lambda m: m.nack(requeue=False),
    "extend": lambda m: m.extend(0.0),
}


@pytest.fixture
def url(backend: Backend) -> Iterator[str]:
    if backend.name == "local":
        pytest.skip("a local message has no lease: it never comes back alone")
    q = backend.make_queue()
    try:
        yield str(q.url)
    finally:
        q.close()


@pytest.mark.parametrize("what", sorted(_STALE))
def test_a_settle_from_a_delivery_whose_lease_ran_out_is_refused(url: str, what: str) -> None:
    with pigeon.Queue(url, lease=LEASE) as a, pigeon.Queue(url, lease=LEASE) as b:
        a.put("job")
        first = a.get_message(timeout=LONG)
        time.sleep(LEASE + 0.5)  # the lease runs out
        second = b.get_message(timeout=LONG)
        assert (second.body, second.delivery_count) == ("job", 2)
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            _STALE[what](first)
        with pytest.raises(pigeon.Empty):
            a.get_message(timeout=0.5)  # still held by b: the stale call changed nothing
        second.ack()
        assert b.qsize() == 0
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=0.5)
