"""Real mounts: MemFS served by `tests.fuse.memfs_daemon` in its own process,
used by ordinary tools from other processes (never from the daemon's loop).
Needs root and /dev/fuse."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from chubbyfs.fuse.mount import is_mounted

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with mount(2) needs root"),
]

REPO = pathlib.Path(__file__).resolve().parents[2]
PY = sys.executable


class Daemon:
    def __init__(self, proc: trio.Process, mnt: pathlib.Path) -> None:
        self.proc = proc
        self.mnt = mnt
        self._buf = b""

    async def readline(self, timeout_s: float = 10.0) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(timeout_s):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"daemon exited: {self.proc.returncode}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")
        return await self.readline()

    async def stats(self) -> dict:
        return json.loads(await self.command("stats"))

    async def wait_stat(self, key: str, value: int, timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while (await self.stats())[key] != value:
                await trio.sleep(0.02)


@asynccontextmanager
async def memfs(tmp_path: pathlib.Path, *args: str) -> AsyncIterator[Daemon]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = await trio.lowlevel.open_process(
        [PY, "-m", "tests.fuse.memfs_daemon", str(mnt), *args], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    daemon = Daemon(proc, mnt)
    try:
        ready = await daemon.readline()
        assert ready.startswith("READY"), ready
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if is_mounted(mnt):  # only after a failure: never leave a mount behind
                subprocess.run(["umount", "-l", str(mnt)], check=False)


async def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(10):
        return await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True,
                                      check=check)


def _default_sigint() -> None:
    # Test harness trap: a child may inherit SIGINT ignored; Ctrl-C must kill it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
open(sys.argv[3], "a").write("holder\\n")
"""


