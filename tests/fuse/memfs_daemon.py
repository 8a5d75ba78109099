"""Serve MemFS on a mountpoint in its own process, for the mount tests.

    python -m tests.fuse.memfs_daemon MOUNTPOINT [--ttl-s N] [--keep-cache]
        [--method auto|direct|fusermount] [--unmount-timeout-s S]

Prints "READY <flags>" once INIT is answered. Reads commands on stdin, one a
line, and answers one line each:
    set PATH TEXT   replace a file's content behind the kernel's back
    inval PATH      notify_inval_inode for that file
    stats           JSON with the lock table and session statistics
SIGTERM unmounts and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import trio

from chubbyfs.fuse import MountOptions, mount_fs
from chubbyfs.fuse.session import FuseSession

from .memfs import MemFS


async def _commands(fs: MemFS, session: FuseSession) -> None:
    # An FdStream, not trio.wrap_file: a thread blocked in readline() would
    # keep SIGTERM from ending the daemon.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                return
            pending += chunk
        raw, _, pending = pending.partition(b"\n")
        cmd, _, rest = raw.decode().strip().partition(" ")
        try:
            if cmd == "set":
                path, _, text = rest.partition(" ")
                node = fs.resolve(path)
                node.data[:] = text.encode()
                fs.changed(node)
                answer = "ok"
            elif cmd == "inval":
                delivered = await session.notify_inval_inode(fs.resolve(rest).ino)
                answer = f"ok {delivered}"
            elif cmd == "stats":
                fs.assert_invariants()
                session.assert_invariants()
                answer = json.dumps({
                    "lock_waiters": fs.lock_waiters,
                    "interrupted_waits": fs.interrupted_waits,
                    "flocks": len(fs.flocks),
                    "session": dataclasses.asdict(session.statistics()),
                })
            else:
                answer = f"error unknown command {cmd!r}"
        except Exception as exc:  # report, keep serving
            answer = f"error {exc!r}"
        print(answer, flush=True)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--ttl-s", type=float, default=1.0)
    parser.add_argument("--keep-cache", action="store_true")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--unmount-timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    fs = MemFS(ttl_ns=int(args.ttl_s * 1e9), keep_cache=args.keep_cache)
    options = MountOptions(fsname="memfs", subtype="memfs", method=args.method,
                           unmount_timeout_s=args.unmount_timeout_s)
    async with mount_fs(args.mountpoint, fs, options) as session:
        fs.session = session
        negotiated = await session.wait_initialized()
        print(f"READY {negotiated.flags:#x}", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commands, fs, session)
            await session.wait_closed()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="memfs %(levelname)s %(message)s")
    trio.run(main, sys.argv[1:])
