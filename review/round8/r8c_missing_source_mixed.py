"""r8c: "a source file is missing" - one of the cases ``_compiled`` says it handles - runs
neither the compiled build nor the source: the broker cannot start. With one listed
``.py`` gone (a deployment that strips sources beside their extensions, a half-applied
update), ``_why_not`` says "missing" and installs ``_SourceFirst``, which finds no ``.py``
for that module and lets the import system load its ``.so``; that shim loads the shared
``pigeon__mypyc``, which registers its compiled siblings in ``sys.modules`` as it goes.
Result (delivery.py removed): 7 of the 20 modules compiled, 13 from source; the log says
"the Python source runs instead"; ``BrokerServer(...)`` raises ``TypeError: interpreted
classes cannot inherit from compiled`` (the source ``Broker`` extends the compiled
``BrokerState``). The same with PIGEON_PURE_PYTHON=1.

Exit 1 while a tree missing one listed source either mixes compiled and source modules
or cannot serve a put and a get without saying why (exit 2 when nothing is compiled here to copy).
Run: PYTHONPATH=src python review/round8/r8c_missing_source_mixed.py
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
GONE = "server/core/delivery.py"

CODE = r"""
import importlib, json, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import pigeon, pigeon._compiled as c
mods = [importlib.import_module(m) for m in c.MODULES]
out = {"reason": c.reason, "compiled": sorted(m.__name__ for m in mods
                                              if not m.__file__.endswith(".py")),
       "total": len(c.MODULES)}
try:
    from pigeon.testing.broker import BrokerThread
    with BrokerThread() as b:
        with pigeon.Queue(b.url("r8c"), serializer="raw", reconnect_timeout=0) as q:
            q.put(b"hi")
            out["serve"] = repr(q.get(timeout=5))
except Exception as exc:
    out["serve"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def main() -> int:
    if not (SRC / f"pigeon__mypyc{SUFFIX}").exists():
        print(f"nothing compiled in {SRC}: build it first")
        return 2
    bad = 0
    with tempfile.TemporaryDirectory(prefix="rvc-gone-") as tmp:
        shutil.copytree(SRC / "pigeon", Path(tmp, "pigeon"),
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for lib in SRC.glob("pigeon__mypyc*"):
            shutil.copy2(lib, Path(tmp, lib.name))
        Path(tmp, "pigeon", GONE).unlink()
        for pure in (False, True):
            env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
            env["PYTHONPATH"] = tmp
            if pure:
                env["PIGEON_PURE_PYTHON"] = "1"
            run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                                 env=env, timeout=120, cwd=tmp)  # fmt: skip
            if run.returncode != 0 and pure and "has no Python source here" in run.stderr:
                # (the fix: PIGEON_PURE_PYTHON cannot be honoured for a module with no
                # source; an ImportError that says so, not a mix that fails later)
                print(f"PIGEON_PURE_PYTHON=1, {GONE} removed: ImportError, says why: held")
                continue
            if run.returncode != 0:
                print(run.stderr[-2000:])
                return 2
            said = [ln for ln in run.stderr.splitlines() if "not used" in ln]
            out = json.loads(run.stdout.strip().splitlines()[-1])
            what = "PIGEON_PURE_PYTHON=1" if pure else "default"
            print(f"{what}, {GONE} removed:")
            print(f"  log: {said[0] if said else '(nothing)'}")
            print(f"  compiled: {len(out['compiled'])} of {out['total']} {out['compiled']}")
            print(f"  put + get through a BrokerThread: {out['serve']}")
            mixed = 0 < len(out["compiled"]) < out["total"]
            refused = "delivery.py" in out["serve"]  # a clear refusal naming it is a fix too
            if mixed or ("hi" not in out["serve"] and not refused):
                bad += 1
    if bad:
        print("DEFECT: a missing source leaves compiled and source modules mixed, and the "
              "broker cannot start (the log says the source runs)")  # fmt: skip
        return 1
    print("held: a missing source gives one consistent build that serves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
