"""``pigeon peek | purge | delete | move`` on redis:// and nats:// queue URLs (they were
pigeon:// only)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import pigeon
from pigeon.cli import cli
from tests._services import queue_name, require_service

ENGINES = {"redis": ("Redis", 6379), "nats": ("NATS", 4222)}


@pytest.mark.parametrize("scheme", sorted(ENGINES))
def test_peek_move_purge_delete_on_an_engine_url(scheme: str) -> None:
    service, port = ENGINES[scheme]
    require_service(service, port)
    name = queue_name()
    url = f"{scheme}://127.0.0.1:{port}/{name}"
    with pigeon.Queue(url + ".dead") as dead:
        dead.put("replay me", headers={"k": "v"})
        dead.put("later", delay=60)
    run = CliRunner().invoke
    shown = run(cli, ["peek", url + ".dead", "--json"])
    assert shown.exit_code == 0, shown.output
    rows = [json.loads(line) for line in shown.output.splitlines()]
    assert [r["body"] for r in rows] == ["replay me", "later"]
    assert "due" not in rows[0] and 0 < rows[1]["due"] <= 60
    moved = run(cli, ["move", url + ".dead", "--to", url])
    assert moved.exit_code == 0 and "moved 1 message(s)" in moved.output, moved.output
    purged = run(cli, ["purge", url + ".dead", "--yes"])
    assert purged.exit_code == 0 and "purged 1 message(s)" in purged.output, purged.output
    deleted = run(cli, ["delete", url, "--yes"])
    assert deleted.exit_code == 0 and "1 message(s)" in deleted.output, deleted.output
    run(cli, ["delete", url + ".dead", "--yes"])


@pytest.mark.parametrize("command", ["peek", "purge", "delete", "move"])
def test_the_admin_commands_say_which_backends_they_work_on(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert "redis://" in result.output and "nats://" in result.output
    extra = {"purge": ["--yes"], "delete": ["--yes"], "move": ["--to", "x"]}.get(command, [])
    refused = CliRunner().invoke(cli, [command, "memcached://127.0.0.1/q", *extra])
    assert refused.exit_code == 2 and "pigeon://, redis:// or nats://" in refused.output
