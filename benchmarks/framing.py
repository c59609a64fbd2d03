"""Decode throughput of pigeon.framing against the usual alternatives, in one run.

Run:  python benchmarks/framing.py [--mb 64] [--repeat 3]

Workloads (the stream is cut into 64 KiB chunks, as recv() would return it):
  * 64 B frames with a 4-byte big-endian length header, 64 MB in all;
  * 1 MiB frames, 64 MB in all.
Contenders:
  * pigeon        LengthPrefixed().decoder().feed(chunk)
  * naive         buffer += chunk; cut frames off the front with slicing
  * readexactly   asyncio.StreamReader: readexactly(4), readexactly(n) per frame
  * twisted       Int32StringReceiver.dataReceived (if Twisted is installed)
  * bytes copy    the same bytes copied into 1 MiB bytes objects: the memcpy ceiling
Prints a table (best of --repeat) with ratios, and writes benchmarks/results/framing.png.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from collections.abc import Callable

from _report import RESULTS, bars, table
from pigeon.framing import LengthPrefixed

CHUNK = 64 * 1024


def make_stream(frame_size: int, total: int) -> tuple[list[bytes], int]:
    frame = struct.pack(">I", frame_size) + b"x" * frame_size
    count = max(1, total // len(frame))
    wire = frame * count
    return [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)], count


def pigeon_decode(chunks: list[bytes]) -> int:
    dec = LengthPrefixed(max_frame_size=2**30).decoder()
    n = 0
    for c in chunks:
        n += len(dec.feed(c))
    return n


def naive_decode(chunks: list[bytes]) -> int:
    buf = b""
    n = 0
    for c in chunks:
        buf += c
        while len(buf) >= 4:
            (size,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + size:
                break
            _frame = buf[4 : 4 + size]
            buf = buf[4 + size :]
            n += 1
    return n


def readexactly_decode(chunks: list[bytes]) -> int:
    async def main() -> int:
        reader = asyncio.StreamReader(limit=2**31)

        async def feed() -> None:
            for c in chunks:
                reader.feed_data(c)
                await asyncio.sleep(0)
            reader.feed_eof()

        task = asyncio.create_task(feed())
        n = 0
        try:
            while True:
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                await reader.readexactly(size)
                n += 1
        except asyncio.IncompleteReadError:
            pass
        await task
        return n

    return asyncio.run(main())


def twisted_decode(chunks: list[bytes]) -> int:
    from twisted.protocols.basic import Int32StringReceiver

    class Counter(Int32StringReceiver):  # type: ignore[misc]
        MAX_LENGTH = 2**30
        n = 0

        def stringReceived(self, string: bytes) -> None:
            self.n += 1

    proto = Counter()
    for c in chunks:
        proto.dataReceived(c)
    return proto.n


def bytes_copy(chunks: list[bytes]) -> float:
    """Seconds to copy the same bytes into 1 MiB ``bytes`` objects: the memcpy ceiling."""
    view = memoryview(bytearray().join(chunks))
    step = 2**20
    t = time.perf_counter()
    for i in range(0, view.nbytes, step):
        bytes(view[i : i + step])
    return time.perf_counter() - t


def best_of(fn: Callable[[list[bytes]], int], chunks: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(chunks)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="stream size in MB (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; best is kept")
    args = ap.parse_args()
    total = args.mb * 10**6

    contenders: dict[str, Callable[[list[bytes]], int]] = {
        "pigeon": pigeon_decode,
        "naive": naive_decode,
        "readexactly": readexactly_decode,
    }
    try:
        import twisted  # noqa: F401

        contenders["twisted"] = twisted_decode
    except ImportError:
        print("twisted not installed: skipping Int32StringReceiver")

    rows: list[list[object]] = []
    plot: dict[str, dict[str, float]] = {}
    for label, size in (("64 B frames", 64), ("1 MiB frames", 2**20)):
        chunks, count = make_stream(size, total)
        nbytes = sum(map(len, chunks))
        results: dict[str, float] = {}
        for name, fn in contenders.items():
            results[name] = best_of(fn, chunks, args.repeat)
        results["bytes copy"] = min(bytes_copy(chunks) for _ in range(args.repeat))
        base = results["pigeon"]
        for name, secs in results.items():
            rate = f"{count / secs / 1e6:.2f}" if name != "bytes copy" else "-"
            rows.append([label, name, rate, f"{nbytes / secs / 1e6:,.0f}", f"{secs / base:.2f}×"])
        plot[label] = {k: nbytes / v / 1e6 for k, v in results.items()}
        if size == 64:
            r_naive = results["naive"] / base
            r_rx = results["readexactly"] / base
            print(
                f"64 B: pigeon is {r_naive:.1f}× naive (target ≥ 3), {r_rx:.1f}× readexactly (≥ 4)"
            )
        else:
            r_copy = results["bytes copy"] / base
            print(f"1 MiB: pigeon runs at {r_copy:.0%} of a plain bytes copy (target ≥ 50%)")
            print(f"1 MiB: pigeon is {results['readexactly'] / base:.1f}× readexactly")
    table(
        f"framing decode, {args.mb} MB in 64 KiB chunks (best of {args.repeat})",
        ["workload", "decoder", "M frames/s", "MB/s", "its time / pigeon's"],
        rows,
    )
    out = bars(RESULTS / "framing.png", "pigeon.framing decode throughput", plot, "MB/s")
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