async def start_holder(path: pathlib.Path, hold_s: float, log: pathlib.Path) -> trio.Process:
    proc = await trio.lowlevel.open_process([PY, "-c", HOLDER, str(path), str(hold_s), str(log)],
                                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with trio.fail_after(5):
        assert (await proc.stdout.receive_some(100)).startswith(b"locked")
    return proc


async def test_shell_tools(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path) as d:
        m = d.mnt
        assert (await run("ls", "-la", str(m))).returncode == 0
        await run("sh", "-c", f"echo hello > {m}/a")
        assert (await run("cat", f"{m}/a")).stdout == b"hello\n"
        await run("sh", "-c", f"echo more >> {m}/a")
        assert (await run("cat", f"{m}/a")).stdout == b"hello\nmore\n"
        await run("mkdir", f"{m}/dir")
        await run("mv", f"{m}/a", f"{m}/dir/b")
        assert (await run("ls", f"{m}/dir")).stdout == b"b\n"
        assert (await run("ls", str(m))).stdout == b"dir\n"
        st = (await run("stat", "-c", "%s %F %a", f"{m}/dir/b")).stdout
        assert st == b"11 regular file 644\n"
        await run("setfattr", "-n", "user.color", "-v", "blue", f"{m}/dir/b")
        out = (await run("getfattr", "-d", "--absolute-names", f"{m}/dir/b")).stdout
        assert b'user.color="blue"' in out
        missing = await run("getfattr", "-n", "user.none", f"{m}/dir/b", check=False)
        assert missing.returncode != 0 and b"No such attribute" in missing.stderr
        assert (await run("ls", "-l", f"{m}/dir")).returncode == 0  # xattr probes
        await run("truncate", "-s", "3", f"{m}/dir/b")
        assert (await run("cat", f"{m}/dir/b")).stdout == b"hel"
        assert (await run("rmdir", f"{m}/dir", check=False)).returncode != 0  # not empty
        await run("rm", f"{m}/dir/b")
        await run("rmdir", f"{m}/dir")
        assert (await run("ls", "-A", str(m))).stdout == b""
        assert b"memfs" in (await run("df", str(m))).stdout
        stats = await d.stats()
        assert stats["session"]["handler_crashes"] == 0


async def test_flock_blocks_and_fails_fast(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "order.log"
    async with memfs(tmp_path) as d:
        f = d.mnt / "lockfile"
        await run("touch", str(f))
        holder = await start_holder(f, 1.0, log)
        nonblocking = await run("flock", "-n", str(f), "true", check=False)
        assert nonblocking.returncode == 1  # EWOULDBLOCK
        start = trio.current_time()
        await run("flock", "-x", str(f), "-c", f"echo waiter >> {log}")
        assert trio.current_time() - start > 0.5  # really waited for the holder
        await holder.wait()
        assert log.read_text() == "holder\nwaiter\n"
        assert (await run("flock", "-n", str(f), "true")).returncode == 0
        await d.wait_stat("flocks", 0)


async def test_ctrl_c_interrupts_a_blocked_flock(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path) as d:
        f = d.mnt / "lockfile"
        await run("touch", str(f))
        holder = await start_holder(f, 60, tmp_path / "unused.log")
        try:
            waiter = await trio.lowlevel.open_process(["flock", "-x", str(f), "true"],
                                                      preexec_fn=_default_sigint)
            await d.wait_stat("lock_waiters", 1)
            waiter.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                await waiter.wait()
            assert waiter.returncode == -signal.SIGINT
            await d.wait_stat("lock_waiters", 0)
            stats = await d.stats()
            assert stats["interrupted_waits"] == 1
            assert stats["session"]["interrupts_delivered"] >= 1
            # The holder still holds the lock.
            assert (await run("flock", "-n", str(f), "true", check=False)).returncode == 1
        finally:
            holder.kill()
            await holder.wait()
        await d.wait_stat("flocks", 0)  # RELEASE with FLOCK_UNLOCK dropped it
        assert (await run("flock", "-n", str(f), "true")).returncode == 0


POLLER = """
import os, select, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
p = select.poll()
p.register(fd, select.POLLIN)
print("polling", flush=True)
t = time.monotonic()
events = p.poll(5000)
print(events[0][1] if events else 0, round(time.monotonic() - t, 3), flush=True)
"""


async def test_poll_wakes_on_write_through_another_fd(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path) as d:
        f = d.mnt / "events"
        await run("touch", str(f))
        poller = await trio.lowlevel.open_process([PY, "-c", POLLER, str(f)],
                                                  stdout=subprocess.PIPE)
        reader = Daemon(poller, d.mnt)  # reuse its line reader
        assert await reader.readline(5) == "polling"
        await trio.sleep(0.3)
        await run("sh", "-c", f"echo event >> {f}")
        line = (await reader.readline(5)).split()
        await poller.wait()
        revents, elapsed_s = int(line[0]), float(line[1])
        assert revents & 1  # POLLIN
        assert 0.2 < elapsed_s < 4.0  # woke on the write, not on the timeout


async def test_inval_inode_makes_the_kernel_reread(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path, "--ttl-s", "60", "--keep-cache") as d:
        f = d.mnt / "cached"
        await run("sh", "-c", f"printf aaaa > {f}")
        assert (await run("cat", str(f))).stdout == b"aaaa"
        assert await d.command("set /cached bbbb") == "ok"
        # Same size, long TTLs, KEEP_CACHE: the kernel keeps serving its pages.
        assert (await run("cat", str(f))).stdout == b"aaaa"
        assert await d.command("inval /cached") == "ok True"
        assert (await run("cat", str(f))).stdout == b"bbbb"


async def test_sigterm_unmounts_cleanly(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path) as d:
        await run("sh", "-c", f"echo x > {d.mnt}/f")
        assert is_mounted(d.mnt)
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            await d.proc.wait()
        assert d.proc.returncode == 0
        assert not is_mounted(d.mnt)
        assert str(d.mnt) not in pathlib.Path("/proc/mounts").read_text()


@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 not installed")
async def test_fusermount3_mount_path(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path, "--method", "fusermount") as d:
        await run("sh", "-c", f"echo via-fusermount > {d.mnt}/f")
        assert (await run("cat", f"{d.mnt}/f")).stdout == b"via-fusermount\n"
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            await d.proc.wait()
        assert d.proc.returncode == 0
        assert not is_mounted(d.mnt)


async def test_busy_mount_is_detached_on_sigterm(tmp_path: pathlib.Path) -> None:
    async with memfs(tmp_path, "--unmount-timeout-s", "0.5") as d:
        (d.mnt / "sub").mkdir()
        squatter = await trio.lowlevel.open_process(["sleep", "30"], cwd=d.mnt / "sub")
        try:
            d.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                await d.proc.wait()
            assert d.proc.returncode == 0
            assert not is_mounted(d.mnt)  # detached although busy
        finally:
            squatter.kill()
            await squatter.wait()
