"""Mounting and unmounting a FUSE filesystem without libfuse.

Two strategies, as go-fuse and fuser do:
* direct (root): open /dev/fuse and call mount(2) through ctypes with
  `fd=N,rootmode=...,user_id=...,group_id=...`; type `fuse.<subtype>`.
* fusermount3 (anyone): the setuid helper mounts and hands the fd back over
  a socketpair named by `_FUSE_COMMFD` (SCM_RIGHTS).

mount(2) returns before INIT is answered, so mounting from the event loop is
safe; anything that may wait on the filesystem (umount, fusermount3 -u)
runs in a worker thread, never in the loop that must answer the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .negotiate import FuseConfig
from .ops import Operations
from .session import FuseSession

log = logging.getLogger("chubbyfs.fuse")

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

Method = Literal["auto", "direct", "fusermount"]


class MountError(OSError):
    """Mounting or unmounting failed."""


@dataclass(frozen=True, slots=True)
class MountOptions:
    fsname: str = "chubbyfs"  # first column of /proc/mounts
    subtype: str = "chubbyfs"  # type shows as fuse.<subtype>
    allow_other: bool = False  # non-root: needs user_allow_other in /etc/fuse.conf
    default_permissions: bool = True  # kernel checks mode bits; no ACCESS requests
    max_read: int | None = None
    method: Method = "auto"  # auto: direct as root, else fusermount3
    fusermount: str = "fusermount3"
    # SIGTERM/SIGHUP end the `mount_fs` body so the mount is removed cleanly.
    handle_signals: bool = True
    unmount_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (self.fsname, self.subtype):
            if not name or any(c in name for c in ",= \t\n\\"):
                raise ValueError(f"fsname/subtype must be plain words, got {name!r}")
        if self.method not in ("auto", "direct", "fusermount"):
            raise ValueError(f"unknown mount method {self.method!r}")
        if self.max_read is not None and self.max_read <= 0:
            raise ValueError("max_read must be positive")

    def common_options(self) -> list[str]:
        opts = []
        if self.allow_other:
            opts.append("allow_other")
        if self.default_permissions:
            opts.append("default_permissions")
        if self.max_read is not None:
            opts.append(f"max_read={self.max_read}")
        return opts


_libc: Any = None


def _libc_fn() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p)
        _libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    return _libc


def _check_mountpoint(mountpoint: str) -> os.stat_result:
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        raise MountError(exc.errno, f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"mountpoint {mountpoint} is not a directory")
    return st


def mount_direct(mountpoint: str, options: MountOptions) -> int:
    """mount(2) as root; returns the /dev/fuse fd (close-on-exec)."""
    st = _check_mountpoint(mountpoint)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = ",".join([
            f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}",
            f"user_id={os.getuid()}", f"group_id={os.getgid()}", *options.common_options(),
        ])
        rc = _libc_fn().mount(options.fsname.encode(), mountpoint.encode(),
                              f"fuse.{options.subtype}".encode(), MS_NOSUID | MS_NODEV,
                              data.encode())
        if rc != 0:
            err = ctypes.get_errno()
            raise MountError(err, f"mount {mountpoint}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount_fusermount(mountpoint: str, options: MountOptions) -> int:
    """Mount through fusermount3 and receive the fd over `_FUSE_COMMFD`."""
    _check_mountpoint(mountpoint)
    opts = ",".join([f"fsname={options.fsname}", f"subtype={options.subtype}",
                     *options.common_options()])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
            try:
                proc = subprocess.run(
                    [options.fusermount, "-o", opts, "--", mountpoint], env=env,
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    capture_output=True, text=True, check=False)
            except FileNotFoundError:
                raise MountError(errno.ENOENT, f"{options.fusermount} not found") from None
        # fusermount3 has exited; its message (1 byte + the fd) waits in the socket.
        ours.settimeout(5.0)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:
            raise MountError(exc.errno or errno.EIO, f"receiving the fd: {exc}") from None
    if not fds:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise MountError(errno.EIO, f"{options.fusermount} failed: {detail}")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def _mountinfo_has(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                sep = fields.index("-")
                if fields[sep + 1].startswith("fuse"):
                    return True
    return False


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def resolve_mountpoint(mountpoint: str | os.PathLike[str]) -> str:
    """Absolute path with symlinks resolved in the parent only: never touches
    the mountpoint itself, which may be a mount nobody answers for."""
    path = os.path.abspath(os.fspath(mountpoint))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a FUSE filesystem is mounted exactly at `mountpoint`."""
    return _mountinfo_has(resolve_mountpoint(mountpoint))


