"""The local backend across processes, and each multiprocessing.Queue failure, fixed."""

from __future__ import annotations

import asyncio
import collections
import gc
import glob
import hashlib
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pigeon
from pigeon.backends.local import LocalQueue
from pigeon.errors import ClosedResourceError, InvalidURL, ShutDown

METHODS = ["fork", "spawn", "forkserver"]
WORDS = ["java", "Python", "JavaScript"]


def _writer(q: pigeon.Queue[str]) -> None:
    for w in WORDS:
        q.put_nowait(w)
    q.shutdown()


def _reader(q: pigeon.Queue[str], out: Any) -> None:
    out.put(list(q))


@pytest.mark.parametrize("method", METHODS)
def test_writer_and_reader_processes_end_on_shutdown(method: str) -> None:
    ctx = mp.get_context(method)
    with pigeon.Queue() as q:
        out = ctx.SimpleQueue()
        reader = ctx.Process(target=_reader, args=(q, out))
        reader.start()
        time.sleep(0.2)  # the reader is waiting on an empty queue: it must not give up
        writer = ctx.Process(target=_writer, args=(q,))
        writer.start()
        writer.join(30)
        assert out.get() == WORDS
        reader.join(30)
        assert reader.exitcode == 0 and writer.exitcode == 0


def _put_and_exit(q: pigeon.Queue[bytes], n: int) -> None:
    for i in range(n):
        q.put(i.to_bytes(4, "big") * 256)
    # no flush, no join_thread: when put returns, the item is in the queue


def test_items_survive_a_producer_that_exits_at_once() -> None:
    with pigeon.Queue() as q:
        p = mp.get_context("fork").Process(target=_put_and_exit, args=(q, 500))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert q.qsize() == 500
        got = q.get_many(1000)
        assert [int.from_bytes(g[:4], "big") for g in got] == list(range(500))


def test_joining_the_producer_before_draining_does_not_hang() -> None:
    # multiprocessing.Queue documents this deadlock: a child that put large items
    # cannot exit until they are consumed. Here the child exits at once.
    with pigeon.Queue() as q:
        p = mp.get_context("spawn").Process(target=_put_and_exit, args=(q, 100))
        p.start()
        p.join(30)
        assert p.exitcode == 0, "producer did not exit"
        assert len(q.get_many(1000)) == 100


def test_unpicklable_item_raises_from_put_in_the_caller() -> None:
    with pigeon.Queue() as q:
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
            q.put(lambda: None)
        with pytest.raises(TypeError):
            q.put(threading.Lock())
        assert q.qsize() == 0


def _hold_the_lock_then_wait(q: LocalQueue[Any], ready: Any) -> None:
    q._lock()
    ready.set()
    time.sleep(60)


def test_process_killed_holding_the_lock_leaves_the_queue_usable() -> None:
    ctx = mp.get_context("fork")
    with pigeon.Queue() as q:
        assert isinstance(q, LocalQueue)
        ready = ctx.Event()
        p = ctx.Process(target=_hold_the_lock_then_wait, args=(q, ready))
        p.start()
        assert ready.wait(30)
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(30)
        q.put("still works", timeout=10)
        assert q.get(timeout=10) == "still works"


