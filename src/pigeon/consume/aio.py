"""Coroutine workers: ``n`` tasks on an event loop of their own, supervised for the time
limit and for grace. A coroutine that ignores its cancellation is abandoned like a thread:
its message is given back and it runs on, never awaited."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pigeon.consume.policy import SLICE, TICK, Ended, Run, describe, time_limit_error

if TYPE_CHECKING:
    from pigeon.aio import AsyncQueue

__all__ = ["CANCEL_WAIT", "run_async"]

log = logging.getLogger("pigeon.consume")

CANCEL_WAIT = 1.0  # seconds a cancelled coroutine has to end before it is abandoned


def run_async(run: Run, n: int, grace: float) -> None:
    """``n`` coroutines on a loop of their own (``asyncio.run``, except that a coroutine
    that ignores its cancellation is not awaited for ever: like an abandoned thread, it
    runs on - its loop in a daemon thread - while the process lives. Closing it instead
    would run its code in a finalizer with no loop, where such a coroutine spins)."""
    from pigeon.aio import AsyncQueue

    loop = asyncio.new_event_loop()
    workers = _AsyncRun(run, n, grace, loop, AsyncQueue(run.q))
    try:
        loop.run_until_complete(workers.main())
    finally:
        stuck = {t for t in workers.stuck if not t.done()}  # they had their chance
        pending = asyncio.all_tasks(loop) - stuck
        for t in pending:
            t.cancel()
        if pending:
            _, late = loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_WAIT))
            stuck |= late
        if stuck:
            threading.Thread(target=loop.run_forever, name="pigeon-abandoned-coroutines",
                             daemon=True).start()  # fmt: skip
        else:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()


class _AsyncRun:
    """The coroutine workers of one run and their supervisor (time limit, grace)."""

    def __init__(self, run: Run, n: int, grace: float, loop: asyncio.AbstractEventLoop,
                 aq: AsyncQueue[Any]) -> None:  # fmt: skip
        self.run, self.n, self.grace, self.loop, self.aq = run, n, grace, loop, aq
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.stuck: list[asyncio.Task[None]] = []  # ignored their cancellation: left behind
        self.background: set[asyncio.Task[None]] = set()  # extensions from the keeper

    async def main(self) -> None:
        run = self.run
        try:
            for slot in range(self.n):
                self.workers[slot] = asyncio.create_task(self.work(slot))
            while not all(t.done() for t in self.workers.values()) and not run.stopping():
                await asyncio.sleep(TICK)
                if run.time_limit is not None:
                    await self.abandon_late(run.time_limit + CANCEL_WAIT)
            _, pending = await asyncio.wait(self.workers.values(), timeout=self.grace)
            for t in pending:
                t.cancel()
            if pending:
                _, ignored = await asyncio.wait(pending, timeout=CANCEL_WAIT)
                self.stuck.extend(ignored)
            given = await self.give_back_all()  # left: handlers that ignore cancellation
            if given:
                log.warning("%d async handler(s) still running after grace=%s s and their "
                            "cancellation: their messages were given back", given,
                            self.grace)  # fmt: skip
        finally:
            await self.aq.aclose()

    async def take(self) -> Any:
        try:
            msg = await self.aq.get_message(timeout=SLICE)
        except Exception as exc:
            wait = self.run.take_failed(exc)
            if wait:
                await asyncio.sleep(wait)
            return None
        self.run.took()
        return msg

    async def settle(self, what: str, make: Callable[[], Awaitable[Any]]) -> bool:
        """True when settled, or perhaps settled (``Indeterminate``)."""
        try:
            await make()
        except Exception as exc:
            return self.run.settle_error(what, exc)
        return True

    async def fail(self, msg: Any, error: str) -> None:
        to_dead, delay = self.run.on_failure(msg, error)
        if to_dead:
            await self.settle("nack", lambda: msg.nack(requeue=False, reason=error))
        else:
            await self.settle("nack", lambda: msg.nack(requeue=True, delay=delay))

    def extender(self, msg: Any) -> Callable[[float], None]:
        """``msg.extend`` from the keeper's thread: run on this loop, without waiting."""

        async def extend(seconds: float) -> None:
            try:
                await msg.extend(seconds)
            except Exception as exc:  # settled meanwhile, or the connection is gone
                log.debug("extending a lease failed: %s", describe(exc))

        def start(seconds: float) -> None:
            task = self.loop.create_task(extend(seconds))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

        def soon(seconds: float) -> None:
            self.loop.call_soon_threadsafe(start, seconds)  # RuntimeError once closed

        return soon

    async def one(self, msg: Any, slot: int) -> None:
        run = self.run
        task = run.begin(msg, slot, self.extender(msg))
        limit = asyncio.timeout(run.time_limit)
        error: str | None = None
        try:
            async with limit:
                with run.traced(msg):
                    result = run.handler(msg.body)
                    if inspect.isawaitable(result):
                        await result
        except asyncio.CancelledError as exc:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # ours: stopped past grace
                if run.done(task):
                    await self.settle("nack", lambda: msg.nack(requeue=True))
                raise
            error = describe(exc)  # the handler's own CancelledError: it failed
        except TimeoutError as exc:
            if limit.expired():  # the limit, not a TimeoutError the handler raised
                run.progress.add(timed_out=1)
                error = time_limit_error(run.time_limit or 0)
            else:
                error = describe(exc)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from a handler too
            error = describe(exc)
        if not run.done(task):
            return  # abandoned by the supervisor, which settled it
        if error is not None:
            await self.fail(msg, error)
        elif await self.settle("ack", msg.ack):
            run.progress.add(processed=1)

    async def work(self, slot: int) -> None:
        run = self.run
        while not run.stopping():
            try:
                msg = await self.take()
                if msg is not None:
                    await self.one(msg, slot)
            except Ended as end:
                run.finish(end)
                return
            except asyncio.CancelledError:
                raise
            except BaseException:
                run.progress.add(worker_deaths=1)
                log.exception("a worker task died; it goes on")

    async def abandon_late(self, limit: float) -> None:
        """A handler that outlived its cancellation at ``time_limit``: fail its message,
        leave the coroutine behind, start another worker in its slot."""
        now = time.monotonic()
        with self.run.progress.lock:
            late = [t for t in self.run.progress.in_progress.values() if now - t.started > limit]
        for task in late:
            if self.run.abandon(task):
                log.warning("an async handler ignored its cancellation at time_limit=%s s: "
                            "its message is given back and its task replaced",
                            self.run.time_limit)  # fmt: skip
                self.run.progress.add(timed_out=1)
                await self.fail(task.msg, time_limit_error(self.run.time_limit or 0))
                self.stuck.append(self.workers[task.slot])
                self.workers[task.slot] = asyncio.create_task(self.work(task.slot))

    async def give_back_all(self) -> int:
        with self.run.progress.lock:
            late = list(self.run.progress.in_progress.values())
        given = [t for t in late if self.run.abandon(t)]
        for task in given:
            await self.settle("nack", functools.partial(task.msg.nack, requeue=True))
        return len(given)
