"""framing/ computes only: it imports nothing that does I/O or concurrency."""

from __future__ import annotations

import ast
from pathlib import Path

import pigeon.framing

FORBIDDEN = {"socket", "asyncio", "threading", "selectors", "select", "multiprocessing"}


def test_framing_imports_no_io_modules() -> None:
    root = Path(pigeon.framing.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
