"""Process workers: children fed one item at a time through a pipe by a dispatcher thread
each. The parent takes every message and holds its lease, so a child that dies, runs past
``time_limit`` or is recycled never takes a message with it, and the parent knows which
item killed it; a message that killed ``poison_after`` children is dead-lettered with
reason ``worker_died``.

# Strategy:
# Children are forked (a handler may be a closure). They ignore SIGTERM and SIGINT: a
# signal to the process group is the parent's to act on, with grace. Each closes the
# parent's ends of its siblings' pipes, so a child sees the end of file when the parent
# goes; the parent retires one by asking (an empty frame). A child found dead before an
# item is sent died idle (the OOM killer): replaced, the item not charged. The crash count
# belongs to the message (``crashes``), not to its bytes; an ack or a dead letter ends it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pigeon._queue_base import Message
from pigeon.consume.policy import TICK, NotSync, Run, call_sync, describe, time_limit_error
from pigeon.consume.threads import Supervised

__all__ = ["Child", "plain_streams", "run_processes"]

log = logging.getLogger("pigeon.consume")

_RETIRE = b""  # an empty frame: the parent asks the child to end (no pickle is empty)
_SEND_INLINE = 16 * 2**10  # bytes: a payload this small fits the idle pipe, never blocks
# The parent's ends of every live child's pipe. A child forked later closes them all
# first: else it would keep its older siblings' pipes open, and they would never see the
# end of file that tells them the parent is gone (fork copies every descriptor).
_PARENT_ENDS: set[Any] = set()
_FORK_LOCK = threading.Lock()  # forks and the set change together


def _rss() -> int:
    """This process's resident memory in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plain_streams() -> None:
    """A child forked while the parent shows a live display writes to the streams the
    display wraps (rich's proxies hold locks a parent thread may have held at the fork)."""
    for name in ("stdout", "stderr"):
        proxied = getattr(getattr(sys, name), "rich_proxied_file", None)
        if proxied is not None:
            setattr(sys, name, proxied)


def _child(conn: Any, inherited: list[Any], handler: Callable[[Any], Any]) -> None:
    """A process worker: items in through the pipe, (outcome, error, RSS) out; an empty
    frame or the end of file (the parent went) ends it."""
    for other in inherited:
        other.close()
    # the parent decides when to stop: a signal to the whole group is its to act on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    plain_streams()
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if payload == _RETIRE:
            return
        outcome, error = "ok", None
        try:
            call_sync(handler, pickle.loads(payload))
        except NotSync:
            outcome = "async"
        except BaseException as exc:  # sys.exit() in a handler fails the item, not the child
            outcome, error = "error", describe(exc)
        conn.send((outcome, error, _rss()))


