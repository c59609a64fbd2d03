"""An unplugged peer is noticed in seconds: a real partition in a
network namespace the test makes, packets dropped both ways by nftables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._services import skip_or_fail

DRIVER = Path(__file__).with_name("_partition.py")


@pytest.fixture
def netns() -> Iterator[str]:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        skip_or_fail(
            f"a partition test needs root and {', '.join(missing) or 'ip and nft'} "
            "(Debian: iproute2, nftables); .ci/run installs them"
        )
    name = f"pigeon-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        skip_or_fail(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


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