def unmount(mountpoint: str, method: Method = "auto", fusermount: str = "fusermount3") -> None:
    """Unmount; if busy, detach lazily (existing users keep it until they leave).

    Blocking: call from a worker thread when a session of this process serves
    the mount.
    """
    if method == "auto":
        method = "direct" if os.geteuid() == 0 else "fusermount"
    if method == "direct":
        libc = _libc_fn()
        if libc.umount2(mountpoint.encode(), 0) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            log.warning("%s is busy; detaching lazily", mountpoint)
            if libc.umount2(mountpoint.encode(), MNT_DETACH) == 0:
                return
            err = ctypes.get_errno()
        raise MountError(err, f"umount {mountpoint}: {os.strerror(err)}")
    for args in (["-u"], ["-u", "-z"]):
        proc = subprocess.run([fusermount, *args, "--", mountpoint], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode == 0:
            return
    raise MountError(errno.EIO, f"{fusermount} -u {mountpoint}: {proc.stderr.strip()}")


def _open_mount(mountpoint: str, options: MountOptions) -> tuple[int, Method]:
    method = options.method
    if method == "auto":
        method = "direct" if os.geteuid() == 0 else "fusermount"
    if method == "direct":
        return mount_direct(mountpoint, options), "direct"
    return mount_fusermount(mountpoint, options), "fusermount"


async def _end_on_signal(scope: trio.CancelScope, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            scope.cancel()
            return


@asynccontextmanager
async def mount_fs(mountpoint: str | os.PathLike[str], ops: Operations,
                   options: MountOptions | None = None,
                   config: FuseConfig | None = None) -> AsyncIterator[FuseSession]:
    """Mount `ops` at `mountpoint` and serve it for the body of the block.

    Leaving the block (normally, by exception, by cancellation, or on
    SIGTERM/SIGHUP when `handle_signals`) unmounts, lazily if busy, waits up
    to `unmount_timeout_s` for the kernel to end the connection, then stops
    serving and closes the device.
    """
    options = options or MountOptions()
    path = resolve_mountpoint(mountpoint)
    fd, method = await trio.to_thread.run_sync(_open_mount, path, options)
    session = FuseSession(fd, ops, config)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            body_scope = trio.CancelScope()
            if options.handle_signals and threading.current_thread() is threading.main_thread():
                await nursery.start(_end_on_signal, body_scope)
            try:
                with body_scope:
                    yield session
            except BaseException as exc:  # re-raised below, outside the nursery
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await _teardown(path, method, session, options)
                nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    if body_error is not None:
        raise body_error


async def _teardown(path: str, method: Method, session: FuseSession,
                    options: MountOptions) -> None:
    with trio.move_on_after(options.unmount_timeout_s) as scope:
        if not session.closed or await trio.to_thread.run_sync(_mountinfo_has, path):
            try:
                await trio.to_thread.run_sync(unmount, path, method, options.fusermount)
            except MountError as exc:
                log.error("unmount failed: %s", exc)
        await session.wait_closed()
    if scope.cancelled_caught:
        log.warning("connection still open %.1fs after unmount; closing the device",
                    options.unmount_timeout_s)
    await session.detach()
