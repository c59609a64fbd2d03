"""``pigeon put | get | stats``: the broker's command-line clients."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import pigeon
from pigeon.backends.pigeon.sync import BrokerQueue, Endpoint

DEFAULT_URL = "pigeon://127.0.0.1:7878/jobs"


def open_broker_queue(url: str, serializer: str) -> BrokerQueue[Any]:
    """The queue at a ``pigeon://`` URL, for a command; a usage error for anything else."""
    try:
        q: pigeon.Queue[Any] = pigeon.Queue(url, serializer=serializer)
    except pigeon.InvalidURL as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    if not isinstance(q, BrokerQueue):
        raise click.BadParameter(
            "pigeon put/get/stats speak to a pigeon:// broker", param_hint="URL"
        )
    return q


_SERIALIZER = click.option(
    "--serializer", type=click.Choice(["msgpack", "json", "raw"]), default="msgpack",
    show_default=True, help="how items are encoded (Python clients default to msgpack)",
)  # fmt: skip


def _header(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in value:
        name, eq, text = pair.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", ctx, param)
        out[name] = text
    return out


@click.command()
@click.argument("url")
@click.argument("items", nargs=-1)
@_SERIALIZER
@click.option("--delay", type=float, help="seconds before the items can be taken")
@click.option(
    "--ttl",
    type=float,
    help="seconds they may wait to be taken; then they move to NAME.dead (expired)",
)
@click.option("--priority", type=click.IntRange(0, 9), help="0-9, higher first (default 0)")
@click.option("--header", "-H", "headers", multiple=True, callback=_header, metavar="NAME=VALUE",
              help="a header carried with each item (repeatable)")  # fmt: skip
def put(
    url: str,
    items: tuple[str, ...],
    serializer: str,
    delay: float | None,
    ttl: float | None,
    priority: int | None,
    headers: dict[str, str],
) -> None:
    """Put ITEMS (or, with none, each line of stdin) on the queue at URL.

    \b
    Examples:
      pigeon put pigeon://127.0.0.1:7878/jobs java Python JavaScript
      seq 100 | pigeon put pigeon://127.0.0.1:7878/jobs
      pigeon put pigeon://127.0.0.1:7878/jobs reminder --delay 3600 --priority 5
      pigeon put pigeon://127.0.0.1:7878/jobs hi -H tenant=acme --ttl 60
    """
    lines = list(items) if items else [line.rstrip("\n") for line in sys.stdin]
    values: list[Any] = [s.encode() for s in lines] if serializer == "raw" else lines
    options: dict[str, Any] = {"delay": delay, "ttl": ttl, "priority": priority,
                               "headers": headers or None}  # fmt: skip
    try:
        with open_broker_queue(url, serializer) as q:
            for i in range(0, len(values), 1000):
                q.put_many(values[i : i + 1000], timeout=30, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except pigeon.PigeonError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"put {len(values)} item(s)", err=True)


@click.command()
@click.argument("url")
@click.option(
    "-n",
    "count",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="how many items to take",
)
@click.option("--follow", "-f", is_flag=True, help="keep taking items until interrupted")
@click.option(
    "--ack",
    is_flag=True,
    help="take each item as a message and ack it after printing (at-least-once)",
)
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(0),
    help="seconds to wait for an item (default: wait as long as it takes)",
)
@_SERIALIZER
def get(url: str, count: int, follow: bool, ack: bool, timeout: float | None,
        serializer: str) -> None:  # fmt: skip
    """Take items from the queue at URL and print one per line.

    \b
    Examples:
      pigeon get pigeon://127.0.0.1:7878/jobs            one item
      pigeon get pigeon://127.0.0.1:7878/jobs -n 3       three items
      pigeon get pigeon://127.0.0.1:7878/jobs --follow   until Ctrl-C or shutdown
      pigeon get pigeon://127.0.0.1:7878/jobs --ack      ack after printing
    """
    taken = 0
    try:
        with open_broker_queue(url, serializer) as q:
            while follow or taken < count:
                if ack:
                    msg = q.get_message(timeout=timeout)
                    _print(msg.body)
                    msg.ack()
                else:
                    _print(q.get(timeout=timeout))
                taken += 1
    except pigeon.Empty:
        raise click.ClickException(f"no item within {timeout} s") from None
    except pigeon.ShutDown:
        if taken == 0:
            raise click.ClickException("the queue was shut down and is empty") from None
    except KeyboardInterrupt:
        pass
    except pigeon.PigeonError as exc:
        raise click.ClickException(str(exc)) from None


def _print(value: Any) -> None:
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            value = repr(value)
    click.echo(value if isinstance(value, str) else json.dumps(value))


@click.command()
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    help="any pigeon:// URL of the broker (the queue part is ignored)",
)
@click.option("--json", "as_json", is_flag=True, help="print the raw statistics as JSON")
def stats(url: str, as_json: bool) -> None:
    """Show the broker's queues and connections.

    \b
    Queues: depth (waiting, the delayed among them), delayed (not due yet:
    a put's delay or a nack's), in flight (delivered, not acked), consumers
    waiting, totals. Connections: peer, age, bytes in/out, and the TCP state
    the kernel reports (ESTABLISHED, CLOSE_WAIT, ...).

    \b
    Example:
      pigeon stats --url pigeon://127.0.0.1:7878/any
    """
    target = url if _has_queue(url) else url.rstrip("/") + "/_"
    try:
        q = BrokerQueue[Any](target, reconnect_timeout=2.0, connect_timeout=5.0)
        try:
            data = q.stats()
        finally:
            q.close()
    except pigeon.PigeonError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    qt = Table("queue", "depth", "delayed", "in flight", "maxsize", "consumers", "put",
               "delivered", "acked", "redelivered", "dead", "shut down",
               title="queues")  # fmt: skip
    for name, q in data["queues"].items():
        qt.add_row(name, str(q["depth"]), str(q.get("delayed", 0)), str(q["in_flight"]),
                   str(q["maxsize"] or "-"),
                   str(q["consumers_waiting"]), str(q["put_total"]), str(q["delivered_total"]),
                   str(q["acked_total"]), str(q["redelivered_total"]), str(q["dead_total"]),
                   "yes" if q["shutdown"] else "")  # fmt: skip
    console.print(qt)
    ct = Table("peer", "client", "mode", "age (s)", "bytes in", "bytes out", "TCP state",
               title="connections")  # fmt: skip
    for c in data["connections"]:
        ct.add_row(c["peer"], c["client"], c["mode"], f"{c['age']:.1f}", str(c["bytes_in"]),
                   str(c["bytes_out"]), c["tcp_state"])  # fmt: skip
    console.print(ct)
    s = data["server"]
    console.print(
        f"{s['name']} on {', '.join(s['addresses'])}, up {s['uptime']:.0f} s, "
        f"store {s['store']}, failed auth {s['failed_auth']}"
    )


def _has_queue(url: str) -> bool:
    try:
        Endpoint(url)
        return True
    except pigeon.InvalidURL:
        return False
