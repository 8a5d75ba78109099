"""The core must stay pure: no I/O, clock or randomness imports (ARCHITECTURE.md)."""

from __future__ import annotations

import pathlib

import chubbyfs.raft
from tests.purity import impure_imports

# The trio shell that drives the core lives beside it (ARCHITECTURE.md: "and
# the trio node that drives the core"); every other module must be pure, so
# a new file is checked by default.
SHELL_MODULES = {"node.py", "tcp_transport.py"}
CORE_MODULES = {
    "__init__.py",
    "confchange.py",
    "core.py",
    "log.py",
    "memory_storage.py",
    "progress.py",
    "quorum.py",
    "rawnode.py",
    "read_index.py",
    "storage.py",
    "types.py",
}


def test_raft_modules_import_nothing_impure() -> None:
    package_dir = pathlib.Path(chubbyfs.raft.__file__).parent
    files = sorted(p for p in package_dir.glob("*.py") if p.name not in SHELL_MODULES)
    assert CORE_MODULES <= {p.name for p in files}
    for path in files:
        bad = impure_imports(path)
        assert not bad, f"{path.name} imports {sorted(bad)}"
