"""taskiq on pigeon's broker: the one line is ``PigeonBroker(...)``.

    pip install 'pigeon-queue[taskiq]'
    pigeon serve                                            # the broker, port 7878
    taskiq worker taskiq_app:broker --app-dir examples      # taskiq's own worker
    python examples/taskiq_app.py                           # kicks the tasks

In the worker's terminal: a reminder kicked with ``delay=3`` runs 3 s later (the broker
held it; no worker did); a charge kicked twice with one ``dedup_id`` runs once; a flaky
task fails, and SmartRetryMiddleware's retry comes back 1 s later (a broker-held delay
too); a password reset with ``priority=9`` goes ahead of the routine reports still
waiting on the broker when the worker is busy (``--max-async-tasks 1`` shows it).
"""

from __future__ import annotations

import asyncio
import os
import time

from taskiq import Context, SmartRetryMiddleware, TaskiqDepends

from pigeon.integrations.taskiq import PigeonBroker

broker = PigeonBroker(os.environ.get("PIGEON_URL", "pigeon://127.0.0.1:7878/taskiq"))
broker.add_middlewares(SmartRetryMiddleware(default_retry_count=3, default_delay=1.0))

CONTEXT: Context = TaskiqDepends()  # taskiq's idiom: context: Context = TaskiqDepends()


# task names of their own: the same whether this file runs as taskiq_app or __main__
@broker.task("send_reminder")
async def send_reminder(user: str, kicked_at: float) -> None:
    print(f"reminder for {user}, {time.time() - kicked_at:.1f} s after it was kicked", flush=True)


@broker.task("rebuild_report")
async def rebuild_report(n: int) -> None:
    await asyncio.sleep(0.05)
    print(f"report {n} rebuilt", flush=True)


@broker.task("reset_password")
async def reset_password(user: str) -> None:
    print(f"password reset for {user}", flush=True)


@broker.task("charge")
async def charge(order: int) -> None:
    print(f"order {order} charged (once)", flush=True)


@broker.task("flaky", retry_on_error=True)
async def flaky(context: Context = CONTEXT) -> None:
    attempt = int(context.message.labels.get("_retries", 0))
    if attempt == 0:
        print("flaky: attempt 0 fails", flush=True)
        raise RuntimeError("a transient failure")
    print(f"flaky: attempt {attempt} succeeded", flush=True)


async def main() -> None:
    await broker.startup()
    await send_reminder.kicker().with_labels(delay=3).kiq("ada", time.time())
    for n in range(5):
        await rebuild_report.kiq(n)
    await reset_password.kicker().with_labels(priority=9).kiq("grace")
    for _ in range(2):  # sent twice (a retried request, a double click): stored once
        await charge.kicker().with_labels(dedup_id="order-42").kiq(42)
    await flaky.kiq()
    await broker.shutdown()
    print("kicked: see the worker's output")


if __name__ == "__main__":
    asyncio.run(main())
