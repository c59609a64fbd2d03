"""Where the broker's CPU goes: is it the bottleneck, and what does each request cost it?

Run:  python benchmarks/broker_cpu.py [--items 1000000] [--batch 100] [--store memory|log]
      python benchmarks/broker_cpu.py --trees OLD_TREE NEW_TREE   (an A/B, interleaved)

1. A 1 → 1 run like benchmarks/broker.py's (one producer process, one consumer process,
   64 B, put_many/get_many of --batch, or put/get for --batch 1) against a ``pigeon
   serve`` started here, with the CPU seconds each process spent per item: the broker's
   share of one core says whether it is the bottleneck (on this 2-CPU VM, at ~95 % it is).
2. The broker through its connection layer without sockets: the frames a client sends
   (PUT_BATCH, GET, the quiet ACK) fed to ``Connection.buffer_updated``, the replies kept
   by a transport that sends nothing - the Python one read costs the broker, with the
   memory store and the log store (``--fsync batch``). Medians of --rounds.

With --trees, both parts run for each source tree (``PYTHONPATH=TREE/src``), the trees
alternating --repeat times; the table gives each tree's best run (this VM's speed drifts
by ±15 % over seconds: the best of several interleaved runs is the steadiest figure).
Prints tables and writes benchmarks/results/broker_cpu.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _serve import cpu_seconds, wait_listening

ITEM = b"x" * 64
PORT = 7899


# --- 1. a 1 -> 1 run with CPU accounting ----------------------------------------------------


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _produce(url: str, n: int, batch: int, go: Any, out: Any) -> None:
    import pigeon

    with pigeon.Queue(url, serializer="raw") as q:
        q.put(b"warm-up")  # connected before the clock starts
        go.wait()
        start = _self_cpu()
        for _ in range(0, n, batch):
            if batch == 1:
                q.put(ITEM)
            else:
                q.put_many([ITEM] * batch)
        out.put(("producer", _self_cpu() - start))


def _consume(url: str, n: int, batch: int, go: Any, out: Any) -> None:
    import pigeon

    with pigeon.Queue(url, serializer="raw") as q:
        q.get()
        go.wait()
        start = _self_cpu()
        got = 0
        while got < n:
            if batch == 1:
                q.get(timeout=60)
                got += 1
            else:
                got += len(q.get_many(batch, timeout=60))
        out.put(("consumer", _self_cpu() - start))
        out.put(("done", time.perf_counter()))


def one_to_one(n: int, batch: int, store: str) -> dict[str, float]:
    """items/s and CPU µs per item of the broker, the producer and the consumer."""
    ctx = mp.get_context("fork")
    data = tempfile.mkdtemp(prefix="pigeon-cpu-")
    where = ["--memory"] if store == "memory" else ["--data-dir", data, "--fsync", "batch"]
    broker = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--port", str(PORT), *where],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(PORT)
        url = f"pigeon://127.0.0.1:{PORT}/cpu-{os.getpid()}"
        go, out = ctx.Event(), ctx.SimpleQueue()
        procs = [ctx.Process(target=_produce, args=(url, n, batch, go, out)),
                 ctx.Process(target=_consume, args=(url, n, batch, go, out))]  # fmt: skip
        for p in procs:
            p.start()
        time.sleep(0.5)
        before = cpu_seconds(broker.pid)
        start = time.perf_counter()
        go.set()
        got = dict(out.get() for _ in range(3))
        wall = got["done"] - start
        used = cpu_seconds(broker.pid) - before
        for p in procs:
            p.join(30)
    finally:
        broker.terminate()
        broker.wait(10)
        import shutil

        shutil.rmtree(data, ignore_errors=True)
    return {
        "items/s": n / wall,
        "broker µs/item": used / n * 1e6,
        "producer µs/item": got["producer"] / n * 1e6,
        "consumer µs/item": got["consumer"] / n * 1e6,
        "broker's share of a core": used / wall,
    }


# --- 2. the connection layer without sockets ------------------------------------------------


class _Transport:
    """What a connection writes to: kept, never sent."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if key == "peername" else default

    def is_closing(self) -> bool:
        return False

    def writelines(self, bufs: Any) -> None:
        self.out.extend(bufs)

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def taken(self) -> bytes:
        data, self.out = b"".join(self.out), []
        return data


def _feed(c: Any, data: bytes) -> None:
    while data:
        buf = c.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        c.buffer_updated(n)
        data = data[n:]


