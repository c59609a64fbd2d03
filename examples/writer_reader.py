"""The seed program, done right: one writer process, one reader process, one queue.

The writer puts three words and then shuts the queue down; the reader iterates until the
queue is shut down and drained. Nobody polls ``empty()``, so a slow writer is not
mistaken for a finished one.

Run:  python examples/writer_reader.py
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pigeon


def writer(q: pigeon.Queue[str]) -> None:
    for word in ["java", "Python", "JavaScript"]:
        time.sleep(0.1)  # a slow writer: the queue is often empty meanwhile
        q.put_nowait(word)
        print(f"writer put {word}")
    q.shutdown()  # "no more": readers get what is left, then stop


def reader(q: pigeon.Queue[str]) -> None:
    for word in q:
        print(f"reader got {word}")
    print("reader: queue shut down and drained, done")


if __name__ == "__main__":
    with pigeon.Queue() as q:
        procs = [mp.Process(target=reader, args=(q,)), mp.Process(target=writer, args=(q,))]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
