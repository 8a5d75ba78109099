"""The core must stay pure: no I/O, clock or randomness imports (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import pathlib

import chubbyfs.raft

FORBIDDEN = {"trio", "os", "socket", "time", "random", "asyncio", "threading", "subprocess"}


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_raft_modules_import_nothing_impure() -> None:
    package_dir = pathlib.Path(chubbyfs.raft.__file__).parent
    files = sorted(package_dir.glob("*.py"))
    assert len(files) >= 10, files
    for path in files:
        bad = _imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"
