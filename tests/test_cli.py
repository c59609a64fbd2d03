from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from pigeon.cli import cli


def test_demo_sticky_recovers_every_message_with_each_codec() -> None:
    result = CliRunner().invoke(cli, ["demo", "sticky", "--messages", "300"])
    assert result.exit_code == 0, result.output
    assert result.output.count("yes") == 3
    assert "NO" not in result.output
    assert "received 300 messages" in result.output


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    commands = [[], ["demo"], ["demo", "sticky"], ["bench"], ["bench", "concurrency"]]
    commands += [["serve"], ["put"], ["get"], ["stats"]]
    for args in [[*c, "--help"] for c in commands]:
        result = runner.invoke(cli, args)
        assert result.exit_code == 0
        assert "Example" in result.output or "Try:" in result.output


def test_python_dash_m_pigeon() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pigeon", "--version"], capture_output=True, text=True, check=True
    )
    assert "pigeon" in out.stdout


def test_demo_runs_the_seed_with_processes_threads_and_coroutines() -> None:
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    # the seed's empty()-polling reader quits early; pigeon's readers get all 3 words
    # (the process part prints from the child processes, outside CliRunner's capture)
    assert "the reader stopped after" in result.output
    assert "writer exit code 0, reader exit code 0" in result.output
    for word in ("'java'", "'Python'", "'JavaScript'"):
        assert result.output.count(f"reader got {word}") >= 2
    assert "nothing was lost" in result.output


def test_bench_concurrency_prints_a_table_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "gil.png"
    args = ["bench", "concurrency", "-n", "2", "--cpu-tasks", "2", "--cpu-size", "1000"]
    args += ["--io-tasks", "4", "--plot", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for kind in ("threads", "processes", "coroutines"):
        assert kind in result.output
    assert out.stat().st_size > 1000


def test_bench_help_teaches() -> None:
    result = CliRunner().invoke(cli, ["bench", "concurrency", "--help"])
    assert result.exit_code == 0
    assert "GIL" in result.output and "pigeon bench concurrency -n 4" in result.output


def test_demo_through_a_broker() -> None:
    from pigeon.testing.broker import BrokerThread

    with BrokerThread() as broker:
        args = ["demo", "--no-old", "--broker", broker.url("demo")]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "through the broker" in result.output
    assert "writer exit code 0, reader exit code 0; 0 left" in result.output


def test_serve_says_what_to_do_when_the_disk_fails_while_recovering(
    tmp_path: Any, monkeypatch: Any
) -> None:
    import errno

    import pigeon.server.store as stores

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stores, "open_store", full)
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "free disk space" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_serve_options_default_to_what_the_server_defaults_to() -> None:
    """Every default is defined once: `pigeon serve`'s options agree with ServerConfig."""
    import dataclasses

    from pigeon.cli.serve import serve
    from pigeon.server.app import ServerConfig

    fields = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    renamed = {"lease": "default_lease"}
    fields.pop("store")  # ServerConfig.store is the store object; --store names its kind
    checked = 0
    for param in serve.params:
        name = renamed.get(param.name or "", param.name or "")
        default = param.default
        if default is None or type(default).__name__ == "Sentinel":  # no default given
            continue
        if name in fields and fields[name] is not dataclasses.MISSING:
            assert default == fields[name], f"--{param.name}: {default!r} vs {name}"
            checked += 1
    assert checked >= 15
