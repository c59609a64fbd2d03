"""``pigeon.consume.policy``: retries and dead letters, the retry delay, what a handler is
(sync or async, whatever wraps it), how a failure is described, undecodable items."""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import Any

import pytest

import pigeon
from pigeon.testing.broker import BrokerThread
from tests.consume._support import SEEN, always_fails, coroutine, flaky, record


@pytest.mark.parametrize("where", ["local", "pigeon"])
def test_retries_then_success_and_dead_letters(broker: BrokerThread, where: str) -> None:
    q = pigeon.Queue() if where == "local" else pigeon.Queue(broker.url("retry"))
    q.put("flaky")
    q.shutdown()
    retry = pigeon.Retry(attempts=3, backoff=0.01)
    report = pigeon.consume(q, flaky, mode="thread", concurrency=2, retry=retry)
    assert SEEN["flaky"] == 3 and report.processed == 1
    assert report.failed == 2 and report.retried == 2 and report.dead == 0
    q.close()

    q = pigeon.Queue() if where == "local" else pigeon.Queue(broker.url("doomed"))
    q.put("poison")
    q.shutdown()
    report = pigeon.consume(q, always_fails, mode="thread", concurrency=1, retry=retry)
    assert report.dead == 1 and report.processed == 0 and report.failed == 3
    if where == "local":  # no dead-letter queue: kept in the report, never dropped
        (letter,) = report.dead_letters
        assert letter.item == "poison" and "ValueError" in letter.error
    else:
        with pigeon.Queue(broker.url("doomed.dead")) as dead:
            (shown,) = dead.peek(5)  # type: ignore[attr-defined]
            assert shown["body"] == "poison" and "ValueError: cannot handle" in shown["reason"]
    q.close()


def test_retry_delay_follows_the_formula() -> None:
    r = pigeon.Retry(backoff=1.0, max_backoff=5.0, jitter=False)
    assert [r.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    j = pigeon.Retry(backoff=1.0, max_backoff=60.0)
    assert all(0 <= j.delay(3) <= 4.0 for _ in range(100))


def test_retry_delay_is_defined_for_any_delivery_count() -> None:
    r = pigeon.Retry(attempts=10**9, backoff=1.0, max_backoff=60.0, jitter=False)
    assert r.delay(1025) == r.delay(1100) == r.delay(10**12) == 60.0
    assert pigeon.Retry(backoff=0.0, jitter=False).delay(10**6) == 0.0


def test_an_item_retried_past_a_thousand_deliveries_stays_in_the_queue() -> None:
    q: pigeon.Queue[str] = pigeon.Queue()
    q.put("invoice")
    tries: list[int] = []

    def handler(item: str) -> None:
        tries.append(1)
        if len(tries) <= 1100:
            raise ConnectionError("billing service down")

    q.shutdown()
    report = pigeon.consume(q, handler, mode="thread", concurrency=1, grace=1,
                            retry=pigeon.Retry(attempts=10**9, backoff=0.0))  # fmt: skip
    assert report.processed == 1 and report.failed == 1100 and report.worker_deaths == 0
    q.close()


class Mailer:
    """A handler object whose ``__call__`` is a coroutine function."""

    async def __call__(self, item: Any) -> None:
        await asyncio.sleep(0)
        record(item)


def _plain_decorator(fn: Any) -> Any:
    def wrapper(*args: Any) -> Any:  # no functools.wraps: nothing tells it is async
        return fn(*args)

    return wrapper


def _wraps_decorator(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


@_wraps_decorator
async def wrapped_coroutine(item: Any) -> None:
    await asyncio.sleep(0)
    record(item)


disguised_coroutine = _plain_decorator(coroutine)


@pytest.mark.parametrize(
    "handler", [Mailer(), wrapped_coroutine, disguised_coroutine], ids=["object", "wraps", "plain"]
)
def test_an_async_handler_the_runner_cannot_see_at_once_is_awaited_not_acked(handler: Any) -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(10))
    q.shutdown()
    report = pigeon.consume(q, handler, concurrency=4)  # mode="auto"
    assert report.mode == "async", report.reason
    assert report.processed == 10 and collections.Counter(range(10)) == SEEN
    q.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_an_async_handler_in_disguise_ends_a_thread_or_process_run_and_loses_nothing(
    mode: str,
) -> None:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(3))
    report = pigeon.consume(q, disguised_coroutine, mode=mode, concurrency=1, grace=1)
    assert report.ended == "failed" and "mode='async'" in (report.error or "")
    assert report.processed == 0 and report.failed == 0
    assert sorted(q.get_many(10, timeout=1)) == [0, 1, 2]  # given back, not acked
    q.close()


def test_an_exception_whose_str_raises_is_a_failure_with_a_reason() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def handler(item: Any) -> None:
        raise Broken

    q: pigeon.Queue[int] = pigeon.Queue()
    q.put(1)
    q.shutdown()
    report = pigeon.consume(q, handler, mode="thread", retry=pigeon.Retry(attempts=1))
    (letter,) = report.dead_letters
    assert letter.error == "Broken: <str() of the exception raised RuntimeError>"
    assert report.worker_deaths == 0
    q.close()


def test_an_undecodable_local_item_is_kept_in_the_dead_letters_as_its_bytes() -> None:
    q: pigeon.Queue[Any] = pigeon.Queue()
    q.put("order-1")
    q.put(_Undecodable())
    q.put("order-3")
    q.shutdown()
    report = pigeon.consume(q, record, mode="thread", concurrency=1)
    assert report.processed == 2 and report.dead == 1
    (letter,) = report.dead_letters
    assert isinstance(letter.item, bytes) and b"_refuse" in letter.item
    assert letter.error.startswith("DecodeError: local queue: an item cannot be decoded")
    q.close()


def _refuse(*fields: str) -> None:
    raise ValueError("schema v2: this consumer only knows v1")


class _Undecodable:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ("id", "amount"))
