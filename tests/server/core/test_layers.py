"""The broker's rules are a sans-IO package in layers: nothing they load does I/O or
concurrency, and no module of the package imports, even for typing only, one that
imports it back."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
import pigeon.server.core

FORBIDDEN = {"socket", "asyncio", "threading", "selectors", "select", "multiprocessing"}
SRC = Path(pigeon.__file__).parent.parent
CORE = "pigeon.server.core"


def _path(module: str) -> Path | None:
    """The file of a pigeon module (None: not one of pigeon's, or a name in a module)."""
    base = SRC.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> Iterator[str]:
    """Every module ``module`` imports, anywhere in its text (functions and
    ``if TYPE_CHECKING:`` blocks included), with ``from M import N`` counted as M.N too
    when N is a module."""
    path = _path(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            for alias in node.names:
                if _path(f"{base}.{alias.name}") is not None:
                    yield f"{base}.{alias.name}"


def _loaded_with(module: str) -> list[str]:
    """``module`` and its parent packages, as an import of it runs them (pigeon's own
    ``__init__`` aside: it is the library's face and loads every backend)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def _closure(root: str) -> dict[str, set[str]]:
    """The pigeon modules loading ``root`` loads, each with the modules it imports."""
    graph: dict[str, set[str]] = {}
    todo = [root]
    while todo:
        module = todo.pop()
        for m in _loaded_with(module):
            if m in graph:
                continue
            graph[m] = set(_imports(m))
            todo += [n for n in graph[m] if n.startswith("pigeon.") and _path(n) is not None]
    return graph


def _core_modules() -> list[str]:
    root = Path(pigeon.server.core.__file__).parent
    return [CORE] + [f"{CORE}.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__"]


def test_the_broker_rules_load_no_module_that_does_io_or_concurrency() -> None:
    graph = _closure(CORE)
    assert set(_core_modules()) <= set(graph)  # every module of the package was walked
    assert "pigeon.protocol.messages" in graph  # and what they build on
    bad = sorted(
        f"{m} imports {n}" for m, names in graph.items() for n in names
        if n.split(".")[0] in FORBIDDEN
    )  # fmt: skip
    assert not bad


@pytest.mark.parametrize("module", _core_modules())
def test_no_module_of_the_package_imports_one_that_imports_it_back(module: str) -> None:
    graph = {m: {n for n in _imports(m) if n == CORE or n.startswith(CORE + ".")}
             for m in _core_modules()}  # fmt: skip
    seen: set[str] = set()
    todo = list(graph[module])
    while todo:
        m = todo.pop()
        assert m != module, f"{module} imports a module that imports it back"
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())


def test_nothing_in_pigeon_imports_the_old_address_of_the_data_types() -> None:
    old = "pigeon.server.model"
    users = [
        str(path.relative_to(SRC))
        for path in sorted((SRC / "pigeon").rglob("*.py"))
        if path != SRC.joinpath(*old.split(".")).with_suffix(".py")
        and any(
            name == old
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for name in (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
        )
    ]
    assert not users
