"""pigeon.Queue over redis:// and nats:// against the raw clients doing the same work.

Run:  python benchmarks/engines.py [--quick]

For each engine, the same N items of 64 B are put, then taken and acknowledged:
  raw naive   one command per item (redis-py XADD; XREADGROUP COUNT 1 + XACK + XDEL;
              nats-py publish awaiting each ack; fetch(1) + ack)
  raw best    batches of 100 (a redis-py pipeline; 100 publishes in flight, fetch(100))
  pigeon      pigeon.Queue(url).put / get (the blocking face)
  pigeon x100 put_many / get_many of 100
Prints put and get rates with ratios to the raw client, writes benchmarks/results/engines.png.
Targets: pigeon x100 within 10% of raw best; pigeon single no slower than raw naive.

Then the message options, each next to a plain put on the same engine (pigeon single,
64 B; put, then get once every item is due):
  plain, delay (1 s), ttl (60 s), priority 5, priorities 0-9 mixed, a large item (2 MiB:
  chunks on nats://), and "early": a get handed delayed messages before they are due
  (each given back until then), in messages given back per second.
With --options [--engines redis,nats] [--count N]: the cost of each message option
(priority, delay, ttl, headers, dedup_id) next to a plain put, single items through the
blocking face: the same N items put with the option, then taken; rates and ratios to
the plain put and get of the same run. An option the engine refuses shows as such.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import pigeon
from _report import RESULTS, bars, table

ITEM = b"x" * 64
BATCH = 100


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- Redis ------------------------------------------------------------------------------


def redis_raw(n: int, batch: int) -> tuple[float, float]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379)
    key = f"bench-raw-{uuid.uuid4().hex[:8]}"
    r.xgroup_create(key, "g", id="0", mkstream=True)

    def put() -> None:
        if batch == 1:
            for _ in range(n):
                r.xadd(key, {"d": ITEM})
            return
        for _ in range(0, n, batch):
            p = r.pipeline(transaction=False)
            for _ in range(batch):
                p.xadd(key, {"d": ITEM})
            p.execute()

    def get() -> None:
        got = 0
        while got < n:
            res = r.xreadgroup("g", "c", {key: ">"}, count=batch, block=1000)
            ids = [i for i, _ in res[0][1]]
            p = r.pipeline(transaction=True)
            p.xack(key, "g", *ids)
            p.xdel(key, *ids)
            p.execute()
            got += len(ids)

    out = timed(put), timed(get)
    r.delete(key)
    r.close()
    return out


def pigeon_run(url: str, n: int, batch: int) -> tuple[float, float]:
    with pigeon.Queue(url, serializer="raw") as q:

        def put() -> None:
            if batch == 1:
                for _ in range(n):
                    q.put(ITEM)
            else:
                for _ in range(0, n, batch):
                    q.put_many([ITEM] * batch)

        def get() -> None:
            got = 0
            while got < n:
                if batch == 1:
                    q.get(timeout=10)
                    got += 1
                else:
                    got += len(q.get_many(batch, timeout=10))

        return timed(put), timed(get)


# --- NATS -------------------------------------------------------------------------------


def nats_raw(n: int, batch: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        import nats
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        nc = await nats.connect("nats://127.0.0.1:4222")
        js = nc.jetstream()
        name = f"BENCHRAW{uuid.uuid4().hex[:8]}"
        await js.add_stream(StreamConfig(name=name, subjects=[name], storage=StorageType.FILE,
                                         retention=RetentionPolicy.WORK_QUEUE))  # fmt: skip
        t = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                await js.publish(name, ITEM)
        else:
            for _ in range(0, n, batch):
                acks = [await js.publish_async(name, ITEM) for _ in range(batch)]
                await asyncio.gather(*acks)
        put = time.perf_counter() - t
        sub = await js.pull_subscribe(name, durable="c")
        t = time.perf_counter()
        got = 0
        while got < n:
            msgs = await sub.fetch(batch, timeout=5)
            if batch == 1:
                for m in msgs:
                    await m.ack()
            else:
                await asyncio.gather(*(m.ack() for m in msgs))
            got += len(msgs)
        get = time.perf_counter() - t
        await js.delete_stream(name)
        await nc.close()
        return put, get

    return asyncio.run(main())


# --- message options --------------------------------------------------------------------


def option_costs(base: str, n: int) -> list[list[object]]:
    """Rows of ``[option, put/s, vs plain, get/s, vs plain]`` for the queue URLs under
    ``base`` (one fresh queue each)."""
    big = b"x" * (2 << 20)
    cases: list[tuple[str, int, Callable[[int], dict[str, object]], bytes]] = [
        ("plain", n, lambda i: {}, ITEM),
        ("delay 1 s", n, lambda i: {"delay": 1.0}, ITEM),
        ("ttl 60 s", n, lambda i: {"ttl": 60.0}, ITEM),
        ("priority 5", n, lambda i: {"priority": 5}, ITEM),
        ("priorities 0-9", n, lambda i: {"priority": i % 10}, ITEM),
        ("2 MiB item", max(5, n // 50), lambda i: {}, big),
    ]
    rates: dict[str, tuple[float, float]] = {}
    for label, count, options, item in cases:
        with pigeon.Queue(f"{base}/bench-{uuid.uuid4().hex[:8]}", serializer="raw") as q:
            t = time.perf_counter()
            for i in range(count):
                q.put(item, **options(i))  # type: ignore[arg-type]
            put = time.perf_counter() - t
            if label.startswith("delay"):
                time.sleep(1.0)  # every item due: the get measures the check, not the wait
            t = time.perf_counter()
            for _ in range(count):
                q.get(timeout=10)
            get = time.perf_counter() - t
        rates[label] = (count / put, count / get)
        print(f"  {base.split(':')[0]:5s} {label:16s} put {count / put:10,.0f}/s  "
              f"get {count / get:10,.0f}/s", flush=True)  # fmt: skip
    with pigeon.Queue(f"{base}/bench-{uuid.uuid4().hex[:8]}", serializer="raw") as q:
        q.put_many([ITEM] * n, delay=3600.0)
        t = time.perf_counter()
        with contextlib.suppress(pigeon.Empty):
            q.get_many(n, block=False)  # hands out every delayed message once, early
        early = n / (time.perf_counter() - t)
        q.shutdown(immediate=True)
    print(f"  {base.split(':')[0]:5s} {'early hand-out':16s} {early:10,.0f} given back/s")
    plain_put, plain_get = rates["plain"]
    rows: list[list[object]] = [
        [label, f"{p:,.0f}", f"{p / plain_put:.2f}×", f"{g:,.0f}", f"{g / plain_get:.2f}×"]
        for label, (p, g) in rates.items()
    ]
    rows.append(["delay, handed out early", "", "", f"{early:,.0f} given back", ""])
    return rows


# --- message options: each one's cost next to a plain put -----------------------------

OPTIONS: dict[str, Callable[[int], dict[str, object]]] = {
    "plain": lambda i: {},
    "priority": lambda i: {"priority": i % 10},
    "delay": lambda i: {"delay": 0.001},  # due at once: the cost of holding it apart
    "ttl": lambda i: {"ttl": 3600.0},
    "headers": lambda i: {"headers": {"tenant": "acme", "trace": "t-1"}},
    "dedup_id": lambda i: {"dedup_id": f"id-{i}"},
}


def option_run(url: str, n: int, option: str) -> tuple[float, float] | None:
    """(put s, get s) for n single puts with ``option`` then n gets; None if refused."""
    make = OPTIONS[option]
    with pigeon.Queue(url, serializer="raw") as q:
        try:
            q.put(ITEM, **make(0))  # type: ignore[arg-type]
        except pigeon.Unsupported:
            return None
        q.get(timeout=10)

        def put() -> None:
            for i in range(n):
                q.put(ITEM, **make(i + 1))  # type: ignore[arg-type]

        def get() -> None:
            for _ in range(n):
                q.get(timeout=10)

        put_s = timed(put)
        if option == "delay":
            time.sleep(0.01)  # every delay over before the gets start
        return put_s, timed(get)


def options_main(engines: list[str], n: int) -> None:
    urls = {"redis": "redis://127.0.0.1:6379", "nats": "nats://127.0.0.1:4222"}
    rows: list[list[object]] = []
    for engine in engines:
        base: tuple[float, float] | None = None
        option_run(f"{urls[engine]}/bench-opt-{uuid.uuid4().hex[:8]}", min(n, 200), "plain")
        for option in OPTIONS:
            took = option_run(f"{urls[engine]}/bench-opt-{uuid.uuid4().hex[:8]}", n, option)
            if took is None:
                rows.append([engine, option, "Unsupported", "", "", ""])
                continue
            put, get = n / took[0], n / took[1]
            base = base or (put, get)
            rows.append([engine, option, f"{put:,.0f}", f"{put / base[0]:.2f}×",
                         f"{get:,.0f}", f"{get / base[1]:.2f}×"])  # fmt: skip
            print(f"  {engine:5s} {option:9s} put {put:10,.0f}/s  get {get:10,.0f}/s", flush=True)
    table(f"message options: single items, {n:,} each (items/s; ratio to the plain put/get)",
          ["engine", "option", "put/s", "vs plain", "get/s", "vs plain"], rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--options", action="store_true", help="the cost of each message option")
    ap.add_argument("--engines", default="redis,nats", help="with --options: which engines")
    ap.add_argument("--count", type=int, help="with --options: items per option")
    args = ap.parse_args()
    if args.options:
        options_main(args.engines.split(","), args.count or (500 if args.quick else 3_000))
        return
    n_single, n_batch = (500, 5_000) if args.quick else (3_000, 50_000)
    rows: list[list[object]] = []
    plot: dict[str, dict[str, float]] = {}
    for engine, raw, scheme in (("redis", redis_raw, "redis://127.0.0.1:6379"),
                                ("nats", nats_raw, "nats://127.0.0.1:4222")):  # fmt: skip
        results: dict[str, tuple[float, float]] = {}
        for label, batch, n in (("single", 1, n_single), ("x100", BATCH, n_batch)):
            rp, rg = raw(n, batch)
            pp, pg = pigeon_run(f"{scheme}/bench-{uuid.uuid4().hex[:8]}", n, batch)
            results[f"raw {label}"] = (n / rp, n / rg)
            results[f"pigeon {label}"] = (n / pp, n / pg)
            for who, (put, get) in (("raw", (rp, rg)), ("pigeon", (pp, pg))):
                rates = f"put {n / put:10,.0f}/s  get {n / get:10,.0f}/s"
                print(f"  {engine:5s} {who:6s} {label:6s} {rates}", flush=True)
        for name, (put, get) in results.items():
            kind = name.split()[1]
            base_put, base_get = results[f"raw {kind}"]
            rows.append([engine, name, f"{put:,.0f}", f"{put / base_put:.2f}×",
                         f"{get:,.0f}", f"{get / base_get:.2f}×"])  # fmt: skip
        plot[engine] = {k: v[0] for k, v in results.items()}
        ps, pb = results["pigeon single"], results["pigeon x100"]
        rs, rb = results["raw single"], results["raw x100"]
        print(f"{engine}: pigeon x100 / raw best: put {pb[0] / rb[0]:.2f}, get {pb[1] / rb[1]:.2f} "
              f"(target ≥ 0.9); pigeon single / raw naive: put {ps[0] / rs[0]:.2f}, "
              f"get {ps[1] / rs[1]:.2f} (target ≥ 1)")  # fmt: skip
    table("engines: pigeon.Queue vs the raw client (items/s)",
          ["engine", "client", "put/s", "vs raw", "get+ack/s", "vs raw"], rows)  # fmt: skip
    print(f"plot written to {bars(RESULTS / 'engines.png', 'put rate (items/s)', plot, 'items/s')}")
    for engine, scheme in (("redis", "redis://127.0.0.1:6379"), ("nats", "nats://127.0.0.1:4222")):
        table(f"{engine}: the cost of each message option (pigeon single, items/s)",
              ["option", "put/s", "vs plain", "get+ack/s", "vs plain"],
              option_costs(scheme, n_single))  # fmt: skip


if __name__ == "__main__":
    main()
