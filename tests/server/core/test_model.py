"""The broker's data: a queue's ready messages and its counts."""

from __future__ import annotations

from pigeon.options import DEFAULT_DEDUP_WINDOW
from pigeon.protocol import Get, Put
from pigeon.protocol.messages import PutOptions
from pigeon.server.core import Broker, Extra, QueueState, Ready, Stored
from tests.server.core._broker import A


def test_the_oldest_age_counts_a_low_priority_message_starved_by_higher_ones() -> None:
    b = Broker()
    b.connection_made(A)
    b.handle(A, Put(1, "q", b"old, priority 0"), now=0.0)
    for t in range(1, 7):
        b.handle(A, Put(1, "q", b"new", options=PutOptions(priority=9)), now=float(t))
        b.handle(A, Get(2, "q", 1, 0), now=float(t))
    assert b.queues["q"].oldest_age(6.0) == 6.0


def test_a_queue_gives_the_store_every_setting_and_takes_back_what_it_kept() -> None:
    q = QueueState("q", maxsize=3, lease=2.0)
    q.shutdown = True
    again = QueueState("q")
    again.configure(q.settings())
    assert again.settings() == q.settings() and again.declared
    partial = QueueState("q", lease=9.0)
    partial.configure({"maxsize": 1})  # an older store's settings lack the newer ones
    assert (partial.maxsize, partial.lease, partial.dedup_window) == (1, 9.0, DEFAULT_DEDUP_WINDOW)


def test_ready_hands_out_higher_priorities_first_and_each_in_its_original_order() -> None:
    ready = Ready()
    high = Extra(priority=5)
    for i, extra in enumerate([None, high, None, high, None], start=1):
        ready.append(Stored(i, b"%d" % i, extra=extra))
    first = ready.popleft()
    ready.give_back(ready.popleft())  # 4 comes back: ahead of nothing older of its priority
    ready.give_back(first)  # 2 comes back ahead of 4
    assert [m.id for m in ready] == [2, 4, 1, 3, 5]
    assert [ready.popleft().id for _ in range(len(ready))] == [2, 4, 1, 3, 5]
    assert ready.plain() is not None  # empty again: the plain FIFO is all there is
