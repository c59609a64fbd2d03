"""The ``pigeon`` command line: ``serve`` (serve.py); ``put | get | stats`` (client.py);
``queues | peek | purge | delete | move | backup`` (admin.py); ``worker``; ``demo``; ``bench``."""

from __future__ import annotations

import click

from pigeon import __version__
from pigeon.cli.admin import backup, delete, move, peek, purge, queues
from pigeon.cli.bench import bench
from pigeon.cli.client import get, put, stats
from pigeon.cli.demo import demo
from pigeon.cli.serve import serve
from pigeon.cli.worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pigeon")
def cli() -> None:
    """pigeon moves messages between threads, processes, coroutines and hosts.

    \b
    Try:
      pigeon demo            the writer/reader seed program, done right
      pigeon demo sticky     TCP's "sticky packets" and the three ways to frame them
      pigeon bench concurrency   threads vs processes vs coroutines, measured here
      pigeon serve           a broker on 127.0.0.1:7878
      pigeon put pigeon://127.0.0.1:7878/jobs java Python JavaScript
      pigeon get pigeon://127.0.0.1:7878/jobs -n 3
      pigeon stats           connections and their TCP states
      pigeon queues          every queue: depth, in flight, counters
      pigeon peek pigeon://127.0.0.1:7878/jobs.dead      dead letters, and why
      pigeon move pigeon://127.0.0.1:7878/jobs.dead --to jobs   replay them
      pigeon worker pigeon://127.0.0.1:7878/jobs myapp.tasks:handle   consume
    """


cli.add_command(demo)
cli.add_command(bench)
for command in (serve, put, get, stats, queues, peek, purge, delete, move, backup, worker):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()
