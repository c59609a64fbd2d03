"""``pigeon demo``: small, readable programs that show what pigeon is for."""

from __future__ import annotations

import click

from pigeon.cli import seed, sticky


@click.group(invoke_without_command=True)
@click.option("--no-old", is_flag=True, help="skip the multiprocessing.Queue part")
@click.option(
    "--broker",
    metavar="URL",
    help="also run the writer and reader through a broker queue, e.g. "
    "pigeon://127.0.0.1:7878/demo (start one with `pigeon serve`)",
)
@click.pass_context
def demo(ctx: click.Context, no_old: bool, broker: str | None) -> None:
    """Run the demos. With no sub-command: the writer/reader seed program, done right.

    \b
    A writer puts "java", "Python", "JavaScript" and a reader takes them:
    first the seed's multiprocessing.Queue with a reader polling empty()
    (it quits early), then pigeon.Queue between processes, threads and
    coroutines, each reader ending on shutdown(); with --broker, also
    between two processes through a pigeon broker.

    \b
    Examples:
      pigeon demo            the seed program, done right
      pigeon demo --broker pigeon://127.0.0.1:7878/demo
      pigeon demo sticky     why TCP needs framing, on a real loopback connection
    """
    if ctx.invoked_subcommand is None:
        seed.run(old=not no_old, broker=broker)


@demo.command("sticky")
@click.option("--messages", default=2000, show_default=True, help="how many small messages")
def sticky_command(messages: int) -> None:
    """Show TCP merging and splitting messages (粘包/拆包), and the three fixes.

    \b
    On a real loopback TCP connection it shows:
      (a) raw recv() merging many small sends and splitting a large one;
      (b) FixedLength, Delimited and LengthPrefixed each recovering exactly
          the messages that were sent, however the bytes arrived;
      (c) a half-close: the client shuts down its write side, the server
          still answers, nothing in flight is lost.

    \b
    Example:
      pigeon demo sticky --messages 500
    """
    sticky.run(messages)
