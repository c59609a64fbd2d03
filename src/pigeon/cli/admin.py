"""``pigeon queues | peek | purge | delete | move | backup``: looking after a broker's queues."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import pigeon
from pigeon.backends.pigeon.sync import BrokerQueue
from pigeon.cli.client import open_broker_queue

__all__ = ["backup", "delete", "move", "peek", "purge", "queues"]


@contextlib.contextmanager
def _broker(url: str, serializer: str = "raw") -> Iterator[BrokerQueue[Any]]:
    """The queue at a ``pigeon://`` URL (``pigeon queues`` asks the broker for STATS)."""
    q = open_broker_queue(url, serializer)
    with _commanding(q):
        yield q


ADMIN_SCHEMES = ("pigeon", "redis", "nats")  # the backends peek/purge/delete/move work on


@contextlib.contextmanager
def _admin(url: str, serializer: str = "raw") -> Iterator[Any]:
    """The queue at a pigeon://, redis:// (plain, Cluster, Sentinel) or nats:// URL."""
    scheme = url.partition("://")[0].split("+")[0]
    if "://" not in url or {"rediss": "redis"}.get(scheme, scheme) not in ADMIN_SCHEMES:
        raise click.BadParameter(
            "pigeon peek/purge/delete/move speak to a pigeon://, redis:// or nats:// queue",
            param_hint="QUEUE_URL",
        )
    try:
        q: Any = pigeon.Queue(url, serializer=serializer)
    except pigeon.InvalidURL as exc:
        raise click.BadParameter(str(exc), param_hint="QUEUE_URL") from None
    except pigeon.PigeonError as exc:
        raise click.ClickException(str(exc)) from None
    with _commanding(q):
        yield q


@contextlib.contextmanager
def _commanding(q: Any) -> Iterator[None]:
    try:
        yield
    except pigeon.PigeonError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        q.close()


def _queue_url(url: str) -> str:
    """A broker URL (``pigeon://host:port``) or any queue URL on it, as a queue URL."""
    from pigeon.backends.pigeon.ops import Endpoint

    try:
        Endpoint(url)
        return url
    except pigeon.InvalidURL:
        return url.rstrip("/") + "/_"


@click.command()
@click.argument("url", default="pigeon://127.0.0.1:7878")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def queues(url: str, as_json: bool) -> None:
    """List the broker's queues with their depth, in-flight count and counters.

    \b
    Dead-letter queues end in .dead; replay them with `pigeon move`.

    \b
    Examples:
      pigeon queues
      pigeon queues pigeon://:TOKEN@broker-host:7878 --json
    """
    with _broker(_queue_url(url)) as q:
        data: dict[str, Any] = q.stats()["queues"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("queue", "depth", "delayed", "in flight", "maxsize", "consumers", "put",
                  "delivered", "acked", "dead", "shut down", title=f"queues at {url}")  # fmt: skip
    for name, info in data.items():
        table.add_row(name, str(info["depth"]), str(info.get("delayed", 0)),
                      str(info["in_flight"]), str(info["maxsize"] or "-"),
                      str(info["consumers_waiting"]), str(info["put_total"]),
                      str(info["delivered_total"]), str(info["acked_total"]),
                      str(info["dead_total"]), "yes" if info["shutdown"] else "")  # fmt: skip
    Console().print(table)


def _shown(payload: bytes, body: Any) -> str:
    if body is not None:
        return json.dumps(body, default=repr)[:200]
    try:
        return payload.decode()[:200]
    except UnicodeDecodeError:
        return "$" + base64.b64encode(payload[:150]).decode()


@click.command()
@click.argument("queue_url")
@click.option("-n", "count", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="how many messages to show")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="one JSON object per message")
def peek(queue_url: str, count: int, as_json: bool) -> None:
    """Show the next messages of QUEUE_URL without delivering them.

    \b
    Works on pigeon://, redis:// (Cluster and Sentinel too) and nats://.
    Delivery counts do not change and nothing is taken: first what a get
    would take now, in that order, then delayed messages ("due": seconds
    until they can be taken). For a dead letter it shows the queue it came
    from and why it died (max_deliveries, rejected, undecodable, expired).

    \b
    Examples:
      pigeon peek pigeon://127.0.0.1:7878/jobs -n 5
      pigeon peek pigeon://127.0.0.1:7878/jobs.dead
      pigeon peek redis://127.0.0.1:6379/jobs --json
      pigeon peek nats://127.0.0.1:4222/jobs.dead
    """
    with _admin(queue_url, "msgpack") as q:
        shown = q.peek(count)
    if as_json:
        for m in shown:
            m = {**m, "payload": base64.b64encode(m["payload"]).decode()}
            click.echo(json.dumps(m, default=repr))
        return
    # priority and headers only when some message has them: the table stays narrow
    extra = any(m.get("priority") or m.get("headers") for m in shown)
    columns = ["id", "deliveries", "age (s)", "due (s)", "from", "why", "body"]
    table = Table(*columns[:6], *(["priority", "headers"] if extra else []), "body",
                  title=queue_url)  # fmt: skip
    for m in shown:
        due = f"{m['due']:.1f}" if m.get("due") is not None else ""
        row = [str(m["id"]), str(m["delivery_count"]), f"{m['age']:.1f}", due, m["origin"],
               m["reason"]]  # fmt: skip
        if extra:
            headers = " ".join(f"{k}={v}" for k, v in (m.get("headers") or {}).items())
            row += [str(m.get("priority", 0)), headers[:60]]
        table.add_row(*row, _shown(m["payload"], m["body"]))
    Console().print(table)


