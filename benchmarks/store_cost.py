"""What the durable store costs the broker: CPU seconds per message, store by store.

Run:  python benchmarks/store_cost.py [--messages 200000] [--rounds 2]

Starts `pigeon serve` with each store in turn (`--memory`; the log store with `--fsync
never`, `batch`, `always`; the SQLite store with `--fsync batch`), moves the same messages
through it (one producer process putting batches of 100, one consumer process taking
batches of 100 and acknowledging them), and reads the broker's user + system CPU time
from /proc (Linux). The CPU time is a steadier measure than throughput on a shared
machine; the difference to `--memory` is what the store costs.
Prints a table and writes benchmarks/results/store_cost.png.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time

import pigeon
from _report import RESULTS, bars, table
from _serve import cpu_seconds, wait_listening

PORT = 7897
BATCH = 100
ITEM = b"x" * 64
STORES = {
    "--memory": ["--memory"],
    "fsync never": ["--fsync", "never"],
    "fsync batch": ["--fsync", "batch"],
    "fsync always": ["--fsync", "always"],
    "sqlite batch": ["--fsync", "batch", "--store", "sqlite"],
}


def _produce(url: str, n: int) -> None:
    with pigeon.Queue(url, serializer="raw") as q:
        for _ in range(0, n, BATCH):
            q.put_many([ITEM] * BATCH)


def _consume(url: str, n: int) -> None:
    with pigeon.Queue(url, serializer="raw") as q:
        got = 0
        while got < n:
            got += len(q.get_many(BATCH, timeout=60))


def measure(flags: list[str], n: int) -> tuple[float, float]:
    """(broker CPU seconds spent on the messages, messages per second)."""
    data = tempfile.mkdtemp(prefix="pigeon-store-cost-")
    argv = [sys.executable, "-m", "pigeon", "serve", "--port", str(PORT), "--data-dir", data]
    broker = subprocess.Popen(argv + flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(PORT)
        idle = cpu_seconds(broker.pid)  # start-up, not counted
        url = f"pigeon://127.0.0.1:{PORT}/cost"
        ctx = mp.get_context("fork")
        procs = [
            ctx.Process(target=_produce, args=(url, n)),
            ctx.Process(target=_consume, args=(url, n)),
        ]
        start = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
            if p.exitcode != 0:
                raise RuntimeError(f"a client failed (exit code {p.exitcode})")
        elapsed = time.perf_counter() - start
        return cpu_seconds(broker.pid) - idle, n / elapsed
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000, help="messages per store and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, the stores interleaved")
    ap.add_argument(
        "--stores",
        default=",".join(STORES),
        help=f"which stores, comma-separated ('--memory' always runs; of {', '.join(STORES)})",
    )
    args = ap.parse_args()
    chosen = {"--memory"} | {name.strip() for name in args.stores.split(",")}
    unknown = chosen - set(STORES)
    if unknown:
        ap.error(f"unknown store(s) {', '.join(sorted(unknown))}; choose from {', '.join(STORES)}")
    stores = {name: flags for name, flags in STORES.items() if name in chosen}
    n = max(BATCH, args.messages // BATCH * BATCH)
    cpu: dict[str, list[float]] = {k: [] for k in stores}
    rate: dict[str, list[float]] = {k: [] for k in stores}
    for _ in range(args.rounds):
        for name, flags in stores.items():
            secs, per_s = measure(flags, n)
            cpu[name].append(secs)
            rate[name].append(per_s)
            print(f"  {name:13s} {secs:6.2f} CPU-s  {per_s:10,.0f} msgs/s", flush=True)
    base = min(cpu["--memory"])
    rows = []
    for name in stores:
        best = min(cpu[name])
        rows.append(
            [
                name,
                f"{best:.2f}",
                f"{best / n * 1e6:.1f}",
                f"{(best - base) / n * 1e6:.1f}",
                f"{best / base:.2f}×" if base else "n/a (too few messages to time)",
                f"{max(rate[name]):,.0f}",
            ]
        )
    table(
        f"broker CPU for {n:,} messages of 64 B put and acked in batches of {BATCH} "
        f"(best of {args.rounds})",
        ["store", "CPU-s", "µs/msg", "store µs/msg", "vs --memory", "msgs/s"],
        rows,
    )
    out = bars(
        RESULTS / "store_cost.png",
        "broker CPU per message (µs)",
        {"CPU per message": {name: min(cpu[name]) / n * 1e6 for name in stores}},
        "µs per message put and acked",
    )
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