async def _layer(rounds: int, batch: int, store: str, warm: int = 200) -> dict[str, float]:
    from pigeon.protocol import Ack, Get
    from pigeon.protocol.client import ClientConnection
    from pigeon.protocol.messages import PutBatch
    from pigeon.server.app import BrokerServer
    from pigeon.server.config import ServerConfig

    kept = None
    if store == "log":
        from pigeon.server.store import open_store

        kept = open_store(Path(tempfile.mkdtemp(prefix="pigeon-cpu-")), "log", "batch", 0.01)
    server = BrokerServer(ServerConfig(store=kept))
    if kept is not None:
        kept.attach(asyncio.get_running_loop())  # type: ignore[attr-defined]
        kept.start(server._committed)
    ends = []
    for _ in range(2):  # a producer's connection and a consumer's
        c, t, client = server._accept(), _Transport(), ClientConnection("bench")
        c.connection_made(t)  # type: ignore[arg-type]
        _feed(c, client.data_to_send())  # HELLO
        client.receive_data(t.taken())  # WELCOME
        ends.append((c, t, client))
    (pc, pt, producer), (cc, ct, consumer) = ends
    took: dict[str, list[float]] = {"put": [], "get": [], "ack": []}
    for i in range(rounds + warm):  # the first `warm` rounds warm up
        producer.request(PutBatch(0, "q", [ITEM] * batch, 0.0))
        frames = producer.data_to_send()
        t0 = time.perf_counter()
        _feed(pc, frames)
        t1 = time.perf_counter()
        producer.receive_data(pt.taken())
        consumer.request(Get(0, "q", batch, 0.0, True, None))
        frames = consumer.data_to_send()
        t2 = time.perf_counter()
        _feed(cc, frames)
        t3 = time.perf_counter()
        (event,) = consumer.receive_data(ct.taken())
        consumer.post(Ack(0, "q", [d.id for d in event.message.messages], True))  # type: ignore[attr-defined]
        frames = consumer.data_to_send()
        t4 = time.perf_counter()
        _feed(cc, frames)
        t5 = time.perf_counter()
        if i >= warm:
            took["put"].append(t1 - t0)
            took["get"].append(t3 - t2)
            took["ack"].append(t5 - t4)
    if kept is not None:
        kept.close()
    med = {k: statistics.median(v) * 1e6 if v else 0.0 for k, v in took.items()}
    return {**med, "total": sum(med.values())}


def layer(rounds: int, batch: int, store: str) -> dict[str, float]:
    """µs of broker Python per PUT_BATCH, GET and ACK read (medians)."""
    return asyncio.run(_layer(rounds, batch, store))


# --- the driver ----------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "1 -> 1": one_to_one(args.items, args.batch, args.store),
        "layer memory": layer(args.rounds, args.batch, "memory"),
        "layer log": layer(args.rounds, args.batch, "log"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000, help="items in the 1 -> 1 run")
    ap.add_argument("--batch", type=int, default=100, help="put_many/get_many of this many")
    ap.add_argument("--store", choices=["memory", "log"], default="memory",
                    help="the broker of the 1 -> 1 run: --memory or the log store with "
                    "--fsync batch")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3000, help="reads timed in part 2")
    ap.add_argument("--trees", nargs=2, metavar=("OLD", "NEW"), help="compare two trees")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tree with --trees")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run, as JSON
    args = ap.parse_args()
    if args.items < args.batch or args.batch < 1 or args.rounds < 1 or args.repeat < 1:
        ap.error("--items must be at least --batch, and --batch, --rounds, --repeat at least 1")
    args.items -= args.items % args.batch
    if args.json:
        print(json.dumps(measure(args)))
        return
    trees = {"this tree": str(Path(__file__).resolve().parent.parent)}
    if args.trees:
        trees = {"old": args.trees[0], "new": args.trees[1]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    me = [a for a in sys.argv[1:] if a not in ("--trees", *(args.trees or ()))]
    for i in range(args.repeat if args.trees else 1):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(tree) / "src")}
            done = subprocess.run([sys.executable, __file__, *me, "--json"], env=env,
                                  capture_output=True, text=True, check=True)  # fmt: skip
            runs[name].append(json.loads(done.stdout))
            print(f"  run {i + 1}: {name} done", flush=True)
    _report(runs, args)


def _best(runs: list[dict[str, Any]], part: str, key: str, high: bool) -> float:
    values = [r[part][key] for r in runs]
    return max(values) if high else min(values)


def _report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    from _report import RESULTS, bars, table

    names = list(runs)
    kind = f"{'put/get' if args.batch == 1 else f'x{args.batch}'}, --store {args.store}"
    rows = []
    for key in ("items/s", "broker µs/item", "producer µs/item", "consumer µs/item",
                "broker's share of a core"):  # fmt: skip
        high = key in ("items/s", "broker's share of a core")
        cells = [_best(runs[n], "1 -> 1", key, high) for n in names]
        fmt = "{:,.0f}" if key == "items/s" else "{:.0%}" if "share" in key else "{:.2f}"
        rows.append([key, *(fmt.format(c) for c in cells)])
    table(f"1 -> 1, 64 B, {kind} (best of {len(runs[names[0]])})", ["", *names], rows)
    rows = []
    for store in ("memory", "log"):
        for key in ("put", "get", "ack", "total"):
            cells = [_best(runs[n], f"layer {store}", key, False) for n in names]
            rows.append([f"{store}: {key}", *(f"{c:.1f}" for c in cells)])
    table(f"the broker's Python per read, x{args.batch}, no sockets (µs, median)",
          ["read", *names], rows)  # fmt: skip
    if len(names) == 2:
        old, new = (runs[n] for n in names)
        rate = _best(new, "1 -> 1", "items/s", True) / _best(old, "1 -> 1", "items/s", True)
        # /proc counts CPU in clock ticks (10 ms): a short run can read 0 for a tree
        new_cpu = _best(new, "1 -> 1", "broker µs/item", False)
        old_cpu = _best(old, "1 -> 1", "broker µs/item", False)
        cpu = f"{new_cpu / old_cpu:.2f}×" if old_cpu > 0 else "n/a (run too short to measure)"
        print(f"new/old: items/s {rate:.2f}×, the broker's CPU per item {cpu}")
    out = bars(
        RESULTS / "broker_cpu.png",
        f"the broker's Python per read, x{args.batch} (µs)",
        {n: {f"{s} {k}": _best(runs[n], f"layer {s}", k, False)
             for s in ("memory", "log") for k in ("put", "get", "ack")} for n in names},
        "µs",
    )  # fmt: skip
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
