"""pigeon's broker against Redis and NATS JetStream, in one run, on this machine.

Run:  python benchmarks/broker.py [--quick] [--sizes 64] [--rounds 3] [--durable-only]

Needs Redis on 127.0.0.1:6379 and NATS with JetStream on 127.0.0.1:4222 (skipped with a
note if absent). The pigeon broker is started by the benchmark (`pigeon serve --memory`
semantics: this version keeps queues in memory). Producers and consumers are separate
processes; time runs from a common start until the consumers have every item.

Throughput contenders (items/s):
  pigeon            confirmed put / get                    (one round trip each)
  pigeon x100       put_many / get_many of 100             (one round trip per 100)
  redis list        LPUSH / BRPOP
  redis list x100   pipelined LPUSH x100 / RPOP count 100
  redis stream      XADD / XREADGROUP count 1 + XACK
  redis stream x100 pipelined XADD x100 / XREADGROUP count 100 + XACK
  jetstream         publish (awaits the ack) / pull fetch 1 + ack
  jetstream x100    100 publishes in flight / pull fetch 100 + acks
Latency (µs, one client, sequential): pigeon confirmed put, redis PING, redis XADD,
a raw Python TCP echo.
Durable modes (needs redis-server to start scratch servers with appendonly yes): pigeon's
log store with --fsync always and batch, its SQLite store with batch, Redis Streams with
appendfsync always and everysec, JetStream file storage, RabbitMQ (127.0.0.1:5672,
guest/guest; aio-pika) durable classic and quorum queues with persistent messages,
publisher confirms and manual acks; single and x100 throughput, and
the confirmed put's round trip p50/p99 on each, interleaved (--durable-only: just these).
Every contender is measured --rounds times (3; 1 with --quick), the rounds interleaved, and
the tables give each one's median and its rounds' range: this VM's speed drifts by ±15 %
over seconds, and one measurement each let a contender that ran in a slow moment skew a
ratio by a third. Prints tables with ratios and writes benchmarks/results/broker.png and
durable.png.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pigeon
from _report import RESULTS, bars, table
from _serve import wait_listening

ctx = mp.get_context("fork")
BATCH = 100
PIGEON_PORT = 7891


# --- contenders: each has produce(n, item, args) and consume(n, args) -------------------


def pigeon_produce(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    with pigeon.Queue(a["url"], serializer="raw") as q:
        if batch == 1:
            for _ in range(n):
                q.put(item)
        else:
            for i in range(0, n, batch):
                q.put_many([item] * min(batch, n - i))


def pigeon_consume(n: int, a: dict[str, Any], batch: int) -> int:
    got = 0
    with pigeon.Queue(a["url"], serializer="raw") as q:
        while got < n:
            if batch == 1:
                q.get(timeout=60)
                got += 1
            else:
                got += len(q.get_many(min(batch, n - got), timeout=60))
    return got


def _redis(a: dict[str, Any] | None = None) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=(a or {}).get("redis_port", 6379))


def rlist_produce(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    r = _redis(a)
    if batch == 1:
        for _ in range(n):
            r.lpush(a["key"], item)
    else:
        for i in range(0, n, batch):
            p = r.pipeline(transaction=False)
            for _ in range(min(batch, n - i)):
                p.lpush(a["key"], item)
            p.execute()


def rlist_consume(n: int, a: dict[str, Any], batch: int) -> int:
    r = _redis(a)
    got = 0
    while got < n:
        if batch == 1:
            if r.brpop(a["key"], timeout=60) is None:
                break
            got += 1
        else:
            items = r.rpop(a["key"], min(batch, n - got))
            if items:
                got += len(items)
            elif r.brpop(a["key"], timeout=60) is not None:
                got += 1
    return got


def rstream_setup(a: dict[str, Any]) -> None:
    _redis(a).xgroup_create(a["key"], "g", id="0", mkstream=True)


def rstream_produce(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    r = _redis(a)
    if batch == 1:
        for _ in range(n):
            r.xadd(a["key"], {"d": item})
    else:
        for i in range(0, n, batch):
            p = r.pipeline(transaction=False)
            for _ in range(min(batch, n - i)):
                p.xadd(a["key"], {"d": item})
            p.execute()


def pigeon_produce_single(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    """Put-bound: one confirmed put at a time, whatever the consumer's batch."""
    pigeon_produce(n, item, a, 1)


