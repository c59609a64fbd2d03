"""r8c: the staleness check vouches for a shared library it never looks at. mypyc puts
the code of all 20 compiled modules in ONE extension, ``pigeon__mypyc.<abi>.so``, at the
top of ``src/`` (beside the package, not in it); each ``pigeon/.../x.<abi>.so`` is a shim
that imports it *by name, through sys.path*. ``_compiled._why_not`` hashes the sources
against the manifest and never asks whether that library is there, nor which one loads:

1. package without its library (a ``COPY src/pigeon`` into an image, a vendored copy, a
   checkout where only the package directory was copied): ``import pigeon`` itself fails
   with ``ModuleNotFoundError: No module named 'pigeon__mypyc'`` - the client too, since
   ``pigeon.framing.length_prefixed`` is compiled and imported by ``pigeon/__init__`` -
   where the module promises the Python source runs whenever the compiled modules cannot;
2. the same package with another ``pigeon__mypyc`` further down sys.path (another
   checkout's editable install, a wheel in site-packages - here, the lead's venv puts
   /work/main/src on every path): the shims load *that* library, whatever it was built
   from, and ``_compiled`` reports ``reason None``, ``compiled() True``.

Exit 1 while either happens (exit 2 when nothing is compiled here to copy).
Run: PYTHONPATH=src python review/round8/r8c_shared_lib_unchecked.py
"""

from __future__ import annotations

import json
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
SITE = sysconfig.get_paths()["purelib"]

# -S: no .pth files (no editable install of another checkout); msgspec from site-packages
REPORT = r"""
import json, sys
sys.path[:0] = PATHS
out = {}
try:
    import pigeon, pigeon._compiled as c
    import pigeon.server.app as app
    lib = sys.modules.get("pigeon__mypyc")
    out = {"import": "ok", "reason": c.reason, "compiled": c.compiled(),
           "app": app.__file__, "lib": getattr(lib, "__file__", None)}
except Exception as exc:
    out = {"import": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def run(paths: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIGEON_PURE_PYTHON")}
    code = REPORT.replace("PATHS", repr(paths))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tempfile.gettempdir())  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    lib = SRC / f"pigeon__mypyc{SUFFIX}"
    manifest = SRC / "pigeon" / f"_compiled{SUFFIX.removesuffix('.so')}.json"
    if not lib.exists() or not manifest.exists():
        print(f"nothing compiled in {SRC} ({lib.name}, {manifest.name}): build it first")
        return 2
    with tempfile.TemporaryDirectory(prefix="rvc-lib-") as tmp:
        tree, other = Path(tmp, "tree"), Path(tmp, "other")
        shutil.copytree(SRC / "pigeon", tree / "pigeon",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        other.mkdir()
        shutil.copy2(lib, other / lib.name)  # "another checkout's" library
        alone = run([str(tree), SITE])
        print(f"1. the package without {lib.name}: {alone}")
        elsewhere = run([str(tree), SITE, str(other)])
        print(f"2. another {lib.name} further down sys.path: {elsewhere}")
    bad = 0
    if alone["import"] != "ok":
        print("DEFECT 1: `import pigeon` fails instead of running the Python source")
        bad += 1
    loaded = str(elsewhere.get("lib") or "")
    if elsewhere["import"] == "ok" and elsewhere["compiled"] and loaded.startswith(str(other)):
        print(f"DEFECT 2: the manifest of {tree} was checked, and the code run is {loaded}")
        bad += 1
    if bad:
        return 1
    print("held: a missing or foreign shared library is caught (the source runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
