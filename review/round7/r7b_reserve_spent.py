"""r7b #2: the disk reserve is spent by settles that free nothing, then the store wedges
for good. After the reserve is let go, every get (DELIVERED), nack (REQUEUED) and ack is
written into the freed room, but disk space only comes back when a whole segment has
nothing live. Settles that do not empty a segment use the room up; the next write gets
ENOSPC with no reserve left and is retried for ever: no ack is written again, the disk
never frees, puts stay refused - the wedge the reserve was meant to prevent.

Default mode (~15 s): 256 KiB segments (reserve 256 KiB), 6 MiB tmpfs filled with 1 KiB
puts, then a consumer that nacks (requeue) what it gets: ~7,000 cycles spend the reserve.
``--default`` (~70 s): the default 64 MiB segments and 4 MiB reserve, a 12 MiB tmpfs filled
with 8-byte messages, then plain get_message + ack: ~91,000 acks of 836,000 spend it.
Exit 1 while a settle on the self-filled disk ends up waiting on a wedged store.
(After the fix, a GET may be refused, Unavailable "disk is full", once the room left is
what settling the messages out needs: that is the bound, not a wedge; the script then
checks the store still commits.)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r7b_common import Broker, free_bytes, tmpfs

import pigeon

PORT = 7955
DEFAULT = "--default" in sys.argv


def main() -> int:
    with tmpfs("12m" if DEFAULT else "6m") as disk:
        b = Broker(PORT, disk, seg=64 * 2**20) if DEFAULT else Broker(PORT, disk)
        try:
            if not b.start():
                print("broker did not start:\n" + b.log())
                return 2
            url = f"pigeon://127.0.0.1:{PORT}/r7b-spent"
            n = 0
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                while True:
                    batch = (
                        [b"%08d" % i for i in range(n, n + 1000)]
                        if DEFAULT
                        else [os.urandom(1024)] * 50
                    )
                    try:
                        q.put_many(batch, timeout=5)
                    except pigeon.PigeonError as exc:
                        print(f"{n} messages stored, then: {exc}")
                        break
                    n += len(batch)
                print(f"{free_bytes(disk)} bytes free (the reserve's room)")
                t0, k, slow = time.monotonic(), 0, 0.0
                refused: pigeon.Unavailable | None = None
                while time.monotonic() - t0 < 150:
                    try:
                        m = q.get_message(timeout=5)
                    except pigeon.Empty:
                        break
                    except pigeon.Unavailable as exc:
                        if "disk is full" not in str(exc):
                            raise
                        refused = exc
                        break
                    t = time.monotonic()
                    if DEFAULT:
                        m.ack()
                    else:
                        m.nack(requeue=True)  # a failing job, retried (max_deliveries 20)
                    slow = time.monotonic() - t
                    k += 1
                    if slow > 2:
                        break
            what = "acks" if DEFAULT else "get+nack cycles"
            print(f"{k} {what}; last settle took {slow:.1f}s; {free_bytes(disk)} bytes free")
            if refused is not None:
                print(f"then a GET was refused: {refused}")
                t = time.monotonic()
                with pigeon.Queue(url + "-2", reconnect_timeout=0, lease=30) as q2:
                    q2.qsize()  # its DECLARE is a change: the store must still commit it
                slow = max(slow, time.monotonic() - t)
                print(f"a queue declared after it in {time.monotonic() - t:.2f}s")
            stuck = "store has not committed" in b.log()
            for ln in b.log().splitlines():
                if "reserve" in ln or "cannot write" in ln or "not committed" in ln:
                    print("  " + ln)
                    if "not committed" in ln:
                        break
            if stuck or slow > 2:
                print(
                    "DEFECT: the reserve was spent by settles that free no segment; the "
                    "store then retries an ENOSPC write for ever: acks are no longer "
                    "written, nothing can drain, puts stay refused"
                )
                return 1
            print("held: settles on the full disk kept being written")
            return 0
        finally:
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