def rstream_produce_single(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    rstream_produce(n, item, a, 1)


def rstream_consume(n: int, a: dict[str, Any], batch: int) -> int:
    r = _redis(a)
    me = uuid.uuid4().hex
    got = 0
    while got < n:
        resp = r.xreadgroup("g", me, {a["key"]: ">"}, count=min(batch, n - got), block=60_000)
        if not resp:
            break
        ids = [mid for mid, _ in resp[0][1]]
        r.xack(a["key"], "g", *ids)
        got += len(ids)
    return got


def _js_run(coro_fn: Callable[[Any], Any]) -> Any:
    async def main() -> Any:
        import nats

        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            return await coro_fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def js_setup(a: dict[str, Any]) -> None:
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    async def setup(js: Any) -> None:
        await js.add_stream(
            StreamConfig(
                name=a["key"], subjects=[a["key"]], retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE if a.get("file") else StorageType.MEMORY,
            )
        )  # fmt: skip

    _js_run(setup)


def js_teardown(a: dict[str, Any]) -> None:
    async def drop(js: Any) -> None:
        await js.delete_stream(a["key"])

    _js_run(drop)


def js_produce(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    async def produce(js: Any) -> None:
        if batch == 1:
            for _ in range(n):
                await js.publish(a["key"], item)
        else:
            for i in range(0, n, batch):
                await asyncio.gather(
                    *(js.publish(a["key"], item) for _ in range(min(batch, n - i)))
                )

    _js_run(produce)


def js_consume(n: int, a: dict[str, Any], batch: int) -> int:
    async def consume(js: Any) -> int:
        sub = await js.pull_subscribe(a["key"], durable="c")
        got = 0
        while got < n:
            try:
                msgs = await sub.fetch(min(batch, n - got), timeout=5)
            except TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            got += len(msgs)
        return got

    return int(_js_run(consume))


# RabbitMQ, as Celery and kombu users run it: a durable queue (classic, or quorum: the
# replicated kind RabbitMQ recommends for data safety), persistent messages, publisher
# confirms (a put counts once the broker confirmed it: for persistent messages, once on
# disk), manual acks with prefetch. aio-pika (asyncio): one publish awaited at a time, or
# 100 in flight; the consumer acks each message (x100: one ack with multiple=True per 100).
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _amqp_run(coro_fn: Callable[[Any], Any]) -> Any:
    import aio_pika

    async def main() -> Any:
        conn = await aio_pika.connect_robust(RABBIT_URL)
        try:
            return await coro_fn(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def amqp_setup(a: dict[str, Any]) -> None:
    async def declare(conn: Any) -> None:
        ch = await conn.channel()
        args = {"x-queue-type": "quorum"} if a.get("quorum") else {}
        await ch.declare_queue(a["key"], durable=True, arguments=args)

    _amqp_run(declare)


def amqp_teardown(a: dict[str, Any]) -> None:
    async def delete(conn: Any) -> None:
        ch = await conn.channel()
        await ch.queue_delete(a["key"])

    _amqp_run(delete)


def amqp_produce(n: int, item: bytes, a: dict[str, Any], batch: int) -> None:
    import aio_pika

    async def produce(conn: Any) -> None:
        ch = await conn.channel(publisher_confirms=True)
        ex = ch.default_exchange
        persistent = aio_pika.DeliveryMode.PERSISTENT

        def msg() -> Any:
            return aio_pika.Message(item, delivery_mode=persistent)

        for i in range(0, n, batch):
            k = min(batch, n - i)
            if k == 1:
                await ex.publish(msg(), routing_key=a["key"])  # waits for the confirm
            else:
                await asyncio.gather(*(ex.publish(msg(), routing_key=a["key"]) for _ in range(k)))

    _amqp_run(produce)


def amqp_consume(n: int, a: dict[str, Any], batch: int) -> int:
    async def consume(conn: Any) -> int:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=batch)
        queue = await ch.get_queue(a["key"], ensure=False)
        got = 0
        async with queue.iterator() as it:
            async for message in it:
                got += 1
                if batch == 1:
                    await message.ack()
                elif got % batch == 0 or got == n:
                    await message.ack(multiple=True)
                if got >= n:
                    break
        return got

    return int(_amqp_run(consume))


CONTENDERS: dict[str, tuple[Any, Any, Any, Any, int]] = {
    # name: (produce, consume, setup, teardown, batch); the in-memory modes
    "pigeon": (pigeon_produce, pigeon_consume, None, None, 1),
    "pigeon x100": (pigeon_produce, pigeon_consume, None, None, BATCH),
    "redis list": (rlist_produce, rlist_consume, None, None, 1),
    "redis list x100": (rlist_produce, rlist_consume, None, None, BATCH),
    "redis stream": (rstream_produce, rstream_consume, rstream_setup, None, 1),
    "redis stream x100": (rstream_produce, rstream_consume, rstream_setup, None, BATCH),
    "jetstream": (js_produce, js_consume, js_setup, js_teardown, 1),
    "jetstream x100": (js_produce, js_consume, js_setup, js_teardown, BATCH),
    # put-bound: one producer putting one at a time, the consumer reading 100 at a time
    "pigeon put-bound": (pigeon_produce_single, pigeon_consume, None, None, BATCH),
    "redis stream put-bound": (rstream_produce_single, rstream_consume, rstream_setup, None, BATCH),
}


# The durable modes, side by side: pigeon --fsync always|batch, Redis with an append-only
# file (appendfsync always|everysec) on scratch servers, JetStream file storage.
DURABLE: dict[str, tuple[Any, Any, Any, Any, int, dict[str, Any]]] = {
    "pigeon fsync=always": (pigeon_produce, pigeon_consume, None, None, 1, {"port": 7892}),
    "pigeon fsync=always x100": (pigeon_produce, pigeon_consume, None, None, BATCH, {"port": 7892}),
    "pigeon fsync=batch": (pigeon_produce, pigeon_consume, None, None, 1, {"port": 7893}),
    "pigeon fsync=batch x100": (pigeon_produce, pigeon_consume, None, None, BATCH, {"port": 7893}),
    "pigeon sqlite fsync=batch": (pigeon_produce, pigeon_consume, None, None, 1, {"port": 7894}),
    "pigeon sqlite fsync=batch x100": (pigeon_produce, pigeon_consume, None, None, BATCH, {"port": 7894}),
    "redis aof=always": (rstream_produce, rstream_consume, rstream_setup, None, 1, {"redis_port": 6391}),
    "redis aof=always x100": (rstream_produce, rstream_consume, rstream_setup, None, BATCH, {"redis_port": 6391}),
    "redis aof=everysec": (rstream_produce, rstream_consume, rstream_setup, None, 1, {"redis_port": 6390}),
    "redis aof=everysec x100": (rstream_produce, rstream_consume, rstream_setup, None, BATCH, {"redis_port": 6390}),
    "pigeon fsync=batch put-bound": (pigeon_produce_single, pigeon_consume, None, None, BATCH, {"port": 7893}),
    "redis aof=everysec put-bound": (rstream_produce_single, rstream_consume, rstream_setup, None, BATCH, {"redis_port": 6390}),
    "jetstream file x100": (js_produce, js_consume, js_setup, js_teardown, BATCH, {"file": True}),
    "rabbitmq classic": (amqp_produce, amqp_consume, amqp_setup, amqp_teardown, 1, {}),
    "rabbitmq classic x100": (amqp_produce, amqp_consume, amqp_setup, amqp_teardown, BATCH, {}),
    "rabbitmq quorum": (amqp_produce, amqp_consume, amqp_setup, amqp_teardown, 1, {"quorum": True}),
    "rabbitmq quorum x100": (amqp_produce, amqp_consume, amqp_setup, amqp_teardown, BATCH, {"quorum": True}),
}  # fmt: skip


def _producer(fn: Any, n: int, size: int, a: dict[str, Any], batch: int, go: Any) -> None:
    go.wait()
    fn(n, b"x" * size, a, batch)


def _consumer(fn: Any, n: int, a: dict[str, Any], batch: int, go: Any, done: Any) -> None:
    go.wait()
    done.put(fn(n, a, batch))


def measure(name: str, pairs: int, size: int, count: int) -> float:
    if name in DURABLE:
        produce, consume, setup, teardown, batch, params = DURABLE[name]
    else:
        produce, consume, setup, teardown, batch = CONTENDERS[name]
        params = {}
    key = f"bench-{uuid.uuid4().hex[:10]}"
    port = params.get("port", PIGEON_PORT)
    a = {"key": key, "url": f"pigeon://127.0.0.1:{port}/{key}", **params}
    if setup:
        setup(a)
    share = count // pairs
    go = ctx.Event()
    done = ctx.SimpleQueue()
    procs = [ctx.Process(target=_producer, args=(produce, share, size, a, batch, go))
             for _ in range(pairs)]  # fmt: skip
    procs += [ctx.Process(target=_consumer, args=(consume, share, a, batch, go, done))
              for _ in range(pairs)]  # fmt: skip
    for p in procs:
        p.start()
    time.sleep(0.5)
    start = time.perf_counter()
    go.set()
    got = sum(done.get() for _ in range(pairs))
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(30)
    if teardown:
        teardown(a)
    if got != share * pairs:
        raise AssertionError(f"{name}: {got} of {share * pairs} items arrived")
    return share * pairs / elapsed


def rounds(
    counts: dict[str, int], pairs: int, size: int, n: int, label: str
) -> dict[str, list[float]]:
    """Each contender measured ``n`` times, the rounds interleaved (every contender once a
    round): this machine's speed drifts by ±15 % over seconds, and a contender measured
    only while it was slow would skew its ratios. The tables give the median."""
    rates: dict[str, list[float]] = {name: [] for name in counts}
    for i in range(n):
        for name, count in counts.items():
            rate = measure(name, pairs, size, count)
            rates[name].append(rate)
            print(f"  {label} {name:26s} {rate:12,.0f} items/s  (round {i + 1}/{n})", flush=True)
    return rates


def spread(rates: list[float]) -> str:
    """The lowest and highest of a contender's rounds, as a share of its median."""
    mid = statistics.median(rates)
    return f"{min(rates) / mid - 1:+.0%} / {max(rates) / mid - 1:+.0%}" if len(rates) > 1 else "-"


# --- latency ------------------------------------------------------------------------------


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def _timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(p50, p99) in µs of ``n`` sequential calls, after 200 to warm up."""
    for _ in range(200):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return _percentiles(samples)


def durable_latencies(n: int) -> dict[str, tuple[float, float]]:
    """A confirmed put's round trip on each store, interleaved in rounds so that the
    machine's drift hits them alike."""
    brokers = {
        "pigeon put --memory": PIGEON_PORT,
        "pigeon put --fsync batch (log)": 7893,
        "pigeon put --fsync always (log)": 7892,
        "pigeon put --fsync batch (sqlite)": 7894,
    }
    queues = {k: pigeon.Queue(f"pigeon://127.0.0.1:{p}/dlat", serializer="raw")
              for k, p in brokers.items()}  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in brokers}
    try:
        r = _redis({"redis_port": 6390})
        key = f"dlat-{uuid.uuid4().hex[:8]}"
        calls: dict[str, Callable[[], object]] = {
            k: (lambda q=q: q.put(b"x")) for k, q in queues.items()
        }
        calls["redis XADD (aof everysec)"] = lambda: r.xadd(key, {"d": b"x"})
        samples["redis XADD (aof everysec)"] = []
        for fn in calls.values():
            for _ in range(200):
                fn()
        for _ in range(5):
            for k, fn in calls.items():
                for _ in range(n // 5):
                    t = time.perf_counter()
                    fn()
                    samples[k].append(time.perf_counter() - t)
        r.delete(key)
    finally:
        for q in queues.values():
            q.shutdown(immediate=True)
            q.close()
    return {k: _percentiles(v) for k, v in samples.items()}


def latencies(n: int) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        return _timed(fn, n)

    with pigeon.Queue(f"pigeon://127.0.0.1:{PIGEON_PORT}/lat", serializer="raw") as q:
        out["pigeon put (confirmed)"] = timed(lambda: q.put(b"x"))
        out["pigeon qsize (round trip)"] = timed(q.qsize)
        q.shutdown(immediate=True)
    try:
        r = _redis()
        out["redis PING"] = timed(r.ping)
        key = f"lat-{uuid.uuid4().hex[:8]}"
        out["redis XADD"] = timed(lambda: r.xadd(key, {"d": b"x"}))
        r.delete(key)
    except Exception as exc:  # redis absent
        print(f"redis latency skipped: {exc}")

    # a raw Python TCP echo: the floor for any Python client and server pair
    srv = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    c = socket.create_connection(srv.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ping() -> None:
        c.sendall(b"x" * 16)
        c.recv(65536)

    out["raw Python TCP echo"] = timed(ping)
    c.close()
    t.join(5)
    srv.close()
    return out


def available() -> dict[str, str]:
    missing = {}
    try:
        _redis().ping()
    except Exception as exc:
        missing["redis"] = str(exc)
    try:
        socket.create_connection(("127.0.0.1", 4222), 2).close()
        import nats  # noqa: F401
    except Exception as exc:
        missing["jetstream"] = str(exc)
    try:
        socket.create_connection(("127.0.0.1", 5672), 2).close()
        import aio_pika  # noqa: F401
    except Exception as exc:
        missing["rabbitmq"] = str(exc)
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    ap.add_argument("--sizes", default="64,1024,65536")
    ap.add_argument("--durable-only", action="store_true", help="only the durable-mode table")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measure every contender this many times, interleaved, and report the median "
        "(default 3; 1 with --quick)",
    )
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="pigeon-bench-")
    procs = [
        _spawn([sys.executable, "-m", "pigeon", "serve", "--port", str(PIGEON_PORT), "--memory"])
    ]
    for port, mode, store in ((7892, "always", "log"), (7893, "batch", "log"),
                              (7894, "batch", "sqlite")):  # fmt: skip
        procs.append(_spawn([sys.executable, "-m", "pigeon", "serve", "--port", str(port),
                             "--data-dir", f"{scratch}/{port}", "--fsync", mode,
                             "--store", store]))  # fmt: skip
    redis_server = shutil.which("redis-server")
    if redis_server:
        for port, fsync in ((6390, "everysec"), (6391, "always")):
            procs.append(_spawn([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
                                 "--dir", scratch, "--appendfilename", f"a{port}.aof"]))  # fmt: skip
    try:
        for port in (PIGEON_PORT, 7892, 7893, 7894, *((6390, 6391) if redis_server else ())):
            wait_listening(port)
        run(args, durable=bool(redis_server))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace, durable: bool) -> None:
    missing = available()
    for what, why in missing.items():
        print(f"{what} unavailable, skipped: {why}")
    names = [n for n in CONTENDERS if n.split()[0] not in missing]
    if args.durable_only:
        names = []
    rows: list[list[object]] = []
    plot: dict[str, dict[str, float]] = {}
    results: dict[tuple[str, int, int], float] = {}
    for pairs in (1, 4) if names else ():
        for size in [int(s) for s in args.sizes.split(",")]:
            if pairs == 4 and size > 1024:
                continue
            counts = {}
            for name in names:
                single = not name.endswith("x100")  # (put-bound: as many as singles)
                count = (
                    (2_000 if single else 20_000) if args.quick else (10_000 if single else 100_000)
                )
                if size >= 65536:
                    count //= 5
                counts[name] = count - count % (pairs * (1 if single else BATCH))
            rates = rounds(counts, pairs, size, args.rounds, f"{pairs}x{pairs} {size:>6} B")
            label = f"{pairs}x{pairs} {size} B"
            for name in names:
                results[name, pairs, size] = statistics.median(rates[name])
            base = results.get(("redis stream", pairs, size)) or results[("pigeon", pairs, size)]
            for name in names:
                rate = results[name, pairs, size]
                rows.append(
                    [label, name, f"{rate:,.0f}", spread(rates[name]), f"{rate / base:.2f}×"]
                )
            plot[label] = {n: results[n, pairs, size] for n in names}
    if names:
        table(
            f"broker throughput (items/s, median of {args.rounds} interleaved rounds)",
            ["workload", "contender", "items/s", "rounds' range", "vs redis stream"],
            rows,
        )
        key = ("pigeon put-bound", 1, 64), ("redis stream put-bound", 1, 64)
        if all(k in results for k in key):
            print(
                f"put-bound (one confirmed put at a time, read 100 at a time), --memory vs "
                f"redis stream, 1x1 64 B: {results[key[0]] / results[key[1]]:.2f}× (target ≥ 1.5)"
            )
    if durable:
        drows: list[list[object]] = []
        dcounts = {}
        for name in DURABLE:
            if name.split()[0] in missing:
                continue
            single = not name.endswith("x100")  # (put-bound: as many as singles)
            dcounts[name] = (
                (1_000 if single else 10_000) if args.quick else (10_000 if single else 100_000)
            )
        drates = rounds(dcounts, 1, 64, args.rounds, "1x1     64 B")
        dres = {name: statistics.median(r) for name, r in drates.items()}
        base = dres["redis aof=everysec x100"]
        for name, rate in dres.items():
            drows.append(["1x1 64 B", name, f"{rate:,.0f}", spread(drates[name]),
                          f"{rate / base:.2f}×"])  # fmt: skip
        table(f"durable modes (items/s, confirmed puts and acked gets; median of {args.rounds} "
              "interleaved rounds)",
              ["workload", "contender", "items/s", "rounds' range",
               "vs redis aof=everysec x100"], drows)  # fmt: skip
        print(
            f"--fsync batch x100 vs redis appendfsync everysec pipelined: "
            f"{dres['pigeon fsync=batch x100'] / dres['redis aof=everysec x100']:.2f}× "
            "(target ≥ 2.5)"
        )
        print(
            f"--fsync always vs redis appendfsync always: single "
            f"{dres['pigeon fsync=always'] / dres['redis aof=always']:.2f}×, x100 "
            f"{dres['pigeon fsync=always x100'] / dres['redis aof=always x100']:.2f}× (target ≥ 1)"
        )
        print(
            f"put-bound (one confirmed put at a time, read 100 at a time), --fsync batch vs "
            f"redis appendfsync everysec: "
            f"{dres['pigeon fsync=batch put-bound'] / dres['redis aof=everysec put-bound']:.2f}× "
            "(target ≥ 1.0)"
        )
        print(
            f"--fsync batch single vs redis appendfsync everysec: "
            f"{dres['pigeon fsync=batch'] / dres['redis aof=everysec']:.2f}× (target ≥ 1.2)"
        )
        for kind in ("classic", "quorum"):
            if f"rabbitmq {kind}" in dres:
                single, x100 = dres[f"rabbitmq {kind}"], dres[f"rabbitmq {kind} x100"]
                print(
                    f"vs rabbitmq {kind} (persistent, confirmed, acked): --fsync always "
                    f"{dres['pigeon fsync=always'] / single:.2f}× single, "
                    f"{dres['pigeon fsync=always x100'] / x100:.2f}× x100; --fsync batch "
                    f"{dres['pigeon fsync=batch'] / single:.2f}× single, "
                    f"{dres['pigeon fsync=batch x100'] / x100:.2f}× x100"
                )
        dlat = durable_latencies(500 if args.quick else 3000)
        table("durable round trip (µs, one client, sequential)", ["operation", "p50", "p99"],
              [[k, f"{v[0]:.0f}", f"{v[1]:.0f}"] for k, v in dlat.items()])  # fmt: skip
        out = bars(
            RESULTS / "durable.png",
            "durable modes, 1 producer + 1 consumer, 64 B (items/s)",
            {"single": {k: v for k, v in dres.items() if not k.endswith("x100")},
             "x100": {k[: -len(" x100")]: v for k, v in dres.items() if k.endswith("x100")}},
            "items/s",
        )  # fmt: skip
        print(f"plot written to {out}")
        mem, log = dlat["pigeon put --memory"], dlat["pigeon put --fsync batch (log)"]
        print(
            f"durable put p50 vs --memory: {log[0] / mem[0]:.2f}× (target ≤ 1.5); "
            f"its p99 vs its p50: {log[1] / log[0]:.2f}× (target ≤ 3)"
        )
    if args.durable_only:
        return
    lat = latencies(500 if args.quick else 3000)
    table("round trip (µs)", ["operation", "p50", "p99"],
          [[k, f"{v[0]:.0f}", f"{v[1]:.0f}"] for k, v in lat.items()])  # fmt: skip
    _targets(results, lat, names)
    _plot(plot)


