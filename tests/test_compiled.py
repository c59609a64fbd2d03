"""The mypyc-compiled broker modules (src/pigeon/_compiled.py, hatch_build.py): used where
built and current, their source where PIGEON_PURE_PYTHON is set or a source was edited."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pigeon
from pigeon import _compiled

PACKAGE = Path(pigeon.__file__).parent

# Prints, for every compiled module, whether it loaded from its .py source.
_REPORT = (
    "import importlib, json, pigeon, pigeon._compiled as c\n"
    "print(json.dumps({m: importlib.import_module(m).__file__.endswith('.py') "
    "for m in c.MODULES}))\n"
)


def _from_source(env: dict[str, str], path: Path | None = None) -> tuple[dict[str, bool], str]:
    if path is not None:
        env = {**env, "PYTHONPATH": str(path)}
    out = subprocess.run(
        [sys.executable, "-c", _REPORT], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_every_listed_module_exists_and_holds_no_msgspec_struct() -> None:
    # a compiled module keeps a class's annotations only as plain types (``dict[str, str] |
    # None`` becomes ``type``), which msgspec would then decode by: Structs stay interpreted
    for module in _compiled.MODULES:
        tree = ast.parse(_compiled.source(module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any("Struct" in b for b in bases), f"{module}.{node.name}: {bases}"


@pytest.mark.skipif(
    not os.environ.get("PIGEON_EXPECT_COMPILED"), reason="only the compiled runs expect it"
)
def test_the_compiled_run_runs_compiled_modules() -> None:
    assert _compiled.reason is None, _compiled.reason
    assert _compiled.compiled()
    used, _ = _from_source(dict(os.environ))
    assert not any(used.values()), [m for m, src in used.items() if src]


def test_pure_python_runs_every_module_from_its_source() -> None:
    used, _ = _from_source({**os.environ, "PIGEON_PURE_PYTHON": "1"})
    assert all(used.values()), [m for m, src in used.items() if not src]


def test_an_edited_source_runs_all_of_them_from_source_and_says_so(tmp_path: Path) -> None:
    # A copy of the package, compiled files included where this checkout has them. Each
    # compiled module calls the others directly, so one stale module must stop them all.
    root = PACKAGE.parent
    shutil.copytree(PACKAGE, tmp_path / "pigeon", ignore=shutil.ignore_patterns("__pycache__"))
    for shared in root.glob("pigeon__mypyc*"):
        shutil.copy2(shared, tmp_path / shared.name)
    env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
    built = _compiled.manifest_path(tmp_path / "pigeon").exists()
    if built:
        used, said = _from_source(env, tmp_path)
        assert not any(used.values()) and "not used" not in said
    edited = _compiled.source("pigeon.server.core.delivery", tmp_path / "pigeon")
    edited.write_text(edited.read_text() + "\n# an edit\n")
    used, said = _from_source(env, tmp_path)
    assert all(used.values()), [m for m, src in used.items() if not src]
    if built:
        assert "compiled modules are not used" in said and "delivery.py changed" in said
