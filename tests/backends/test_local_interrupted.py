"""A local-queue operation interrupted at any line - Ctrl-C (KeyboardInterrupt), SystemExit
from a signal handler, MemoryError, or SIGKILL - is either complete or invisible to the next
lock holder: nothing confirmed is lost, nothing is delivered twice, nothing torn, and the
queue keeps working (docs/local.md, "When a process dies").

The interruptions are exhaustive, not sampled: a line tracer counts the lines the local
queue's own code runs during the operation and interrupts at the n-th, for every n until
the operation completes uninterrupted. They run on the C path and on the pure-Python path.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pigeon
from pigeon.backends.local import LocalQueue
from tests.backends._local_faults import Fault as _Fault
from tests.backends._local_faults import use_path


@pytest.fixture(params=["c", "pure"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The C fast path (where it is built) and the pure-Python path with the ctypes mutex."""
    use_path(request.param, monkeypatch)
    yield request.param


def _in_thread(check: Callable[[], None], timeout: float = 20) -> None:
    """Run ``check`` in another thread: a lock the interrupted call left held by this
    thread shows up as a check that never ends, not as a test that hangs."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the interrupted call left the queue's lock held"
    if errors:
        raise errors[0]


def _drain(q: LocalQueue[Any]) -> list[Any]:
    out: list[Any] = []
    while True:
        try:
            out.extend(q.get_many(100, block=False))
        except pigeon.Empty:
            return out


def _state(q: LocalQueue[Any]) -> tuple[int, int, int, int]:
    st = q._state()
    return st.count, st.tombs, st.special, st.unfinished


# --- scenarios: (make the queue, the operation, check what is left) -----------------------

LIVE = ["head", "p1", "p2", "tail"]


def _options_queue() -> LocalQueue[Any]:
    """A plain record at the head, expired ones behind it, then priorities: a take walks,
    drops expired records from the middle and takes one from the middle."""
    q: LocalQueue[Any] = pigeon.Queue()  # type: ignore[assignment]
    q.put("head")
    q.put_many(["old-1", "old-2", "old-3"], ttl=1e-9)  # expired by the time anyone looks
    q.put("p1", priority=1)
    q.put("p2", priority=2)
    q.put("tail")
    return q


def _checker(may_lose: set[str]) -> Callable[[LocalQueue[Any], list[Any], bool], None]:
    """What is left of ``_options_queue`` after a take of ``may_lose``: an interrupted
    take that committed took those items with it (at-most-once for crashing consumers),
    one that did not left them all; one that completed returned them."""

    def check(q: LocalQueue[Any], returned: list[Any], done: bool) -> None:
        left = _drain(q)
        got = left + returned
        assert len(got) == len(set(got)), f"delivered twice: {got}"
        assert set(got) <= set(LIVE), f"an expired or torn item came out: {got}"
        missing = set(LIVE) - set(got)
        assert missing in (set(), may_lose), missing
        assert not (done and missing), missing
        _check_options_state(q)

    return check


def _check_options_state(q: LocalQueue[Any]) -> None:
    assert _state(q)[:3] == (0, 0, 0), _state(q)
    assert _state(q)[3] == len(LIVE), "an expired item was counted done twice, or not at all"
    q.put("after")
    assert q.get(timeout=5) == "after"


def _op_get(q: LocalQueue[Any]) -> list[Any]:
    return [q.get()]


def _op_get_many(q: LocalQueue[Any]) -> list[Any]:
    return q.get_many(10)


def _op_get_message(q: LocalQueue[Any]) -> list[Any]:
    msg = q.get_message(timeout=0)
    msg.ack()
    return [msg.body]


def _wrapped_queue() -> LocalQueue[Any]:
    """A ring of 4096 bytes that has wrapped, with room for one more record of 1000 bytes:
    a batch of three must grow it, and growing moves its upper part."""
    q: LocalQueue[Any] = pigeon.Queue(capacity=4096)  # type: ignore[assignment]
    q.put_many([bytes([i]) * 1000 for i in range(4)])
    assert q.get_many(2) == [bytes([0]) * 1000, bytes([1]) * 1000]
    q.put(bytes([4]) * 1000)  # wraps to the start
    return q


def _op_put_many(q: LocalQueue[Any]) -> list[Any]:
    q.put_many([b"x" * 1000, b"y" * 1000, b"z" * 1000])
    return []


def _check_wrapped(q: LocalQueue[Any], returned: list[Any], done: bool) -> None:
    old = [bytes([i]) * 1000 for i in (2, 3, 4)]
    new = [b"x" * 1000, b"y" * 1000, b"z" * 1000]
    left = _drain(q)
    assert left in (old, old + new), f"torn or lost: {[x[:1] for x in left]}"
    assert not (done and left != old + new)
    q.put(b"after")
    assert q.get(timeout=5) == b"after"
    assert _state(q)[:3] == (0, 0, 0)


def _op_shutdown(q: LocalQueue[Any]) -> list[Any]:
    q.shutdown(immediate=True)
    return []


def _check_shutdown(q: LocalQueue[Any], returned: list[Any], done: bool) -> None:
    try:
        q.put_nowait("probe")
    except pigeon.ShutDown:  # shut down, immediately: so with nothing left
        assert _state(q) == (0, 0, 0, 0), _state(q)
        with pytest.raises(pigeon.ShutDown):
            q.get(timeout=1)
        return
    assert not done
    assert _drain(q) == ["p2", "p1", "head", "tail", "probe"]


def _dedup_queue() -> LocalQueue[Any]:
    q: LocalQueue[Any] = pigeon.Queue()  # type: ignore[assignment]
    q.put("made", dedup_id="first")  # the table of ids exists
    return q


def _op_put_dedup(q: LocalQueue[Any]) -> list[Any]:
    q.put("d", dedup_id="k")
    return []


def _check_dedup(q: LocalQueue[Any], returned: list[Any], done: bool) -> None:
    """Never an id remembered for an item that was not stored."""
    stored = _drain(q)
    assert stored in (["made"], ["made", "d"]), stored
    assert not done or stored == ["made", "d"]
    q.put("again", dedup_id="k")
    again = _drain(q)
    if "d" in stored:
        assert again in ([], ["again"])  # its id remembered, or forgotten (at-least-once)
        assert not done or again == []
    else:
        assert again == ["again"], "the id was remembered for an item that was not stored"


SCENARIOS: dict[str, tuple[Any, Any, Any]] = {
    "get": (_options_queue, _op_get, _checker({"p2"})),
    "get_many": (_options_queue, _op_get_many, _checker(set(LIVE))),
    "get_message": (_options_queue, _op_get_message, _checker({"p2"})),
    "put_many_growing": (_wrapped_queue, _op_put_many, _check_wrapped),
    "shutdown_immediate": (_options_queue, _op_shutdown, _check_shutdown),
    "put_dedup": (_dedup_queue, _op_put_dedup, _check_dedup),
}


def _raise(exc: type[BaseException]) -> Callable[[], None]:
    def action() -> None:
        raise exc

    return action


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, MemoryError])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_exception_at_any_line_leaves_the_queue_whole(
    path: str, scenario: str, interrupt: type[BaseException]
) -> None:
    make, op, check = SCENARIOS[scenario]
    n = 0
    while True:
        n += 1
        q = make()
        returned: list[Any] = []
        with _Fault(n, _raise(interrupt)) as fault:
            try:
                returned = op(q)
            except interrupt:
                pass
        _in_thread(lambda: check(q, returned, not fault.fired))  # noqa: B023
        q.close()
        if not fault.fired:
            break
    assert n > 20  # the operation ran through the local queue's code line by line


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario", ["get", "get_many", "put_many_growing", "shutdown_immediate", "put_dedup"]
)
def test_a_process_killed_at_any_line_leaves_the_queue_whole(path: str, scenario: str) -> None:
    make, op, check = SCENARIOS[scenario]
    n = 0
    while True:
        n += 1
        q = make()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                with _Fault(n, _die):
                    op(q)
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        completed = os.WIFEXITED(status)
        assert not completed or os.WEXITSTATUS(status) == 0, "the child failed"
        _in_thread(lambda: check(q, [], False))  # noqa: B023
        q.close()
        if completed:
            break
    assert n > 20


def test_a_consumer_killed_mid_walk_over_expired_records_loses_nothing(path: str) -> None:
    """The review's case (round 4, clients #1) at a smaller scale: thousands of expired
    records behind a live one and priority records after them; a consumer SIGKILLed at a
    random moment of its get."""
    for trial in range(6):
        with pigeon.Queue() as q:
            q.put("first")
            q.put_many([f"old-{i}" for i in range(3000)], ttl=1e-9)
            q.put_many([f"job-{i}" for i in range(30)], priority=1)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(r)
                os.write(w, b"1")
                try:
                    q.get()
                finally:
                    os._exit(0)
            os.close(w)
            os.read(r, 1)
            os.close(r)
            time.sleep(0.001 * trial)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            got = _drain(q)
            live = [x for x in got if x.startswith("job-") or x == "first"]
            assert live == got and len(got) >= 30, got[:5]
            assert _state(q)[:3] == (0, 0, 0)
            q.put("after")
            assert q.get(timeout=5) == "after"
