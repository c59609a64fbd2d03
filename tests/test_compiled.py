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


def _copy(tmp_path: Path) -> tuple[dict[str, str], bool]:
    """A copy of the package, with its compiled files where this checkout has them; the
    environment that runs it (not pure), and whether it holds compiled modules."""
    root = PACKAGE.parent
    shutil.copytree(PACKAGE, tmp_path / "pigeon", ignore=shutil.ignore_patterns("__pycache__"))
    for shared in root.glob(f"{_compiled.SHARED}*"):
        shutil.copy2(shared, tmp_path / shared.name)
    env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
    built = _compiled.manifest_path(tmp_path / "pigeon").exists()
    if built:
        used, said = _from_source(env, tmp_path)
        assert not any(used.values()) and "not used" not in said
    return env, built


def test_an_edited_source_runs_all_of_them_from_source_and_says_so(tmp_path: Path) -> None:
    # Each compiled module calls the others directly: one stale module must stop them all
    env, built = _copy(tmp_path)
    edited = _compiled.source("pigeon.server.core.delivery", tmp_path / "pigeon")
    edited.write_text(edited.read_text() + "\n# an edit\n")
    used, said = _from_source(env, tmp_path)
    assert all(used.values()), [m for m, src in used.items() if not src]
    if built:
        assert "compiled modules are not used" in said and "delivery.py changed" in said


@pytest.mark.parametrize("damage", ["no shared library", "a manifest of another shape"])
def test_a_build_that_does_not_hang_together_runs_from_source(tmp_path: Path, damage: str) -> None:
    # review round 8 (compiled) #2 and #9: the compiled modules load their shared library
    # by name from sys.path; a manifest that parses but is not this version's
    env, built = _copy(tmp_path)
    if not built:
        pytest.skip("nothing is compiled here to damage")
    if damage == "no shared library":
        for shared in tmp_path.glob(f"{_compiled.SHARED}*"):
            shared.unlink()
    else:
        _compiled.manifest_path(tmp_path / "pigeon").write_text("[]")
    env["PYTHONPATH"] = str(tmp_path)  # (and not the checkout's src, where one is found)
    used, said = _from_source(env)
    assert all(used.values()), [m for m, src in used.items() if not src]
    assert "compiled modules are not used" in said


def test_a_file_saved_while_the_build_runs_is_not_recorded_as_compiled(tmp_path: Path) -> None:
    # review round 8 (compiled) #4: the hashes are taken before compiling, not after
    package = tmp_path / "pigeon"
    for module in _compiled.MODULES:
        path = _compiled.source(module, package)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    before = _compiled.digests(package)
    _compiled.source(_compiled.MODULES[0], package).write_text("x = 2\n")  # during the build
    shared = _compiled.shared_library(package)
    shared.write_bytes(b"lib")
    written = json.loads(_compiled.write_manifest(before, package).read_text())
    assert written["sources"][_compiled.MODULES[0]] != _compiled.digest(
        _compiled.source(_compiled.MODULES[0], package)
    )
    assert written["shared"] == 3


def test_a_module_compiled_without_its_source_runs_with_the_rest_never_mixed(
    tmp_path: Path,
) -> None:
    # review round 8 (compiled) #3: a missing source made 7 of the modules load compiled
    # and the rest from source, and the broker could not start
    env, built = _copy(tmp_path)
    if not built:
        pytest.skip("nothing is compiled here")
    _compiled.source("pigeon.server.core.delivery", tmp_path / "pigeon").unlink()
    used, said = _from_source(env, tmp_path)
    assert not any(used.values()) and "not used" not in said
    out = subprocess.run(
        [sys.executable, "-c", _REPORT], capture_output=True, text=True, timeout=60,
        env={**env, "PYTHONPATH": str(tmp_path), "PIGEON_PURE_PYTHON": "1"},
    )  # fmt: skip
    assert out.returncode != 0 and "delivery has no Python source here" in out.stderr
