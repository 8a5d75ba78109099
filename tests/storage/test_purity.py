"""Only fs.py (RealFS) may touch the operating system; the WAL, snapshot and
DiskStorage code reach files through the FileSystem protocol, and SimFS is
pure so simulations stay deterministic (ARCHITECTURE.md)."""

from __future__ import annotations

import pathlib

import chubbyfs.sim.disk
import chubbyfs.storage
from tests.purity import impure_imports

OS_BOUNDARY = {"fs.py"}


def test_storage_modules_reach_files_only_through_the_protocol():
    package = pathlib.Path(chubbyfs.storage.__file__).parent
    checked = [p for p in sorted(package.glob("*.py")) if p.name not in OS_BOUNDARY]
    assert {"wal.py", "snapshot.py", "raft_storage.py"} <= {p.name for p in checked}
    for path in checked:
        bad = impure_imports(path)
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_simfs_is_pure():
    path = pathlib.Path(chubbyfs.sim.disk.__file__)
    assert not impure_imports(path)
