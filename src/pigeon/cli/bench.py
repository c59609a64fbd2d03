"""``pigeon bench``: measure, on this machine, instead of assuming."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pigeon.cli import concurrency


@click.group()
def bench() -> None:
    """Benchmarks that run on your own machine.

    \b
    Examples:
      pigeon bench concurrency                 threads vs processes vs coroutines
      pigeon bench concurrency --plot gil.png  the same, and a chart
    """


@bench.command("concurrency")
@click.option(
    "-n",
    "--workers",
    type=click.IntRange(1, 64),
    default=os.cpu_count() or 2,
    show_default=True,
    help="workers of each kind (compared with 1 worker of the same kind)",
)
@click.option(
    "--cpu-tasks",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="CPU-bound tasks (pure-Python arithmetic)",
)
@click.option(
    "--cpu-size",
    type=click.IntRange(1),
    default=300_000,
    show_default=True,
    help="loop iterations per CPU task",
)
@click.option(
    "--io-tasks",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="I/O-bound tasks (each waits 20 ms)",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write a bar chart of the speed-ups to this PNG",
)
def concurrency_command(
    workers: int, cpu_tasks: int, cpu_size: int, io_tasks: int, plot: Path | None
) -> None:
    """Threads vs processes vs coroutines, for CPU-bound and I/O-bound work.

    \b
    The same pure-Python CPU job and the same I/O job (a 20 ms wait) run
    through pigeon queues on 1 and on N threads, processes and coroutines.
    Expect: CPU work speeds up only with processes (the GIL lets one thread
    run Python bytecode at a time, and coroutines share one thread);
    I/O work speeds up with all three, since waiting releases the GIL;
    the last rows run one thread or one coroutine per I/O task.

    \b
    Example:
      pigeon bench concurrency -n 4 --plot gil.png
    """
    plan = [
        (job, mode, n)
        for job in ("cpu", "io")
        for mode in ("threads", "processes", "coroutines")
        for n in sorted({1, workers})
    ]
    # many waits at once: where coroutines shine (a thread each would cost far more memory)
    plan += [("io", mode, io_tasks) for mode in ("threads", "coroutines") if io_tasks > workers]
    results: dict[tuple[str, str, int], float] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("measuring", total=len(plan))
        for job, mode, n in plan:
            progress.update(bar, description=f"{job} on {n} {mode}")
            count, size = (cpu_tasks, cpu_size) if job == "cpu" else (io_tasks, 0)
            results[job, mode, n] = concurrency.run_one(job, mode, n, count, size).seconds
            progress.advance(bar)
    table = Table(
        "job",
        "kind",
        "workers",
        "wall time (s)",
        "speed-up over 1",
        title=f"threads vs processes vs coroutines ({os.cpu_count()} CPUs)",
    )
    speedups: dict[str, dict[str, float]] = {"cpu": {}, "io": {}}
    for job, mode, n in plan:
        up = results[job, mode, 1] / results[job, mode, n]
        table.add_row(job, mode, str(n), f"{results[job, mode, n]:.3f}", f"{up:.2f}×")
        if n == workers:
            speedups[job][mode] = up
    Console().print(table)
    if plot is not None:
        _plot(plot, speedups, workers)
        click.echo(f"plot written to {plot}")


def _plot(path: Path, speedups: dict[str, dict[str, float]], workers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise click.ClickException(
            "--plot needs matplotlib: pip install 'pigeon-queue[bench]'"
        ) from exc
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (job, values) in zip(axes, speedups.items(), strict=True):
        ax.bar(list(values), list(values.values()), color=["#4477aa", "#ee6677", "#228833"])
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_title(f"{job}-bound, {workers} workers")
        ax.set_ylabel("speed-up over 1 worker")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
