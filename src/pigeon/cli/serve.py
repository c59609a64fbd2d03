"""``pigeon serve``: the broker, with its options, config file and SIGHUP reload."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pigeon.cli.config import load_config_file, reloaded, setup_logging
from pigeon.cli.config import print_config as show_config
from pigeon.server.config import ServerConfig

F = TypeVar("F", bound=Callable[..., Any])

# The broker's settings are ServerConfig's fields: an option for one takes its default
# from there (defined once), and its value goes to ServerConfig under the field's name.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
_FIELD = {"lease": "default_lease"}  # option -> field, where the names differ


def _setting(flag: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option(flag, ...)`` for a ServerConfig field, with the field's default."""
    name = flag.removeprefix("--").replace("-", "_")
    return click.option(flag, default=_DEFAULTS[_FIELD.get(name, name)], **kwargs)


@click.command(context_settings={"auto_envvar_prefix": "PIGEON", "show_default": True})
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    is_eager=True,
    expose_value=True,
    callback=load_config_file,
    help="a TOML file of settings (the option names, with _ or -); command line and "
    "environment (PIGEON_<OPTION>) take precedence; unknown keys are refused",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="print every setting, its value and where it came from, then exit",
)
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="serve /metrics (Prometheus), /healthz, /readyz, /api/stats and a live dashboard "
    "at / there; a non-loopback address needs --token (sent as 'Authorization: Bearer')",
)
@_setting(
    "--host",
    help="address to listen on; a non-loopback one requires --token",
)
@_setting("--port", type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="PIGEON_TOKEN",
    help="shared secret clients must send in HELLO (env PIGEON_TOKEN)",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="allow a non-loopback --host without a token (trusted networks only)",
)
@_setting(
    "--max-frame-size",
    type=click.IntRange(1024, 2**31),
    help="largest frame accepted, in bytes",
)
@_setting(
    "--heartbeat",
    type=click.FloatRange(0.1),
    help="seconds between heartbeats to each client",
)
@_setting(
    "--lease",
    type=click.FloatRange(0, 366 * 86400, min_open=True),
    help="default seconds before an unacked message is redelivered",
)
@_setting(
    "--max-deliveries",
    type=click.IntRange(1),
    help="deliveries before a message moves to QUEUE.dead",
)
@_setting("--max-connections", type=click.IntRange(1))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PIGEON_DATA_DIR",
    help="where messages are kept (env PIGEON_DATA_DIR; default ./pigeon-data)",
)
@click.option(
    "--memory", is_flag=True, help="keep messages in memory only: nothing survives a restart"
)
@click.option(
    "--store",
    type=click.Choice(["auto", "log", "sqlite"]),
    default="auto",
    show_default=True,
    help="log: an append-only log in DATA_DIR/log (the default); sqlite: DATA_DIR/"
    "pigeon.sqlite3; auto: the log, or SQLite if DATA_DIR holds only a SQLite store. "
    "--store log on a SQLite-only DATA_DIR imports it into a log once",
)
@click.option(
    "--segment-bytes",
    default=64 * 2**20,
    show_default=True,
    type=click.IntRange(4096),
    help="the log store's segment size: a full segment is fsynced and closed and a new one "
    "begun; disk space is reclaimed a segment at a time",
)
@click.option(
    "--fsync",
    type=click.Choice(["always", "batch", "never"]),
    default="batch",
    show_default=True,
    help="always: confirm after the fsync (puts arriving meanwhile share the next one: "
    "survives power loss); batch: confirm once written to the OS (survives kill -9), fsync "
    "within --fsync-interval; never: confirm before writing",
)
@click.option(
    "--fsync-interval",
    default=0.010,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="seconds --fsync batch waits to gather a batch",
)
@_setting(
    "--handshake-timeout",
    type=click.FloatRange(0.01),
    help="seconds a new connection has to complete HELLO",
)
@_setting(
    "--idle-timeout",
    type=click.FloatRange(0),
    help="close a connection after this many seconds without a byte from it, unless it "
    "holds deliveries or waits for a reply (a worker busy with a long job) (0: never)",
)
@_setting(
    "--max-unacked-bytes",
    type=click.IntRange(1),
    help="unacked bytes one connection may hold before it gets no more deliveries",
)
@_setting(
    "--max-pending-output",
    type=click.IntRange(0),
    help="bytes of replies a client that does not read may leave waiting before it is "
    "dropped (0: no limit)",
)
@_setting(
    "--max-queues",
    type=click.IntRange(1),
    help="queues the broker keeps; beyond it new names are refused (queues made by a "
    "mere reference are forgotten once empty and unwatched, and do not count long)",
)
@_setting(
    "--max-dedup-ids",
    type=click.IntRange(0),
    help="dedup ids the broker remembers across all queues, each for its queue's "
    "dedup_window (about 400 bytes of memory each); beyond it a put with new ones is "
    "refused with 'limit', nothing stored",
)
@_setting(
    "--max-parked-bytes-per-connection",
    type=click.IntRange(0),
    help="payload bytes one connection's puts may hold while they wait for room in a full "
    "queue; beyond it a put is refused with 'limit'",
)
@_setting(
    "--max-parked-gets-per-connection",
    type=click.IntRange(1),
    help="GETs one connection may have waiting for a message; beyond it a GET is refused "
    "with 'limit' (a client needs one per consumer thread or task)",
)
@_setting(
    "--max-parked-gets",
    type=click.IntRange(1),
    help="GETs all connections together may have waiting",
)
@_setting(
    "--max-parked-bytes",
    type=click.IntRange(0),
    help="payload bytes all waiting puts may hold together",
)
@_setting(
    "--peer-timeout",
    type=click.FloatRange(0),
    help="seconds a peer's TCP stack may leave the broker's data (or its probes) "
    "unacknowledged before the connection counts as dead and its messages are requeued "
    "(checked in the kernel's TCP_INFO; a peer that only reads slowly is not dropped; 0: "
    "never, the kernel's ~15 min of retransmissions)",
)
@_setting(
    "--store-timeout",
    type=click.FloatRange(0.1),
    help="seconds a reply may wait for a store that cannot commit (busy or failing disk) "
    "before it is answered 'unavailable'",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM certificate: serve TLS (clients use pigeon+tls://)",
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key for --tls-cert"
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    help="what to log (SIGHUP reloads it)",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="text lines, or one JSON object per line (keys: time, level, logger, message)",
)
@click.option("-v", "--verbose", count=True, help="log more: -v is --log-level debug")
def serve(
    host: str, port: int, token: str | None, insecure_no_auth: bool, data_dir: Path | None,
    memory: bool, store: str, segment_bytes: int, fsync: str, fsync_interval: float,
    tls_cert: str | None, tls_key: str | None, verbose: int, config: Path | None,
    print_config: bool, http: str | None, log_level: str, log_format: str, **settings: Any,
) -> None:  # fmt: skip
    """Run a pigeon broker until SIGINT/SIGTERM (then it closes gracefully, exit 0).

    \b
    Clients reach its queues as pigeon://HOST:PORT/QUEUE; queues are created
    on first use. Binary clients speak the protocol in docs/protocol.md; humans
    can type to the same port: `nc 127.0.0.1 7878`, then PUT jobs hello, GET jobs,
    STATS, QUIT (HELP lists the commands).

    \b
    Messages are durable by default: appended to a log of checksummed records
    in DATA_DIR/log, and a put is confirmed only once it is written (--fsync
    batch: in the OS, fsynced within 10 ms; always: on disk), so it survives
    kill -9 (and power loss with --fsync always); unacked messages come back
    after a restart. If the disk fills up, new puts are refused ("the broker's
    disk is full") while gets and acks go on, in a 4 MiB reserve the log holds
    for that, and what acks free is punched out of the log as they go; once
    the room left is what settling the messages out needs, gets are refused
    too; puts are taken again once there is room.

    \b
    Examples:
      pigeon serve                               loopback only, port 7878, ./pigeon-data
      pigeon serve --memory                      nothing on disk
      pigeon serve --host 0.0.0.0 --token s3cret  reachable from other hosts
    """
    ctx = click.get_current_context()
    if print_config:
        show_config(ctx, ctx.params)
        return
    from pigeon.errors import StoreCorrupted, StoreInUse
    from pigeon.server.app import run
    from pigeon.server.core import Store
    from pigeon.server.store import open_store

    ssl_ctx = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise click.UsageError("--tls-cert and --tls-key go together")
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(tls_cert, tls_key)
    kept: Store
    if memory:
        kept = Store()
    else:
        try:
            kept = open_store(data_dir or Path("pigeon-data"), store, fsync, fsync_interval,  # type: ignore[arg-type]
                              segment_bytes)  # fmt: skip
        except (StoreCorrupted, StoreInUse) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full or failing disk while recovering
            raise click.ClickException(
                f"cannot open the store in {data_dir or 'pigeon-data'}: {exc}; free disk "
                "space (or mend the disk) and start again - nothing was lost by trying"
            ) from None

    setup_logging("debug" if verbose else log_level, log_format)
    if http:
        from pigeon.server.http import parse_address

        try:
            parse_address(http)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--http") from None
    for option, field in _FIELD.items():
        settings[field] = settings.pop(option)
    server_config = ServerConfig(
        host=host, port=port, token=token, store=kept, http=http,
        extra={"insecure_no_auth": insecure_no_auth, "ssl": ssl_ctx}, **settings,
    )  # fmt: skip

    def ready(server: Any) -> None:
        where = "memory only" if memory else f"{kept.path} (fsync {fsync})"  # type: ignore[attr-defined]
        click.echo(
            f"pigeon broker listening on {', '.join(server.addresses)}, messages in "
            f"{where} (Ctrl-C stops)"
        )
        if server.http is not None:
            click.echo(f"dashboard and metrics at {server.http.url}")
        sys.stdout.flush()

    def hangup(server: Any) -> None:
        new = reloaded(ctx, ctx.params)
        setup_logging("debug" if verbose else new["log_level"], log_format)
        tls = (new["tls_cert"], new["tls_key"]) if new["tls_cert"] and new["tls_key"] else None
        server.reload(new["token"], tls)

    try:
        run(server_config, ready, hangup)
    except PermissionError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