@click.command()
@click.argument("queue_url")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
def purge(queue_url: str, yes: bool) -> None:
    """Drop every message waiting in QUEUE_URL, delayed ones too (messages in
    flight stay). Works on pigeon://, redis:// and nats://.

    \b
    Example:
      pigeon purge pigeon://127.0.0.1:7878/jobs.dead --yes
      pigeon purge redis://127.0.0.1:6379/jobs.dead --yes
    """
    if not yes:
        click.confirm(f"drop every waiting message of {queue_url}?", abort=True)
    with _admin(queue_url) as q:
        n = q.purge()
    click.echo(f"purged {n} message(s)")


@click.command()
@click.argument("queue_url")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
def delete(queue_url: str, yes: bool) -> None:
    """Delete QUEUE_URL: its messages (in flight too), settings and waiters.
    Works on pigeon://, redis:// (its keys) and nats:// (its stream).

    \b
    Example:
      pigeon delete pigeon://127.0.0.1:7878/old-jobs --yes
      pigeon delete nats://127.0.0.1:4222/old-jobs --yes
    """
    if not yes:
        click.confirm(f"delete {queue_url} and every message in it?", abort=True)
    with _admin(queue_url) as q:
        n = q.delete()
    click.echo(f"deleted the queue and {n} message(s)")


@click.command()
@click.argument("queue_url")
@click.option("--to", "to", required=True, help="the queue (name or URL on the same broker)")
@click.option("--limit", type=click.IntRange(1), help="move at most this many (default: all)")
def move(queue_url: str, to: str, limit: int | None) -> None:
    """Move waiting messages of QUEUE_URL to another queue: replay dead letters.

    \b
    The messages go to the tail of the target, on the same server, with
    their priority and headers and their delivery counts starting afresh;
    delayed ones stay. Works on pigeon:// (one transaction of the broker's
    store), redis:// (one Lua script per batch; on a Cluster between a queue
    and its .dead queue only) and nats:// (each message published to the
    target, then deleted: a crash between the two keeps it once).

    \b
    Example:
      pigeon move pigeon://127.0.0.1:7878/jobs.dead --to pigeon://127.0.0.1:7878/jobs
      pigeon move pigeon://127.0.0.1:7878/jobs.dead --to jobs --limit 10
      pigeon move redis://127.0.0.1:6379/jobs.dead --to jobs
    """
    target = to.rsplit("/", 1)[-1].split("?")[0] if "://" in to else to
    with _admin(queue_url) as q:
        try:
            n = q.move_to(target, limit)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"moved {n} message(s) to {target}")


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              required=True, help="the broker's data directory")  # fmt: skip
@click.option("--to", "target", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the file to write (a SQLite database)")  # fmt: skip
def backup(data_dir: Path, target: Path) -> None:
    """Copy a broker's store, consistently, while it runs.

    \b
    The copy is one consistent state of the store (every put confirmed before
    the copy began), written as a single SQLite file, and the broker keeps
    serving. To restore, stop the broker, move DATA_DIR aside, and put the file
    in a new DATA_DIR as pigeon.sqlite3: `pigeon serve` starts on it as it is,
    `pigeon serve --store log` imports it into a log.

    \b
    Example:
      pigeon backup --data-dir ./pigeon-data --to pigeon-backup.sqlite3
    """
    from pigeon.server.store import LOG_DIR, backup_log, backup_sqlite

    try:
        n = (backup_log if (data_dir / LOG_DIR).is_dir() else backup_sqlite)(data_dir, target)
    except (pigeon.PigeonError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"copied {n} message(s) to {target}")
