"""`chubbyfs mount` and `chubbyfs umount`: every cell of the cells file under
one mount point (default /ls), in the foreground or as a daemon.

    chubbyfs mount /ls                       # foreground, logs to stderr
    chubbyfs mount /ls --daemon              # returns once mounted; logs to syslog
    chubbyfs umount /ls
    mount -t fuse.chubbyfs none /ls -o cells=/etc/chubbyfs/cells.toml
                                             # through contrib/mount.fuse.chubbyfs
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from chubbyfs.cell.config import ConfigError, load_cells_file

log = logging.getLogger("chubbyfs.mount")

# mount(8) options that mount(8) itself handles or that mean nothing to us;
# accepted so that an fstab line can carry them.
_GENERIC_OPTIONS = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
                    "strictatime", "async", "sync"}
_VALUE_OPTIONS = {"cells": "cells", "attr_timeout": "attr_timeout", "entry_timeout": "entry_timeout",
                  "call_timeout": "call_timeout", "max_file_bytes": "max_file_bytes", "log": "log_file",
                  "busy_poll_us": "busy_poll_us"}
_INT_OPTIONS = {"max_file_bytes", "busy_poll_us"}


def apply_mount_options(args: argparse.Namespace, text: str) -> None:
    """Fold `-o a,b=c` (as mount(8) passes it) into the parsed arguments."""
    for item in filter(None, (o.strip() for o in text.split(","))):
        key, eq, value = item.partition("=")
        if item in _GENERIC_OPTIONS or key.startswith("x-") or key.startswith("comment"):
            continue
        if item == "allow_other":
            args.allow_other = True
        elif item == "noallow_other":
            args.allow_other = False
        elif key in _VALUE_OPTIONS and eq:
            dest = _VALUE_OPTIONS[key]
            try:
                setattr(args, dest, value if dest in ("cells", "log_file") else
                        int(value) if dest in _INT_OPTIONS else float(value))
            except ValueError:
                raise ConfigError(f"mount option {key}= needs a number, got {value!r}") from None
        elif item == "ro":
            raise ConfigError("read-only mounts are not supported (the cell's ACLs decide who may write)")
        else:
            raise ConfigError(f"unknown mount option {item!r}")


def _setup_logging(args: argparse.Namespace, daemon: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s chubbyfs[%(process)d] %(levelname)s %(message)s"))
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("chubbyfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s chubbyfs[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)


async def serve_mount(args: argparse.Namespace, cells: dict[str, list[str]],
                      ready: Callable[[str | None], None]) -> int:
    from chubbyfs.fuse import FuseConfig, MountOptions, mount_fs
    from chubbyfs.fuse.abi import InitFlag
    from chubbyfs.fuse.negotiate import DEFAULT_WANT
    from chubbyfs.mount.ops import ChubbyOperations, MountConfig
    from chubbyfs.mount.sessions import SessionPool

    config = MountConfig(attr_timeout_s=args.attr_timeout, entry_timeout_s=args.entry_timeout,
                         max_file_bytes=args.max_file_bytes)
    allow_other = args.allow_other if args.allow_other is not None else os.geteuid() == 0
    options = MountOptions(fsname="chubbyfs", subtype="chubbyfs", allow_other=allow_other,
                           default_permissions=False)
    # O_TRUNC must reach open() so that truncation and new contents are one
    # commit; without it the kernel truncates through a separate setattr.
    fuse_config = FuseConfig(want=int(DEFAULT_WANT | InitFlag.ATOMIC_O_TRUNC),
                             require=int(InitFlag.ATOMIC_O_TRUNC), busy_poll_us=args.busy_poll_us)
    async with trio.open_nursery() as nursery:
        pool = SessionPool(nursery, cells, call_timeout_s=args.call_timeout)
        ops = ChubbyOperations(pool, config)
        try:
            async with mount_fs(args.mountpoint, ops, options, fuse_config) as session:
                ops.session = session
                await session.wait_initialized()
                log.info("mounted %d cell(s) (%s) at %s", len(cells), ", ".join(sorted(cells)),
                         args.mountpoint)
                ready(None)
                with trio.open_signal_receiver(signal.SIGINT) as interrupts:
                    async with trio.open_nursery() as waiters:
                        async def on_interrupt() -> None:
                            async for _ in interrupts:
                                log.info("interrupted: unmounting")
                                waiters.cancel_scope.cancel()
                                return
                        waiters.start_soon(on_interrupt)
                        await session.wait_closed()
                        waiters.cancel_scope.cancel()
        except OSError as exc:
            ready(f"cannot mount {args.mountpoint}: {exc}")
            nursery.cancel_scope.cancel()
            return 1
        log.info("unmounted %s; ending sessions", args.mountpoint)
        await pool.aclose()
        nursery.cancel_scope.cancel()
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    if args.options:
        apply_mount_options(args, args.options)
    from chubbyfs.fuse.negotiate import MAX_BUSY_POLL_US

    if not 0 <= args.busy_poll_us <= MAX_BUSY_POLL_US:
        raise ConfigError(f"--busy-poll-us must be between 0 and {MAX_BUSY_POLL_US}, not {args.busy_poll_us}")
    cells = load_cells_file(args.cells or _default_cells_file())
    if not cells:
        raise ConfigError("the cells file names no cells")
    mountpoint = Path(args.mountpoint)
    if not mountpoint.exists():
        mountpoint.mkdir(parents=True)
    args.mountpoint = str(mountpoint.absolute())
    if not args.daemon:
        _setup_logging(args, daemon=False)

        def ready(error: str | None) -> None:
            if error:
                print(f"chubbyfs: {error}", file=sys.stderr)
        return trio.run(serve_mount, args, cells, ready)
    return _daemonize(args, cells)


def _daemonize(args: argparse.Namespace, cells: dict[str, list[str]]) -> int:
    """Fork; the parent returns once the child has mounted (or says why not),
    so `mount(8)` and systemd Type=forking see the mount in place."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
        if answer == "ok":
            return 0
        print(f"chubbyfs: {answer or 'the mount daemon exited before mounting'}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(args, daemon=True)

    def ready(error: str | None) -> None:
        nonlocal write_end
        if write_end >= 0:
            os.write(write_end, (error or "ok").encode())
            os.close(write_end)
            write_end = -1

    try:
        code = trio.run(serve_mount, args, cells, ready)
    except BaseException as exc:  # the parent must hear why
        ready(f"{type(exc).__name__}: {exc}")
        log.exception("mount daemon failed")
        code = 1
    ready("the mount daemon exited before mounting")
    os._exit(code)


def cmd_umount(args: argparse.Namespace) -> int:
    from chubbyfs.fuse.mount import MountError, is_mounted, resolve_mountpoint, unmount

    path = resolve_mountpoint(args.mountpoint)
    if not is_mounted(path):
        print(f"chubbyfs: nothing is mounted at {path}", file=sys.stderr)
        return 1
    try:
        unmount(path)
    except MountError as exc:
        print(f"chubbyfs: {exc}", file=sys.stderr)
        return 1
    return 0


def _default_cells_file() -> Path:
    from chubbyfs.cli import default_cells_file

    return default_cells_file()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mount", help="mount every cell of the cells file (default at /ls)")
    m.add_argument("mountpoint", nargs="?", default="/ls")
    m.add_argument("--cells", help="cells file (default: $CHUBBYFS_CELLS, /etc/chubbyfs/cells.toml, ~/.config)")
    m.add_argument("--daemon", action="store_true", help="detach once mounted; log to syslog")
    m.add_argument("--allow-other", dest="allow_other", action="store_true", default=None,
                   help="let every local user use the mount (default when run as root)")
    m.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    m.add_argument("--attr-timeout", type=float, default=60.0, metavar="S",
                   help="at most S seconds the kernel caches attributes and pages a session caches "
                        "(kept coherent by invalidations; 0: no kernel caching; default 60)")
    m.add_argument("--entry-timeout", type=float, default=60.0, metavar="S",
                   help="at most S seconds the kernel caches names, also missing ones (default 60)")
    m.add_argument("--call-timeout", type=float, default=15.0, metavar="S",
                   help="a call fails with EIO when no master answers within S seconds")
    m.add_argument("--max-file-bytes", type=int, default=256 * 1024, metavar="N",
                   help="largest file written through the mount (the cell's limit)")
    m.add_argument("--busy-poll-us", type=int, default=50, metavar="US",
                   help="after answering, poll for the next request this long before sleeping "
                        "(0: never; never when the daemon may use one CPU only)")
    m.add_argument("--log-file", help="log here instead of stderr/syslog")
    m.add_argument("-o", dest="options", metavar="OPTS",
                   help="mount(8)-style options: cells=,allow_other,attr_timeout=,entry_timeout=,"
                        "call_timeout=,max_file_bytes=,busy_poll_us=,log=")
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="unmount (lazily if busy)")
    u.add_argument("mountpoint", nargs="?", default="/ls")
    u.set_defaults(func=cmd_umount)
