"""The nemesis's checker: Jepsen's queue checker over the clients' logs (no I/O but reading).

- **lost**: acknowledged writes never delivered. 0 unless the broker may lose confirmed
  puts (``--memory``, ``--fsync never``).
- **unexpected**: delivered ids never attempted. Always 0.
- **dup**: deliveries minus distinct ids delivered: at-least-once allows them; reported.
- **dedup-twice**: ids put with a dedup id (their own) that were acked successfully twice or
  more: two stored copies within the window, or an ack lost. 0 unless the broker may lose.
- **resurrected**: ids delivered after the final drain, a kill -9 and a restart. 0 unless
  the broker may lose (a lost ack brings its message back).
- **hangs**: processes that did not stop, a queue that did not drain, a client that did not
  work again after the last heal. Always none.
- **foreign**: exceptions from a call that are no ``pigeon.PigeonError``. Always none.
- **errors**: unhandled exceptions in the broker's log, anything a client process printed
  (a traceback, an asyncio complaint, a warning), a client that exited before it was asked
  to, a SIGTERM after which the broker did not exit 0. Always none.
- **indeterminate**: attempted, never acknowledged (the call raised, or its process was
  killed); how many of them were delivered anyway is reported beside it.
- **worst overrun**: the call that exceeded its timeout the most (by more than 2 s).

The log records are described in ``_nemesis_clients.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEDUP_LETTERS = "DB"  # ids of the producers that put with dedup ids (_nemesis_clients.ROLES)


@dataclass
class History:
    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    deliveries: Counter[str] = field(default_factory=Counter)
    acks: Counter[str] = field(default_factory=Counter)
    ack_failures: int = 0
    overruns: list[tuple[float, str, float]] = field(default_factory=list)  # overrun, op, timeout
    foreign: list[str] = field(default_factory=list)

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            parts = line.split()
            if len(parts) < 2 or not line.endswith("\n"):
                continue  # a record cut short by a kill: not written, so not counted
            kind, fields = parts[1], parts[2:]
            if kind == "a":
                self.attempted.add(fields[0])
            elif kind == "k":
                self.acked.add(fields[0])
            elif kind == "d":
                self.deliveries[fields[0]] += 1
            elif kind == "s":
                self.acks[fields[0]] += 1
            elif kind == "f":
                self.ack_failures += 1
            elif kind == "o":
                took, timeout = float(fields[1]), float(fields[2])
                self.overruns.append((took - timeout, fields[0], timeout))
            elif kind == "F":
                self.foreign.append(" ".join(fields))

    def read(self, paths: Iterable[Path]) -> History:
        for path in paths:
            with open(path, errors="replace") as f:
                self.feed(f)
        return self


@dataclass(frozen=True)
class Verdict:
    attempted: int
    acked: int
    delivered: int
    deliveries: int
    lost: tuple[str, ...]
    unexpected: tuple[str, ...]
    indeterminate: int
    indeterminate_delivered: int
    dedup_twice: tuple[str, ...]
    resurrected: tuple[str, ...]
    hangs: tuple[str, ...]
    foreign: tuple[str, ...]
    errors: tuple[str, ...]
    acks_refused: int
    worst_overrun: tuple[float, str, float] | None

    @property
    def duplicates(self) -> int:
        return self.deliveries - self.delivered

    def problems(self, may_lose: bool) -> list[str]:
        """What broke a promise; ``may_lose``: the broker was not asked to keep confirmed
        puts across kill -9 (``--memory``, ``--fsync never``)."""
        out = []
        if self.lost and not may_lose:
            out.append(f"lost {len(self.lost)} acknowledged writes, e.g. {list(self.lost[:5])}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected deliveries: {list(self.unexpected[:5])}")
        if self.dedup_twice and not may_lose:
            out.append(f"dedup ids acked twice: {list(self.dedup_twice[:5])}")
        if self.resurrected and not may_lose:
            out.append(f"resurrected after the drain: {list(self.resurrected[:5])}")
        out += [f"hang: {h}" for h in self.hangs]
        out += [f"error outside pigeon's hierarchy: {f}" for f in self.foreign[:5]]
        out += [f"error: {e}" for e in self.errors[:5]]
        return out


def check(
    history: History,
    resurrected: History,
    hangs: Iterable[str] = (),
    errors: Iterable[str] = (),
) -> Verdict:
    delivered = set(history.deliveries)
    indeterminate = history.attempted - history.acked
    overruns = sorted(history.overruns + resurrected.overruns)
    return Verdict(
        attempted=len(history.attempted),
        acked=len(history.acked),
        delivered=len(delivered),
        deliveries=sum(history.deliveries.values()),
        lost=tuple(sorted(history.acked - delivered)),
        unexpected=tuple(sorted((delivered | set(resurrected.deliveries)) - history.attempted)),
        indeterminate=len(indeterminate),
        indeterminate_delivered=len(indeterminate & delivered),
        dedup_twice=tuple(
            sorted(i for i, n in history.acks.items() if n > 1 and i[0] in DEDUP_LETTERS)
        ),
        resurrected=tuple(sorted(resurrected.deliveries)),
        hangs=tuple(hangs),
        foreign=tuple(history.foreign + resurrected.foreign),
        errors=tuple(errors),
        acks_refused=history.ack_failures,
        worst_overrun=overruns[-1] if overruns else None,
    )


HEADER = (
    "| store, fsync | nemesis drew from | s | faults / broker starts | attempted | acked "
    "| delivered | lost | dup | unexpected | indeterminate (delivered) | dedup-twice "
    "| resurrected | hangs | acks refused | worst overrun | verdict |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(v: Verdict, setup: str, drew: str, seconds: float, faults: int, starts: int,
        may_lose: bool) -> str:  # fmt: skip
    """One line of the table under ``HEADER``."""
    over = "-"
    if v.worst_overrun is not None:
        by, op, timeout = v.worst_overrun
        over = f"{op}(timeout={timeout:g}) +{by:.1f} s"
    problems = v.problems(may_lose)
    verdict = "FAIL" if problems else "ok"
    if may_lose and v.lost:
        verdict += " (losses allowed here)"
    cells = [setup, drew, f"{seconds:.0f}", f"{faults} / {starts}", v.attempted, v.acked,
             v.delivered, f"**{len(v.lost)}**", v.duplicates, f"**{len(v.unexpected)}**",
             f"{v.indeterminate} ({v.indeterminate_delivered})", len(v.dedup_twice),
             len(v.resurrected), len(v.hangs), v.acks_refused, over, verdict]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"
