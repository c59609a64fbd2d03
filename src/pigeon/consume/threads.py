"""Thread workers: ``n`` supervised threads that take and handle messages. A thread that
dies is replaced and what it held given back; one past ``time_limit`` cannot be killed: its
message is given back, the thread abandoned (its late result ignored) and replaced."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pigeon.consume.policy import TICK, Ended, Run, time_limit_error

__all__ = ["Supervised", "enforce_time_limit", "give_back_late_work", "run_threads"]

log = logging.getLogger("pigeon.consume")


def run_threads(run: Run, n: int, grace: float, *,
                 handler: Callable[[Any], Any] | None = None,
                 more: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
    """``n`` threads taking and handling messages until the run halts or ends (or, for
    the measurement, ``more()`` says enough). A thread that dies is replaced; one past
    ``time_limit`` has its message given back and is replaced."""
    fn = handler or run.handler

    def work(slot: int) -> None:
        while not run.stopping() and more():
            msg = run.fetch()
            if msg is not None and not run.handle(msg, slot, fn):
                return  # abandoned past its time limit: a replacement took the slot

    pool = Supervised(run, work, "pigeon-worker", n)
    while not run.stopping() and not pool.all_ended():  # all ended: drained, or measured
        pool.replace_dead()
        if run.time_limit is not None:
            enforce_time_limit(run, pool.start)
        run.halt.wait(TICK)
    pool.join(grace)
    pool.replace_dead(restart=False)
    give_back_late_work(run, grace)


class Supervised:
    """``n`` threads running ``target(slot)``; one that dies (an exception other than the
    run's end) is counted, what it held is given back, and it is replaced by
    ``replace_dead``."""

    def __init__(self, run: Run, target: Callable[[int], None], name: str, n: int) -> None:
        self.run, self.target, self.name = run, target, name
        self.clean: set[threading.Thread] = set()  # threads that ended on purpose
        self.threads: dict[int, threading.Thread] = {}
        for slot in range(n):
            self.start(slot)

    def _body(self, slot: int) -> None:
        try:
            self.target(slot)
        except Ended as end:
            self.run.finish(end)
        self.clean.add(threading.current_thread())

    def start(self, slot: int) -> None:
        t = threading.Thread(target=self._body, args=(slot,), name=f"{self.name}-{slot}",
                             daemon=True)  # fmt: skip
        self.threads[slot] = t
        t.start()

    def all_ended(self) -> bool:
        return all(t in self.clean for t in self.threads.values())

    def replace_dead(self, *, restart: bool = True) -> None:
        for slot, t in list(self.threads.items()):
            if not t.is_alive() and t not in self.clean:
                self.clean.add(t)
                self.run.progress.add(worker_deaths=1)
                for task in self.run.held_by(slot):  # neither settled nor forgotten
                    self.run.nack(task.msg, requeue=True)
                log.error("%s died; %s", t.name, "started another" if restart else "stopping")
                if restart:
                    self.start(slot)

    def join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))


def enforce_time_limit(run: Run, replace: Callable[[int], None]) -> None:
    assert run.time_limit is not None
    now = time.monotonic()
    with run.progress.lock:
        late = [t for t in run.progress.in_progress.values()
                if now - t.started > run.time_limit]  # fmt: skip
    for task in late:
        if run.abandon(task):
            run.progress.add(timed_out=1)
            log.warning("a handler ran past time_limit=%s s: its message is given back and "
                        "its thread replaced", run.time_limit)  # fmt: skip
            run.fail(task.msg, time_limit_error(run.time_limit))
            replace(task.slot)


def give_back_late_work(run: Run, grace: float) -> None:
    """Work still running after ``grace``: give its messages back now, so none waits
    for a lease (or is lost with this process)."""
    with run.progress.lock:
        late = list(run.progress.in_progress.values())
    given = [t for t in late if run.abandon(t)]
    for task in given:
        run.nack(task.msg, requeue=True)
    if given:
        log.warning("%d handler(s) still running after grace=%s s: their messages were given "
                    "back", len(given), grace)  # fmt: skip
