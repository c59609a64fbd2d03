"""How long a broker takes to start on a store holding N messages (default 1,000,000).

Run:  python benchmarks/recovery.py [--messages 1000000] [--size 64]

Fills a fresh SQLite store through the same code path the broker uses (SQLiteStore,
group commit), then times opening it again and loading every message (Broker(store)),
which is what `pigeon serve --data-dir DIR` does at start.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

from pigeon.server.broker import Broker
from pigeon.server.model import Stored
from pigeon.server.store import SQLiteStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(d, "never")
        done = threading.Event()
        store.start(lambda batch: done.set())
        payload = b"x" * args.size
        t = time.perf_counter()
        for i in range(1, args.messages + 1):
            store.added("jobs", Stored(i, payload))
        store.close()
        fill = time.perf_counter() - t
        t = time.perf_counter()
        store2 = SQLiteStore(d, "batch")
        broker = Broker(store2)
        recover = time.perf_counter() - t
        depth = broker.queues["jobs"].depth
        store2.close()
    print(f"filled {args.messages:,} messages of {args.size} B in {fill:.1f} s")
    print(f"recovered {depth:,} messages in {recover:.2f} s "
          f"({depth / recover:,.0f} messages/s, checksums verified)")  # fmt: skip


if __name__ == "__main__":
    main()
