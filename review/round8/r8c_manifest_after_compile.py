"""r8c: the build hashes the sources *after* mypyc compiled them. ``compile_modules``
(hatch_build.py) runs mypycify + the C compiler (minutes: 4,120 lines into one C file,
-O3), then ``write_manifest`` reads the sources again. A source saved during the build -
an editor's save, a ``git checkout``/``git pull`` while ``pip install -e .`` or ``make``
runs - is compiled as it was, and recorded as it is now: the manifest then vouches for
the edited file, ``_why_not`` finds every hash current, and the old compiled code runs
with no warning, for good (until the next build). The check exists for exactly this
case ("an edited checkout runs its source").

This runs the real ``compile_modules`` on a copy of the tree with mypyc replaced by a
stand-in that notes the hash of each source as mypyc would read it, then edits one (as a
save during the compile would), and compiles nothing. Exit 1 while the manifest records a
hash other than the one of the source that was compiled.
Run: PYTHONPATH=src python review/round8/r8c_manifest_after_compile.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import ROOT


def main() -> int:
    try:
        import mypyc.build
    except ImportError:
        print("mypyc is not installed here")
        return 2
    # hatch_build imports hatchling's hook base class (not needed to run compile_modules)
    for name in (
        "hatchling",
        "hatchling.builders",
        "hatchling.builders.hooks",
        "hatchling.builders.hooks.plugin",
        "hatchling.builders.hooks.plugin.interface",
    ):
        mod = sys.modules.setdefault(name, types.ModuleType(name))
    mod.BuildHookInterface = type("BuildHookInterface", (), {})  # type: ignore[attr-defined]
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rvc-manifest-") as tmp:
        root = Path(tmp)
        shutil.copy2(ROOT / "hatch_build.py", root / "hatch_build.py")
        shutil.copytree(ROOT / "src" / "pigeon", root / "src" / "pigeon",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.json"))  # fmt: skip
        sys.path.insert(0, str(root))
        import hatch_build
        import mypyc.build

        def mypycify(paths: list[str], **kwargs: object) -> list[object]:
            for p in paths:  # what mypyc reads, relative to src/ (the cwd here)
                seen[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            edited = Path("pigeon/server/core/delivery.py")  # saved while the C compiles
            edited.write_text(edited.read_text() + "\n# saved during the build\n")
            return []

        real = mypyc.build.mypycify
        mypyc.build.mypycify = mypycify
        try:
            built = hatch_build.compile_modules()
        finally:
            mypyc.build.mypycify = real
        manifest = json.loads(built[-1].read_text())
        manifest = manifest.get("sources", manifest)  # (the format the fix writes)
        compiled = hatch_build._compiled_module()
        wrong = []
        for module, digest in manifest.items():
            path = str(compiled.source(module, Path("pigeon")))
            if seen.get(path) != digest:
                wrong.append(path)
    print(f"{len(seen)} sources compiled; the manifest records {len(manifest)}")
    if wrong:
        print(f"DEFECT: the manifest records the hash of {', '.join(wrong)} as it is after "
              "the build, not as it was compiled: the stale compiled module counts as "
              "current and runs")  # fmt: skip
        return 1
    print("held: the manifest holds the hashes of the sources as they were compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
