"""``pigeon.consume.crashes``: the worker processes each message killed, counted for that
message - by the identity its backend tells, else by its bytes - never for its twins."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from pigeon._queue_base import Message
from pigeon.consume.crashes import Crashes


class Held(Message[Any]):
    def __init__(self, delivery_count: int, identity: Hashable | None = None) -> None:
        self.body = {"job": "refresh-cache"}
        self.delivery_count = delivery_count
        self.headers = {}
        self._identity = identity


PAYLOAD = b"the same bytes"


def test_twins_with_their_own_ids_have_their_own_counts() -> None:
    crashes = Crashes()
    twins = [Held(1, identity=i) for i in (41, 42, 43)]
    keys = [crashes.key(m, PAYLOAD) for m in twins]
    assert [crashes.killed(k, m) for k, m in zip(keys, twins, strict=True)] == [1, 1, 1]
    assert crashes.of(keys[2], Held(2, identity=43)) == 1  # its next delivery


def test_a_message_carries_its_count_to_its_later_deliveries_until_forgotten() -> None:
    crashes = Crashes()
    key = crashes.key(Held(1, identity=7), PAYLOAD)
    for delivery in (1, 2, 3):
        assert crashes.killed(key, Held(delivery, identity=7)) == delivery
    assert crashes.of(key, Held(4, identity=7)) == 3
    crashes.forget(key)
    assert crashes.of(key, Held(5, identity=7)) == 0


def test_an_id_that_comes_again_at_an_earlier_delivery_is_another_message() -> None:
    # a broker that lost its memory gives a new message the id of one that killed workers
    crashes = Crashes()
    key = crashes.key(Held(1, identity=1), PAYLOAD)
    crashes.killed(key, Held(1, identity=1))
    crashes.killed(key, Held(2, identity=1))
    assert crashes.of(key, Held(1, identity=1)) == 0
    assert crashes.killed(key, Held(1, identity=1)) == 1


def test_without_an_identity_the_bytes_stand_in_and_twins_do_not_add_up() -> None:
    # the local queue tells no identity: three twins, each killing one worker at its
    # first delivery, are each at one; the one that comes back carries its one
    crashes = Crashes()
    key = crashes.key(Held(1), PAYLOAD)
    assert key == crashes.key(Held(3), PAYLOAD) != crashes.key(Held(1), b"other bytes")
    assert [crashes.killed(key, Held(1)) for _ in range(3)] == [1, 1, 1]
    assert crashes.of(key, Held(1)) == 0
    assert crashes.of(key, Held(2)) == 1
