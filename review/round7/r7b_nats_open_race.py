"""r7b #3: nats:// - two handles opening at once with different leases can LOWER the
shared consumer's AckWait. ``_fit_consumer`` reads AckWait (consumer_info) and then raises
it (add_consumer) without any compare-and-set: A (lease 8) and B (lease 4) both read 2,
A writes 8, B writes 4. A believes AckWait is 8 (``_ack_waits``), keeps no keeper (its
lease equals the AckWait it read) and trusts its deliveries for ~8 s; the server
redelivers after 4 s to another consumer while A's lease runs, and A's late ack is sent
without asking and settles the message the other consumer now holds.

Needs the shared NATS at 127.0.0.1:4222 (queue r8-race-<pid>, deleted after).
Exit 1 while an open lowers AckWait below the longest open handle's lease (or a second
consumer is handed the job during A's lease); 0 once not.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import nats

import pigeon
from pigeon.aio import AsyncQueue
from pigeon.backends.nats import level_durable, stream_name

NAME = f"r8-race-{os.getpid()}"


async def ack_wait(queue: str) -> float:
    """The AckWait of ``queue``'s level-0 consumer, read straight from JetStream."""
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        info = await nc.jetstream().consumer_info(stream_name(queue), level_durable(0))
        return float(info.config.ack_wait)
    finally:
        await nc.close()


def delete(url: str) -> None:
    try:
        with pigeon.Queue(url) as q:
            q.delete()
    except Exception as exc:
        print("cleanup:", exc)


async def trial(k: int) -> tuple[float, bool | None, str]:
    name = f"{NAME}-{k}"
    url = f"nats://127.0.0.1:4222/{name}"
    seed = AsyncQueue(url, lease=2)
    await seed.put("job")
    a, b = AsyncQueue(url, lease=8), AsyncQueue(url, lease=4)
    try:
        await asyncio.gather(a.qsize(), b.qsize())  # both open at once
        aw = await ack_wait(name)
        if aw >= 8 - 1e-6:
            return aw, None, "raised as it should"
        # A (lease 8) takes the job at once, before any re-read of the AckWait.
        first = await a.get_message(timeout=5)
        t0 = time.monotonic()
        c = AsyncQueue(url)  # another worker, no lease of its own
        try:
            try:
                second = await c.get_message(timeout=7)
                got_at = time.monotonic() - t0
                taken = True
            except Exception:
                got_at, taken = -1.0, False
            how = f"C got the job {got_at:.1f}s into A's 8 s lease" if taken else "C waited"
            if taken:
                try:
                    await first.ack()  # within A's lease, by A's count
                    how += "; A's ack (within its lease) accepted"
                except Exception as exc:
                    how += f"; A's ack refused: {type(exc).__name__}"
                await second.nack(requeue=True)
                try:
                    back = await c.get_message(timeout=6)
                    await back.ack()
                    how += "; the job C nacked came back"
                except Exception:
                    how += "; the job C nacked is LOST"
            return aw, taken, how
        finally:
            await c.aclose()
    finally:
        for q in (a, b, seed):
            await q.aclose()
        await asyncio.to_thread(delete, url)


async def main() -> int:
    bad = 0
    for k in range(10):  # the race is won in most trials, not all
        aw, _taken, how = await trial(k)
        print(f"trial {k}: AckWait after A(lease 8) and B(lease 4) opened at once: {aw:g} s; {how}")
        if aw < 8 - 1e-6:
            bad += 1
            break
    if bad:
        print(
            "DEFECT: concurrent opens lowered the shared consumer's AckWait below an open "
            "handle's lease (read-then-raise is not atomic)"
        )
        return 1
    print("held: AckWait never ended below the longest lease")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
