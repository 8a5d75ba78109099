"""Only fs.py (RealFS) may touch the operating system; the WAL, snapshot and
DiskStorage code reach files through the FileSystem protocol, and SimFS is
pure so simulations stay deterministic (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import pathlib

import chubbyfs.sim.disk
import chubbyfs.storage

FORBIDDEN = {"trio", "os", "socket", "time", "random", "asyncio", "threading", "subprocess", "shutil"}
OS_BOUNDARY = {"fs.py"}


def imported_roots(path: pathlib.Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_storage_modules_reach_files_only_through_the_protocol():
    package = pathlib.Path(chubbyfs.storage.__file__).parent
    checked = [p for p in sorted(package.glob("*.py")) if p.name not in OS_BOUNDARY]
    assert {"wal.py", "snapshot.py", "raft_storage.py"} <= {p.name for p in checked}
    for path in checked:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_simfs_is_pure():
    path = pathlib.Path(chubbyfs.sim.disk.__file__)
    assert not imported_roots(path) & FORBIDDEN
