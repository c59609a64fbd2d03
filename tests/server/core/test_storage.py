"""The ``Store`` interface the broker calls, and the memory store (``--memory``)."""

from __future__ import annotations

from pigeon.server.core import NO_TRANSACTION, Store, Stored


def test_the_memory_store_keeps_nothing_and_gives_nothing_back() -> None:
    store = Store()
    store.added("q", Stored(1, b"x"))
    store.added_many("q", [Stored(2, b"y")])
    store.declared("q", {"maxsize": 1})
    assert list(store.recover()) == []
    assert store.recover_queues() == {} and store.recover_dedup() == {}
    assert store.atomic() is NO_TRANSACTION is store.atomic()  # one object for every request
    assert not store.holds_replies and store.stalled_for == 0.0
    assert store.commit_histogram() is None


def test_a_store_that_takes_changes_one_by_one_is_given_batches_one_by_one() -> None:
    class OneByOne(Store):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        def added(self, queue: str, msg: Stored) -> None:
            self.seen.append(("added", msg.id))

        def removed(self, queue: str, msg_id: int) -> None:
            self.seen.append(("removed", msg_id))

    store = OneByOne()
    store.added_plain("q", [Stored(1, b"a"), Stored(2, b"b")])
    store.added_many("q", [Stored(3, b"c")])
    store.removed_many("q", [2, 1])
    assert store.seen == [("added", 1), ("added", 2), ("added", 3), ("removed", 2), ("removed", 1)]
