"""Run the Jepsen-style nemesis against ``pigeon serve`` for longer than CI does, and print
the table docs/reliability.md shows (one row per run).

Needs root, ``ip``, ``nft`` and ``tc`` (Debian: iproute2, nftables). The harness is
``tests/faults/_nemesis.py``; ``tests/faults/test_nemesis.py`` runs it for 60 s in CI.

    python scripts/nemesis.py                  # 120 s, log store, --fsync always, every fault
    python scripts/nemesis.py --seconds 300 --fsync batch --store sqlite
    python scripts/nemesis.py --faults kill,kill-backlog,kill-twice,term --segment-bytes 65536
    python scripts/nemesis.py --memory --faults kill-backlog --seconds 20   # a control: FAILs
    python scripts/nemesis.py --seed 1234 --faults ci --every-once --heartbeat 1  # a CI run

Exit status: 0 when every promise of the setup held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout

from tests.faults._nemesis import CI_FAULTS, FAULTS, Options, nemesis
from tests.faults._nemesis_check import HEADER, row
from tests.faults._netns import missing_tools


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="of faults and calm (120)")
    p.add_argument("--seed", type=int, default=None, help="random when not given; printed")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated, 'all' or 'ci'; known: {', '.join(FAULTS)}")  # fmt: skip
    p.add_argument("--every-once", action="store_true",
                   help="each fault once, in a seeded order (CI); else at random")  # fmt: skip
    p.add_argument("--store", choices=("log", "sqlite"), default="log")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="always")
    p.add_argument("--memory", action="store_true", help="a broker that keeps nothing (a control)")
    p.add_argument("--segment-bytes", type=int, default=None)
    p.add_argument("--heartbeat", type=float, default=5.0, help="the broker's (5, its default)")
    p.add_argument("--lease", type=float, default=10.0)
    p.add_argument("--max-deliveries", type=int, default=20)
    p.add_argument("--pace", type=float, default=0.02, help="a producer's sleep per item")
    p.add_argument("--workdir", type=Path, default=None,
                   help="logs, kept after the run (default: a new temp dir)")  # fmt: skip
    args = p.parse_args()
    missing = missing_tools("ip", "nft", "tc")
    if missing:
        p.error(f"needs {', '.join(missing)} (Debian: iproute2, nftables) and root")
    faults = {"all": tuple(FAULTS), "ci": CI_FAULTS}.get(args.faults) or tuple(
        f.strip() for f in args.faults.split(",")
    )
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pigeon-nemesis-"))
    opts = Options(
        workdir=workdir, seconds=args.seconds, seed=seed, faults=faults,
        every_once=args.every_once, store=args.store, fsync=args.fsync, memory=args.memory,
        segment_bytes=args.segment_bytes, heartbeat=args.heartbeat, lease=args.lease,
        max_deliveries=args.max_deliveries, pace=args.pace, calm=(1.0, 3.0),
    )  # fmt: skip
    print(f"seed {seed}; logs in {workdir}", flush=True)
    with nemesis(opts) as run:
        verdict = run.go()
        drew = "all" if args.faults == "all" else ", ".join(faults)
        line = row(verdict, opts.setup, drew, run.planned_seconds, run.faults_done,
                   run.broker.starts, opts.may_lose)  # fmt: skip
    print()
    print(HEADER)
    print(line)
    problems = verdict.problems(opts.may_lose)
    for problem in problems:
        print(f"- {problem}")
    if opts.may_lose and verdict.lost:
        print(f"- lost {len(verdict.lost)} acknowledged writes: allowed for this setup")
    print(f"seed {seed}; logs in {workdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
