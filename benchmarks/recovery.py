"""How long a broker takes to start on a store holding N messages (default 1,000,000).

Run:  python benchmarks/recovery.py [--messages 1000000] [--size 64]

Fills a fresh store - the log (the default) and SQLite - through the code path the
broker uses (batches of 100, as put_many sends them), then times opening it again and
loading every message (Broker(store)), which is what `pigeon serve --data-dir DIR` does at
start; checksums are verified either way.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pigeon.server.core import Broker, Stored
from pigeon.server.store import LogStore, SQLiteStore

STORES = {"log": LogStore, "sqlite": SQLiteStore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--stores", default="log,sqlite", help="comma-separated: log, sqlite")
    args = ap.parse_args()
    for kind in args.stores.split(","):
        cls = STORES[kind.strip()]
        with tempfile.TemporaryDirectory() as d:
            store = cls(d, "never")
            store.start(lambda batch: None)
            payload = b"x" * args.size
            t = time.perf_counter()
            for i in range(1, args.messages + 1, 100):
                with store.atomic():
                    end = min(i + 100, args.messages + 1)
                    store.added_many("jobs", [Stored(j, payload) for j in range(i, end)])
            store.close()
            fill = time.perf_counter() - t
            t = time.perf_counter()
            store2 = cls(d, "batch")
            broker = Broker(store2)
            recover = time.perf_counter() - t
            depth = broker.queues["jobs"].depth
            store2.close()
        print(f"{kind}: filled {args.messages:,} messages of {args.size} B in {fill:.1f} s; "
              f"recovered {depth:,} in {recover:.2f} s ({depth / recover:,.0f} messages/s, "
              "checksums verified)")  # fmt: skip


if __name__ == "__main__":
    main()
