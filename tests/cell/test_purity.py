"""The state machine is a pure core: no I/O, no clock, no ambient randomness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chubbyfs
from tests.purity import impure_imports

PACKAGE = Path(chubbyfs.__file__).parent
CORE_MODULES = [
    PACKAGE / "locks.py",
    PACKAGE / "cell" / "commands.py",
    PACKAGE / "cell" / "state_machine.py",
    PACKAGE / "cell" / "session_requests.py",
    PACKAGE / "cell" / "names.py",
    PACKAGE / "cell" / "acl.py",
    PACKAGE / "cell" / "handles.py",
    PACKAGE / "cell" / "cache_registry.py",
    PACKAGE / "cell" / "keep_alive_core.py",
]


def test_core_modules_import_nothing_impure() -> None:
    for path in CORE_MODULES:
        bad = impure_imports(path)
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_core_loads_no_io_module() -> None:
    code = ("import sys; import chubbyfs.cell.state_machine, chubbyfs.locks; "
            "print(','.join(sorted(m for m in {'trio', 'socket', 'random', 'asyncio'} "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == ""


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom time import monotonic\nimport hashlib\n")
    assert impure_imports(sample) == {"os", "time"}
