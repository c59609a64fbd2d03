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

# The modules the build compiles: the broker's, none of pigeon's public API. Each is plain
# annotated Python with no msgspec Struct (a compiled module keeps annotations only as
# plain types: the broker's Structs live in pigeon.server.core.message), and no class of
# theirs is subclassed (a compiled class cannot be, by Python code: they are ``@final``).
# Compiled code checks a value against its annotation where pure Python would not look
# (``ServerConfig`` makes its numbers the types it declares), and calls the methods of a
# compiled class directly: a test must not patch them (patch what they call instead).
MODULES = (
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
SHARED = "pigeon__mypyc"  # the compiled modules' shared library, beside the package


def source(module: str, root: Path = HERE) -> Path:
    """The ``.py`` file of one of ``MODULES`` under the package directory ``root``."""
    return root.joinpath(*module.split(".")[1:]).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _suffix() -> str:
    """This interpreter's extension-module suffix (``.cpython-311-x86_64-linux-gnu.so``)."""
    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def manifest_path(root: Path = HERE) -> Path:
    """Where the build records what it compiled for this interpreter's ABI."""
    return root / f"_compiled{_suffix().removesuffix('.so').removesuffix('.pyd')}.json"


def digests(root: Path = HERE) -> dict[str, str]:
    """The hash of each source to compile (taken before compiling: a file saved while the
    build runs must not be recorded as what was compiled)."""
    return {m: digest(source(m, root)) for m in MODULES}


def failure_note(root: Path = HERE) -> Path:
    """Where an in-tree build that tried to compile and failed leaves its error."""
    return root.parent.parent / "build" / f"mypyc-{sys.implementation.cache_tag}" / "failed.txt"


def shared_library(root: Path = HERE) -> Path:
    return root.parent / f"{SHARED}{_suffix()}"


def write_manifest(sources: dict[str, str], root: Path = HERE) -> Path:
    """Record what was compiled (called by the build once it compiled ``sources``): each
    source's hash and the shared library's size."""
    path = manifest_path(root)
    lib = shared_library(root)
    built = {"sources": sources, "shared": lib.stat().st_size if lib.exists() else None}
    path.write_text(json.dumps(built, indent=1) + "\n")
    return path


def _why_not() -> str | None:
    """None when the compiled modules can be used; else why not."""
    if os.environ.get("PIGEON_PURE_PYTHON"):
        return "PIGEON_PURE_PYTHON is set"
    try:
        built = json.loads(manifest_path().read_text())
    except FileNotFoundError:
        failed = failure_note()
        if failed.is_file():
            return f"nothing was compiled for this interpreter: {failed.read_text().strip()}"
        return "nothing was compiled for this interpreter"
    except (OSError, ValueError) as exc:
        return f"its manifest is unreadable ({exc})"
    if not isinstance(built, dict) or not isinstance(built.get("sources"), dict):
        return "its manifest is not one this version writes"
    lib = shared_library()
    spec = importlib.util.find_spec(SHARED)  # what the compiled modules would load
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != lib.resolve():
        where = spec.origin if spec is not None else "nowhere"
        return f"their shared library {lib.name} is not beside the package (found: {where})"
    if lib.stat().st_size != built.get("shared"):
        return f"their shared library {lib} is not the one built with them"
    for module in MODULES:
        path = source(module)
        try:
            if built["sources"].get(module) != digest(path):
                return f"{path} changed since it was compiled"
        except FileNotFoundError:  # a compiled-only install: the compiled module is all
            if not path.with_name(path.stem + _suffix()).exists():  # (this ABI's)
                return f"{path} is missing, and not compiled either"
        except OSError as exc:
            return f"{path} cannot be read ({exc})"
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
        # not its compiled module alone: the others run as Python and cannot be mixed with it
        raise ImportError(
            f"{fullname} has no Python source here, so it cannot run as Python ({reason}); "
            "reinstall pigeon",
            name=fullname,
        )


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
    if not reason.startswith(("PIGEON_PURE_PYTHON", "nothing was compiled")):
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
