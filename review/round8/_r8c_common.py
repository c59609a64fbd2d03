"""Shared helpers for the r8c_* scripts: run a snippet in a child Python, compiled (the
build's default) and with PIGEON_PURE_PYTHON=1 (the reference), and compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SRC = ROOT / "src"


def child(code: str, *, pure: bool, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run ``code`` (which prints one JSON line last) in a child; its decoded output."""
    e = {**os.environ, **(env or {})}
    e.setdefault("PYTHONPATH", str(SRC))
    e.pop("PIGEON_PURE_PYTHON", None)
    if pure:
        e["PIGEON_PURE_PYTHON"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, env=e)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compiled_here() -> bool:
    """Whether the broker's modules run compiled with this PYTHONPATH (else: exit 2)."""
    return bool(child("import json, pigeon._compiled as c; print(json.dumps(c.compiled()))",
                      pure=False))  # fmt: skip
