"""The contract checks, each a function of ``make_queue``. No pytest needed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue as stdlib_queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import pigeon
from pigeon.errors import ClosedResourceError, Empty, Full, LocalProtocolError, ShutDown

__all__ = ["ASYNC_CHECKS", "SYNC_CHECKS", "MakeQueue"]

F = TypeVar("F", bound=Callable[..., Any])
SHORT = 0.05  # seconds: timeouts that must expire (no assertion on how fast)
LONG = 10.0  # seconds: waits that must not expire


class MakeQueue(Protocol):
    def __call__(self, maxsize: int = 0) -> pigeon.Queue[Any]: ...


SYNC_CHECKS: dict[str, Callable[[MakeQueue], None]] = {}
ASYNC_CHECKS: dict[str, Callable[[MakeQueue], None]] = {}


def sync_check(*needs: str) -> Callable[[F], F]:
    def register(fn: F) -> F:
        fn.needs = needs  # type: ignore[attr-defined]
        SYNC_CHECKS[fn.__name__.removeprefix("check_")] = fn
        return fn

    return register


def async_check(*needs: str) -> Callable[[Callable[[MakeQueue], Coroutine[Any, Any, None]]], Any]:
    def register(fn: Callable[[MakeQueue], Coroutine[Any, Any, None]]) -> Any:
        def run(make_queue: MakeQueue) -> None:
            asyncio.run(asyncio.wait_for(fn(make_queue), LONG * 3))

        run.__name__ = fn.__name__
        run.needs = needs  # type: ignore[attr-defined]
        ASYNC_CHECKS[fn.__name__.removeprefix("check_async_")] = run
        return run

    return register


@contextlib.contextmanager
def raises(exc: type[BaseException], match: str | None = None) -> Iterator[None]:
    try:
        yield
    except exc as e:
        if match is not None:
            assert match in str(e), f"expected {match!r} in the message, got {str(e)!r}"
    else:
        raise AssertionError(f"did not raise {exc.__name__}")


@contextlib.contextmanager
def opened(make_queue: MakeQueue, maxsize: int = 0) -> Iterator[pigeon.Queue[Any]]:
    q = make_queue(maxsize=maxsize)
    try:
        yield q
    finally:
        q.close()


def in_thread(fn: Callable[[], object], delay: float = 0.0) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# --- synchronous face ---------------------------------------------------------------------


@sync_check()
def check_fifo_order(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        for i in range(100):
            q.put(i)
        assert [q.get(timeout=LONG) for _ in range(100)] == list(range(100))


@sync_check()
def check_item_types_round_trip(make_queue: MakeQueue) -> None:
    items: list[Any] = ["java", "Python", "JavaScript", 1, 2.5, None, [1, 2], {"a": "b"}, "é"]
    with opened(make_queue) as q:
        q.put_many(items)
        assert [q.get(timeout=LONG) for _ in items] == items


@sync_check()
def check_empty_raises_pigeon_and_stdlib_empty(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        with raises(Empty):
            q.get_nowait()
        with raises(stdlib_queue.Empty):
            q.get(block=False)
        with raises(Empty):
            q.get(timeout=SHORT)


@sync_check()
def check_negative_timeout_is_a_value_error(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=1) as q:
        with raises(ValueError, match="non-negative"):
            q.get(timeout=-1)
        with raises(ValueError, match="non-negative"):
            q.put(1, timeout=-0.5)


@sync_check()
def check_maxsize_full(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=2) as q:
        assert q.maxsize == 2
        q.put("a")
        q.put_nowait("b")
        assert q.full()
        assert q.qsize() == 2
        with raises(Full):
            q.put_nowait("c")
        with raises(stdlib_queue.Full):
            q.put("c", timeout=SHORT)
        assert q.get(timeout=LONG) == "a"
        q.put_nowait("c")
        assert [q.get(timeout=LONG), q.get(timeout=LONG)] == ["b", "c"]


@sync_check()
def check_qsize_and_empty_right_after_put(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        assert q.empty() and q.qsize() == 0 and not q.full()
        q.put("x")
        assert not q.empty() and q.qsize() == 1
        q.get(timeout=LONG)
        assert q.empty() and q.qsize() == 0


@sync_check()
def check_put_many_get_many(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put_many(range(10))
        q.put_many([])
        first = q.get_many(4, timeout=LONG)
        assert first == [0, 1, 2, 3]
        rest = q.get_many(100, timeout=LONG)
        assert 1 <= len(rest) <= 6 and rest == list(range(4, 4 + len(rest)))
        with raises(ValueError):
            q.get_many(0)
        while q.qsize():
            q.get_nowait()
        with raises(Empty):
            q.get_many(5, block=False)
        with raises(Empty):
            q.get_many(5, timeout=SHORT)


@sync_check()
def check_put_many_is_all_or_nothing(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=3) as q:
        q.put("a")
        with raises(Full):
            q.put_many(["b", "c", "d"], block=False)
        assert q.qsize() == 1
        q.put_many(["b", "c"], block=False)
        assert q.get_many(3, timeout=LONG) == ["a", "b", "c"]


@sync_check()
def check_blocked_get_woken_by_put_from_a_thread(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        t = in_thread(lambda: q.put("late"), delay=SHORT)
        assert q.get(timeout=LONG) == "late"
        t.join()


@sync_check()
def check_blocked_put_woken_by_get(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=1) as q:
        q.put("first")
        t = in_thread(lambda: q.get(timeout=LONG), delay=SHORT)
        q.put("second", timeout=LONG)
        t.join()
        assert q.get(timeout=LONG) == "second"


@sync_check("join", "task_done")
def check_task_done_and_join(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put_many(["a", "b", "c"])
        assert q.get(timeout=LONG) == "a"
        q.task_done()  # a backend without it says so here, before any thread starts
        done: list[str] = []

        def work() -> None:
            for _ in range(2):
                done.append(q.get(timeout=LONG))
                q.task_done()

        t = in_thread(work, delay=SHORT)
        q.join()
        assert done == ["b", "c"]
        t.join()
        with raises(ValueError):
            q.task_done()


@sync_check("shutdown")
def check_shutdown_drains_then_raises(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put_many(["java", "Python"])
        q.shutdown()
        with raises(ShutDown):
            q.put("JavaScript")
        assert q.get(timeout=LONG) == "java"
        assert q.get_nowait() == "Python"
        with raises(ShutDown):
            q.get(timeout=LONG)
        with raises(ShutDown):
            q.get_nowait()


@sync_check("shutdown")
def check_iteration_ends_at_shutdown(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        words = ["java", "Python", "JavaScript"]

        def writer() -> None:
            for w in words:
                q.put(w)
            q.shutdown()

        t = in_thread(writer, delay=SHORT)
        assert list(q) == words
        t.join()


@sync_check("shutdown")
def check_shutdown_wakes_blocked_getter(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        errors: list[BaseException] = []

        def getter() -> None:
            try:
                q.get(timeout=LONG)
            except BaseException as exc:
                errors.append(exc)

        t = in_thread(getter)
        time.sleep(SHORT)
        q.shutdown()
        t.join(LONG)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ShutDown)


@sync_check("shutdown")
def check_shutdown_immediate_drops_items(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put_many([1, 2, 3])
        q.shutdown(immediate=True)
        with raises(ShutDown):
            q.get_nowait()
        assert q.qsize() == 0
        with contextlib.suppress(pigeon.Unsupported):
            q.join(timeout=LONG)  # the dropped items count as done


@sync_check("get_message")
def check_get_message_ack_and_nack(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("job")
        msg = q.get_message(timeout=LONG)
        assert msg.body == "job" and msg.delivery_count == 1
        msg.nack(requeue=True)
        again = q.get_message(timeout=LONG)
        assert again.body == "job" and again.delivery_count == 2
        again.ack()
        with raises(LocalProtocolError):
            again.ack()
        with raises(Empty):
            q.get_message(timeout=SHORT)


@sync_check("get_message")
def check_get_message_context_manager(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("ok")
        q.put("boom")
        with q.get_message(timeout=LONG) as msg:
            assert msg.body == "ok"
        with contextlib.suppress(RuntimeError), q.get_message(timeout=LONG) as msg:
            raise RuntimeError("handler failed")
        back = q.get_message(timeout=LONG)
        assert back.body == "boom" and back.delivery_count == 2
        back.ack()


@sync_check()
def check_close_and_context_manager(make_queue: MakeQueue) -> None:
    q = make_queue()
    with q as same:
        assert same is q
        q.put(1)
    with raises(ClosedResourceError):
        q.put(2)
    with raises(ClosedResourceError):
        q.get_nowait()
    q.close()  # idempotent


# --- the edges: where backends are easiest to get wrong ------------------------------------


def other_handle(q: pigeon.Queue[Any], **options: Any) -> pigeon.Queue[Any]:
    """A second handle on the same queue (for a networked one, another connection)."""
    if q.url is not None:
        return pigeon.Queue(q.url, **options)
    from pigeon.backends.local import LocalQueue

    return LocalQueue(_path=q._path, **options)  # type: ignore[attr-defined]


@sync_check("get_message")
def check_nack_at_capacity_never_blocks(make_queue: MakeQueue) -> None:
    """A message taken for processing keeps its place: a nack never waits for room."""
    with opened(make_queue, maxsize=1) as q:
        q.put("a")
        msg = q.get_message(timeout=LONG)
        with contextlib.suppress(Full):
            q.put_nowait("b")  # local: room (the item left); networked: it is still held
        done = threading.Event()

        def nack() -> None:
            msg.nack()
            done.set()

        in_thread(nack)
        assert done.wait(LONG), "nack blocked on a full queue"
        got = set()
        with contextlib.suppress(Empty):
            while True:
                m = q.get_message(timeout=1.0)
                got.add(m.body)
                m.ack()
        assert "a" in got and got <= {"a", "b"}


@sync_check("get_message", "join", "task_done")
def check_join_after_nack_ack_and_task_done(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("x")
        q.get_message(timeout=LONG).nack()
        again = q.get_message(timeout=LONG)
        assert again.delivery_count == 2
        again.ack()
        q.task_done()
        q.join(timeout=LONG)  # the nack did not count the item twice


@sync_check("get_message", "lease")
def check_message_lease_and_extend_mean_now_plus_seconds(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        if q.url is None:
            raise pigeon.Unsupported("a local message has no lease: it never comes back alone")
        other = other_handle(q)
        try:
            q.put("job")
            msg = q.get_message(timeout=LONG, lease=1.0)
            with raises(Empty):
                other.get_message(timeout=0.3)  # held
            msg.extend(2.5)  # longer than the lease asked for, and than 1 s from now
            time.sleep(1.2)  # past the first lease
            with raises(Empty):
                other.get_message(timeout=0.3)  # still held: the extension counts
            again = other.get_message(timeout=LONG)  # back once the extension ran out
            assert again.body == "job" and again.delivery_count == 2
            again.ack()
        finally:
            other.close()


@sync_check()
def check_undecodable_payload_raises_decode_error_and_loses_nothing_else(
    make_queue: MakeQueue,
) -> None:
    with opened(make_queue) as q:
        raw = other_handle(q, serializer="raw")
        try:
            q.put("before")
            raw.put(b"\xc1 is never msgpack, nor pickle")
            q.put("after")
            got: list[Any] = []
            error: pigeon.DecodeError | None = None
            for _ in range(4):
                try:
                    got += q.get_many(10, timeout=1.0)
                except pigeon.DecodeError as exc:
                    error = exc
                except Empty:
                    break
            assert error is not None and error.raw == b"\xc1 is never msgpack, nor pickle"
            assert sorted(got) == ["after", "before"]
        finally:
            raw.close()


@sync_check("maxsize")
def check_batches_at_capacity_under_concurrency_are_all_or_none(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=5) as q:
        errors: list[BaseException] = []

        def producer(tag: str) -> None:
            p = other_handle(q)
            try:
                for r in range(3):
                    p.put_many([f"{tag}{r}-{i}" for i in range(3)], timeout=LONG)
            except BaseException as exc:
                errors.append(exc)
            finally:
                p.close()

        threads = [in_thread(functools.partial(producer, t)) for t in "ab"]
        got: list[str] = []
        deadline = time.monotonic() + 3 * LONG
        while len(got) < 18 and time.monotonic() < deadline:
            with contextlib.suppress(Empty):
                got += q.get_many(10, timeout=0.5)
        for t in threads:
            t.join(LONG)
        assert errors == []
        assert sorted(got) == sorted(
            f"{t}{r}-{i}" for t in "ab" for r in range(3) for i in range(3)
        )


@sync_check("large_items")
def check_a_one_mib_item_round_trips(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        item = b"x" * (1 << 20)
        try:
            q.put(item)
        except pigeon.TooLarge as exc:
            raise pigeon.Unsupported(str(exc)) from exc
        assert q.get(timeout=LONG) == item


@sync_check()
def check_short_lived_threads_leave_nothing_behind(make_queue: MakeQueue) -> None:
    import gc
    import os

    with opened(make_queue) as q:
        q.put(0)
        q.get(timeout=LONG)
        if not os.path.isdir("/proc/self/fd"):
            return
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for i in range(40):
            in_thread(functools.partial(q.put, i)).join(LONG)
        gc.collect()
        grew = len(os.listdir("/proc/self/fd")) - before
        assert grew < 12, f"40 finished threads left {grew} more file descriptors"
        assert len(q.get_many(50, timeout=LONG)) >= 1


# --- asyncio face -------------------------------------------------------------------------


def _aq(q: pigeon.Queue[Any]) -> pigeon.AsyncQueue[Any]:
    return pigeon.AsyncQueue(q)


async def _later(delay: float, fn: Callable[[], Awaitable[object] | object]) -> None:
    await asyncio.sleep(delay)
    result = fn()
    if asyncio.iscoroutine(result):
        await result


@async_check()
async def check_async_fifo_and_nowait(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            await aq.put("java")
            await aq.put_nowait("Python")
            await aq.put_many(["JavaScript"])
            assert await aq.qsize() == 3
            assert await aq.get() == "java"
            assert await aq.get_nowait() == "Python"
            assert await aq.get_many(5) == ["JavaScript"]
            assert await aq.empty()
            with raises(Empty):
                await aq.get_nowait()
            with raises(Empty):
                await aq.get(timeout=SHORT)


@async_check()
async def check_async_full(make_queue: MakeQueue) -> None:
    with opened(make_queue, maxsize=1) as q:
        async with _aq(q) as aq:
            await aq.put(1)
            assert await aq.full()
            with raises(Full):
                await aq.put_nowait(2)
            with raises(Full):
                await aq.put(2, timeout=SHORT)
            task = asyncio.create_task(aq.put(3, timeout=LONG))
            await asyncio.sleep(SHORT)
            assert await aq.get() == 1
            await task
            assert await aq.get() == 3


@async_check()
async def check_async_get_woken_by_thread_put(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            t = in_thread(lambda: q.put("from a thread"), delay=SHORT)
            assert await aq.get(timeout=LONG) == "from a thread"
            t.join()


@async_check()
async def check_async_loop_not_blocked_while_waiting(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            with raises(Empty):
                await aq.get(timeout=0.2)
            tick.cancel()
            assert ticks >= 5, f"the event loop was blocked: only {ticks} ticks"


@async_check()
async def check_async_cancelled_get_many_loses_nothing(make_queue: MakeQueue) -> None:
    """Cancelled just as the item is on its way: whichever wins, nothing vanishes."""
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            taken = 0
            for i in range(5):
                task = asyncio.create_task(aq.get_many(5))
                await asyncio.sleep(SHORT / 2)
                await aq.put(i)
                task.cancel()
                try:
                    taken += len(await task)
                except asyncio.CancelledError:
                    pass
            left = 0
            with contextlib.suppress(Empty):
                while True:
                    left += len(await aq.get_many(10, timeout=1.0))
            assert taken + left == 5


@async_check()
async def check_async_cancelled_get_loses_nothing(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            task = asyncio.create_task(aq.get())
            await asyncio.sleep(SHORT)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await aq.put("kept")
            assert await aq.get(timeout=LONG) == "kept"


@async_check("shutdown")
async def check_async_iteration_until_shutdown(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:

            async def writer() -> None:
                for w in ["java", "Python", "JavaScript"]:
                    await aq.put(w)
                await aq.shutdown()

            task = asyncio.create_task(writer())
            assert [w async for w in aq] == ["java", "Python", "JavaScript"]
            await task
            with raises(ShutDown):
                await aq.put("late")


@async_check("join", "task_done")
async def check_async_join(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            await aq.put_many([1, 2])

            async def work() -> None:
                for _ in range(2):
                    await aq.get()
                    await aq.task_done()

            task = asyncio.create_task(_later(SHORT, work))
            await aq.join(timeout=LONG)
            await task


@async_check("get_message")
async def check_async_get_message(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            await aq.put("job")
            msg = await aq.get_message(timeout=LONG)
            assert msg.body == "job"
            msg.nack()
            again = await aq.get_message(timeout=LONG)
            assert again.delivery_count == 2
            again.ack()


# --- message options ----------------------------------------------------------------------

_BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"delay": -1}, ValueError),
    ({"delay": float("nan")}, ValueError),
    ({"delay": "5"}, TypeError),
    ({"ttl": 0}, ValueError),
    ({"ttl": -2.5}, ValueError),
    ({"priority": 10}, ValueError),
    ({"priority": -1}, ValueError),
    ({"priority": 1.5}, TypeError),
    ({"priority": True}, TypeError),
    ({"dedup_id": ""}, ValueError),
    ({"dedup_id": 7}, TypeError),
    ({"dedup_id": "x" * 257}, ValueError),
    ({"headers": {"k": 1}}, TypeError),
    ({"headers": {1: "v"}}, TypeError),
    ({"headers": ["k", "v"]}, TypeError),
    ({"headers": {"": "v"}}, ValueError),
    ({"headers": {f"k{i}": "v" for i in range(65)}}, ValueError),
    ({"headers": {"k": "v" * 20_000}}, ValueError),
]


@sync_check()
def check_bad_message_options_are_refused_before_anything_is_sent(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        for options, exc in _BAD_OPTIONS:
            name = next(iter(options))
            with raises(exc, match=name):
                q.put("never", **options)
            many: dict[str, Any] = (
                {"dedup_ids": [options["dedup_id"]]} if name == "dedup_id" else options
            )
            with raises(exc, match=name):
                q.put_many(["never"], **many)
        with raises(ValueError, match="dedup_ids"):
            q.put_many(["a", "b"], dedup_ids=["only one"])
        with raises(TypeError):
            q.put_many(["a"], dedup_id="x")  # type: ignore[call-arg]
        with raises(Empty):
            q.get(timeout=SHORT)


@sync_check("headers")
def check_headers_travel_with_the_message(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("plain")
        q.put("tagged", headers={"tenant": "acme", "trace": "t-1 é"})
        plain = q.get_message(timeout=LONG)
        assert plain.body == "plain" and plain.headers == {}
        plain.ack()
        msg = q.get_message(timeout=LONG)
        assert msg.headers == {"tenant": "acme", "trace": "t-1 é"}
        msg.nack(requeue=True)
        again = q.get_message(timeout=LONG)
        assert again.body == "tagged" and again.delivery_count == 2
        assert again.headers == {"tenant": "acme", "trace": "t-1 é"}
        again.ack()
        q.put_many(["a", "b"], headers={"batch": "1"})
        got = [q.get_message(timeout=LONG) for _ in range(2)]
        assert [(m.body, m.headers) for m in got] == [("a", {"batch": "1"}), ("b", {"batch": "1"})]
        for m in got:
            m.ack()


@sync_check("priority")
def check_priority_higher_first_fifo_within_one(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("a0")
        q.put("b5", priority=5)
        q.put("c5", priority=5)
        q.put("d9", priority=9)
        q.put("e0", priority=0)
        q.put_many(["f5", "g5"], priority=5)
        assert [q.get(timeout=LONG) for _ in range(7)] == ["d9", "b5", "c5", "f5", "g5", "a0", "e0"]
        q.put("low")
        q.put("high", priority=3)
        msg = q.get_message(timeout=LONG)
        assert msg.body == "high"
        msg.nack(requeue=True)  # a redelivered message keeps its priority
        assert q.get(timeout=LONG) == "high"
        assert q.get(timeout=LONG) == "low"


@sync_check("delay")
def check_delay_hides_a_message_until_it_is_due(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        started = time.monotonic()
        q.put("later", delay=0.6)
        q.put("now")
        assert q.qsize() == 2  # a delayed message is counted
        assert q.get(timeout=LONG) == "now"
        with raises(Empty):
            q.get_nowait()
        assert q.get(timeout=LONG) == "later"
        assert time.monotonic() - started >= 0.5


@sync_check("ttl")
def check_a_message_not_taken_within_its_ttl_is_not_delivered(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("stale", ttl=0.2)
        q.put("fresh", ttl=LONG * 6)
        time.sleep(0.6)
        assert q.get(timeout=LONG) == "fresh"
        with raises(Empty):
            q.get(timeout=SHORT)
        if q.url is not None:  # a networked queue moves it to NAME.dead
            dead: pigeon.Queue[Any]
            with pigeon.Queue(q.url.split("?")[0] + ".dead") as dead:
                msg: pigeon.Message[Any] = dead.get_message(timeout=LONG)
                assert msg.body == "stale"
                msg.ack()


@sync_check("dedup")
def check_a_repeated_dedup_id_is_confirmed_but_not_stored(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        q.put("first", dedup_id="order-1")
        q.put("again", dedup_id="order-1")  # confirmed: no error
        q.put("other", dedup_id="order-2")
        msg = q.get_message(timeout=LONG)
        assert msg.body == "first"
        msg.ack()
        q.put("after the ack", dedup_id="order-1")  # still within the window
        assert q.get(timeout=LONG) == "other"
        q.put_many(["x", "y", "z"], dedup_ids=["order-2", "order-3", "order-3"])
        assert q.get(timeout=LONG) == "y"
        with raises(Empty):
            q.get(timeout=SHORT)


@async_check("headers")
async def check_async_message_options(make_queue: MakeQueue) -> None:
    with opened(make_queue) as q:
        async with _aq(q) as aq:
            await aq.put("tagged", headers={"k": "v"})
            msg = await aq.get_message(timeout=LONG)
            assert msg.body == "tagged" and msg.headers == {"k": "v"}
            msg.ack()
            await aq.put_many(["a"], headers={"b": "1"})
            msg = await aq.get_message(timeout=LONG)
            assert msg.headers == {"b": "1"}
            msg.ack()
            with raises(ValueError, match="priority"):
                await aq.put("never", priority=11)