def _targets(
    results: dict[tuple[str, int, int], float], lat: dict[str, Any], names: list[str]
) -> None:
    r = results
    if "redis stream" in names:
        print(
            f"single put+get vs redis stream unpipelined (1x1 64 B): "
            f"{r['pigeon', 1, 64] / r['redis stream', 1, 64]:.2f}× (target ≥ 1.5)"
        )
        print(
            f"batched x100 vs redis stream pipelined x100 (1x1 64 B): "
            f"{r['pigeon x100', 1, 64] / r['redis stream x100', 1, 64]:.2f}× (target ≥ 2.5)"
        )
    if "jetstream x100" in names:
        print(
            f"batched x100 vs jetstream x100 (1x1 64 B): "
            f"{r['pigeon x100', 1, 64] / r['jetstream x100', 1, 64]:.2f}× (target ≥ 5)"
        )
    if "redis PING" in lat:
        ours, theirs = lat["pigeon qsize (round trip)"][0], lat["redis PING"][0]
        print(
            f"p50 round trip: pigeon {ours:.0f} µs vs redis PING {theirs:.0f} µs: "
            f"{ours / theirs:.2f}× (target ≤ 1.5)"
        )


def _plot(plot: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(plot)
    names = list(next(iter(plot.values())))
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 2.2), 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [plot[label][name] for label in labels], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("items/s (log)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "broker.png", dpi=100)
    plt.close(fig)
    print(f"plot written to {RESULTS / 'broker.png'}")


if __name__ == "__main__":
    main()
