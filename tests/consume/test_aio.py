"""``pigeon.consume.aio``: coroutine workers under a time limit and a stop, with handlers
that ignore their cancellation."""

from __future__ import annotations

import asyncio
import threading

import pigeon
from tests.consume._support import SEEN, ignores_cancellation, record


def test_async_handlers_have_the_same_time_limit_as_threads() -> None:
    async def handler(item: str) -> None:
        if item == "slow":
            await asyncio.sleep(30)
        if item == "own-timeout":
            raise TimeoutError("the handler's own")  # not the time limit

    q: pigeon.Queue[str] = pigeon.Queue()
    q.put_many(["slow", "own-timeout", "fine"])
    q.shutdown()
    retry = pigeon.Retry(attempts=1)
    report = pigeon.consume(q, handler, concurrency=3, time_limit=0.3, retry=retry, grace=1)
    assert report.mode == "async" and report.processed == 1 and report.timed_out == 1
    errors = sorted(d.error for d in report.dead_letters)
    assert errors[0].startswith("TimeLimitExceeded") and errors[1].startswith("TimeoutError")
    q.close()


def test_an_async_handler_that_ignores_cancellation_does_not_hold_the_run_past_grace() -> None:
    q: pigeon.Queue[str] = pigeon.Queue()
    q.put("order-7")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    out: dict[str, pigeon.ConsumeReport] = {}
    runner = threading.Thread(target=lambda: out.update(r=pigeon.consume(
        q, ignores_cancellation, concurrency=1, stop=stop, grace=0.5)), daemon=True)  # fmt: skip
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "consume did not return after grace"
    assert out["r"].ended == "stopped" and SEEN["order-7"] == 1
    assert q.get(timeout=1) == "order-7"  # given back
    q.close()


def test_an_async_handler_that_ignores_its_time_limit_is_left_behind_and_replaced() -> None:
    async def handler(item: str) -> None:
        if item == "stuck":
            await ignores_cancellation(item)
        record(item)

    q: pigeon.Queue[str] = pigeon.Queue()
    q.put_many(["stuck", "a", "b"])
    q.shutdown()
    report = pigeon.consume(q, handler, concurrency=1, time_limit=0.3, grace=1,
                            retry=pigeon.Retry(attempts=1))  # fmt: skip
    assert report.ended == "shutdown" and report.processed == 2 and report.timed_out == 1
    (letter,) = report.dead_letters
    assert letter.item == "stuck" and letter.error.startswith("TimeLimitExceeded")
    q.close()
