"""The one check behind every "this core is pure" test: which modules a
source file imports, read from its syntax tree (ARCHITECTURE.md: pure cores
import neither trio nor os, socket, time or random)."""

from __future__ import annotations

import ast
import pathlib

FORBIDDEN = frozenset({"trio", "os", "socket", "time", "random", "asyncio", "threading", "subprocess",
                       "shutil"})


def imported_roots(path: pathlib.Path) -> set[str]:
    """Top-level names of absolute imports; `.name` for a sibling module
    imported relatively; `__import__` if the file imports dynamically."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            roots.add("." + node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            roots.add("__import__")
    return roots


def impure_imports(path: pathlib.Path, allowed_siblings: set[str] | None = None) -> set[str]:
    """What `path` imports that a pure core must not: I/O modules, dynamic
    imports, and (when `allowed_siblings` is given) sibling modules outside it."""
    roots = imported_roots(path)
    bad = roots & (FORBIDDEN | {"__import__"})
    if allowed_siblings is not None:
        bad |= {r for r in roots if r.startswith(".") and r[1:] not in allowed_siblings}
    return bad
