"""A message taken from a local queue (backends/local/message.py): a nack gives it back to
the shared ring, with a delay as a delayed record."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

import pytest

import pigeon
from pigeon.backends.local import LocalQueue


def _nack_later_and_exit(q: LocalQueue[Any]) -> None:
    msg = q.get_message(timeout=10)
    msg.nack(delay=0.5)
    os._exit(0)  # a consumer stopped during the retry delay (no finalizers, no timers)


def test_a_message_nacked_with_a_delay_waits_in_the_ring_not_in_the_consumer() -> None:
    """Round 4, clients #7: nack(delay=) kept the item in a threading.Timer of the
    consuming process; a consumer stopped during the delay lost it."""
    with pigeon.Queue() as q:
        q.put("order 7", priority=3, headers={"trace": "t1"})
        p = mp.get_context("fork").Process(target=_nack_later_and_exit, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert q.qsize() == 1  # back in the queue at once, not due yet
        with pytest.raises(pigeon.Empty, match="nothing is due yet"):
            q.get(timeout=0.1)
        msg = q.get_message(timeout=10)
        assert (msg.body, msg.delivery_count, msg.headers) == ("order 7", 2, {"trace": "t1"})
        msg.ack()


def test_a_nack_delay_is_checked_like_a_put_delay() -> None:
    with pigeon.Queue() as q:
        q.put("x")
        msg = q.get_message(timeout=1)
        with pytest.raises(ValueError, match="delay"):
            msg.nack(delay=float("nan"))
        msg.nack(delay=0.05)
        assert q.get(timeout=5) == "x"
