"""The queue contract as code: ``check_queue(make_queue)`` proves a backend conforms.

``make_queue(maxsize=0)`` must return a fresh, empty ``pigeon.Queue``. Every check runs
on the synchronous face and, through ``pigeon.AsyncQueue(q)``, on the asyncio face. A
check that meets ``pigeon.Unsupported`` passes only if the backend says so in
``unsupported`` (the names of the calls it cannot offer): an unsupported call must say
so with that exception, never fail some other way.

    from pigeon.testing import check_queue
    check_queue(lambda maxsize=0: MyQueue("my://host/q", maxsize=maxsize))

pigeon's own test-suite runs these same checks, one pytest test each, against every
backend (``tests/conformance``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pigeon.errors import Unsupported
from pigeon.testing._checks import ASYNC_CHECKS, SYNC_CHECKS, MakeQueue

__all__ = ["ASYNC_CHECKS", "SYNC_CHECKS", "CheckReport", "MakeQueue", "check_queue", "run_check"]


@dataclass
class CheckReport:
    """What ``check_queue`` found: names of checks passed and declared unsupported."""

    passed: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


def run_check(
    check: Callable[[MakeQueue], None], make_queue: MakeQueue, unsupported: Iterable[str] = ()
) -> bool:
    """Run one check; True if it passed, False if it met a declared ``Unsupported``.

    Raises:
        AssertionError: the backend broke the contract (including an undeclared
            ``Unsupported``).
    """
    declared = set(unsupported)
    try:
        check(make_queue)
    except Unsupported as exc:
        needs = set(getattr(check, "needs", ()))
        if needs & declared:
            return False
        raise AssertionError(
            f"{check.__name__}: raised Unsupported ({exc}) but the backend did not declare "
            f"any of {sorted(needs) or ['(nothing optional)']} unsupported"
        ) from exc
    return True


def check_queue(
    make_queue: MakeQueue,
    *,
    unsupported: Iterable[str] = (),
    faces: Iterable[str] = ("sync", "async"),
) -> CheckReport:
    """Run the whole contract against ``make_queue``; raise AssertionError on a breach."""
    report = CheckReport()
    suites = {"sync": SYNC_CHECKS, "async": ASYNC_CHECKS}
    for face in faces:
        for name, check in suites[face].items():
            ok = run_check(check, make_queue, unsupported)
            (report.passed if ok else report.unsupported).append(f"{face}:{name}")
    return report
