"""Message options through a pigeon broker: a delay that is not a lease, priorities, a
dedup id that makes a retried put safe, an expiry that dead-letters, and headers.

Start a broker first (`pigeon serve`), then run:  python examples/message_options.py
"""

from __future__ import annotations

import sys
import time

import pigeon

URL = sys.argv[1] if len(sys.argv) > 1 else "pigeon://127.0.0.1:7878/options-demo"


def main() -> None:
    with pigeon.Queue(URL + "?lease=2") as q, pigeon.Queue(URL + ".dead") as dead:
        q.put("send the reminder", delay=3)  # invisible for 3 s; longer than the lease
        q.put("routine", priority=0)
        q.put("urgent", priority=9, headers={"tenant": "acme"})
        q.put("charge order 7", dedup_id="order-7")
        q.put("charge order 7", dedup_id="order-7")  # a retry: confirmed, not stored again
        q.put("stale quote", ttl=0.5)  # not taken within 0.5 s: moves to .dead
        print(f"qsize {q.qsize()} (the delayed message counts)")
        time.sleep(1)
        for _ in range(3):
            with q.get_message(timeout=5) as msg:
                print(f"got {msg.body!r} headers={msg.headers}")
        started = time.monotonic()
        with q.get_message(timeout=10) as msg:  # the delayed one, once, after its delay
            print(f"got {msg.body!r} after {time.monotonic() - started:.1f} s more")
        with dead.get_message(timeout=5) as msg:
            print(f"dead letter {msg.body!r} (expired)")
        try:
            q.get(timeout=0.5)
        except pigeon.Empty:
            print("nothing else: the repeated order was stored once")


if __name__ == "__main__":
    main()
