"""The benchmarks still run (tiny sizes): they are part of the product, not decoration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks"


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_framing_benchmark_runs() -> None:
    out = _run("framing.py", "--mb", "1", "--repeat", "1")
    assert "pigeon" in out and "readexactly" in out and "plot written" in out


def test_local_benchmark_runs() -> None:
    out = _run("local.py", "--quick", "--sizes", "64,65536", "--topologies", "1x1,2x2")
    assert "mp.Queue" in out and "plot written" in out


def test_consumers_benchmark_runs() -> None:
    out = _run("consumers.py", "--quick")
    # which mode auto picks is measured on the spot (a loaded machine may pick threads)
    assert "mp.Pool.imap_unordered" in out and "auto chose " in out and "plot written" in out


def test_store_cost_benchmark_runs() -> None:
    out = _run("store_cost.py", "--messages", "20000", "--rounds", "1")
    assert "fsync batch" in out and "vs --memory" in out and "plot written" in out


def test_recovery_benchmark_runs() -> None:
    out = _run("recovery.py", "--messages", "2000")
    assert "log: filled 2,000" in out and "sqlite: filled 2,000" in out


def test_hot_path_benchmark_runs() -> None:
    out = _run("hot_path.py", "--rounds", "200")
    assert "ack x100" in out and "get_many(100)" in out and "asyncio get" in out
    assert "plot written" in out


def test_broker_benchmark_durable_table_runs_in_interleaved_rounds() -> None:
    # the durable table starts scratch redis-servers; CI's machine has redis-server
    import shutil

    if shutil.which("redis-server") is None:
        import pytest

        pytest.skip("redis-server is not installed: the durable table needs it to start its own")
    out = _run("broker.py", "--quick", "--durable-only", "--sizes", "64", "--rounds", "2")
    assert "median of 2 interleaved" in out and "(round 2/2)" in out and "rounds' range" in out
    assert "--fsync batch x100 vs redis appendfsync everysec" in out and "plot written" in out


def test_broker_cpu_benchmark_runs_and_compares_two_trees() -> None:
    tree = str(BENCH.parent)
    out = _run("broker_cpu.py", "--items", "2000", "--rounds", "50", "--store", "log",
               "--trees", tree, tree, "--repeat", "1")  # fmt: skip
    assert "broker's share of a core" in out and "log: ack" in out and "new/old" in out
    assert "plot written" in out


def test_instructions_benchmark_workload_runs() -> None:
    # valgrind counts it; the workload itself must keep running against the broker
    for kind in ("single", "noack", "batch"):
        _run("instructions.py", "--workload", "300", kind)


def test_taskiq_benchmark_runs() -> None:
    # pigeon only: Redis and RabbitMQ are the shared services the full run compares with
    import importlib.util

    from tests._services import skip_or_fail

    if importlib.util.find_spec("taskiq") is None:
        skip_or_fail("taskiq is not installed (pip install 'pigeon-queue[taskiq]')")
    out = _run("taskiq_tasks.py", "--brokers", "pigeon,pigeon-memory", "--tasks", "50",
               "--paced", "10", "--rate", "50")  # fmt: skip
    assert "pigeon-memory" in out and "kicks/s" in out and "plot written" in out


def test_engines_benchmark_measures_each_message_option_on_redis() -> None:
    from tests._services import require_service

    require_service("Redis", 6379)
    out = _run("engines.py", "--options", "--engines", "redis", "--count", "30")
    for option in ("plain", "priority", "delay", "ttl", "headers", "dedup_id"):
        assert f"redis {option}" in out
    assert "Unsupported" not in out and "vs plain" in out
