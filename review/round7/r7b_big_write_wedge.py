"""r7b #1: a write larger than what the reserve frees wedges the store on a disk the broker
filled itself: the reserve is let go, the write fails again, it is retried for ever, and
every ack queued behind it waits with it. Exit 1 while so, 0 once acks are confirmed.

Default mode (~25 s): 256 KiB segments (reserve 256 KiB), 6 MiB tmpfs, 16 KiB puts until
under 200 KiB is free, then one 1 MiB put. ``--default``: the default 64 MiB segments and
4 MiB reserve on a 16 MiB tmpfs, 64 KiB puts until under 1 MiB is free, then one 6 MiB put
(a put_many of that size does the same)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r7b_common import Broker, free_bytes, tmpfs

import pigeon

PORT = 7950
DEFAULT = "--default" in sys.argv


def main() -> int:
    with tmpfs("16m" if DEFAULT else "6m") as disk:
        b = Broker(PORT, disk, seg=64 * 2**20) if DEFAULT else Broker(PORT, disk)
        try:
            if not b.start():
                print("broker did not start:\n" + b.log())
                return 2
            url = f"pigeon://127.0.0.1:{PORT}/r7b-wedge"
            item = os.urandom((64 if DEFAULT else 16) * 1024)
            stop_at = (1024 if DEFAULT else 200) * 1024
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                n = 0
                while free_bytes(disk) > stop_at:  # stop short of ENOSPC (reserve held)
                    q.put(item, timeout=5)
                    n += 1
                print(
                    f"{n} puts of {len(item) // 1024} KiB confirmed; {free_bytes(disk)} bytes free"
                )
                big = os.urandom((6 if DEFAULT else 1) * 2**20)  # > free room + the reserve
                try:
                    q.put(big, timeout=5)
                    print(f"{len(big) >> 20} MiB put confirmed")
                except pigeon.PigeonError as exc:
                    print(f"{len(big) >> 20} MiB put: {type(exc).__name__}: {exc}")
            # A consumer drains: each ack should be written (confirmed) on the full disk,
            # well within a second; the broker answers a held reply after 5 s regardless.
            slow = []
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                for _ in range(3):
                    m = q.get_message(timeout=10)
                    t = time.monotonic()
                    m.ack()
                    slow.append(round(time.monotonic() - t, 2))
            stuck = "store has not committed" in b.log()
            tail = [ln for ln in b.log().splitlines() if "reserve" in ln or "commit" in ln]
            print("broker log:", *tail[:4], sep="\n  ")
            print(f"ack round trips (s): {slow}; store stuck: {stuck}")
            if stuck or max(slow) > 2:
                print(
                    "DEFECT: a write larger than free room + the reserve fails again after "
                    "the reserve is let go and is retried for ever: no ack is written, the "
                    "disk never frees, puts stay refused"
                )
                return 1
            print("held: acks written on the full disk")
            return 0
        finally:
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
