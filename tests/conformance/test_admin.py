"""Administration - ``peek``, ``purge``, ``delete``, ``move_to`` (``pigeon peek | purge |
delete | move``) - the same on every networked backend: pigeon://, redis:// (plain,
Cluster, Sentinel) and nats://. A local queue refuses each with ``Unsupported``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pigeon
from tests.conformance.conftest import BACKENDS, Backend, usable


@pytest.fixture(params=[b for b in BACKENDS if b.name != "local"], ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    """The networked backends (a local queue refuses administration: the last test)."""
    return usable(request.param)


@pytest.fixture
def q(backend: Backend) -> Iterator[Any]:
    queue = backend.make_queue()
    try:
        yield queue
    finally:
        queue.close()


def _name(q: Any) -> str:
    return str(q.url).split("?")[0].rsplit("/", 1)[1]


def _dead(q: Any) -> Any:
    """A handle of ``q``'s dead-letter queue (its URL's query kept)."""
    path, sep, query = str(q.url).partition("?")
    return pigeon.Queue(path + ".dead" + sep + query)


def test_peek_shows_waiting_then_delayed_messages_taking_nothing(q: Any) -> None:
    q.put("a")
    q.put("b", priority=5, headers={"tenant": "acme"})
    q.put("c", delay=60)
    shown = q.peek(10)
    assert [m["body"] for m in shown] == ["b", "a", "c"]
    assert [m["delivery_count"] for m in shown] == [0, 0, 0]
    assert [m["priority"] for m in shown] == [5, 0, 0]
    assert shown[0]["headers"] == {"tenant": "acme"} and shown[1]["headers"] == {}
    assert "due" not in shown[0] and "due" not in shown[1]
    assert 50 < shown[2]["due"] <= 60
    assert all(m["origin"] == m["reason"] == "" and m["age"] >= 0 for m in shown)
    assert [m["body"] for m in q.peek(1)] == ["b"]
    msg = q.get_message(timeout=10)
    assert (msg.body, msg.delivery_count) == ("b", 1)  # peek counted no delivery
    assert [m["body"] for m in q.peek(10)] == ["a", "c"]  # a held message is not shown
    msg.ack()


def test_move_replays_dead_letters_with_their_headers_and_a_fresh_count(q: Any) -> None:
    with _dead(q) as dead:
        q.put("x", headers={"k": "v"}, priority=2)
        msg = q.get_message(timeout=10)
        msg.nack(requeue=False, reason="bad input")
        (shown,) = dead.peek(10)
        assert (shown["body"], shown["origin"], shown["reason"]) == ("x", _name(q), "bad input")
        assert dead.move_to(_name(q)) == 1
        assert dead.qsize() == 0 and dead.peek(10) == []
        again = q.get_message(timeout=10)
        assert (again.body, again.delivery_count, again.headers) == ("x", 1, {"k": "v"})
        assert q.peek(10) == []
        again.ack()
        dead.delete()


def test_move_takes_a_limit_and_leaves_delayed_messages(q: Any) -> None:
    with _dead(q) as dead:
        dead.put_many(["1", "2", "3"])
        dead.put("later", delay=60)
        assert dead.move_to(_name(q), 2) == 2
        assert dead.move_to(_name(q)) == 1
        assert dead.move_to(_name(q)) == 0
        assert [m["body"] for m in dead.peek(10)] == ["later"]
        assert q.get_many(3, timeout=10) == ["1", "2", "3"]
        with pytest.raises(ValueError, match="itself"):
            dead.move_to(_name(dead))
        dead.delete()


def test_purge_drops_waiting_and_delayed_messages_not_held_ones(q: Any) -> None:
    q.put_many(["held", "b"])
    q.put("c", delay=60)
    msg = q.get_message(timeout=10)
    assert msg.body == "held"
    assert q.purge() == 2
    assert q.qsize() == 0 and q.peek(10) == []
    msg.ack()  # still held: it settles
    q.put("after")
    assert q.get(timeout=10) == "after"


def test_delete_drops_everything_and_the_queue_works_again(q: Any) -> None:
    q.put_many(["a", "b"])
    msg = q.get_message(timeout=10)
    assert msg.body == "a"
    assert q.delete() == 2
    q.put("new")
    assert q.get(timeout=10) == "new"
    assert q.qsize() == 0


_CALLS: dict[str, Callable[[Any], object]] = {
    "peek": lambda q: q.peek(10),
    "purge": lambda q: q.purge(),
    "delete": lambda q: q.delete(),
    "move_to": lambda q: q.move_to("other"),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_a_local_queue_refuses_administration_with_unsupported_and_changes_nothing(
    call: str,
) -> None:
    """No server holds a local queue (and it has no name): each call says so and what to
    do instead, and the queue is as it was."""
    with pigeon.Queue() as q:
        q.put_many(["a", "b"])
        q.put("later", delay=60)
        with pytest.raises(pigeon.Unsupported, match=f"a local queue has no {call}") as err:
            _CALLS[call](q)
        assert "pigeon://" in str(err.value)  # where it is offered
        assert q.qsize() == 3
        assert q.get_many(10, timeout=10) == ["a", "b"]
