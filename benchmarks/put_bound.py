"""The put-bound workload of issue 33, compiled and pure Python, against Redis, in one run.

Run:  python benchmarks/put_bound.py [--rounds 3] [--count 10000]

One producer process putting one 64 B item at a time (each confirmed before the next) and
one consumer process reading 100 at a time, as in benchmarks/broker.py's "put-bound" rows:
the loop of `q.put(x)` most programs write. Contenders, the rounds interleaved:
  pigeon --fsync batch (the default log store) with its broker modules compiled (mypyc) and
  with PIGEON_PURE_PYTHON=1, against Redis Streams on a scratch redis-server with
  appendonly yes, appendfsync everysec (XADD one at a time, XREADGROUP COUNT 100 + XACK);
  pigeon --memory compiled and pure Python, against Redis Streams on 127.0.0.1:6379.
Prints the medians with the rounds' range and the ratios (targets: the durable store
>= 1.0x Redis AOF everysec, --memory >= 1.5x Redis Streams), writes
benchmarks/results/put_bound.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import broker as b
from _report import RESULTS, bars, table
from _serve import wait_listening

# name: (pigeon port, or None for Redis; Redis port; PIGEON_PURE_PYTHON)
SERVERS = {
    "pigeon fsync=batch, compiled": (7881, 0, False),
    "pigeon fsync=batch, Python": (7882, 0, True),
    "redis aof=everysec": (None, 6392, False),
    "pigeon --memory, compiled": (7883, 0, False),
    "pigeon --memory, Python": (7884, 0, True),
    "redis stream": (None, 6379, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--count", type=int, default=10_000, help="items per contender per round")
    args = ap.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("needs redis-server (for the scratch appendonly server)")
    scratch = tempfile.mkdtemp(prefix="pigeon-putbound-")
    procs = []
    for name, (port, rport, pure) in SERVERS.items():
        if port is None:
            if rport != 6379:
                procs.append(b._spawn([redis_server, "--port", str(rport), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "yes", "--appendfsync",
                                       "everysec", "--dir", scratch]))  # fmt: skip
            b.DURABLE[name] = (b.rstream_produce_single, b.rstream_consume, b.rstream_setup,
                               None, b.BATCH, {"redis_port": rport})  # fmt: skip
            continue
        store = ["--memory"] if "memory" in name else ["--data-dir", f"{scratch}/{port}",
                                                       "--fsync", "batch"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
        if pure:
            env["PIGEON_PURE_PYTHON"] = "1"
        procs.append(subprocess.Popen([sys.executable, "-m", "pigeon", "serve", "--port", str(port),
                                       *store], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))  # fmt: skip
        b.DURABLE[name] = (b.pigeon_produce_single, b.pigeon_consume, None, None, b.BATCH,
                           {"port": port})  # fmt: skip
    try:
        for port, rport, _ in SERVERS.values():
            wait_listening(port or rport)
        rates = b.rounds({n: args.count for n in SERVERS}, 1, 64, args.rounds, "put-bound 64 B")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
    med = {n: statistics.median(r) for n, r in rates.items()}
    durable = ("fsync=batch", "aof=")
    base = {
        n: med["redis aof=everysec" if any(d in n for d in durable) else "redis stream"]
        for n in med
    }
    table(
        f"put-bound, 1 producer (one confirmed put at a time) -> 1 consumer (100 at a time), "
        f"64 B (items/s, median of {args.rounds} interleaved rounds)",
        ["contender", "items/s", "rounds' range", "vs Redis (same durability)"],
        [[n, f"{r:,.0f}", b.spread(rates[n]), f"{r / base[n]:.2f}×"] for n, r in med.items()],
    )
    for store, peer, target in (("fsync=batch", "redis aof=everysec", 1.0),
                                ("--memory", "redis stream", 1.5)):  # fmt: skip
        c, p = med[f"pigeon {store}, compiled"], med[f"pigeon {store}, Python"]
        print(
            f"pigeon {store} vs {peer}: compiled {c / med[peer]:.2f}×, Python "
            f"{p / med[peer]:.2f}× (target ≥ {target}); compiled/Python {c / p:.2f}×"
        )
    out = bars(RESULTS / "put_bound.png", "put-bound, 1 -> 1, 64 B (items/s)", {"put-bound": med},
               "items/s")  # fmt: skip
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
