"""Which of pigeon's modules run compiled, and the switch back to their Python source.

The broker's per-request path (its rules in ``pigeon.server.core``, the connection layer, the
server half of the protocol and the length-prefixed framing) is plain, fully annotated Python
that the build compiles with mypyc where it can (hatch_build.py): the same code, run as C,
about a third fewer instructions per request. The source stays the reference, and is what
runs when:

- ``PIGEON_PURE_PYTHON=1`` is set (the tests run both paths; it also turns off the C ring
  of the local queue, see ``pigeon._native``);
- nothing was compiled here (no C compiler, no mypyc, ``PIGEON_PURE_PYTHON`` set at build);
- a source file changed since it was compiled (an edited checkout): the compiled modules
  call each other directly, so one stale module means none of them is used, and a warning
  says to rebuild.

The build writes a manifest beside this file (one per interpreter ABI) with the SHA-256 of
each compiled source; the compiled modules are used only when every hash still matches.
This module must import nothing from pigeon: it runs first, and hatch_build.py loads it by
path to read ``MODULES``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules the build compiles (each plain Python, annotated, with no class that an
# interpreted module subclasses and no msgspec Struct: a compiled module keeps annotations
# only as plain types, so the broker's Structs live in pigeon.server.core.message).
MODULES = (
    "pigeon.framing.length_prefixed",
    "pigeon.protocol.rules",
    "pigeon.protocol.server",
    "pigeon.server.app",
    "pigeon.server.commit_gate",
    "pigeon.server.connection",
    "pigeon.server.core.admin",
    "pigeon.server.core.admission",
    "pigeon.server.core.broker",
    "pigeon.server.core.deadlines",
    "pigeon.server.core.delivery",
    "pigeon.server.core.holdings",
    "pigeon.server.core.model",
    "pigeon.server.core.placement",
    "pigeon.server.core.recovery",
    "pigeon.server.core.requeue",
    "pigeon.server.core.settings",
    "pigeon.server.core.settlement",
    "pigeon.server.core.state",
    "pigeon.server.core.tasks",
)

HERE = Path(__file__).resolve().parent


def source(module: str, root: Path = HERE) -> Path:
    """The ``.py`` file of one of ``MODULES`` under the package directory ``root``."""
    return root.joinpath(*module.split(".")[1:]).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_path(root: Path = HERE) -> Path:
    """Where the build records what it compiled for this interpreter's ABI."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return root / f"_compiled{suffix.removesuffix('.so').removesuffix('.pyd')}.json"


def write_manifest(root: Path = HERE) -> Path:
    """Record the hash of each compiled source (called by the build once it compiled them)."""
    path = manifest_path(root)
    path.write_text(json.dumps({m: digest(source(m, root)) for m in MODULES}, indent=1) + "\n")
    return path


def _why_not() -> str | None:
    """None when the compiled modules can be used; else why not (None-or-reason)."""
    if os.environ.get("PIGEON_PURE_PYTHON"):
        return "PIGEON_PURE_PYTHON is set"
    try:
        built = json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return "nothing was compiled for this interpreter"
    except (OSError, ValueError) as exc:
        return f"its manifest is unreadable ({exc})"
    for module in MODULES:
        try:
            if built.get(module) != digest(source(module)):
                return f"{source(module)} changed since it was compiled"
        except OSError:
            return f"{source(module)} is missing"
    return None


class _SourceFirst:
    """A meta-path finder that loads ``MODULES`` from their ``.py`` source even where a
    compiled extension sits beside it (the import system would prefer the extension)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NAMES or not path:
            return None
        name = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            candidate = os.path.join(entry, name)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


_NAMES = frozenset(MODULES)
reason: str | None = None  # why the compiled modules are not used (None: they are, if built)


def choose() -> bool:
    """Use the compiled modules if they are built and current; else make every one of
    ``MODULES`` load from source. Returns whether compiled modules may be used. Called by
    ``pigeon/__init__`` before anything imports them."""
    global reason
    reason = _why_not()
    if reason is None:
        return True
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())
    if "changed since" in reason or "missing" in reason or "unreadable" in reason:
        logging.getLogger("pigeon").warning(
            "pigeon's compiled modules are not used: %s; the Python source runs instead "
            "(rebuild with `pip install -e .` or `make` to compile them again)",
            reason,
        )
    return False


def describe() -> str:
    """What runs the broker's modules here, for the log line a broker starts with."""
    if compiled():
        return "its modules compiled"
    return f"its modules run as Python: {reason or 'they are not compiled here'}"


def compiled() -> bool:
    """Whether the broker's modules run compiled in this process (for diagnostics)."""
    mod = sys.modules.get("pigeon.server.core.broker")
    if mod is None:
        return reason is None and manifest_path().exists()
    return not (getattr(mod, "__file__", "") or "").endswith(".py")


# pigeon/__init__ imports this module first; the build reads it by path (another name)
if __name__ == "pigeon._compiled":
    choose()