def _kill_at_the_commit(q: LocalQueue[Any]) -> None:
    """Die at the one-byte store that commits, whichever path (C or Python) makes it."""
    from pigeon.backends.local import queue as local

    if local.C is not None:
        local.C._die_before_publish(True)
        return

    def killed(*_: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    q._publish = killed  # type: ignore[method-assign]


def _die_before_commit(q: LocalQueue[Any]) -> None:
    _kill_at_the_commit(q)
    q.put(b"half-written" * 1000)


def test_put_killed_after_writing_bytes_before_commit_leaves_no_torn_item() -> None:
    with pigeon.Queue() as q:
        q.put("before")
        p = mp.get_context("fork").Process(target=_die_before_commit, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert q.qsize() == 1
        q.put("after")
        assert q.get_many(10, timeout=10) == ["before", "after"]


def _die_while_taking(q: LocalQueue[Any]) -> None:
    _kill_at_the_commit(q)
    q.get()


def test_get_killed_before_commit_leaves_the_item_for_others() -> None:
    with pigeon.Queue() as q:
        q.put("precious")
        p = mp.get_context("fork").Process(target=_die_while_taking, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert q.get(timeout=10) == "precious"


def _die_in_a_batch(q: LocalQueue[Any], op: str) -> None:
    _kill_at_the_commit(q)
    if op == "put_many":
        q.put_many([b"half" * 100, "written", b"batch"])
    else:
        q.get_many(10)


@pytest.mark.parametrize("op", ["put_many", "get_many"])
def test_a_batch_killed_before_its_commit_is_all_or_nothing(op: str) -> None:
    with pigeon.Queue() as q:
        q.put_many([b"one", "two"])
        p = mp.get_context("fork").Process(target=_die_in_a_batch, args=(q, op))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert q.get_many(10, timeout=10) == [b"one", "two"]
        q.put_many([b"after", "it"])  # and the lock the dead process held is free
        assert q.get_many(10, timeout=10) == [b"after", "it"]


def _hammer(q: LocalQueue[bytes], tag: int, n: int) -> None:
    """Three threads put n tagged items each, singly and in batches of 7."""

    def run(t: int) -> None:
        items = [b"%d.%d.%d" % (tag, t, i) + b"." * (i % 300) for i in range(n)]
        for at in range(0, n, 14):
            for item in items[at : at + 7]:
                q.put(item)
            if items[at + 7 : at + 14]:
                q.put_many(items[at + 7 : at + 14])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def test_threads_of_several_processes_share_one_lock_and_lose_nothing() -> None:
    """Two processes of three producing threads and three consuming threads here, through
    a small bounded ring that wraps: every item arrives once, each thread's in order.
    The lock is one mutex for threads and processes alike (no per-process thread lock)."""
    ctx = mp.get_context("fork")
    n = 1500
    with LocalQueue[bytes](maxsize=60, capacity=4096) as q:
        procs = [ctx.Process(target=_hammer, args=(q, tag, n)) for tag in range(2)]
        for p in procs:
            p.start()
        got: list[list[bytes]] = [[], [], []]

        def consume(k: int) -> None:
            for i in range(10**9):
                try:
                    if i % 2:
                        got[k].append(q.get(timeout=5))
                    else:
                        got[k] += q.get_many(5, timeout=5)
                except pigeon.Empty:
                    return

        consumers = [threading.Thread(target=consume, args=(k,)) for k in range(3)]
        for th in consumers:
            th.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        for th in consumers:
            th.join(60)
        every = [item for items in got for item in items]
        assert len(every) == 2 * 3 * n and len(set(every)) == len(every)
        for items in got:  # one consumer sees each producer thread's items in order
            last: dict[bytes, int] = {}
            for item in items:
                tag, t, i = item.rstrip(b".").split(b".")
                assert int(i) > last.get(tag + t, -1)
                last[tag + t] = int(i)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "put_many", "get", "get_many"]), st.integers(0, 2500)),
        max_size=60,
    )
)
def test_any_sequence_of_operations_keeps_fifo_through_wraps_and_growth(
    ops: list[tuple[str, int]],
) -> None:
    """The ring against a deque: items of any size, singly and in batches, through a
    ring small enough to wrap and grow (the C path and the Python path alike)."""
    model: collections.deque[Any] = collections.deque()
    with LocalQueue[Any](capacity=4096) as q:
        for i, (op, size) in enumerate(ops):
            item: Any = bytes([i % 251]) * size if i % 3 else ("text", i, size)
            if op == "put":
                q.put(item)
                model.append(item)
            elif op == "put_many":
                batch = [item, bytearray(size // 2), b""]
                q.put_many(batch)
                model.extend(batch)
            elif op == "get":
                if model:
                    assert q.get_nowait() == model.popleft()
                else:
                    with pytest.raises(pigeon.Empty):
                        q.get_nowait()
            else:
                k = 1 + size % 5
                expect = [model.popleft() for _ in range(min(k, len(model)))]
                if expect:
                    assert q.get_many(k, block=False) == expect
                else:
                    with pytest.raises(pigeon.Empty):
                        q.get_many(k, block=False)
            assert q.qsize() == len(model)
        if model:
            assert q.get_many(10_000, block=False) == list(model)
        assert q.qsize() == 0


def test_a_flock_queue_works_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where robust mutexes do not exist (macOS), a queue is locked with flock: the same
    operations, the C path included, through a fork child."""
    from pigeon.backends.local import shared

    monkeypatch.setattr(shared, "MUTEX", None)
    with LocalQueue[bytes]() as q:
        assert q._cfd >= 0 and not q._mutex
        p = mp.get_context("fork").Process(target=_put_and_exit, args=(q, 500))
        p.start()
        got = [q.get(timeout=10) for _ in range(250)] + q.get_many(1000, timeout=10)
        while len(got) < 500:
            got += q.get_many(1000, timeout=10)
        p.join(30)
        assert [int.from_bytes(g[:4], "big") for g in got] == list(range(500))


def test_a_mutex_queue_is_refused_where_the_mutex_cannot_be_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pigeon.backends.local import queue as local
    from pigeon.backends.local import shared

    if shared.MUTEX is None:
        pytest.skip("PIGEON_LOCAL_LOCK=flock (or not Linux): this process makes no mutex queue")
    with LocalQueue[bytes]() as q:
        assert q._mutex, "on Linux a new queue is locked with the robust mutex"
        monkeypatch.setattr(shared, "MUTEX", None)
        with pytest.raises(ClosedResourceError, match="robust process-shared mutex"):
            local._attach(q._path, "pickle")


def _churn(q: pigeon.Queue[bytes], role: str, seed: int) -> None:
    i = 0
    while True:
        if role == "put":
            body = os.urandom(16) * (1 + (seed + i) % 4096)
            q.put(hashlib.sha256(body).digest() + body)
        else:
            try:
                q.get(timeout=0.1)
            except pigeon.Empty:
                pass
        i += 1


def test_random_sigkills_during_put_and_get_never_tear_or_hang() -> None:
    """Kill churning producers and consumers at random moments, 20 times, then check
    that every item left is intact and the queue still moves items both ways."""
    ctx = mp.get_context("fork")
    with pigeon.Queue(maxsize=200) as q:
        for round_ in range(20):
            procs = [
                ctx.Process(target=_churn, args=(q, role, round_ * 10 + k), daemon=True)
                for k, role in enumerate(["put", "put", "get"])
            ]
            for p in procs:
                p.start()
            time.sleep(0.02 + (round_ % 5) * 0.013)
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            for p in procs:
                p.join(30)
            # every item present is whole: its checksum matches
            for item in q.get_many(10_000, timeout=10) if q.qsize() else []:
                assert hashlib.sha256(item[32:]).digest() == item[:32]
        q.put(b"x" * 32 + b"end", timeout=10)
        assert q.get(timeout=10).endswith(b"end")


def _getter_expecting_shutdown(q: pigeon.Queue[Any], out: Any) -> None:
    try:
        q.get(timeout=30)
        out.put("got an item")
    except ShutDown:
        out.put("shutdown")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shutdown_in_one_process_wakes_getters_in_every_process(method: str) -> None:
    ctx = mp.get_context(method)
    with pigeon.Queue() as q:
        out = ctx.SimpleQueue()
        getters = [ctx.Process(target=_getter_expecting_shutdown, args=(q, out)) for _ in range(3)]
        for g in getters:
            g.start()
        time.sleep(0.3)
        shutter = ctx.Process(target=q.shutdown)
        shutter.start()
        shutter.join(30)
        assert sorted(out.get() for _ in getters) == ["shutdown"] * 3
        for g in getters:
            g.join(30)


def _pool_init(q: pigeon.Queue[int]) -> None:
    global _POOL_QUEUE
    _POOL_QUEUE = q


def _pool_work(x: int) -> int:
    _POOL_QUEUE.put(x * x)
    return x


_POOL_QUEUE: pigeon.Queue[int]


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_workers_receive_the_queue_through_their_initializer(method: str) -> None:
    with pigeon.Queue() as q:
        ctx = mp.get_context(method)
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_pool_init, initargs=(q,)) as ex:
            assert sorted(ex.map(_pool_work, range(10))) == list(range(10))
        assert sorted(q.get_many(100, timeout=10)) == [x * x for x in range(10)]
        with ctx.Pool(2, initializer=_pool_init, initargs=(q,)) as pool:
            pool.map(_pool_work, range(5))
        assert sorted(q.get_many(100, timeout=10)) == [x * x for x in range(5)]


def _running_worker(conn: Any) -> None:
    q = conn.recv()  # a queue created after this process started
    q.put(f"hello from pid {os.getpid()}")
    conn.send("done")


def test_queue_handed_to_an_already_running_process() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_running_worker, args=(child,))
    p.start()
    with pigeon.Queue() as q:  # created after the process started
        parent.send(q)
        assert parent.recv() == "done"
        assert q.get(timeout=10) == f"hello from pid {p.pid}"
    p.join(30)


def _send_big(q: pigeon.Queue[Any], size: int) -> None:
    q.put(b"\x01" * size)
    q.put(bytearray(b"\x02" * size))


def test_large_payloads_cross_processes_intact() -> None:
    size = 64 * 2**20
    with pigeon.Queue() as q:
        p = mp.get_context("fork").Process(target=_send_big, args=(q, size))
        p.start()
        a = q.get(timeout=60)
        b = q.get(timeout=60)
        p.join(30)
        assert type(a) is bytes and len(a) == size and a[::4096] == b"\x01" * (size // 4096)
        assert type(b) is bytearray and len(b) == size and b[-1] == 2


def test_out_of_band_pickle_buffers() -> None:
    payload = memoryview(b"m" * (1 << 20))
    with pigeon.Queue() as q:
        q.put(pickle.PickleBuffer(payload))
        got = q.get(timeout=10)
        assert bytes(got) == bytes(payload)


def test_ring_grows_and_wraps_preserving_order() -> None:
    with LocalQueue(capacity=4096) as q:
        sent: list[bytes] = []
        got: list[bytes] = []
        for i in range(2000):
            item = bytes([i % 251]) * (1 + (i * 37) % 3000)
            q.put(item)
            sent.append(item)
            if i % 3 == 0:
                got.append(q.get())
        got += q.get_many(10_000)
        assert got == sent


def test_other_serializers() -> None:
    with pigeon.Queue(serializer="json") as q:
        q.put({"a": [1, 2]})
        assert q.get() == {"a": [1, 2]}
    with pigeon.Queue(serializer="raw") as q:
        q.put(b"bytes")
        with pytest.raises(TypeError, match="serializer='raw' carries bytes only"):
            q.put("text")
        assert q.get() == b"bytes"
    with pytest.raises(ValueError, match="unknown serializer 'yaml'; known: pickle"):
        pigeon.Queue(serializer="yaml")


def test_constructor_errors_are_clear() -> None:
    with pytest.raises(TypeError, match=r"write pigeon.Queue\(maxsize=5\)"):
        pigeon.Queue(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize must be an int >= 0"):
        pigeon.Queue(maxsize=-1)
    with pytest.raises(InvalidURL, match="no backend for 'rediss\\+'"):
        pigeon.Queue("rediss+://x/y")
    with pytest.raises(InvalidURL, match="known: nats, nats\\+tls, pigeon"):
        pigeon.Queue("zmq://127.0.0.1:5555/jobs")


def test_local_queue_has_no_url_and_is_a_pigeon_queue() -> None:
    with pigeon.Queue() as q:
        assert isinstance(q, pigeon.Queue)
        assert q.url is None


def test_queue_file_is_removed_when_the_creator_closes() -> None:
    q = pigeon.Queue()
    assert isinstance(q, LocalQueue)
    path = q._path
    assert os.path.exists(path)
    blob = pickle.dumps(q)
    q.close()
    assert not os.path.exists(path)
    with pytest.raises(ClosedResourceError, match="no longer exists"):
        pickle.loads(blob)


def test_async_get_woken_by_another_process() -> None:
    async def main(q: pigeon.Queue[str]) -> str:
        aq = pigeon.AsyncQueue(q)
        p = mp.get_context("fork").Process(target=_writer, args=(q,))
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, p.start)
        words = [w async for w in aq]
        p.join(30)
        await aq.aclose()
        return " ".join(words)

    with pigeon.Queue() as q:
        assert asyncio.run(main(q)) == "java Python JavaScript"


# --- the edges -------------------------------------------------------------------------------


def test_nack_at_capacity_never_blocks() -> None:
    q = pigeon.Queue(maxsize=1)
    q.put("a")
    msg = q.get_message()
    q.put("b")  # a producer filled the queue meanwhile
    done = threading.Event()
    threading.Thread(target=lambda: (msg.nack(), done.set()), daemon=True).start()
    assert done.wait(5), "nack blocked on a full queue"
    assert sorted(q.get_many(5, timeout=5)) == ["a", "b"]  # "a" went back, past maxsize
    q.close()


def test_nack_in_asyncqueue_does_not_block_the_event_loop() -> None:
    async def main() -> list[str]:
        q = pigeon.Queue(maxsize=1)
        aq = pigeon.AsyncQueue(q)
        await aq.put("a")
        msg = await aq.get_message()
        await aq.put("b")
        await asyncio.wait_for(msg.nack(), 2)
        got = await aq.get_many(5)
        await aq.aclose()
        q.close()
        return sorted(got)

    assert asyncio.run(main()) == ["a", "b"]


def test_join_returns_after_nack_ack_and_task_done() -> None:
    q = pigeon.Queue()
    q.put("x")
    q.get_message().nack()
    m = q.get_message()
    assert m.delivery_count == 2
    m.ack()
    q.task_done()
    q.join(timeout=5)  # nack did not count the item twice
    q.close()


def test_qsize_from_another_thread_loses_no_update() -> None:
    """qsize() must not write the unfinished count back without the lock: a
    qsize() landing between task_done's read and its commit undid the task_done. Here it
    lands there every time: the commit first waits for a qsize() from another thread."""
    q = pigeon.Queue()
    q.put_many(range(3))
    for _ in range(3):
        q.get()
    commit = q._commit  # type: ignore[attr-defined]

    def commit_after_a_qsize(st: Any) -> None:
        t = threading.Thread(target=q.qsize)
        t.start()
        t.join()
        commit(st)

    q._commit = commit_after_a_qsize  # type: ignore[attr-defined]
    for _ in range(3):
        q.task_done()
    q.join(timeout=2)  # TimeoutError if a task_done was lost
    q.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dropped_handles_close_their_descriptors() -> None:
    q = pigeon.Queue()
    blob = pickle.dumps(q)
    gc.collect()
    before = _fds()
    for _ in range(200):
        h = pickle.loads(blob)  # a handle received through a pipe or another queue
        h.put(1)
        h.get()
        del h
    for _ in range(200):
        tmp = pigeon.Queue()
        tmp.put(b"x" * 100_000)
        del tmp
    gc.collect()
    assert _fds() - before < 10
    q.close()


def _shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/pigeon-q-*"))


def _gone_within(paths: set[str], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(os.path.exists(p) for p in paths):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_sigkilled_creators_queue_file_is_removed() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", "import pigeon, time; q = pigeon.Queue(); q.put(b'x' * 8_000_000);"
         " print(q._path, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    # its own file, by name: other processes on the machine may make queues meanwhile
    created = {p.stdout.readline().decode().strip()}
    try:
        assert created <= _shm_files()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    assert _gone_within(created, 15)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_queue_in_a_fork_childs_global_is_removed_after_the_child() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # like a multiprocessing worker: a global queue, then os._exit
        global CHILD_QUEUE
        CHILD_QUEUE = pigeon.Queue()
        CHILD_QUEUE.put(1)
        os.write(w, CHILD_QUEUE._path.encode())  # type: ignore[attr-defined]
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        created = {f.read().decode()}  # its own file: other processes may make queues too
    assert created and _gone_within(created, 15)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_file_still_held_by_a_live_process_is_kept() -> None:
    """The creator dies, another process still uses the queue: the file stays until it too
    lets go."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import pickle, sys, time, pigeon; q = pigeon.Queue(); q.put(7);"
         " sys.stdout.buffer.write(pickle.dumps(q) + b'\\n'); sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    q = pickle.loads(p.stdout.readline())
    path = q._path  # type: ignore[attr-defined]
    p.kill()
    p.wait()
    p.stdout.close()
    time.sleep(2)
    assert os.path.exists(path) and q.get(timeout=5) == 7
    q.close()
    assert _gone_within({path}, 15)


def test_the_c_path_and_the_mutex_are_in_use_where_they_can_be() -> None:
    """CI builds the extension (a compiler is there): a silent fallback would test the
    pure-Python path twice and measure the wrong thing."""
    from pigeon.backends.local import queue as local
    from pigeon.backends.local import shared

    if os.environ.get("PIGEON_PURE_PYTHON") or not sys.platform.startswith("linux"):
        pytest.skip("the pure-Python path was asked for, or this is not Linux")
    if not os.environ.get("CI"):
        pytest.skip("outside CI a machine may lack a compiler")
    assert local.C is not None, "pigeon._fastring was not built (see hatch_build.py)"
    if os.environ.get("PIGEON_LOCAL_LOCK") != "flock":
        assert shared.MUTEX is not None


def test_without_the_extension_it_says_so_once_at_debug_level() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the robust mutex through ctypes is checked on Linux")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s')\n"
        "sys.modules['pigeon._fastring'] = None  # as if it was never built\n"
        "import pigeon\n"
        "q = pigeon.Queue(); q.put(b'x'); assert q.get() == b'x'; q.close()\n"
        "from pigeon.backends.local import queue as local, shared\n"
        "assert local.C is None and shared.MUTEX is not None\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PIGEON_PURE_PYTHON", "PIGEON_LOCAL_LOCK")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "fast path is not built" in line]
    assert len(said) == 1 and said[0].startswith("pigeon.local")


