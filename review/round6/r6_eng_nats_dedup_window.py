"""r6_eng_nats_dedup_window: nats:// must apply the queue's dedup_window (URL or keyword)
as JetStream's stream duplicate window - asked for, on a new or an existing stream - and
dedup_window=0 must mean no dedup. Before the fix the keyword was refused (TypeError),
the URL's value ignored, and every stream kept JetStream's 2 minutes.
Exit 1 while the defect is there, 0 when fixed. Needs NATS+JetStream on 127.0.0.1:4222."""

import asyncio
import sys
import time
import uuid

import pigeon

BASE = "nats://127.0.0.1:4222/r6dw-" + uuid.uuid4().hex[:8]
bad = []


def window_of(queue: str) -> float:
    import nats

    from pigeon.backends.nats import stream_name

    async def ask() -> float:
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            info = await nc.jetstream().stream_info(stream_name(queue))
            return float(info.config.duplicate_window)
        finally:
            await nc.close()

    return asyncio.run(ask())


def check(label: str, ok: bool) -> None:
    print(("ok   " if ok else "FAIL ") + label)
    if not ok:
        bad.append(label)


# 1. a short window from the URL: a repeat after it is stored
with pigeon.Queue(BASE + "a?dedup_window=1") as q:
    q.put("1", dedup_id="x")
    q.put("2", dedup_id="x")
    time.sleep(1.5)
    q.put("3", dedup_id="x")
    check("?dedup_window=1: a repeat within 1 s dropped, one after it stored", q.qsize() == 2)
    q.shutdown(immediate=True)
# 2. the keyword, on a new stream
try:
    with pigeon.Queue(BASE + "b", dedup_window=600) as q:
        check("dedup_window=600 (keyword): the stream's duplicate window is 600 s",
              abs(window_of(BASE.rsplit("/", 1)[1] + "b") - 600) < 1e-6)
        q.shutdown(immediate=True)
except TypeError as exc:
    check(f"dedup_window= keyword accepted ({exc})", False)
# 3. an existing stream takes the window asked for
with pigeon.Queue(BASE + "c") as q:
    q.put("made")
with pigeon.Queue(BASE + "c?dedup_window=30") as q:
    check("an existing stream gets ?dedup_window=30",
          abs(window_of(BASE.rsplit("/", 1)[1] + "c") - 30) < 1e-6)
    q.shutdown(immediate=True)
# 4. 0: no dedup
with pigeon.Queue(BASE + "d?dedup_window=0") as q:
    q.put("1", dedup_id="x")
    q.put("2", dedup_id="x")
    check("dedup_window=0: every put stored", q.qsize() == 2)
    q.shutdown(immediate=True)
# 5. ids NATS would alter stay distinct ("a" and " a": nats-py trims header values)
with pigeon.Queue(BASE + "e") as q:
    q.put("1", dedup_id="a")
    q.put("2", dedup_id=" a")
    check("dedup ids 'a' and ' a' are two ids", q.qsize() == 2)
    q.shutdown(immediate=True)
sys.exit(1 if bad else 0)
