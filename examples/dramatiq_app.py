"""Dramatiq on pigeon's broker: the one line is ``PigeonBroker(...)``.

    pip install 'pigeon-queue[dramatiq]'
    pigeon serve                                   # the broker, port 7878
    dramatiq dramatiq_app --path examples          # Dramatiq's own worker
    python examples/dramatiq_app.py                # sends the tasks, waits with join()

A reminder due in 3 s is held by the broker (no worker holds it meanwhile); an urgent
task goes ahead of routine ones still waiting on the broker (when the workers are busy); a
charge sent twice with one dedup id runs once; a flaky task retries with backoff; a doomed
one ends in ``dramatiq:default.dead`` (``pigeon peek
pigeon://127.0.0.1:7878/dramatiq:default.dead`` says why); and join() returns when all of
it is done.
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.middleware import CurrentMessage

from pigeon.integrations.dramatiq import PigeonBroker

broker = PigeonBroker(url=os.environ.get("PIGEON_URL", "pigeon://127.0.0.1:7878"))
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


@dramatiq.actor
def send_reminder(user: str, sent_at: float) -> None:
    print(f"reminder for {user}, {time.time() - sent_at:.1f} s after it was sent")


@dramatiq.actor  # priority 0 (Dramatiq's default, its highest): the broker's 9
def reset_password(user: str) -> None:
    print(f"password reset for {user}")


@dramatiq.actor(priority=10)  # a lower priority in Dramatiq: the broker's 0
def rebuild_report(n: int) -> None:
    time.sleep(0.05)
    print(f"report {n} rebuilt")


@dramatiq.actor
def charge(order: int) -> None:
    print(f"order {order} charged (once)")


@dramatiq.actor(max_retries=5, min_backoff=200, max_backoff=1000)
def flaky_sync(account: str) -> None:
    retries = CurrentMessage.get_current_message().options.get("retries", 0)
    if retries < 2:  # the first two attempts fail
        raise ConnectionError(f"upstream refused {account} (attempt {retries + 1}); retrying")
    print(f"{account} synced")


@dramatiq.actor(max_retries=0)
def doomed(n: int) -> None:
    raise ValueError(f"record {n} is malformed")


def main() -> None:
    send_reminder.send_with_options(args=("ada", time.time()), delay=3_000)
    for n in range(5):
        rebuild_report.send(n)
    reset_password.send("bob")  # sent last, ahead of any report still waiting
    charge.send_with_options(args=(7,), dedup_id="order-7")
    charge.send_with_options(args=(7,), dedup_id="order-7")  # a repeat: not stored again
    flaky_sync.send("acme")
    doomed.send(42)
    broker.join("default", timeout=60_000)
    print("all done: join() returned once every task ran or was dead-lettered")


if __name__ == "__main__":
    main()
