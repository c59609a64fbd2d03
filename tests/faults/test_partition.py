"""An unplugged peer is noticed in seconds: a real partition in a
network namespace the test makes, packets dropped both ways by nftables."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._services import skip_or_fail
from tests.faults._netns import Netns, require_netns

DRIVER = Path(__file__).with_name("_partition.py")


@pytest.fixture
def netns() -> Iterator[str]:
    require_netns()
    try:
        ns = Netns()
    except RuntimeError as exc:
        skip_or_fail(f"cannot create a network namespace: {exc}")
    try:
        yield ns.name
    finally:
        ns.close()


def run_in(ns: str, scenario: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(DRIVER), scenario],
        capture_output=True, text=True, timeout=240,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cut_off_consumers_message_reaches_another_within_20_s(netns: str) -> None:
    result = run_in(netns, "consumer")
    print(
        f"\nmessage of a cut-off consumer (lease 120 s) redelivered after {result['seconds']:.1f} s"
    )
    assert result["body"] == "job" and result["delivery_count"] == 2
    assert result["seconds"] < 20


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_client_blocked_while_its_broker_is_cut_off_carries_on(netns: str) -> None:
    result = run_in(netns, "broker")
    print(f"\nblocked get() returned {result.get('seconds_after_heal', -1):.1f} s after the heal")
    assert result.get("got") == "after the partition", result
