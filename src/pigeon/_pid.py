"""This process's id, read without a system call.

glibc stopped caching ``getpid()`` (2.25), so ``os.getpid()`` is a system call, and the
clients compare it on every request to notice that they run in a fork child. The id is
read once and again in each fork child (``os.register_at_fork``).

Inside ``os.fork`` the child runs code before the fork hooks - the finalizers of the other
threads' locals, such as a thread's connection being closed - and there this still says
the parent's id: code that can run there (closing) asks ``os.getpid()``.
"""

from __future__ import annotations

import os

__all__ = ["current_pid"]

_pid = os.getpid()


def current_pid() -> int:
    """``os.getpid()``, kept up to date across ``fork``."""
    return _pid


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
