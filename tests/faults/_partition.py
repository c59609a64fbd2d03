"""Run inside a network namespace (``ip netns exec NS python _partition.py SCENARIO``):
a broker and its clients on the namespace's own loopback, and nftables rules that drop
one side's packets both ways - a pulled cable: no FIN, no RST. Prints one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests._services

import pigeon
from tests._services import free_port, wait_for_port
from tests.faults._netns import TABLE, drop_port_script, run


def cut(port: int) -> None:
    """Drop every TCP segment to or from ``port``, in both directions."""
    run("nft", "-f", "-", stdin=drop_port_script(port))


def heal() -> None:
    run("nft", "delete", "table", "inet", TABLE)


def start_broker(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--port", str(port), "--data-dir",
         tempfile.mkdtemp(prefix="pigeon-netns-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port)
    return proc


def consumer_cut_off(port: int) -> dict[str, Any]:
    """A consumer takes a message with a 120 s lease, then its packets are dropped: how
    soon does another consumer get the message?"""
    url = f"pigeon://127.0.0.1:{port}/work"
    with pigeon.Queue(url) as q:
        q.put("job")
    victim = pigeon.Queue(url, client_name="victim")
    msg = victim.get_message(timeout=5, lease=120)
    assert msg.body == "job"
    with pigeon.Queue(url) as probe:
        stats = probe.stats()  # type: ignore[attr-defined]
    (peer,) = [c["peer"] for c in stats["connections"] if c["client"] == "victim"]
    victim_port = int(peer.rsplit(":", 1)[1])
    cut(victim_port)
    t0 = time.monotonic()
    with pigeon.Queue(url) as rescuer:
        again = rescuer.get_message(timeout=60)
        elapsed = time.monotonic() - t0
        again.ack()
    heal()
    return {"body": again.body, "delivery_count": again.delivery_count, "seconds": elapsed}


def broker_cut_off(port: int) -> dict[str, Any]:
    """A client blocked in get() while every packet to and from the broker is dropped for
    20 s: after the partition heals, it gets the next item with no error."""
    url = f"pigeon://127.0.0.1:{port}/later"
    result: dict[str, Any] = {}

    def blocked() -> None:
        try:
            with pigeon.Queue(url) as q:
                result["got"] = q.get(timeout=120)
                result["at"] = time.monotonic()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(1.0)
    cut(port)
    time.sleep(20)
    heal()
    healed = time.monotonic()
    with pigeon.Queue(url) as q:
        q.put("after the partition")
    t.join(90)
    if "at" in result:
        result["seconds_after_heal"] = result.pop("at") - healed
    return result


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = free_port()
    proc = start_broker(port)
    try:
        scenario = {"consumer": consumer_cut_off, "broker": broker_cut_off}[sys.argv[1]]
        print(json.dumps(scenario(port)))
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
