"""A real 3-replica cell and two mount daemons (two "machines": each its own
process and sessions) mounting it, shared by the end-to-end mount tests.
Needs root and /dev/fuse."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from chubbyfs.fuse.mount import is_mounted
from chubbyfs.testing.localcell import LocalCell

REPO = pathlib.Path(__file__).resolve().parents[2]
PY = sys.executable
CELL = "t"

needs_fuse = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with mount(2) and acting as other users need root"),
]


@dataclass
class Mount:
    path: pathlib.Path
    proc: subprocess.Popen
    log: pathlib.Path

    @property
    def cell(self) -> pathlib.Path:
        return self.path / CELL

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_mount(mnt: pathlib.Path, cells: pathlib.Path, log: pathlib.Path, *extra: str) -> Mount:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([PY, "-m", "chubbyfs", "mount", str(mnt), "--cells", str(cells), *extra],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    m = Mount(mnt, proc, log)
    deadline = time.monotonic() + 20
    while "mounted" not in m.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mount(m)
            raise AssertionError(f"mount daemon did not come up:\n{m.log_text()}")
        time.sleep(0.05)
    return m


def stop_mount(m: Mount) -> None:
    if m.proc.poll() is None:
        m.proc.send_signal(signal.SIGTERM)
        try:
            m.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait(timeout=5)
    if is_mounted(m.path):
        subprocess.run(["umount", "-l", str(m.path)], check=False)


def wait_for_cell(cells: pathlib.Path, timeout_s: float = 30) -> None:
    env = dict(os.environ, CHUBBYFS_CELLS=str(cells))
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run([PY, "-m", "chubbyfs", "ls", f"/ls/{CELL}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cell never served: {out.stderr}")
        time.sleep(0.2)


@dataclass
class Setup:
    cell: LocalCell
    m1: Mount
    m2: Mount
    cells: pathlib.Path
    env: dict[str, str]


@pytest.fixture(scope="package")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/fuse")
    base = tmp_path_factory.mktemp("mount")
    (base / "cell").mkdir()
    cell = LocalCell(base / "cell", 3, state_machine="chubby", name=CELL)
    started: list[Mount] = []
    try:
        cell.start_all()
        wait_for_cell(cell.cells_path)
        started.append(start_mount(base / "m1", cell.cells_path, base / "m1.log"))
        started.append(start_mount(base / "m2", cell.cells_path, base / "m2.log"))
        env = dict(os.environ, CHUBBYFS_CELLS=str(cell.cells_path))
        yield Setup(cell, started[0], started[1], cell.cells_path, env)
    finally:
        for m in started:
            stop_mount(m)
        cell.stop_all()


@pytest.fixture
def cell(tmp_path: pathlib.Path):
    def make(**options: object) -> LocalCell:
        (tmp_path / "cell").mkdir()
        c = LocalCell(tmp_path / "cell", 3, state_machine="chubby", name=CELL, **options)
        made.append(c)
        c.start_all()
        wait_for_cell(c.cells_path)
        return c
    made: list[LocalCell] = []
    yield make
    for c in made:
        c.stop_all()
