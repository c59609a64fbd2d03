"""What one put and one get cost, layer by layer (the numbers of docs/performance.md).

Run:  python benchmarks/hot_path.py [--rounds 3000]

1. The broker's rules in-process (``Broker.handle`` on the memory store, no sockets): a
   single put, get and ACK, and a batch of 100, the GET with manual ack (at-least-once,
   then an ACK) and without (the broker forgets items as it sends them).
2. The client's operation generators (``Ops.put`` / ``Ops.take`` of one item, replies
   fed in): the Python a blocking or asyncio call runs around its system calls.
3. Each face alone against a ``pigeon serve --memory`` started here: single put and get,
   and put_many / get_many of 100 (the consumer loop is the ×100 bottleneck).
Prints tables and writes benchmarks/results/hot_path.png.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pigeon
from _report import RESULTS, bars, table
from _serve import wait_listening
from pigeon.backends.pigeon.ops import Ops, Spec, advance
from pigeon.protocol import Ack, Deliver, Delivery, Get, Ok, Put
from pigeon.protocol.messages import PutBatch
from pigeon.server.core import Broker, Store

PORT = 7898
ITEM = b"x" * 64


def _us(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def broker_costs(rounds: int) -> dict[str, float]:
    """µs per call of Broker.handle, warm, one queue, one producer and one consumer."""
    b = Broker(Store())
    b.connection_made(1)
    b.connection_made(2)
    out: dict[str, float] = {}
    for batch in (1, 100):
        put = Put(1, "q", ITEM, 0.0) if batch == 1 else PutBatch(1, "q", [ITEM] * batch, 0.0)
        for manual in (True, False):
            tp = tg = ta = 0.0
            for i in range(rounds + 100):
                t0 = time.perf_counter()
                b.handle(1, put)
                t1 = time.perf_counter()
                (_, reply), *_ = b.handle(2, Get(2, "q", batch, 0.0, manual, None))
                t2 = time.perf_counter()
                if manual:
                    b.handle(2, Ack(3, "q", [d.id for d in reply.messages], True))
                t3 = time.perf_counter()
                if i >= 100:
                    tp, tg, ta = tp + t1 - t0, tg + t2 - t1, ta + t3 - t2
            kind = "manual ack" if manual else "no ack"
            out[f"put x{batch}"] = tp / rounds * 1e6
            out[f"get x{batch} ({kind})"] = tg / rounds * 1e6
            if manual:
                out[f"ack x{batch}"] = ta / rounds * 1e6
    return out


def client_costs(rounds: int) -> dict[str, float]:
    """µs of Python per blocking/asyncio call, without the socket (replies fed in)."""
    ops = Ops(Spec("pigeon://127.0.0.1:1/q", serializer="raw"))
    deliver = Deliver(1, [Delivery(5, 1, ITEM)])

    def put() -> None:
        op = ops.put([ITEM], True, None)
        advance(op, None, None)
        advance(op, Ok(1, 1), None)

    def take() -> None:
        op = ops.take(1, True, 60)
        advance(op, None, None)
        advance(op, deliver, None)  # -> the quiet ACK
        advance(op, None, None)

    return {"Ops.put (1 item)": _us(put, rounds), "Ops.take (1 item)": _us(take, rounds)}


def _faces(n: int) -> dict[str, float]:
    """items/s of each face alone against the broker."""
    url = f"pigeon://127.0.0.1:{PORT}/hot"
    out: dict[str, float] = {}
    with pigeon.Queue(url, serializer="raw") as q:
        t = time.perf_counter()
        for _ in range(n):
            q.put(ITEM)
        out["blocking put"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            q.get()
        out["blocking get"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            q.put_many([ITEM] * 100)
        out["put_many(100)"] = n * 100 / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            q.get_many(100)
        out["get_many(100)"] = n * 100 / (time.perf_counter() - t)

    async def aio() -> None:
        aq: Any = pigeon.AsyncQueue(url, serializer="raw")
        t = time.perf_counter()
        for _ in range(n):
            await aq.put(ITEM)
        out["asyncio put"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            await aq.get()
        out["asyncio get"] = n / (time.perf_counter() - t)
        await aq.aclose()

    asyncio.run(aio())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000, help="calls per measurement")
    args = ap.parse_args()
    inproc = broker_costs(args.rounds)
    table("the broker's rules in-process (µs per call)", ["call", "µs"],
          [[k, f"{v:.1f}"] for k, v in inproc.items()])  # fmt: skip
    m, a = inproc["get x100 (manual ack)"] + inproc["ack x100"], inproc["get x100 (no ack)"]
    print(f"at-least-once GET+ACK of 100 vs a GET that forgets: {m / a:.2f}×")
    client = client_costs(args.rounds * 10)
    table("the client's Python per call (µs, no socket)", ["call", "µs"],
          [[k, f"{v:.2f}"] for k, v in client.items()])  # fmt: skip
    broker = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--port", str(PORT), "--memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(PORT)
        faces = _faces(max(200, args.rounds))
    finally:
        broker.terminate()
        broker.wait(10)
    table("each face alone against pigeon serve --memory (items/s)", ["operation", "items/s"],
          [[k, f"{v:,.0f}"] for k, v in faces.items()])  # fmt: skip
    ratio = faces["get_many(100)"] / faces["put_many(100)"]
    print(f"get_many(100) vs put_many(100), alone: {ratio:.2f}×")
    out = bars(
        RESULTS / "hot_path.png",
        "one put and one get, layer by layer",
        {"in-process broker (µs)": inproc, "client Python (µs)": client},
        "µs per call",
    )
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
