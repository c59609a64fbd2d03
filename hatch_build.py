"""Build hook: compile the local queue's C fast path (src/pigeon/_fastring.c).

It is optional: where no C compiler (or no Python headers) is available, the build goes on
without it and pigeon uses its pure-Python path, which is the same code and the reference
(``PIGEON_PURE_PYTHON=1`` forces it). The module is built in place, next to the sources,
so an editable install (``pip install -e .``) finds it too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HERE = Path(__file__).parent
SOURCE = HERE / "src" / "pigeon" / "_fastring.c"


class FastRingHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if os.environ.get("PIGEON_PURE_PYTHON") or sys.platform == "win32":
            return
        try:
            built = compile_extension()
        except Exception as exc:  # no compiler, no headers: the pure-Python path it is
            print(f"pigeon: the C fast path was not built ({exc}); using pure Python", file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if self.target_name == "wheel" and version != "editable":
            build_data["force_include"][str(built)] = f"pigeon/{built.name}"


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
