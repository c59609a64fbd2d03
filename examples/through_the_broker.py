"""The seed program across processes through a pigeon broker.

Start a broker first (`pigeon serve`), then run:  python examples/through_the_broker.py
Any URL works the same: redis://127.0.0.1:6379/seed or nats://127.0.0.1:4222/seed.
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import pigeon

URL = sys.argv[1] if len(sys.argv) > 1 else "pigeon://127.0.0.1:7878/seed"


def writer(url: str) -> None:
    with pigeon.Queue(url) as q:
        for word in ["java", "Python", "JavaScript"]:
            q.put(word)  # returns once the broker confirmed it
        q.shutdown()  # every reader, in every process, ends once the queue is drained


def reader(url: str) -> None:
    with pigeon.Queue(url) as q:
        for word in q:
            print(f"reader got {word}")
        print("reader: shut down and drained")


if __name__ == "__main__":
    procs = [mp.Process(target=reader, args=(URL,)), mp.Process(target=writer, args=(URL,))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
