"""Waiting on a local queue (backends/local/waits.py): the waiter counts in the shared
control page go back to what they were however a wait ends."""

from __future__ import annotations

import asyncio
import pickle
import signal
import threading
import time
from typing import Any

import pytest

import pigeon
from pigeon.backends.local import LocalQueue
from pigeon.errors import ClosedResourceError


def _waiters(q: LocalQueue[Any]) -> dict[str, int]:
    from pigeon.backends.local.layout import GET_SEQ, JOIN_SEQ, PUT_SEQ, WAITERS

    names = {PUT_SEQ: "getters", GET_SEQ: "putters", JOIN_SEQ: "joiners"}
    return {names[w]: int.from_bytes(q._ctrl[o : o + 4], "little") for w, o in WAITERS.items()}


def _wait_until(condition: Any, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("call", ["get", "put", "join", "async_get"])
def test_closing_a_handle_counts_out_the_threads_it_leaves_waiting(call: str) -> None:
    """Round 4, clients #21: a thread waiting on a handle that is closed cannot count
    itself out of the shared waiters (its handle is gone), so close() does it; else every
    put of every process pays a wake-up system call for a waiter that no longer exists."""
    with pigeon.Queue(maxsize=1) as q:
        assert isinstance(q, LocalQueue)
        for _ in range(3):
            h: LocalQueue[Any] = pickle.loads(pickle.dumps(q))
            if call in ("put", "join"):
                q.put("filler")
            ended = threading.Event()

            def wait(h: LocalQueue[Any] = h, ended: threading.Event = ended) -> None:
                try:
                    if call == "get":
                        h.get()
                    elif call == "put":
                        h.put("more")
                    elif call == "join":
                        h.join()
                    else:
                        asyncio.run(pigeon.AsyncQueue(h).get())  # type: ignore[arg-type]
                except ClosedResourceError:
                    pass
                ended.set()

            threading.Thread(target=wait, daemon=True).start()
            assert _wait_until(lambda: sum(_waiters(q).values()) == 1)
            h.close()
            assert ended.wait(10)
            assert _waiters(q) == {"getters": 0, "putters": 0, "joiners": 0}
            if call in ("put", "join"):
                assert q.get(timeout=1) == "filler"
                if call == "join":
                    q.task_done()


def test_a_wait_interrupted_by_ctrl_c_counts_itself_out() -> None:
    with pigeon.Queue() as q:
        assert isinstance(q, LocalQueue)
        main = threading.main_thread().ident
        assert threading.get_ident() == main
        timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            q.get(timeout=30)
        timer.join()
        assert _waiters(q) == {"getters": 0, "putters": 0, "joiners": 0}


def test_closing_a_flock_handle_lets_go_of_its_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() takes the lock like any call; on the flock path it must drop it before the
    descriptor goes (the mappings hold duplicates of the descriptor, so closing it does not
    drop the flock), or every other handle waits for it for good."""
    from pigeon.backends.local import shared

    monkeypatch.setattr(shared, "MUTEX", None)
    with LocalQueue[str]() as q:
        assert not q._mutex
        h: LocalQueue[str] = pickle.loads(pickle.dumps(q))
        h.put("from h")
        h.close()
        done = threading.Event()

        def use() -> None:
            q.put("after")
            assert q.get_many(10, timeout=5) == ["from h", "after"]
            done.set()

        threading.Thread(target=use, daemon=True).start()
        assert done.wait(10), "the closed handle kept the queue's flock"
