"""r6_eng_nats_short_lease: a small lease on nats:// (0.1-0.9 s, and below a nanosecond)
is the lease asked for - never JetStream's 30 s AckWait default (a lease that rounded to
0 ns), never an early redelivery - and get_message(lease=) / extend() keep their time.
Found: 0.1-0.9 s, get_message(lease=) and extend() were right already; a lease under
1 ns became 30 s (AckWait 0 is JetStream's "default"). Leases now round up to whole ms.
Exit 1 while the defect is there, 0 when fixed. Needs NATS+JetStream on 127.0.0.1:4222."""

import sys
import time
import uuid

import pigeon

bad = []


def check(label: str, ok: bool) -> None:
    print(("ok   " if ok else "FAIL ") + label)
    if not ok:
        bad.append(label)


def redelivered_after(url: str, hold: object = None, extend: float | None = None) -> float:
    with pigeon.Queue(url) as a, pigeon.Queue(url) as b:
        a.put("x")
        m = a.get_message(timeout=5, lease=hold) if hold else a.get_message(timeout=5)
        t0 = time.monotonic()
        if extend is not None:
            m.extend(extend)
        try:
            again = b.get_message(timeout=4)
        except pigeon.Empty:
            return float("inf")
        took = time.monotonic() - t0
        again.ack()
        b.shutdown(immediate=True)
        return took


for lease in (0.1, 0.3, 0.9):
    url = f"nats://127.0.0.1:4222/r6sl-{uuid.uuid4().hex[:8]}?lease={lease}"
    took = redelivered_after(url)
    check(f"?lease={lease}: redelivered after {took:.3f} s", lease - 0.01 <= took <= lease + 0.5)
    url = f"nats://127.0.0.1:4222/r6sl-{uuid.uuid4().hex[:8]}?lease=0.2"
    took = redelivered_after(url, extend=lease + 0.6)
    check(f"lease 0.2, extend({lease + 0.6:.1f}): {took:.3f} s",
          lease + 0.59 <= took <= lease + 1.1)
    url = f"nats://127.0.0.1:4222/r6sl-{uuid.uuid4().hex[:8]}"
    took = redelivered_after(url, hold=lease)
    check(f"get_message(lease={lease}) on a 30 s queue: {took:.3f} s",
          lease - 0.01 <= took <= lease + 0.5)
url = f"nats://127.0.0.1:4222/r6sl-{uuid.uuid4().hex[:8]}?lease=1e-10"
took = redelivered_after(url)
check(f"?lease=1e-10: redelivered after {took:.3f} s (not AckWait's 30 s default)", took < 1.0)
sys.exit(1 if bad else 0)