class Child:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, handler: Callable[[Any], Any], slot: int) -> None:
        with _FORK_LOCK:
            self.conn, theirs = ctx.Pipe()
            self.proc = ctx.Process(
                target=_child, args=(theirs, [*_PARENT_ENDS, self.conn], handler),
                name=f"pigeon-worker-{slot}", daemon=True,
            )  # fmt: skip
            self.proc.start()
            theirs.close()
            _PARENT_ENDS.add(self.conn)
        self.tasks = 0
        self.rss = 0  # bytes, as the child last said

    def idle_death(self) -> bool:
        """The child died while it had nothing to do (an end of file, or it is gone)."""
        try:
            return not self.proc.is_alive() or self.conn.poll(0)
        except (OSError, ValueError):
            return True

    def died(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the worker process was killed by {signal.Signals(-code).name}"
        return f"the worker process exited with code {code}"

    def _close(self) -> None:
        with _FORK_LOCK:
            _PARENT_ENDS.discard(self.conn)
            self.conn.close()

    def kill(self, *, close: bool = True) -> None:
        """SIGKILL it and reap it; then close the pipe, unless a sender still uses it."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.join(5)
        if close:
            self._close()

    def retire(self) -> None:
        """Ask it to end (it is idle: it reads the request at once); kill it if it
        does not."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send_bytes(_RETIRE)
        self.proc.join(5)
        if self.proc.is_alive():
            log.warning("a worker process did not end when asked; killed")
            self.kill()
        else:
            self._close()


def _send(conn: Any, payload: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the child died: the poll loop sees it
        conn.send_bytes(payload)


def _call_child(run: Run, child: Child, payload: bytes,
                grace: float) -> tuple[str, Any]:  # fmt: skip
    """Run one item in ``child``: ("ok"|"error"|"async", (error, rss)) from the child, or
    ("died", why), ("timeout", None), ("stopped", None) when the parent ended it."""
    sender = None
    if len(payload) <= _SEND_INLINE:
        try:
            child.conn.send_bytes(payload)
        except OSError:
            return "died", child.died()
    else:  # the child reads it while it comes: a child that does not read must not hang us
        sender = threading.Thread(target=_send, args=(child.conn, payload), daemon=True)
        sender.start()
    outcome = _await_child(run, child, grace)
    if sender is not None:
        sender.join(5)  # the child is answered or dead: its write is over
    if outcome[0] in ("timeout", "stopped"):
        child.kill()  # killed already; now the pipe can close
    return outcome


def _await_child(run: Run, child: Child, grace: float) -> tuple[str, Any]:
    started = time.monotonic()
    stop_by: float | None = None
    while True:
        try:
            if child.conn.poll(TICK):
                outcome, error, rss = child.conn.recv()
                return outcome, (error, rss)
        except (EOFError, OSError):
            return "died", child.died()
        if not child.proc.is_alive() and not child.conn.poll(0):
            return "died", child.died()
        now = time.monotonic()
        if run.time_limit is not None and now - started > run.time_limit:
            child.kill(close=False)
            return "timeout", None
        if run.stopping():
            stop_by = stop_by or now + grace
            if now > stop_by:
                child.kill(close=False)
                return "stopped", None


def run_processes(run: Run, n: int, grace: float, *, max_tasks_per_child: int | None,
                   max_memory_per_child: int | None) -> None:  # fmt: skip
    """``n`` child processes, each fed by a dispatcher thread of this process that takes
    the message, sends the item, and settles it from the child's answer."""
    ctx: Any = mp.get_context("fork")

    def dispatch(slot: int) -> None:
        child: Child | None = Child(ctx, run.handler, slot)
        try:
            while not run.stopping():
                msg = run.fetch()
                if msg is None:
                    continue
                child = _process_one(run, msg, child, ctx, slot, grace)
                if (
                    child is not None
                    and child.tasks
                    and (
                        (max_tasks_per_child and child.tasks >= max_tasks_per_child)
                        or (max_memory_per_child and child.rss > max_memory_per_child)
                    )
                ):
                    child.retire()
                    run.progress.add(workers_recycled=1)
                    child = _replacement(run, ctx, slot)
                elif child is None:
                    child = _replacement(run, ctx, slot)
        finally:
            if child is not None:
                child.retire()

    pool = Supervised(run, dispatch, "pigeon-dispatch", n)
    while not run.stopping() and not pool.all_ended():
        pool.replace_dead()
        run.halt.wait(TICK)
    pool.join(grace + 10)  # each gives its work back after grace by itself
    pool.replace_dead(restart=False)


def _replacement(run: Run, ctx: Any, slot: int) -> Child | None:
    """A new child for ``slot``, unless the run is stopping (then the next item, if one
    comes, forks it)."""
    return None if run.stopping() else Child(ctx, run.handler, slot)


def _ready_child(run: Run, child: Child | None, ctx: Any, slot: int) -> Child:
    """``child``, or a new one if there is none or it died while idle (the OOM killer,
    an operator's kill: not the fault of the item about to be sent)."""
    if child is not None and child.idle_death():
        why = child.died()
        child.kill()
        run.progress.add(worker_deaths=1)
        log.error("%s while idle; started another", why)
        child = None
    return child or Child(ctx, run.handler, slot)


def _process_one(run: Run, msg: Message[Any], child: Child | None, ctx: Any, slot: int,
                 grace: float) -> Child | None:  # fmt: skip
    """Handle one message in a child process; return the child to use next (None when
    this one died, timed out or was stopped)."""
    try:
        payload = pickle.dumps(msg.body, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        run.fail(msg, f"{type(exc).__name__}: the item cannot be sent to a worker process: "
                      f"{describe(exc)}"[:500])  # fmt: skip
        return child
    crashes = run.crashes
    key = crashes.key(msg, payload)
    kills = crashes.of(key, msg)
    if kills >= run.poison_after:  # its dead-lettering failed: it came back
        if run.fail(msg, f"worker_died: the item killed {kills} worker processes", dead=True):
            crashes.forget(key)
        return child
    child = _ready_child(run, child, ctx, slot)
    task = run.begin(msg, slot)
    with run.traced(msg):
        outcome, detail = _call_child(run, child, payload, grace)
    run.done(task)
    child.tasks += 1
    if outcome == "ok":
        child.rss = detail[1]
        if run.ack(msg):
            crashes.forget(key)
        return child
    if outcome == "error":
        child.rss = detail[1]
        if run.fail(msg, detail[0]):
            crashes.forget(key)
        return child
    if outcome == "async":
        run.nack(msg, requeue=True)  # not handled: back, not counted as a failure
        run.not_sync()
        return child
    if outcome == "stopped":  # past grace while stopping: give it back, not a failure
        run.nack(msg, requeue=True)
        return None
    if outcome == "timeout":
        run.progress.add(timed_out=1)
        log.warning("a handler ran past time_limit=%s s: its worker process was killed and "
                    "replaced", run.time_limit)  # fmt: skip
        if run.fail(msg, time_limit_error(run.time_limit or 0)):
            crashes.forget(key)
        return None
    child.kill()  # died: reap it and close its pipe
    kills = crashes.killed(key, msg)
    run.progress.add(worker_deaths=1)
    log.error("%s while handling an item (%d time(s) for this item); started another",
              detail, kills)  # fmt: skip
    error = f"worker_died: {detail}"
    poisoned = kills >= run.poison_after
    if run.fail(msg, f"worker_died: the item killed {kills} worker processes (last: {detail})"
                if poisoned else error, dead=poisoned):  # fmt: skip
        crashes.forget(key)
    return None
