"""Jepsen-style: the broker in a network namespace, clients on the host side, one fault at
a time - partitions (every client, some, one direction), packet loss and duplication, a
slow link, netem delay where the kernel has it, the broker killed (also with a backlog),
paused past its heartbeat, a producer killed inside a call, a consumer killed holding a
message - then a drain, a last kill -9 and restart, and Jepsen's queue checker over what
every client logged (``_nemesis.py``, ``_nemesis_check.py``).

Bounded: ``PIGEON_NEMESIS_SECONDS`` of faults (default 60), each kind once in an order
drawn from the seed (``PIGEON_NEMESIS_SEED``, random when unset, printed on failure).
``python scripts/nemesis.py`` runs the same for longer.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.faults._nemesis import CI_FAULTS, FAULTS, Options, nemesis, plan
from tests.faults._nemesis_check import HEADER, History, Verdict, check, row
from tests.faults._netns import require_netns

SECONDS = float(os.environ.get("PIGEON_NEMESIS_SECONDS", "60"))


def history(*records: str) -> History:
    h = History()
    h.feed(f"1.0 {r}\n" for r in records)
    return h


# --- the checker ----------------------------------------------------------------------------


def test_the_checker_counts_an_acknowledged_write_never_delivered_as_lost() -> None:
    v = check(history("a P1.1", "k P1.1", "a P1.2", "k P1.2", "d P1.2 1"), History())
    assert v.lost == ("P1.1",)
    assert v.problems(may_lose=False) == ["lost 1 acknowledged writes, e.g. ['P1.1']"]
    assert v.problems(may_lose=True) == []


def test_the_checker_counts_unexpected_deliveries_and_duplicates() -> None:
    v = check(history("a P1.1", "k P1.1", "d P1.1 1", "d P1.1 2", "d X9.9 1"), History())
    assert v.unexpected == ("X9.9",) and v.duplicates == 1 and v.lost == ()
    assert v.problems(may_lose=True) == ["1 unexpected deliveries: ['X9.9']"]


def test_the_checker_counts_dedup_ids_acked_twice_but_not_plain_ids() -> None:
    records = ["a D1.1", "k D1.1", "a P1.1", "k P1.1"]
    records += ["d D1.1 1", "s D1.1", "d D1.1 1", "s D1.1", "d P1.1 1", "s P1.1"]
    records += ["d P1.1 1", "s P1.1"]
    v = check(history(*records), History())
    assert v.dedup_twice == ("D1.1",)
    assert v.duplicates == 2


def test_the_checker_reports_indeterminate_writes_and_which_were_delivered() -> None:
    records = ["a P1.1", "i P1.1 BrokenResourceError", "a P1.2", "a P1.3", "d P1.1 1"]
    v = check(history(*records), History())
    assert (v.attempted, v.acked, v.indeterminate, v.indeterminate_delivered) == (3, 0, 3, 1)
    assert v.problems(may_lose=False) == []


def test_the_checker_reports_resurrected_hangs_errors_and_the_worst_overrun() -> None:
    h = history("a P1.1", "k P1.1", "d P1.1 1", "o get 9.5 2", "o put 3.1 1", "F get OSError:'x'")
    v = check(h, history("d P1.1 2"), ["consumer did not stop"], ["Traceback (most recent...)"])
    assert v.resurrected == ("P1.1",)
    assert v.worst_overrun == (7.5, "get", 2.0)
    assert len(v.problems(may_lose=False)) == 4
    assert len(v.problems(may_lose=True)) == 3  # a lost ack may bring a message back then


def test_the_checker_ignores_a_record_cut_short_by_a_kill() -> None:
    h = History()
    h.feed(["1.0 a P1.1\n", "1.1 k P1.1\n", "1.2 d P1.1 1\n", "1.3 k P1."])
    assert check(h, History()).lost == ()


def test_a_table_row_says_fail_and_counts_what_it_found() -> None:
    v = check(history("a P1.1", "k P1.1"), History())
    line = row(v, "log, always", "all", 60, 12, 3, may_lose=False)
    assert line.count("|") == HEADER.splitlines()[0].count("|")
    assert line.endswith("| FAIL |") and "| **1** |" in line


# --- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize("have_netem", [True, False])
def test_a_ci_plan_makes_each_fault_once_within_its_seconds(
    tmp_path: Path, have_netem: bool
) -> None:
    opts = Options(workdir=tmp_path, seconds=60, heartbeat=1.0)
    for seed in range(200):
        faults = plan(opts, random.Random(seed), have_netem)
        kinds = sorted(f.kind for f in faults)
        assert kinds == sorted(k for k in CI_FAULTS if have_netem or k != "netem")
        assert sum(f.seconds + f.calm for f in faults) <= 60
        (pause,) = [f for f in faults if f.kind == "pause"]
        assert pause.seconds > opts.heartbeat


def test_a_long_plan_draws_faults_until_its_seconds_are_spent(tmp_path: Path) -> None:
    opts = Options(workdir=tmp_path, seconds=300, faults=tuple(FAULTS), every_once=False)
    faults = plan(opts, random.Random(7), have_netem=False)
    total = sum(f.seconds + f.calm for f in faults)
    assert 200 < total <= 300
    assert "netem" not in {f.kind for f in faults}
    assert all(f.seconds > opts.lease for f in faults if f.kind == "stop-consumer")


# --- the runs -------------------------------------------------------------------------------


def run_nemesis(tmp_path: Path, **options: object) -> tuple[Options, Verdict, str]:
    require_netns("ip", "nft", "tc")
    seed = int(os.environ.get("PIGEON_NEMESIS_SEED", random.randrange(2**32)))
    opts = Options(workdir=tmp_path, seed=seed, **options)  # type: ignore[arg-type]
    with nemesis(opts) as run:
        verdict = run.go()
        line = row(verdict, opts.setup, ", ".join(opts.faults), run.planned_seconds,
                   run.faults_done, run.broker.starts, opts.may_lose)  # fmt: skip
    table = f"{HEADER}\n{line}"
    print(f"\n{table}\nseed {seed} (PIGEON_NEMESIS_SEED={seed} replays the plan)")
    return opts, verdict, f"seed {seed}, logs in {tmp_path}\n{table}"


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 900)
def test_no_acknowledged_write_is_lost_under_the_nemesis(tmp_path: Path) -> None:
    opts, verdict, where = run_nemesis(tmp_path, seconds=SECONDS, fsync="always")
    assert verdict.problems(opts.may_lose) == [], where
    assert verdict.acked > 1000 and verdict.delivered >= verdict.acked, where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_checker_catches_a_broker_that_keeps_nothing_losing_writes(tmp_path: Path) -> None:
    """The control: the same clients against ``--memory``, killed with a backlog waiting.
    The checker must see the loss, or a clean verdict above would prove nothing."""
    _, verdict, where = run_nemesis(
        tmp_path, seconds=10, memory=True, faults=("kill-backlog", "kill")
    )
    assert verdict.lost, where
    assert verdict.problems(may_lose=False)[0].startswith("lost "), where
    assert not verdict.unexpected and not verdict.hangs, where
