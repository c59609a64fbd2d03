"""Instructions per message of ``Broker.handle``, counted by callgrind: is a change to the
broker's rules free? (Counts do not depend on the machine's load, as times do.)

Run:  python benchmarks/instructions.py OLD_TREE NEW_TREE [--seeds 0,1,2] [--ops 20000]
      (each tree's ``src`` goes first on the path; valgrind must be installed)
      python benchmarks/instructions.py TREE --pure    (each tree compiled and with
      PIGEON_PURE_PYTHON=1: what the mypyc build saves; src/pigeon/_compiled.py)
      python benchmarks/instructions.py --workload N KIND   (the workload alone, uncounted)

For each tree, hash seed and kind, callgrind counts a run doing N operations and one doing
none; the difference over N is the cost of one message. Kinds: ``single`` (put, GET with
manual ack, ACK), ``noack`` (put, GET without ack), ``batch`` (put_many of 100, get_many of
100 with manual ack, ACK; N counts messages), and ``layer-memory`` / ``layer-log``: a single
put, GET (manual ack) and ACK fed as frames through the broker's connection layer, no sockets
(``Connection.buffer_updated``, as benchmarks/broker_cpu.py does), on the memory store and on
the log store (``--fsync batch``). The hash seed moves a count by up to 1 %
(which names collide in CPython's method cache), hence several seeds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("single", "noack", "batch", "layer-memory", "layer-log")


def workload(n: int, kind: str) -> None:
    if kind.startswith("layer-"):
        import asyncio

        sys.path.insert(0, str(Path(__file__).parent))
        from broker_cpu import _layer

        asyncio.run(_layer(n, 1, kind.removeprefix("layer-"), warm=200))
        return
    from pigeon.protocol import Ack, Get, Put, PutBatch
    from pigeon.server.core import Broker

    b = Broker()
    b.connection_made(1)
    b.connection_made(2)
    one, hundred = Put(1, "q", b"x" * 64, 0.0), PutBatch(1, "q", [b"x" * 64] * 100, 0.0)

    def round_trip(put: Put | PutBatch, want: int, manual: bool) -> None:
        b.handle(1, put)
        ((_, reply), *_) = b.handle(2, Get(2, "q", want, 0.0, manual, None))
        if manual:
            b.handle(2, Ack(3, "q", [d.id for d in reply.messages], True))

    for _ in range(200):  # warm: every path taken before counting starts
        round_trip(one, 1, True)
        round_trip(hundred, 100, True)
        round_trip(one, 1, False)
    if kind == "batch":
        for _ in range(n // 100):
            round_trip(hundred, 100, True)
    else:
        for _ in range(n):
            round_trip(one, 1, kind == "single")


def count(tree: Path, seed: int, n: int, kind: str, pure: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONHASHSEED": str(seed)}
    if pure:
        env["PIGEON_PURE_PYTHON"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, __file__, "--workload", str(n), kind],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    return int(re.findall(r"Collected : (\d+)", out.stderr)[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trees", nargs="*", type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ops", type=int, default=20_000)
    p.add_argument("--workload", nargs=2, metavar=("N", "KIND"))
    p.add_argument("--kinds", default=",".join(KINDS), help="which workloads to count")
    p.add_argument("--pure", action="store_true", help="each tree also with PIGEON_PURE_PYTHON=1")
    args = p.parse_args()
    if args.workload:
        workload(int(args.workload[0]), args.workload[1])
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"instructions per message, mean of seeds {seeds} ({args.ops:,} messages a run)")
    runs = [(t, p) for t in args.trees for p in ((False, True) if args.pure else (False,))]
    print(
        "kind          " + "".join(f"{t.name[-15:] + (' pure' if p else ''):>22}" for t, p in runs)
    )
    for kind in args.kinds.split(","):
        row = []
        for tree, pure in runs:
            count(tree, seeds[0], 0, kind, pure)  # compiles the tree's .pyc files first
            per = [
                (count(tree, s, args.ops, kind, pure) - count(tree, s, 0, kind, pure)) / args.ops
                for s in seeds
            ]
            row.append(f"{statistics.mean(per):>22,.0f}")
        print(f"{kind:14}" + "".join(row))


if __name__ == "__main__":
    main()
