from __future__ import annotations

import subprocess
import sys

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
    for args in (["--help"], ["demo", "--help"], ["demo", "sticky", "--help"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0
        assert "pigeon demo" in result.output


def test_python_dash_m_pigeon() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pigeon", "--version"], capture_output=True, text=True, check=True
    )
    assert "pigeon" in out.stdout
