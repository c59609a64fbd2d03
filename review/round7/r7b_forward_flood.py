"""r7b #4: on a disk the broker filled itself, housekeeping that needs more room than is
left (writing live messages forward, beginning a segment) fails with ENOSPC and is tried
again after EVERY write: one ERROR line per ack ("starting a segment or reclaiming space
failed ... will retry"), hundreds a second, while the compaction that would free space
never progresses (a forward chunk is larger than the room left after the reserve).

6 MiB tmpfs, 256 KiB segments, filled with 1 KiB puts; a consumer acks two of every three
messages it gets and holds the third (a long lease), so no segment empties and the log is
over twice its live set. Exit 1 while more than 100 such lines are logged; 0 once not.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r7b_common import Broker, free_bytes, tmpfs

import pigeon

PORT = 7956
LINE = "starting a segment or reclaiming space failed"


def main() -> int:
    with tmpfs("6m") as disk:
        b = Broker(PORT, disk, "--lease", "600")
        try:
            if not b.start():
                print("broker did not start:\n" + b.log())
                return 2
            url = f"pigeon://127.0.0.1:{PORT}/r7b-flood"
            n = 0
            with pigeon.Queue(url, serializer="raw", reconnect_timeout=0) as q:
                while True:
                    try:
                        q.put_many([os.urandom(1024)] * 50, timeout=5)
                    except pigeon.PigeonError:
                        break
                    n += 50
                print(f"{n} messages stored; {free_bytes(disk)} bytes free")
                held, acks, t0 = [], 0, time.monotonic()
                for i in range(n):
                    m = q.get_message(timeout=5)
                    if i % 3 == 0:
                        held.append(m)
                        continue
                    t = time.monotonic()
                    m.ack()
                    acks += 1
                    if time.monotonic() - t > 2:
                        print("an ack took over 2 s (the store is wedged)")
                        break
                secs = time.monotonic() - t0
            lines = [ln for ln in b.log().splitlines() if LINE in ln]
            print(
                f"{acks} acks in {secs:.1f} s, {len(held)} held; {free_bytes(disk)} bytes "
                f"free; {len(lines)} x '{LINE} ... will retry'"
            )
            if lines:
                print("  first: " + lines[0])
            if len(lines) > 100:
                print(
                    "DEFECT: failed housekeeping on the full disk is retried and logged as "
                    "an ERROR after every write, and never progresses"
                )
                return 1
            print("held: no flood")
            return 0
        finally:
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