_CLOSE_WHILE_IN_USE = r"""
import multiprocessing as mp, os, threading, time
import pigeon
from pigeon.errors import ClosedResourceError

q = pigeon.Queue()

def hammer(q):  # holds the queue's lock while it copies 1 MiB: our threads wait for it
    big = b"z" * (1 << 20)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        q.put(big)
        q.get()

child = mp.get_context("fork").Process(target=hammer, args=(q,), daemon=True)
child.start()
time.sleep(0.2)
errors = []

def user():
    while True:
        try:
            q.put(b"a", timeout=0.01)
            q.get(timeout=0.01)
        except ClosedResourceError:
            return
        except (pigeon.Empty, pigeon.Full):
            pass
        except Exception as exc:
            errors.append(repr(exc))
            return

threads = [threading.Thread(target=user) for _ in range(2)]
for t in threads:
    t.start()
time.sleep(0.3)
q.close()
for t in threads:
    t.join(10)
child.kill()
assert not errors and not any(t.is_alive() for t in threads), (errors, threads)
print("closed cleanly")
"""


@pytest.mark.parametrize("path", ["c", "pure"])
def test_close_while_other_threads_use_the_handle_does_not_crash(path: str) -> None:
    env = {**os.environ, "PIGEON_PURE_PYTHON": "1"} if path == "pure" else dict(os.environ)
    for _ in range(4):
        r = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_IN_USE], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        assert "closed cleanly" in r.stdout
