"""Shared output for the benchmarks: a rich table and a matplotlib bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*(f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row))
    Console().print(t)


def bars(path: Path, title: str, groups: dict[str, dict[str, float]], unit: str) -> Path:
    """One subplot per group, one bar per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    _short = FuncFormatter(
        lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e4 else f"{v:g}"
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], groups.items(), strict=True):
        labels = list(values)
        ax.barh(labels, [values[k] for k in labels], color="#4477aa")
        ax.set_title(name)
        ax.set_xlabel(unit)
        ax.xaxis.set_major_formatter(_short)
        ax.locator_params(axis="x", nbins=5)
        ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
