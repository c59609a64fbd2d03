"""r8c (low): a manifest that is JSON but not an object - ``[]``, ``null``, ``"x"`` -
makes ``import pigeon`` itself fail (``AttributeError: 'list' object has no attribute
'get'`` in ``_compiled._why_not``), client included, where an unreadable one (truncated,
not JSON) is caught and the source runs with a warning. ``_why_not`` catches
``OSError``/``ValueError`` from reading and parsing, then calls ``built.get`` on whatever
was parsed.

Exit 1 while such a manifest breaks ``import pigeon`` (exit 2 when nothing is compiled
here to copy).
Run: PYTHONPATH=src python review/round8/r8c_manifest_shape.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import SRC

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def main() -> int:
    name = f"_compiled{SUFFIX.removesuffix('.so')}.json"
    if not (SRC / "pigeon" / name).exists():
        print(f"nothing compiled in {SRC}: build it first")
        return 2
    bad = 0
    with tempfile.TemporaryDirectory(prefix="rvc-shape-") as tmp:
        shutil.copytree(SRC / "pigeon", Path(tmp, "pigeon"),
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for lib in SRC.glob("pigeon__mypyc*"):
            shutil.copy2(lib, Path(tmp, lib.name))
        env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
        env["PYTHONPATH"] = tmp
        for content in ("{", "[]", "null", '"x"'):
            Path(tmp, "pigeon", name).write_text(content)
            run = subprocess.run(
                [sys.executable, "-c", "import pigeon, pigeon._compiled as c; print(c.reason)"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                cwd=tmp,
            )
            said = (run.stdout or run.stderr).strip().splitlines()[-1]
            print(f"{'  ' if run.returncode == 0 else '!!'} manifest {content!r}: {said}")
            bad += run.returncode != 0
    if bad:
        print(f"DEFECT: {bad} manifests of the wrong shape make `import pigeon` fail")
        return 1
    print("held: any damaged manifest falls back to the source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
