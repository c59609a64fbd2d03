"""Jepsen-style: SIGKILL the broker again and again while producers and consumers work.

Every put the broker confirmed is recorded by its producer; every message a consumer
receives is recorded before it is acked. At the end: lost = confirmed - received must be
empty, unexpected (bodies nobody sent) must be empty; duplicates (at-least-once) are
counted and reported. The broker runs with ``--fsync batch``.

Bounded: ``PIGEON_FAULT_SECONDS`` of kills (default 60), then at most 120 s to drain.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import pigeon
from tests._services import free_port, start_broker

PRODUCERS = 4
CONSUMERS = 4
PER_PRODUCER = 25_000  # 100 k messages in all
BATCH = 100
SECONDS = float(os.environ.get("PIGEON_FAULT_SECONDS", "60"))
FSYNC = os.environ.get("PIGEON_FAULT_FSYNC", "batch")


def broker_args(data: Path, segment_bytes: int) -> tuple[str, ...]:
    return ("--data-dir", str(data), "--fsync", FSYNC, "--heartbeat", "1",
            "--segment-bytes", str(segment_bytes))  # fmt: skip


def produce(url: str, me: int, out: str, pace: float) -> None:
    q = pigeon.Queue(url, serializer="raw", reconnect_timeout=120)
    with open(out, "w") as log:
        for start in range(0, PER_PRODUCER, BATCH):
            batch = [f"{me}:{i}".encode() for i in range(start, start + BATCH)]
            while True:
                try:
                    q.put_many(batch)
                    break
                except pigeon.BrokenResourceError:
                    continue  # not confirmed: try again (it may be stored twice)
            log.write(f"{start}\n")  # confirmed: every item of this batch
            log.flush()
            time.sleep(pace)


def consume(url: str, out: str, stop: Any) -> None:
    q = pigeon.Queue(url, serializer="raw", reconnect_timeout=120)
    with open(out, "wb") as log:
        while not stop.is_set():
            try:
                msg = q.get_message(timeout=0.5)
            except (pigeon.Empty, pigeon.BrokenResourceError):
                continue
            log.write(msg.body + b"\n")
            log.flush()
            try:
                msg.ack()
            except (pigeon.LocalProtocolError, pigeon.BrokenResourceError):
                pass  # the broker restarted: it will deliver the message again


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 300)
@pytest.mark.parametrize(
    ("segment_bytes", "seconds"),
    [(64 * 2**20, SECONDS), (64 * 2**10, SECONDS / 2)],
    ids=["default-segments", "64KiB-segments-rolled-and-reclaimed-under-kills"],
)
def test_no_confirmed_message_is_lost_while_the_broker_is_killed(
    tmp_path: Path, segment_bytes: int, seconds: float
) -> None:
    port = free_port()
    data = tmp_path / "data"
    url = f"pigeon://127.0.0.1:{port}/jepsen?lease=10"
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    broker = start_broker(port, *broker_args(data, segment_bytes))
    pace = max(0.0, seconds * 0.6 / (PER_PRODUCER / BATCH))
    producers = [
        ctx.Process(target=produce, args=(url, p, str(tmp_path / f"p{p}"), pace))
        for p in range(PRODUCERS)
    ]
    consumers = [
        ctx.Process(target=consume, args=(url, str(tmp_path / f"c{c}"), stop))
        for c in range(CONSUMERS)
    ]
    for proc in producers + consumers:
        proc.start()
    kills = 0
    rng = random.Random(1234)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(min(rng.uniform(2, 8), max(0.0, end - time.monotonic())))
            broker.send_signal(signal.SIGKILL)
            broker.wait(10)
            kills += 1
            broker = start_broker(port, *broker_args(data, segment_bytes))
        for p in producers:
            p.join(120)
            assert p.exitcode == 0, "a producer failed"
        confirmed = set()
        for p in range(PRODUCERS):
            for line in (tmp_path / f"p{p}").read_text().split():
                start_i = int(line)
                confirmed.update(f"{p}:{i}".encode() for i in range(start_i, start_i + BATCH))

        def received() -> list[bytes]:
            out: list[bytes] = []
            for c in range(CONSUMERS):
                path = tmp_path / f"c{c}"
                if path.exists():
                    out += path.read_bytes().split(b"\n")[:-1]
            return out

        drain_end = time.monotonic() + 120
        while time.monotonic() < drain_end and not confirmed <= set(received()):
            print(f"draining: {len(confirmed - set(received()))} not yet received", flush=True)
            time.sleep(2)
    finally:
        stop.set()
        for c in consumers:
            c.join(30)
            if c.is_alive():
                c.kill()
        broker.kill()
        broker.wait(10)
    got = received()
    unique = set(got)
    lost = confirmed - unique
    sent = {f"{p}:{i}".encode() for p in range(PRODUCERS) for i in range(PER_PRODUCER)}
    unexpected = unique - sent
    duplicates = len(got) - len(unique)
    print(
        f"\nkills={kills} confirmed={len(confirmed)} received={len(got)} unique={len(unique)} "
        f"lost={len(lost)} unexpected={len(unexpected)} duplicates={duplicates}"
    )
    assert kills >= 1
    assert len(confirmed) == PRODUCERS * PER_PRODUCER
    assert not unexpected, f"unexpected or corrupt: {sorted(unexpected)[:5]}"
    assert not lost, f"lost {len(lost)} confirmed messages, e.g. {sorted(lost)[:5]}"
    segments = sorted(int(p.stem) for p in (data / "log").glob("*.seg"))
    print(f"log segments: {len(segments)} on disk, numbers up to {segments[-1]}")
    if segment_bytes < 2**20:  # the small segments rolled, and old ones were reclaimed
        assert segments[-1] > len(segments) + 5
