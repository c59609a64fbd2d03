"""``pigeon worker URL module:function``: ``pigeon.consume`` from the command line."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

import pigeon
from pigeon.consume import MODES, ConsumeProgress, consume

__all__ = ["worker"]


def _load(target: str) -> Any:
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise click.BadParameter(f"write module:function, like myapp.tasks:handle, not {target!r}")
    sys.path.insert(0, ".")  # the current directory, as `python -m` does
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot import {target}: {exc}") from None
    if not callable(fn):
        raise click.BadParameter(f"{target} is not callable")
    return fn


def _view(counts: ConsumeProgress, started: float, mode: str, reason: str, workers: int) -> Table:
    snap = counts.snapshot()
    elapsed = max(1e-9, time.monotonic() - started)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("mode", f"{workers} {mode} worker(s)")
    t.add_row("why", reason)
    t.add_row("processed", f"{snap['processed']:,}  ({snap['processed'] / elapsed:,.1f}/s)")
    t.add_row("in progress", str(snap["in_progress"]))
    t.add_row(
        "failures", f"{snap['failed']:,} ({snap['retried']:,} retried, {snap['dead']:,} dead)"
    )
    if snap["timed_out"] or snap["worker_deaths"] or snap["workers_recycled"]:
        t.add_row(
            "workers",
            f"{snap['worker_deaths']:,} died, {snap['timed_out']:,} past the time limit, "
            f"{snap['workers_recycled']:,} recycled",
        )
    if snap["settle_errors"]:
        t.add_row(
            "settle errors",
            f"{snap['settle_errors']:,} (logged; those messages come back, an Indeterminate "
            "one perhaps not)",
        )
    t.add_row("elapsed", f"{elapsed:,.1f} s")
    return t


@click.command()
@click.argument("url")
@click.argument("handler")
@click.option("-c", "--concurrency", type=click.IntRange(1), help="workers (default: by mode)")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="thread, process, async, or auto: measure the handler and choose")  # fmt: skip
@click.option("--attempts", default=5, show_default=True, type=click.IntRange(1),
              help="deliveries before an item goes to the dead-letter queue")  # fmt: skip
@click.option("--backoff", default=1.0, show_default=True, type=click.FloatRange(0),
              help="seconds before the first retry; doubling, with full jitter")  # fmt: skip
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="seconds work in progress may take to finish once stopping")  # fmt: skip
@click.option("--drain", is_flag=True,
              help="stop once the queue is empty, not at its shutdown")  # fmt: skip
@click.option("--serializer", type=click.Choice(["msgpack", "json", "raw", "pickle"]),
              default=None, help="how items are encoded (default: msgpack)")  # fmt: skip
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=None,
              help="seconds one handler call may take; past it the item counts as failed "
                   "and its worker is replaced")  # fmt: skip
@click.option("--max-tasks-per-child", type=click.IntRange(1), default=None,
              help="process workers: replace a process after this many items")  # fmt: skip
@click.option("--max-memory-per-child", type=click.IntRange(1), default=None, metavar="MIB",
              help="process workers: replace a process whose resident memory passed this "
                   "many MiB after an item")  # fmt: skip
@click.option("--poison-after", type=click.IntRange(1), default=3, show_default=True,
              help="an item that killed this many worker processes goes to QUEUE.dead "
                   "(reason worker_died)")  # fmt: skip
@click.option("--quiet", is_flag=True, help="no live display; a summary at the end")
def worker(url: str, handler: str, concurrency: int | None, mode: str, attempts: int,
           backoff: float, grace: float, drain: bool, serializer: str | None,
           time_limit: float | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, poison_after: int,
           quiet: bool) -> None:  # fmt: skip
    """Run HANDLER (module:function) on every item of the queue at URL.

    \b
    Success acks the item; an exception retries it with exponential backoff,
    and after --attempts deliveries sends it to QUEUE.dead with the error.
    --mode auto measures the first items: CPU-bound handlers get processes
    (the GIL lets one thread compute at a time), waiting ones threads,
    async def ones coroutines. It says which, and why.

    \b
    It keeps running through broker restarts and lost connections (taking is
    retried with backoff, a failed ack is logged: that item comes back), and
    replaces a worker that dies. --time-limit stops a handler call that runs
    too long (a process is killed, a thread abandoned) and retries its item.

    \b
    Stops when the queue is shut down and drained (or, with --drain, empty),
    or on SIGTERM/Ctrl-C, to it or to its whole process group (systemctl
    stop): work in progress finishes (--grace), then is given back; the rest
    stays in the queue. Exit code 0 when it stopped as asked (or the queue
    was shut down); 1 when it failed (bad token, the queue closed, an
    unsupported call, an async handler run with --mode thread or process):
    the summary says why.

    \b
    Examples:
      pigeon worker pigeon://127.0.0.1:7878/jobs myapp.tasks:handle
      pigeon worker redis://127.0.0.1:6379/emails myapp.mail:send -c 16 --mode thread
      pigeon worker pigeon://127.0.0.1:7878/jobs myapp.tasks:handle --drain
      pigeon worker pigeon://127.0.0.1:7878/jobs myapp.img:resize --mode process \\
          --time-limit 60 --max-tasks-per-child 1000 --max-memory-per-child 500
    """
    fn = _load(handler)
    options: dict[str, Any] = {} if serializer is None else {"serializer": serializer}
    try:
        q: pigeon.Queue[Any] = pigeon.Queue(url, **options)
    except (pigeon.PigeonError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    counts = ConsumeProgress()
    started = time.monotonic()
    shown: dict[str, Any] = {
        "mode": "measuring",
        "reason": "auto: measuring the first items",
        "n": 0,
    }

    def on_start(m: str, why: str, n: int) -> None:
        shown.update(mode=m, reason=why, n=n)

    if drain:

        def watch_empty() -> None:
            empty_checks = 0
            while not stop.wait(0.5):
                with counts.lock:
                    busy = bool(counts.in_progress)
                try:
                    empty = q.qsize() == 0 and not busy
                except pigeon.PigeonError:
                    continue
                empty_checks = empty_checks + 1 if empty else 0
                if empty_checks >= 2:
                    stop.set()

        threading.Thread(target=watch_empty, daemon=True).start()

    console = Console(stderr=True)
    retry = pigeon.Retry(attempts=attempts, backoff=backoff)

    def run() -> pigeon.ConsumeReport:
        return consume(
            q, fn, concurrency=concurrency, mode=mode, retry=retry, stop=stop, grace=grace,
            time_limit=time_limit, max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child and max_memory_per_child * 2**20,
            poison_after=poison_after, on_start=on_start, progress=counts,
        )  # fmt: skip

    try:
        if quiet or not console.is_terminal:
            report = run()
        else:
            with Live(console=console, refresh_per_second=4) as live:
                done = threading.Event()

                def paint() -> None:
                    while not done.wait(0.25):
                        live.update(
                            _view(counts, started, shown["mode"], shown["reason"], shown["n"])
                        )

                painter = threading.Thread(target=paint, daemon=True)
                painter.start()
                try:
                    report = run()
                finally:
                    done.set()
                    painter.join()
    except (pigeon.PigeonError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        stop.set()
        q.close()
    extra = ""
    if report.timed_out or report.worker_deaths or report.workers_recycled:
        extra = (
            f"; workers: {report.worker_deaths} died, {report.timed_out} past the time "
            f"limit, {report.workers_recycled} recycled"
        )
    click.echo(
        f"processed {report.processed}, failed {report.failed} ({report.retried} retried, "
        f"{report.dead} dead) in {report.elapsed:.1f} s with {report.mode} workers{extra}: "
        f"{report.reason}",
        err=True,
    )
    if report.ended == "failed":
        sys.exit(1)
