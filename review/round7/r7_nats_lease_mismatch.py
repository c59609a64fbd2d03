"""nats://: a stale ack is sent without asking when another handle changed the queue's
lease. Each handle trusts its own ``lease`` for ``_fresh`` (AsyncNatsMessage._fresh_until =
pull sent + handle.lease - margin), but a handle opened later with a different ``lease=``
rewrites the JetStream consumer's AckWait "for all" (nats.py, the add_consumer in the
open path). A handle with lease=30 then counts 29 s of freshness while the server
redelivers after 2 s; its late ack is sent without the _holds check and JetStream settles
the redelivery another consumer now holds (settles are by stream sequence). A rolling
deploy that changes the lease does exactly this.

Seen: A (lease=30) gets the message; B opens with lease=2; 3 s later B gets it again
(delivery 2); A's ack is accepted (should be LocalProtocolError: delivery 1 no longer
holds it) and removes the message B holds; B's handler then fails and nacks it
(requeue=True), and the job never comes back: lost.

Once fixed (wt-natslease: an open never lowers the consumer's AckWait; a shorter lease is
kept on its own handle), B is not handed the job while A's 30 s lease runs: that outcome
is checked too - A's ack must then count and the job be gone - and also exits 0.

Needs the shared NATS at 127.0.0.1:4222 (queue r7-lease-<random>, deleted after).
Run: PYTHONPATH=src python r7_nats_lease_mismatch.py   (exit 1: the defect is present)
"""
import os
import sys
import time

import pigeon

URL = f"nats://127.0.0.1:4222/r7-lease-{os.getpid()}"


class _Kept(Exception):
    pass


def main():
    stale_accepted = None
    b_ack = None
    back = "?"
    kept = None
    with pigeon.Queue(URL, lease=30) as a:
        try:
            a.put("job")
            first = a.get_message(timeout=10)  # delivery 1; A believes it holds it 29 s
            with pigeon.Queue(URL, lease=2) as b:  # the consumer's AckWait becomes 2 s
                time.sleep(3)
                try:
                    second = b.get_message(timeout=3)
                except pigeon.Empty:  # the fix: B's lease did not end A's delivery
                    first.ack()  # A still holds the job: its ack counts
                    try:
                        b.get_message(timeout=3)
                        kept = False
                    except pigeon.Empty:
                        kept = True
                    raise _Kept from None
                print(f"B got {second.body!r}, delivery {second.delivery_count}")
                try:
                    first.ack()  # A's delivery no longer holds the message
                    stale_accepted = True
                except pigeon.LocalProtocolError as exc:
                    stale_accepted = False
                    print(f"A's stale ack refused: {exc}")
                try:
                    second.nack(requeue=True)  # B's handler failed: the job must come back
                    b_ack = "nack ok"
                except pigeon.PigeonError as exc:
                    b_ack = f"nack: {type(exc).__name__}: {exc}"
                try:
                    again = b.get_message(timeout=3)
                    back = again.body
                    again.ack()
                except pigeon.Empty:
                    back = None
        except _Kept:
            pass
        finally:
            try:
                a.delete()
            except Exception as exc:
                print("cleanup:", exc)
    if kept is not None:
        print(f"B was not handed the job while A's lease ran; A's ack settled it: {kept}")
        if not kept:
            print("DEFECT: the job came back after A acked it")
            sys.exit(1)
        print("ok: B's shorter lease left A's delivery A's")
        return
    print(f"A's stale ack accepted: {stale_accepted}; B's {b_ack}; job after B's nack: {back!r}")
    if stale_accepted:
        print("DEFECT: a delivery whose AckWait had run out (changed by another handle) "
              "acked the message another consumer held, without asking"
              + ("; the job B nacked is lost" if back is None else ""))
        sys.exit(1)
    print("ok: the stale ack was refused")


if __name__ == "__main__":
    main()
