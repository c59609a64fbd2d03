"""Fault injection for the local queue's tests: act (raise, or SIGKILL the process) at the
n-th point of the local queue's own code where CPython could run a signal handler, and
run a test on the C or the pure-Python path."""

from __future__ import annotations

import ast
import functools
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from pigeon.backends import local as local_pkg
from pigeon.backends.local import lock, shared
from pigeon.backends.local import queue as local_queue

# the local queue's own code: its package
_OURS = os.path.dirname(local_pkg.__file__ or "")


@functools.cache
def quiet_lines(filename: str) -> frozenset[int]:
    """The lines of ``filename`` at whose start no pending signal can be handled.

    CPython runs signal handlers at a function's entry, after a call returns and at
    backward jumps (the other interruption points below cover those). A ``try:`` is a NOP
    ahead of its protected range; a ``return`` without a call in it, a ``break`` or a
    ``continue`` leaves the range (running a ``finally`` on the way) with no call first;
    and the first statement of an ``except`` or ``finally`` block starts with no call
    either. An interruption "there" is one after the call before, which the other points
    model."""
    with open(filename) as f:
        tree = ast.parse(f.read())
    quiet: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            quiet.add(node.lineno)
            for block in [node.finalbody, *(h.body for h in node.handlers)]:
                if block:
                    quiet.add(block[0].lineno)
        elif isinstance(node, ast.Break | ast.Continue) or (
            isinstance(node, ast.Return)
            and not any(isinstance(n, ast.Call) for n in ast.walk(node))
        ):
            quiet.add(node.lineno)
    return frozenset(quiet)


class Fault:
    """Acts at the n-th point of the local queue's code run in this thread: the start of
    each line (but the ones above), and the return of each C function it calls (where
    CPython handles a pending signal, with the call's effect done and its result lost)."""

    def __init__(
        self, n: int, action: Callable[[], None], within: frozenset[str] | None = None
    ) -> None:
        self.left = n
        self.action = action
        self.within = within  # count only the points of functions of these names
        self.fired = False
        self.where = ""  # the function it fired in: "module.py:function"

    def __enter__(self) -> Fault:
        sys.setprofile(self._profile)
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)
        sys.setprofile(None)

    def _point(self, frame: FrameType) -> None:
        if not self.fired and (self.within is None or frame.f_code.co_name in self.within):
            self.left -= 1
            if self.left == 0:
                self.fired = True
                code = frame.f_code
                self.where = f"{os.path.basename(code.co_filename)}:{code.co_name}"
                self.action()

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename.startswith(_OURS):
            return self._line
        return None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno not in quiet_lines(frame.f_code.co_filename):
            self._point(frame)
        return self._line

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_return" and frame.f_code.co_filename.startswith(_OURS):
            self._point(frame)


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the local queue on ``path``: "c" (the fast path, where it is built) or "pure"
    (the pure-Python path with the ctypes mutex), for queues made from now on."""
    if path == "pure":
        monkeypatch.setattr(local_queue, "C", None)
        if shared.MUTEX is not None:
            monkeypatch.setattr(shared, "MUTEX", lock.ctypes_mutex())
    elif local_queue.C is None:
        pytest.skip("the C fast path is not built here (CI builds it and runs this)")
