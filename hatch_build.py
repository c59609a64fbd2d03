"""Build hook: compile pigeon's optional native code, in place, next to the sources.

1. The local queue's C fast path (src/pigeon/_fastring.c).
2. The broker's per-request modules with mypyc (the list is ``MODULES`` in
   src/pigeon/_compiled.py): the same annotated Python, run as C. The build records the hash
   of each source it compiled (``_compiled.<abi>.json``); at import, pigeon uses the compiled
   modules only while every source still matches, so an edited checkout runs its source.

Both are optional: where no C compiler, no Python headers or no mypyc is available, the build
goes on without them and pigeon runs its pure-Python path, which is the same code and the
reference. ``PIGEON_PURE_PYTHON=1`` at build time skips both (at run time it makes pigeon
ignore them). Built in place, so an editable install (``pip install -e .``) finds them too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HERE = Path(__file__).parent
SRC = HERE / "src"
SOURCE = SRC / "pigeon" / "_fastring.c"


class FastRingHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if os.environ.get("PIGEON_PURE_PYTHON") or sys.platform == "win32":
            return
        built: list[Path] = []
        try:
            built.append(compile_extension())
        except Exception as exc:  # no compiler, no headers: the pure-Python path it is
            print(
                f"pigeon: the C fast path was not built ({exc}); using pure Python", file=sys.stderr
            )
        try:
            built.extend(compile_modules())
        except BaseException as exc:  # (mypyc exits on errors: SystemExit)
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed = _compiled_module().failure_note(SRC / "pigeon")
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{exc!r} (the whole error: pip install -v -e .)\n")
            print(f"pigeon: the broker's modules were not compiled ({exc!r}); they run as Python",
                  file=sys.stderr)  # fmt: skip
        if not built:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if self.target_name == "wheel" and version != "editable":
            for path in built:
                build_data["force_include"][str(path)] = str(path.relative_to(SRC))


def compile_extension() -> Path:
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    ext = Extension("pigeon._fastring", [str(SOURCE.relative_to(HERE))], extra_compile_args=["-O2"])
    dist = Distribution({"name": "pigeon-queue", "ext_modules": [ext], "package_dir": {"": "src"}})
    cmd = build_ext(dist)
    cmd.inplace = True
    cmd.ensure_finalized()
    cmd.run()
    return Path(cmd.get_ext_fullpath("pigeon._fastring"))


def _compiled_module() -> Any:
    """src/pigeon/_compiled.py, loaded by path (pigeon itself is not importable here)."""
    spec = importlib.util.spec_from_file_location(
        "_pigeon_compiled", SRC / "pigeon" / "_compiled.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_modules() -> list[Path]:
    """Compile ``MODULES`` with mypyc into src/ and write the manifest; the files built."""
    from mypyc.build import mypycify
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    compiled = _compiled_module()
    root = SRC / "pigeon"
    compiled.failure_note(root).unlink(missing_ok=True)
    manifest = compiled.manifest_path(root)
    manifest.unlink(missing_ok=True)  # (a failed build leaves no claim to be current)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for old in root.rglob(f"*{suffix}"):  # an earlier build's, e.g. of a module since dropped
        if old.name != f"_fastring{suffix}":  # from MODULES: it would shadow its source
            old.unlink()
    paths = [str(compiled.source(m, root).relative_to(SRC)) for m in compiled.MODULES]
    sources = compiled.digests(root)  # before compiling: an edit made meanwhile is not current
    build = HERE / "build" / f"mypyc-{sys.implementation.cache_tag}"  # one per interpreter
    here = os.getcwd()
    os.chdir(SRC)  # mypyc names modules by their path from here
    try:
        exts = mypycify(paths, opt_level="3", group_name="pigeon", target_dir=str(build / "c"))
        dist = Distribution({"name": "pigeon-queue", "ext_modules": exts})
        cmd = build_ext(dist)
        cmd.inplace = True
        cmd.build_temp = str(build / "temp")
        cmd.build_lib = str(build / "lib")
        cmd.ensure_finalized()
        cmd.run()
        built = [Path(cmd.get_ext_fullpath(ext.name)).resolve() for ext in exts]
    finally:
        os.chdir(here)
    built.append(compiled.write_manifest(sources, root))
    return built
