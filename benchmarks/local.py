"""pigeon's local queue against the queues a user would pick instead, in one run.

Run:  python benchmarks/local.py [--quick] [--sizes 64,1024,...] [--topologies 1x1,4x4]

Producers and consumers are separate processes (fork). Every contender moves the same
items (``bytes`` of the given size) from P producer processes to C consumer processes;
time runs from a common start signal until the last consumer has everything.
Contenders:
  pigeon          pigeon.Queue put / get
  pigeon batch    pigeon.Queue put_many / get_many, batches of 100 (fewer for big items:
                  a batch stays under 64 MiB)
  mp.Queue        multiprocessing.Queue put / get
  SimpleQueue     multiprocessing.SimpleQueue put / get
  Pipe            multiprocessing.Pipe send_bytes / recv_bytes (1x1 only: not multi-writer)
  faster-fifo     faster_fifo.Queue put / get, and put_many / get_many (if installed)
  pyzmq ipc       zmq PUSH / PULL over ipc://, send / recv (1x1 only; if installed): ZeroMQ
                  batches small messages itself, so this is the bar for pigeon's batches
Prints a table (items/s, MB/s, ratio to multiprocessing.Queue) and writes
benchmarks/results/local.png.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pigeon
from _report import RESULTS, table

BATCH = 100
ctx = mp.get_context("fork")


def batch_for(size: int) -> int:
    """Items per batch: 100, fewer for big items (a batch stays under 64 MiB)."""
    return max(1, min(BATCH, 64 * 2**20 // max(1, size)))


@dataclass
class Contender:
    name: str
    make: Callable[[int], Any]  # item size -> queue
    put: Callable[[Any, bytes, int], None]  # queue, item, count
    get: Callable[[Any], int]  # queue -> items received (stops at the end marker)
    end: Callable[[Any, int], None]  # queue, consumers: tell them to stop
    only_1x1: bool = False


def _single_put(q: Any, item: bytes, count: int) -> None:
    put = q.put
    for _ in range(count):
        put(item)


def _single_get(q: Any) -> int:
    get = q.get
    n = 0
    while get() is not None:
        n += 1
    return n


def _end_none(q: Any, consumers: int) -> None:
    for _ in range(consumers):
        q.put(None)


def _pigeon_batch_put(q: Any, item: bytes, count: int) -> None:
    batch = batch_for(len(item))
    for i in range(0, count, batch):
        q.put_many([item] * min(batch, count - i))


def _pigeon_batch_get(q: Any) -> int:
    n = 0
    try:
        while True:
            n += len(q.get_many(BATCH))
    except pigeon.ShutDown:
        return n


def _pigeon_end(q: Any, consumers: int) -> None:
    q.shutdown()


def _pipe_put(conn: Any, item: bytes, count: int) -> None:
    send = conn[1].send_bytes
    for _ in range(count):
        send(item)


def _pipe_get(conn: Any) -> int:
    recv = conn[0].recv_bytes
    n = 0
    while recv():
        n += 1
    return n


def _pipe_end(conn: Any, consumers: int) -> None:
    conn[1].send_bytes(b"")


def _ff_make(size: int) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=max(64 * 2**20, 4 * (size + 64) * batch_for(size)))


def _ff_get(q: Any) -> int:
    n = 0
    while True:
        item = q.get(timeout=60)
        if item is None:
            return n
        n += 1


def _ff_batch_put(q: Any, item: bytes, count: int) -> None:
    batch = batch_for(len(item))
    for i in range(0, count, batch):
        q.put_many([item] * min(batch, count - i), timeout=60)


def _ff_batch_get(q: Any) -> int:
    n = 0
    while True:
        items = q.get_many(max_messages_to_get=BATCH, timeout=60)
        ends = items.count(None)  # end markers come after every item
        n += len(items) - ends
        if ends:
            for _ in range(ends - 1):  # the other consumers' markers
                q.put(None)
            return n


def _zmq_make(size: int) -> str:
    import tempfile

    return f"ipc://{tempfile.gettempdir()}/pigeon-bench-{os.getpid()}-{time.monotonic_ns()}.ipc"


def _zmq_put(address: str, item: bytes, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(address)
    send = sock.send
    for _ in range(count):
        send(item, copy=len(item) < 65536)
    send(b"")
    sock.close()
    ctx.term()  # waits until everything is delivered (the process ends with os._exit)


def _zmq_get(address: str) -> int:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)  # zmq.Again rather than a hang if items are lost
    sock.bind(address)
    recv = sock.recv
    n = 0
    while recv():
        n += 1
    sock.close(linger=0)
    os.unlink(address.removeprefix("ipc://"))
    return n


def _zmq_end(address: str, consumers: int) -> None:
    """The producer sent the end marker itself (a socket belongs to one process)."""


def contenders() -> list[Contender]:
    out = [
        Contender("pigeon", lambda s: pigeon.Queue(), _single_put, _single_get, _end_none),
        Contender(
            "pigeon batch",
            lambda s: pigeon.Queue(),
            _pigeon_batch_put,
            _pigeon_batch_get,
            _pigeon_end,
        ),
        Contender("mp.Queue", lambda s: ctx.Queue(), _single_put, _single_get, _end_none),
        Contender("SimpleQueue", lambda s: ctx.SimpleQueue(), _single_put, _single_get, _end_none),
        Contender(
            "Pipe",
            lambda s: ctx.Pipe(duplex=False),
            _pipe_put,
            _pipe_get,
            _pipe_end,
            only_1x1=True,
        ),
    ]
    try:
        import faster_fifo  # noqa: F401

        out += [
            Contender("faster-fifo", _ff_make, _single_put, _ff_get, _end_none),
            Contender("faster-fifo batch", _ff_make, _ff_batch_put, _ff_batch_get, _end_none),
        ]
    except ImportError:
        print("faster-fifo not installed: skipping it")
    try:
        import zmq  # noqa: F401

        out.append(Contender("pyzmq ipc", _zmq_make, _zmq_put, _zmq_get, _zmq_end, only_1x1=True))
    except ImportError:
        print("pyzmq not installed: skipping it")
    return out


def _producer(c: Contender, q: Any, item_size: int, count: int, go: Any) -> None:
    item = b"x" * item_size
    go.wait()
    c.put(q, item, count)


def _consumer(c: Contender, q: Any, go: Any, done: Any) -> None:
    go.wait()
    try:
        done.put(c.get(q))
    except Exception as exc:  # report instead of leaving the parent waiting
        done.put(f"{type(exc).__name__}: {exc}")


def measure(c: Contender, producers: int, consumers: int, size: int, count: int) -> float:
    """Seconds to move ``count`` items of ``size`` bytes; checks none were lost."""
    q = c.make(size)
    go = ctx.Event()
    done = ctx.SimpleQueue()
    share = count // producers
    procs = [ctx.Process(target=_producer, args=(c, q, size, share, go)) for _ in range(producers)]
    cons = [ctx.Process(target=_consumer, args=(c, q, go, done)) for _ in range(consumers)]
    for p in procs + cons:
        p.start()
    time.sleep(0.2)  # let every process reach the start line
    start = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    c.end(q, consumers)
    results = [done.get() for _ in cons]
    elapsed = time.perf_counter() - start
    for p in procs + cons:
        p.join(5)
        if p.is_alive():
            p.kill()
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError(f"{c.name}: a consumer failed: {errors[0]}")
    received = sum(results)
    if received != share * producers:
        raise AssertionError(f"{c.name}: {received} of {share * producers} items arrived")
    if hasattr(q, "close"):
        q.close()
    return elapsed


def item_count(size: int, quick: bool) -> int:
    budget = (16 if quick else 512) * 2**20
    return max(8 if not quick else 4, min(20_000 if quick else 200_000, budget // size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    ap.add_argument("--sizes", default="64,1024,65536,1048576,67108864")
    ap.add_argument("--topologies", default="1x1,4x4", help="PxC producers x consumers")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    topologies = [tuple(map(int, t.split("x"))) for t in args.topologies.split(",")]
    rows: list[list[object]] = []
    plot: dict[str, dict[str, float]] = {}
    checks: list[str] = []
    failures: list[str] = []
    for producers, consumers in topologies:
        for size in sizes:
            count = item_count(size, args.quick)
            count -= count % (producers * BATCH) or 0
            count = max(count, producers * BATCH) if size < 2**20 else max(count, producers)
            rates: dict[str, float] = {}
            for c in contenders():
                if c.only_1x1 and (producers, consumers) != (1, 1):
                    continue
                try:
                    secs = measure(c, producers, consumers, size, count)
                except RuntimeError as exc:
                    print(f"  {exc}", flush=True)
                    failures.append(f"{producers}x{consumers} {_fmt(size)}: {exc}")
                    continue
                rates[c.name] = count / secs
                print(
                    f"  {producers}x{consumers} {_fmt(size):>7} {c.name:18s} "
                    f"{rates[c.name]:12,.0f} items/s",
                    flush=True,
                )
            base = rates["mp.Queue"]
            label = f"{producers}x{consumers} {_fmt(size)}"
            for name, rate in rates.items():
                rows.append(
                    [
                        label,
                        name,
                        f"{rate:,.0f}",
                        f"{rate * size / 1e6:,.0f}",
                        f"{rate / base:.2f}×",
                    ]
                )
            plot[label] = {k: v / base for k, v in rates.items()}
            if size <= 1024:
                checks.append(
                    f"{label}: pigeon {rates['pigeon'] / base:.2f}× mp.Queue (target ≥ 3); "
                    f"batch {rates['pigeon batch'] / base:.2f}× mp.Queue (≥ 3)"
                    + (
                        f", {rates['pigeon batch'] / rates['faster-fifo batch']:.2f}× "
                        "faster-fifo batch (≥ 2)"
                        if "faster-fifo batch" in rates
                        else ""
                    )
                    + (
                        f"; single {rates['pigeon'] / rates['Pipe']:.2f}× Pipe (≥ 1.5)"
                        if "Pipe" in rates
                        else ""
                    )
                    + (
                        f"; batch {rates['pigeon batch'] / rates['pyzmq ipc']:.2f}× "
                        "pyzmq PUSH/PULL ipc (≥ 1)"
                        if "pyzmq ipc" in rates
                        else ""
                    )
                )
            else:
                checks.append(f"{label}: pigeon {rates['pigeon'] / base:.2f}× mp.Queue (≥ 4)")
    table(
        "local queues: items/s between processes (fork)",
        ["workload", "queue", "items/s", "MB/s", "vs mp.Queue"],
        rows,
    )
    for line in checks + failures:
        print(line)
    _plot(plot)


def _fmt(size: int) -> str:
    for unit, n in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= n:
            return f"{size // n} {unit}"
    return f"{size} B"


def _plot(plot: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(plot)
    names = sorted({n for v in plot.values() for n in v})
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.4), 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [plot[label].get(name, 0) for label in labels], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30)
    ax.set_yscale("log")
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_ylabel("throughput relative to multiprocessing.Queue (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "local.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
