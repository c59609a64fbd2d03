"""pigeon.consume in each mode against the pools a user would pick instead, in one run.

Run:  python benchmarks/consumers.py [--items 2000] [--quick]

Two workloads, the same items for every contender:
  cpu   hash a 64-byte block 2,000 times with SHA-256 (pure CPU: holds the GIL)
  io    sleep 5 ms (stands for a network or disk round trip: releases the GIL)
Contenders:
  pigeon thread / process / async / auto   pigeon.consume over a local pigeon.Queue
                                           (put, then shutdown: consume returns drained)
  mp.Pool.imap_unordered                   multiprocessing.Pool, chunksize 16
  ThreadPoolExecutor / ProcessPoolExecutor concurrent.futures .map, chunksize 16
Concurrency: processes = CPU count; threads = min(32, CPUs + 4); coroutines 100 (the
defaults of pigeon.consume, and of the pools). Prints items/s with the ratio to the best
peer, and writes benchmarks/results/consumers.png.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import pigeon
from _report import RESULTS, bars, table

CPUS = os.cpu_count() or 1
THREADS = min(32, CPUS + 4)


def cpu(item: int) -> bytes:
    data = item.to_bytes(8, "big") * 8
    for _ in range(2000):
        data = hashlib.sha256(data).digest()
    return data


def io(item: int) -> int:
    time.sleep(0.005)
    return item


async def io_async(item: int) -> int:
    await asyncio.sleep(0.005)
    return item


def run_pigeon(fn: Callable[[Any], Any], items: int, mode: str) -> tuple[float, str]:
    q: pigeon.Queue[int] = pigeon.Queue()
    q.put_many(range(items))
    q.shutdown()
    concurrency = {"process": CPUS, "thread": THREADS, "async": 100}.get(mode)
    t = time.perf_counter()
    report = pigeon.consume(q, fn, mode=mode, concurrency=concurrency)
    elapsed = time.perf_counter() - t
    q.close()
    assert report.processed == items, report
    return elapsed, report.mode


def run_pool(fn: Callable[[Any], Any], items: int) -> float:
    with mp.get_context("fork").Pool(CPUS) as pool:
        t = time.perf_counter()
        n = sum(1 for _ in pool.imap_unordered(fn, range(items), chunksize=16))
        elapsed = time.perf_counter() - t
    assert n == items
    return elapsed


def run_executor(kind: str, fn: Callable[[Any], Any], items: int) -> float:
    executor: Any = (
        ThreadPoolExecutor(THREADS) if kind == "thread"
        else ProcessPoolExecutor(CPUS, mp_context=mp.get_context("fork"))
    )  # fmt: skip
    with executor:
        t = time.perf_counter()
        n = sum(1 for _ in executor.map(fn, range(items), chunksize=16))
        elapsed = time.perf_counter() - t
    assert n == items
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="200 items: a smoke run")
    args = ap.parse_args()
    items = 200 if args.quick else args.items
    rows = []
    groups: dict[str, dict[str, float]] = {}
    for name, fn, afn in (("cpu", cpu, None), ("io", io, io_async)):
        results: dict[str, float] = {}
        chosen = ""
        for mode in ("thread", "process", "auto"):
            elapsed, picked = run_pigeon(fn, items, mode)
            results[f"pigeon {mode}"] = items / elapsed
            if mode == "auto":
                chosen = picked
        if afn is not None:
            results["pigeon async"] = items / run_pigeon(afn, items, "async")[0]
        results["mp.Pool.imap_unordered"] = items / run_pool(fn, items)
        results["ThreadPoolExecutor"] = items / run_executor("thread", fn, items)
        results["ProcessPoolExecutor"] = items / run_executor("process", fn, items)
        peers = [v for k, v in results.items() if not k.startswith("pigeon")]
        best_peer = max(peers)
        best_fixed = max(
            v for k, v in results.items() if k.startswith("pigeon") and k != "pigeon auto"
        )
        for k, v in results.items():
            note = f"auto chose {chosen}" if k == "pigeon auto" else ""
            rows.append((name, k, v, f"{v / best_peer:.2f}x", note))
        rows.append(
            (
                name,
                "auto vs best fixed pigeon mode",
                "",
                f"{results['pigeon auto'] / best_fixed:.2f}x",
                "",
            )
        )
        groups[f"{name} ({items} items)"] = results
    table(
        f"pigeon.consume vs pools, {CPUS} CPUs, items/s",
        ["work", "contender", "items/s", "vs best peer", ""],
        rows,
    )
    path = bars(RESULTS / "consumers.png", "pigeon.consume vs pools (items/s)", groups, "items/s")
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
