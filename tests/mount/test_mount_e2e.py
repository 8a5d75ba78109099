"""The mount end to end: a real cell, two mount daemons (two "machines"),
ordinary shell tools and Python programs in their own processes."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid

import pytest

from .conftest import CELL, PY, REPO, Setup, needs_fuse

pytestmark = needs_fuse


def sh(cmd: str, cwd: pathlib.Path | None = None, *, check: bool = True, env: dict | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, env=env,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({out.returncode}): {out.stderr}")
    return out


def fresh_dir(mounts: Setup) -> tuple[pathlib.Path, pathlib.Path]:
    """A new directory, as seen through mount 1 and mount 2."""
    name = f"d{uuid.uuid4().hex[:8]}"
    (mounts.m1.cell / name).mkdir()
    return mounts.m1.cell / name, mounts.m2.cell / name


def xattr(path: pathlib.Path, name: str) -> str:
    return os.getxattr(path, f"user.chubby.{name}").decode()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_shell_tools(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo hello > f && cat f", d)
    assert (d / "f").read_text() == "hello\n"
    sh("echo more >> f && cat >> f <<< again", d)
    assert (d2 / "f").read_text() == "hello\nmore\nagain\n"
    sh("cp f g && mv g h && sed -i s/hello/HELLO/ f && tee t <<< teed >/dev/null", d)
    assert sorted(os.listdir(d)) == ["f", "h", "t"]
    assert (d / "h").read_text() == "hello\nmore\nagain\n"
    assert (d2 / "f").read_text() == "HELLO\nmore\nagain\n"
    assert (d / "t").read_text() == "teed\n"
    sh(f"{PY} -c \"open('p', 'w').write('from python')\"", d)
    assert (d2 / "p").read_text() == "from python"
    # Writes at offsets, truncation through a descriptor, O_TRUNC.
    sh(f"{PY} -c \"import os; fd = os.open('p', os.O_RDWR); os.pwrite(fd, b'FROM', 0); "
       f"os.ftruncate(fd, 8); os.close(fd)\"", d)
    assert (d2 / "p").read_text() == "FROM pyt"
    sh("truncate -s 4 p && printf x | dd of=p bs=1 seek=6 conv=notrunc status=none", d)
    assert (d2 / "p").read_bytes() == b"FROM\0\0x"
    out = sh("stat -c '%s %F' f; ls -l f", d).stdout.splitlines()
    assert out[0] == f"{len('HELLO more again ')} regular file"
    sh("mkdir -p sub/deeper && echo x > sub/deeper/y && rm sub/deeper/y && rmdir sub/deeper", d)
    assert os.listdir(d2 / "sub") == []
    fail = sh("rmdir .", d / "..", check=False)
    assert fail.returncode != 0
    assert sh(f"rmdir {d.name}", d.parent, check=False).returncode != 0  # not empty
    sh("rm f h t p && rmdir sub", d)
    assert os.listdir(d2) == []


def test_write_through_one_mount_is_read_at_once_through_the_other(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    for i in range(15):
        value = f"value-{i:03d}\n"  # same size every time: no size change to give it away
        sh(f"echo value-{i:03d} > cfg", d)
        assert sh("cat cfg", d2).stdout == value
    sh("echo created > new", d)
    assert (d2 / "new").read_text() == "created\n"
    sh("rm new", d2)
    assert not (d / "new").exists()


def test_rename_within_a_directory_replaces_and_across_directories_is_exdev(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("mkdir a b && echo 1 > a/x && echo 2 > a/y && mv a/x a/y", d)
    assert os.listdir(d2 / "a") == ["y"] and (d2 / "a/y").read_text() == "1\n"
    with pytest.raises(OSError) as info:
        os.rename(d / "a/y", d / "b/y")
    assert info.value.errno == errno.EXDEV
    out = sh("mv a/y b/", d)  # falls back to copy and delete
    assert (d2 / "b/y").read_text() == "1\n" and os.listdir(d2 / "a") == []
    assert "Operation not supported" not in out.stderr  # read-only xattrs are skipped quietly
    with pytest.raises(OSError) as info:
        os.rename(d / "b", mounts.m1.path / "elsewhere")
    assert info.value.errno in (errno.EXDEV, errno.EPERM)


def test_flock_between_two_mounts(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo lock > l", d)
    holder = subprocess.Popen(["flock", "-x", "l", "-c", "echo held; sleep 1.5"], cwd=d,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        nb = sh("flock -n l true", d2, check=False)
        assert nb.returncode == 1
        timed = time.monotonic()
        assert sh("flock -w 0.4 l true", d2, check=False).returncode == 1
        assert 0.35 < time.monotonic() - timed < 3
        start = time.monotonic()
        sh("flock -x l true", d2)  # blocks until the holder lets go
        waited = time.monotonic() - start
        assert holder.wait(timeout=5) == 0
        assert waited > 0.5, waited
    finally:
        holder.kill()
    # Shared locks share, across mounts.
    a = subprocess.Popen(["flock", "-s", "l", "-c", "echo in; sleep 1"], cwd=d, stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline() == "in\n"
        assert sh("flock -s -n l true", d2, check=False).returncode == 0
        assert sh("flock -x -n l true", d2, check=False).returncode == 1
    finally:
        a.wait(timeout=10)
    assert sh("flock -x -n l true", d2, check=False).returncode == 0


def test_interrupted_waiter_goes_away_and_is_not_granted(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo > l", d)
    holder = subprocess.Popen(["flock", "-x", "l", "-c", "echo held; sleep 2"], cwd=d,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        waiter = subprocess.Popen(["flock", "-x", "l", "-c", "echo WAITER-GOT-IT"], cwd=d2,
                                  stdout=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        time.sleep(0.4)
        assert waiter.poll() is None
        waiter.send_signal(signal.SIGINT)  # Ctrl-C
        assert waiter.wait(timeout=3) == -signal.SIGINT
        assert waiter.stdout.read() == ""
        killed = subprocess.Popen(["flock", "-x", "l", "true"], cwd=d2)
        time.sleep(0.3)
        killed.kill()
        assert killed.wait(timeout=3) == -signal.SIGKILL
        assert holder.wait(timeout=5) == 0
    finally:
        holder.kill()
    # Nobody was left queued: the lock is free right after the holder.
    assert sh("flock -n l true", d, check=False).returncode == 0


def test_sequencer_is_valid_while_held_and_invalid_after(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo > lock", d)
    assert sh("getfattr -n user.chubby.sequencer lock", d, check=False).returncode != 0  # no lock held
    script = ('seq=$(getfattr --only-values -n user.chubby.sequencer lock); echo "$seq"; '
              f'{PY} -m chubbyfs sequencer check "$seq"')
    out = sh(f"flock -x lock -c '{script}'", d, env={**mounts.env, "PYTHONPATH": str(REPO)})
    seq, verdict = out.stdout.splitlines()
    assert seq.startswith(f"chubbyseq1:{CELL}:X:") and seq.endswith(f"/{d.name}/lock")
    assert verdict == "valid"
    after = subprocess.run([PY, "-m", "chubbyfs", "sequencer", "check", seq], cwd=REPO, env=mounts.env,
                           capture_output=True, text=True)
    assert after.returncode == 1 and after.stdout.startswith("invalid")
    # The other mount does not see this mount's sequencer.
    assert "sequencer" not in sh("getfattr -d lock", d2).stdout


def test_xattrs(mounts: Setup) -> None:
    d, _ = fresh_dir(mounts)
    sh("echo data > f", d)
    dump = sh("getfattr -d f", d).stdout
    for name in ("instance", "content_gen", "lock_gen", "acl_gen", "checksum", "ephemeral",
                 "acl.read", "acl.write", "acl.change", "lock_delay_ms"):
        assert f"user.chubby.{name}=" in dump, name
    gen = int(xattr(d / "f", "content_gen"))
    sh("echo data2 > f", d)
    assert int(xattr(d / "f", "content_gen")) > gen
    assert xattr(d / "f", "ephemeral") == "0"
    sh("setfattr -n user.chubby.acl.read -v readers f && setfattr -n user.chubby.lock_delay_ms -v 2500 f", d)
    assert xattr(d / "f", "acl.read") == "readers" and xattr(d / "f", "lock_delay_ms") == "2500"
    acl_gen = int(xattr(d / "f", "acl_gen"))
    assert acl_gen > gen
    for bad in ("-n user.chubby.lock_delay_ms -v 999999", "-n user.chubby.lock_delay_ms -v soon",
                "-n user.chubby.acl.write -v ''"):
        assert "Invalid argument" in sh(f"setfattr {bad} f", d, check=False).stderr
    assert "not supported" in sh("setfattr -n user.chubby.content_gen -v 1 f", d, check=False).stderr
    assert "not supported" in sh("setfattr -n user.other -v 1 f", d, check=False).stderr
    assert "No such attribute" in sh("getfattr -n user.nope f", d, check=False).stderr
    assert int(xattr(d / "f", "acl_gen")) == acl_gen  # refusals changed nothing


def test_cas_from_the_shell_and_lost_updates_reported(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo v1 > f", d)
    gen = xattr(d / "f", "content_gen")
    sh(f"setfattr -n user.chubby.cas -v {gen} f && echo v2 > f", d)
    assert (d2 / "f").read_text() == "v2\n"
    # tee reports the error of close(); bash ignores it for `>` redirections.
    failed = sh(f"setfattr -n user.chubby.cas -v {gen} f && echo v3 | tee f", d, check=False)
    assert failed.returncode != 0 and "Resource temporarily unavailable" in failed.stderr
    assert (d2 / "f").read_text() == "v2\n"
    # Read-modify-write through one open file loses to a concurrent writer:
    # reported at close, not silently overwritten.
    fd = os.open(d / "f", os.O_RDWR)
    try:
        assert os.read(fd, 100) == b"v2\n"
        (d2 / "f").write_text("other\n")
        os.pwrite(fd, b"V", 0)
        with pytest.raises(OSError) as info:
            os.close(fd)
        assert info.value.errno == errno.EAGAIN
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert (d2 / "f").read_text() == "other\n"


def test_bad_input_gets_the_documented_error_and_changes_nothing(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo keep > f", d)
    gen = xattr(d / "f", "content_gen")
    big = sh("head -c 300000 /dev/zero > f", d, check=False)
    assert big.returncode != 0 and "File too large" in big.stderr
    with pytest.raises(OSError) as info:
        with open(d / "f", "ab") as f:
            f.write(b"x" * 270_000)
    assert info.value.errno == errno.EFBIG
    assert xattr(d / "f", "content_gen") == gen and (d2 / "f").read_text() == "keep\n"
    for cmd, message in (("ln -s f sym", "Operation not permitted"), ("ln f hard", "Operation not permitted"),
                         ("chmod 600 f", "Operation not permitted"), ("chown 1 f", "Operation not permitted"),
                         ("touch -d 2001-01-01 f", "Operation not permitted"), ("mkfifo p", "Operation not permitted"),
                         ("echo > " + "n" * 256, "File name too long"), ("mkdir ../.chubby", "File exists"),
                         ("echo > $'bad\\001name'", "Invalid argument")):
        out = sh(cmd, d, check=False)
        assert out.returncode != 0 and message in out.stderr, (cmd, out.stderr)
    assert os.listdir(d2) == ["f"] and xattr(d / "f", "content_gen") == gen
    sh("touch f && chmod 644 f", d)  # restating what is there is fine
    probe = ("import fcntl, os\nfd = os.open('f', os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)\nexcept OSError as e:\n    print(e.errno)\n"
             "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('whole-file ok')")
    out = sh(f"{PY} -c \"{probe}\"", d).stdout.split()
    assert out == [str(errno.EOPNOTSUPP), "whole-file", "ok"]


def test_fcntl_locks_exclude_across_mounts_and_end_on_close(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    sh("echo > l", d)
    fd = os.open(d / "l", os.O_RDWR)
    try:
        import fcntl
        fcntl.lockf(fd, fcntl.LOCK_EX)
        probe = f"{PY} -c \"import fcntl; f = open('l', 'r+'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\""
        assert sh(probe, d2, check=False).returncode != 0
    finally:
        os.close(fd)  # FLUSH ends the process's POSIX locks
    sh(probe, d2)


def test_closing_a_cached_read_only_descriptor_ends_the_process_fcntl_locks(mounts: Setup) -> None:
    # Cached read-only opens skip FLUSH (FOPEN_NOFLUSH), but not while an
    # fcntl lock is held on the file: POSIX ends the process's locks at the
    # close of any of its descriptors of the file, and FLUSH carries that.
    d, d2 = fresh_dir(mounts)
    sh("echo v > l", d)
    for _ in range(3):
        assert (d / "l").read_bytes() == b"v\n"  # the session caches it now
    probe = f"{PY} -c \"import fcntl; f = open('l', 'r+'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\""
    fd = os.open(d / "l", os.O_RDWR)
    try:
        import fcntl
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert sh(probe, d2, check=False).returncode != 0
        reader = os.open(d / "l", os.O_RDONLY)
        assert os.read(reader, 100) == b"v\n"
        os.close(reader)
        sh(probe, d2)  # released by that close
        fcntl.lockf(fd, fcntl.LOCK_EX)  # the daemon still serves the descriptor that locked
        assert sh(probe, d2, check=False).returncode != 0
    finally:
        os.close(fd)
    sh(probe, d2)
    assert sh("cat l", d).stdout == "v\n"


def test_identity_and_acls(mounts: Setup) -> None:
    d, _ = fresh_dir(mounts)
    sh("echo secret > f", d)
    as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups "
    out = sh(as_nobody + "cat f", d, check=False)
    assert out.returncode != 0 and "Permission denied" in out.stderr
    assert sh(as_nobody + "sh -c 'echo x > g'", d, check=False).returncode != 0
    user = sh("id -un 65534", check=False).stdout.strip() or "nobody"
    sh(f"echo {user} > ../acl/readers-{d.name} && setfattr -n user.chubby.acl.read -v readers-{d.name} f", d)
    assert sh(as_nobody + "cat f", d).stdout == "secret\n"
    assert sh(as_nobody + "sh -c 'echo x > f'", d, check=False).returncode != 0
    assert (d / "f").read_text() == "secret\n"
    assert sh(as_nobody + "cat ../.chubby/session", d).stdout.count(f"principal: {user}") == 1


def commit_index(mounts: Setup) -> int:
    rows = json.loads(sh(f"{PY} -m chubbyfs status --json", REPO, env=mounts.env).stdout)
    return max(r["commit"] for r in rows if r["commit"] is not None)


def test_a_reader_struck_from_the_acl_is_refused_at_its_next_open(mounts: Setup) -> None:
    d, _ = fresh_dir(mounts)
    sh("echo secret > f", d)
    as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups "
    user = sh("id -un 65534", check=False).stdout.strip() or "nobody"
    sh(f"echo {user} > ../acl/r-{d.name} && setfattr -n user.chubby.acl.read -v r-{d.name} f", d)
    for _ in range(3):  # the daemon keeps that user's read handle on f
        assert sh(as_nobody + "cat f", d).stdout == "secret\n"
    # ... and answers that user's opens from it, though the user may not
    # read the ACL file itself: no Open/Close in the log per cat.
    before = commit_index(mounts)
    for _ in range(10):
        assert sh(as_nobody + "cat f", d).stdout == "secret\n"
    assert commit_index(mounts) - before <= 5, "cached opens wrote to the log"
    sh(f"echo somebody-else > ../acl/r-{d.name}", d)
    out = sh(as_nobody + "cat f", d, check=False)
    assert out.returncode != 0 and "Permission denied" in out.stderr, out
    sh(f"echo {user} > ../acl/r-{d.name}", d)  # admitted again
    for _ in range(2):
        assert sh(as_nobody + "cat f", d).stdout == "secret\n"
    # The node now names another ACL, which does not list that user.
    sh(f"echo somebody-else > ../acl/r2-{d.name} && setfattr -n user.chubby.acl.read -v r2-{d.name} f", d)
    out = sh(as_nobody + "cat f", d, check=False)
    assert out.returncode != 0 and "Permission denied" in out.stderr, out
    assert sh("cat f", d).stdout == "secret\n", "an administrator still reads it"


def test_control_files(mounts: Setup) -> None:
    ctl = mounts.m1.cell / ".chubby"
    assert sorted(os.listdir(ctl)) == ["epoch", "master", "session", "state"]
    assert ".chubby" in os.listdir(mounts.m1.cell)
    assert (ctl / "state").read_text() == "ok\n"
    master = (ctl / "master").read_text().strip()
    assert master in mounts.cell.addresses.values()
    assert int((ctl / "epoch").read_text()) >= 1
    session = (ctl / "session").read_text()
    assert "state: ok" in session and f"master: {master}" in session
    assert sh(f"echo x > {ctl}/state", check=False).returncode != 0
    assert os.listdir(mounts.m1.path) == [CELL]


def test_ephemeral_file_lives_as_long_as_it_is_open(mounts: Setup) -> None:
    d, d2 = fresh_dir(mounts)
    fd = os.open(d / "member", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o1644)
    try:
        os.write(fd, b"host-a")
        os.fsync(fd)
        assert (d2 / "member").read_text() == "host-a"
        assert xattr(d2 / "member", "ephemeral") == "1"
        assert sh("stat -c %A member", d2).stdout.strip().endswith("T")
    finally:
        os.close(fd)
    # close() does not wait for the kernel's RELEASE, which closes the handle.
    deadline = time.monotonic() + 5
    while (d2 / "member").exists():
        assert time.monotonic() < deadline, "the ephemeral file outlived its last open"
        time.sleep(0.05)


def test_bound_sequencer_makes_later_operations_stale(mounts: Setup) -> None:
    d, _ = fresh_dir(mounts)
    sh("echo > lock && echo data > data", d)
    holder = subprocess.Popen(["flock", "-x", "lock", "-c",
                               "getfattr --only-values -n user.chubby.sequencer lock; echo; sleep 1"],
                              cwd=d, stdout=subprocess.PIPE, text=True)
    try:
        seq = holder.stdout.readline().strip()
        fd = os.open(d / "data", os.O_RDWR)
        try:
            os.setxattr(d / "data", "user.chubby.sequencer", seq.encode())
            os.pwrite(fd, b"D", 0)
            os.fsync(fd)  # the lock is held: accepted
            assert holder.wait(timeout=5) == 0
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"E", 0)
                os.fsync(fd)
            assert info.value.errno == errno.ESTALE
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
    finally:
        holder.kill()
    assert (d / "data").read_text() == "Data\n"
    with pytest.raises(OSError) as info:
        os.setxattr(d / "data", "user.chubby.sequencer", seq.encode())
    assert info.value.errno == errno.EBADF  # no file of ours is open there
