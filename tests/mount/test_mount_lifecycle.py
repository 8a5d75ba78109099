"""Mounting through mount(8)'s helper, `chubbyfs umount`, and a session
that expires under an open file (each with its own cell)."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import time

import pytest

from chubbyfs.fuse.mount import is_mounted

from .conftest import CELL, PY, REPO, needs_fuse, start_mount, stop_mount

pytestmark = needs_fuse


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry))
    return pids


def test_mount_helper_daemon_and_umount(cell, tmp_path: pathlib.Path) -> None:
    c = cell()
    mnt = tmp_path / "ls"
    helper = REPO / "contrib" / "mount.fuse.chubbyfs"
    env = dict(os.environ, CHUBBYFS=f"{PY} -m chubbyfs", PYTHONPATH=str(REPO))
    bad = subprocess.run([str(helper), "none", str(mnt), "-o", f"cells={c.cells_path},bogus"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown mount option 'bogus'" in bad.stderr
    for option, message in (("busy_poll_us=x", "needs a number"), ("busy_poll_us=20000", "between 0 and 10000")):
        bad = subprocess.run([str(helper), "none", str(mnt), "-o", f"cells={c.cells_path},{option}"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
        assert not is_mounted(mnt)
    out = subprocess.run([str(helper), "none", str(mnt), "-o",
                          f"rw,_netdev,cells={c.cells_path},allow_other,busy_poll_us=0"],
                         env=env, capture_output=True, text=True, timeout=30)
    try:
        assert out.returncode == 0, out.stderr
        assert is_mounted(mnt)  # mounted when the helper returned: mount(8) relies on it
        (mnt / CELL / "hello").write_text("hi\n")
        assert (mnt / CELL / "hello").read_text() == "hi\n"
        assert "fuse.chubbyfs" in open("/proc/mounts").read()
        daemons = _processes_mentioning(str(mnt))
        assert daemons, "the daemon is running"
        um = subprocess.run([PY, "-m", "chubbyfs", "umount", str(mnt)], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
        assert um.returncode == 0, um.stderr
        assert not is_mounted(mnt)
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(mnt)):
            assert time.monotonic() < deadline, "the daemon did not exit after umount"
            time.sleep(0.05)
        again = subprocess.run([PY, "-m", "chubbyfs", "umount", str(mnt)], cwd=REPO, capture_output=True,
                               text=True, timeout=30)
        assert again.returncode == 1 and "nothing is mounted" in again.stderr
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_expired_session_makes_open_files_stale_and_a_new_one_serves(cell, tmp_path: pathlib.Path) -> None:
    c = cell(session_lease_ms=1500)
    m = start_mount(tmp_path / "m", c.cells_path, tmp_path / "m.log")
    try:
        f = m.cell / "f"
        f.write_text("before\n")
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 0) == b"before\n"
            m.proc.send_signal(signal.SIGSTOP)  # the daemon's KeepAlives stop: the lease runs out
            time.sleep(3.0)
            m.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while (m.cell / ".chubby" / "state").read_text() != "expired\n":
                assert time.monotonic() < deadline, m.log_text()
                time.sleep(0.1)
            with pytest.raises(OSError) as info:
                os.pread(fd, 100, 0)
            assert info.value.errno == errno.ESTALE
        finally:
            os.close(fd)
        # The next call opens a new session.
        assert f.read_text() == "before\n"
        assert (m.cell / ".chubby" / "state").read_text() == "ok\n"
        assert "expired" in m.log_text()
    finally:
        m.proc.send_signal(signal.SIGCONT)
        stop_mount(m)
