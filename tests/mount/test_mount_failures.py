"""The mount while things fail (each test with its own cell): a master
killed under a blocked flock, a cached file and short call timeouts; a
daemon frozen past its session's lease under a cached file and a poller;
the daemon of a flock holder killed (the primary's machine dying)."""

from __future__ import annotations

import ast
import os
import pathlib
import select
import signal
import subprocess
import time

from .conftest import CELL, PY, REPO, Mount, needs_fuse, start_mount, stop_mount

pytestmark = needs_fuse


def cli(cells: pathlib.Path, *args: str) -> str:
    env = dict(os.environ, CHUBBYFS_CELLS=str(cells))
    out = subprocess.run([PY, "-m", "chubbyfs", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    return proc.stdout.readline()


def _clean_up(procs: tuple[subprocess.Popen | None, ...], mounts: tuple[Mount, ...]) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    for m in mounts:
        stop_mount(m)


def test_blocked_flock_survives_call_timeouts_and_master_failover(cell, tmp_path: pathlib.Path) -> None:
    c = cell()
    m1 = start_mount(tmp_path / "m1", c.cells_path, tmp_path / "m1.log", "--call-timeout", "1")
    m2 = start_mount(tmp_path / "m2", c.cells_path, tmp_path / "m2.log", "--call-timeout", "1")
    holder = waiter = None
    try:
        (m1.cell / "lock").write_text("")
        (m1.cell / "cfg").write_text("old\n")
        for _ in range(2):
            assert (m2.cell / "cfg").read_text() == "old\n"  # cached by mount 2 (and its kernel)
        holder = subprocess.Popen(["flock", "-x", "lock", "-c", "echo held; read line"], cwd=m1.cell,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert read_line(holder, 10) == "held\n"
        waiter = subprocess.Popen(["flock", "-x", "lock", "-c", "echo got"], cwd=m2.cell,
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(2.5)  # several call timeouts: the queued Acquire is asked for again
        assert waiter.poll() is None and not select.select([waiter.stdout], [], [], 0)[0]
        master = (m1.cell / ".chubby" / "master").read_text().strip()
        leader = next(rid for rid, addr in c.addresses.items() if addr == master)
        c.kill(leader)
        # A write through the new master is seen through mount 2 at once.
        cli(c.cells_path, "put", f"/ls/{CELL}/cfg", "new\n")
        assert (m2.cell / "cfg").read_text() == "new\n"
        assert waiter.poll() is None, "the waiter got the lock while it was held"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        assert read_line(waiter, 30) == "got\n"
        assert waiter.wait(timeout=10) == 0
    finally:
        _clean_up((holder, waiter), (m1, m2))


def test_a_dead_holders_lock_passes_on_after_its_lease_and_lock_delay_never_before(
        cell, tmp_path: pathlib.Path) -> None:
    # USERS.md 1: `flock -x leader -c ...` on two machines; the primary's
    # machine dies (here its mount daemon, kill -9). The other takes over
    # once the dead session's lease has run out and the lock-delay passed,
    # and never earlier; the winner then writes its name into the file.
    lease_s, delay_s = 1.5, 3.0
    c = cell(session_lease_ms=int(lease_s * 1000))
    m1 = start_mount(tmp_path / "m1", c.cells_path, tmp_path / "m1.log")
    m2 = start_mount(tmp_path / "m2", c.cells_path, tmp_path / "m2.log")
    holder = waiter = None
    try:
        (m1.cell / "leader").write_text("")
        subprocess.run(["setfattr", "-n", "user.chubby.lock_delay_ms", "-v", str(int(delay_s * 1000)), "leader"],
                       cwd=m1.cell, check=True)
        holder = subprocess.Popen(["flock", "-x", "leader", "-c", "echo m1 > leader; echo held; exec sleep 600"],
                                  cwd=m1.cell, stdout=subprocess.PIPE, text=True)
        assert read_line(holder, 10) == "held\n"
        waiter = subprocess.Popen(["flock", "-x", "leader", "-c", "echo m2 > leader; echo got"],
                                  cwd=m2.cell, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None, "granted while held"
        assert (m2.cell / "leader").read_text() == "m1\n"
        died = time.monotonic()
        m1.proc.kill()
        m1.proc.wait()
        assert read_line(waiter, 60) == "got\n"
        took = time.monotonic() - died
        assert took >= delay_s, f"granted {took:.2f} s after the holder's machine died, within the lock-delay"
        assert took <= lease_s + delay_s + 15, f"granted only {took:.2f} s after the holder's machine died"
        assert waiter.wait(timeout=10) == 0
        assert (m2.cell / "leader").read_text() == "m2\n"
    finally:
        _clean_up((holder, waiter), (m1, m2))


def test_expiry_drops_the_kernel_caches_and_wakes_pollers_with_pollerr(cell, tmp_path: pathlib.Path) -> None:
    c = cell(session_lease_ms=1500)
    m = start_mount(tmp_path / "m", c.cells_path, tmp_path / "m.log")
    poller = None
    try:
        f = m.cell / "f"
        f.write_text("before\n")
        for _ in range(2):
            assert f.read_text() == "before\n"  # the session caches it, the kernel keeps its pages
        poller = subprocess.Popen([PY, "-c", (
            "import os, select\n"
            "fd = os.open('f', os.O_RDONLY)\n"
            "os.pread(fd, 100, 0)\n"
            "p = select.poll(); p.register(fd, select.POLLIN)\n"
            "print('polling', flush=True)\n"
            "print(p.poll(20000), flush=True)\n")], cwd=m.cell, stdout=subprocess.PIPE, text=True)
        assert read_line(poller, 10) == "polling\n"
        m.proc.send_signal(signal.SIGSTOP)  # KeepAlives stop; the cell expires the session
        try:
            time.sleep(2.0)
            cli(c.cells_path, "put", f"/ls/{CELL}/f", "after!\n")  # same size
        finally:
            m.proc.send_signal(signal.SIGCONT)
        events = ast.literal_eval(read_line(poller, 15))
        assert events and events[0][1] & select.POLLERR, events
        assert f.read_text() == "after!\n"
        assert "has expired" in m.log_text()
    finally:
        if poller is not None:
            poller.kill()
            poller.wait()
        m.proc.send_signal(signal.SIGCONT)
        stop_mount(m)
