"""What the mount daemon's Python spends on one cached open: the OPEN and
its RELEASE, both answered in the read loop without a task, with neither
the kernel nor system calls in the measurement. A script, not a test: it
prints numbers.

    .venv/bin/python bench/mount_dispatch.py [--pairs 20000] [--rounds 3] [--layer mount|fuse]

A local 3-replica cell, the mount's real `ChubbyOperations` and a
`FuseSession` on a socketpair: INIT and the LOOKUPs of one cached file go
through the session as the kernel would send them; then OPEN+RELEASE byte
strings are fed to the read loop's per-request step (`_dispatch`) and the
replies are captured instead of written. Prints this process's CPU per
OPEN+RELEASE for each round. Under `valgrind --tool=cachegrind
--cache-sim=no`, two runs with different `--pairs` (2000 and 12000,
`--rounds 1`) give instructions per pair as the difference of the totals
divided by 10000 (the loop's own bookkeeping, some 2 k, included).
`--layer fuse` puts constant answers in place of the mount's (no cell):
what the FUSE layer itself costs per pair.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `chubbyfs`

import trio  # noqa: E402

from chubbyfs._frozen import builder  # noqa: E402
from chubbyfs.fuse import abi  # noqa: E402
from chubbyfs.fuse.ops import AnswerNow, Operations, RequestContext  # noqa: E402
from chubbyfs.fuse.replies import OpenOut  # noqa: E402

CELL = "bench"
PATH = ("bench", "d", "cached")  # under the mount: /<cell>/d/cached


def _request(opcode: int, body: bytes, *, unique: int, nodeid: int) -> bytes:
    header = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 4242, 0, 0)
    return header + body


def _reply(msg: bytes) -> tuple[int, bytes]:
    length, error, _unique = abi.OUT_HEADER.unpack_from(msg)
    assert length == len(msg)
    return error, msg[abi.OUT_HEADER.size:]


class _ConstantAnswers(Operations):
    """`--layer fuse`: every OPEN answered as the mount answers a cached one,
    every RELEASE at once, from nothing: the FUSE layer's own cost."""

    def __init__(self) -> None:
        self._open_out = builder(OpenOut)
        self._fh = 0

    def answer_now_handlers(self) -> dict[str, AnswerNow]:
        return {"open": self.open_now, "release": self.release_now}

    def open_now(self, ctx: RequestContext, req: object) -> OpenOut:
        self._fh += 1
        return self._open_out(self._fh, abi.FOPEN_KEEP_CACHE | abi.FOPEN_NOFLUSH)

    def release_now(self, ctx: RequestContext, req: object) -> None:
        return None


async def _measure(addresses: list[str] | None, pairs: int, rounds: int) -> list[float]:
    """On the mount's operations over a cell at `addresses`, or (None) on
    constant answers."""
    from chubbyfs.client.session import open_session
    from chubbyfs.fuse.negotiate import FuseConfig
    from chubbyfs.fuse.session import FuseSession
    from chubbyfs.mount.ops import ChubbyOperations, MountConfig
    from chubbyfs.mount.sessions import SessionPool

    if addresses is not None:
        async with open_session(CELL, addresses=addresses) as s:
            await (await s.open(f"/ls/{CELL}/d", create="directory")).close()
            h = await s.open(f"/ls/{CELL}/d/cached", create="file", write=True)
            await h.set_contents(b"v" * 100)
            await h.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel = trio.socket.from_stdlib_socket(theirs)
    unique = 0

    async def call(opcode: int, body: bytes = b"", nodeid: int = 1) -> bytes:
        nonlocal unique
        unique += 2
        await kernel.send(_request(opcode, body, unique=unique, nodeid=nodeid))
        error, payload = _reply(await kernel.recv(1 << 20))
        assert error == 0, (opcode, error)
        return payload

    with ours, theirs:
        async with trio.open_nursery() as nursery:
            pool = SessionPool(nursery, {CELL: addresses or []})
            ops: Operations = ChubbyOperations(pool, MountConfig()) if addresses is not None else _ConstantAnswers()
            session = FuseSession(ours.fileno(), ops, FuseConfig(busy_poll_us=0))
            if isinstance(ops, ChubbyOperations):
                ops.session = session
            await nursery.start(session.serve)
            await call(abi.Opcode.INIT, abi.INIT_IN.pack(7, 45, 131072, 0xFFFFFFFF, 0), nodeid=0)
            node = 2
            if addresses is not None:
                node = 1
                for name in PATH:
                    node = struct.unpack_from("<Q", await call(abi.Opcode.LOOKUP, name.encode() + b"\0", node))[0]
            open_in = abi.OPEN_IN.pack(os.O_RDONLY, 0)
            for _ in range(3):  # the session caches the file; its read handle is at hand
                fh = struct.unpack_from("<Q", await call(abi.Opcode.OPEN, open_in, node))[0]
                await call(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0), node)

            replies: list[bytes] = []
            session._reply = replies.append  # type: ignore[method-assign,assignment]
            dispatch = session._dispatch
            open_view = memoryview(_request(abi.Opcode.OPEN, open_in, unique=2, nodeid=node))
            release = bytearray(_request(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(0, os.O_RDONLY, 0, 0),
                                         unique=4, nodeid=node))
            release_view = memoryview(release)
            fh_at = abi.IN_HEADER.size  # fuse_release_in starts with fh
            opened = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + abi.OPEN_OUT.size, 0, 2)
            released = abi.OUT_HEADER.pack(abi.OUT_HEADER.size, 0, 4)

            def loop(n: int) -> None:
                for _ in range(n):
                    dispatch(open_view, nursery)
                    reply = replies.pop()
                    if reply[:16] != opened:
                        raise AssertionError(f"OPEN answered {reply!r}")
                    release[fh_at:fh_at + 8] = reply[16:24]
                    dispatch(release_view, nursery)
                    if replies.pop() != released:
                        raise AssertionError("RELEASE not answered at once, or answered with an error")

            loop(2000)  # warm-up
            results = []
            for _ in range(rounds):
                cpu0 = time.process_time()
                loop(pairs)
                results.append((time.process_time() - cpu0) / pairs)
            await pool.aclose()
            nursery.cancel_scope.cancel()
    return results


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000, help="OPEN+RELEASE pairs per round (default 20000)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    ap.add_argument("--layer", choices=("mount", "fuse"), default="mount",
                    help="the mount's operations on a cell (default), or the FUSE layer alone")
    args = ap.parse_args(argv)
    if args.layer == "fuse":
        results = trio.run(_measure, None, args.pairs, args.rounds)
        args.layer = "FUSE layer alone"
    else:
        results = _on_a_cell(args)
    for i, per_pair in enumerate(results, 1):
        print(f"round {i}: {per_pair * 1e6:.2f} us CPU per cached OPEN+RELEASE ({args.pairs} pairs, {args.layer})")
    return 0


def _on_a_cell(args: argparse.Namespace) -> list[float]:
    from chubbyfs.testing.localcell import LocalCell

    with tempfile.TemporaryDirectory(prefix="chubbyfs-bench-dispatch-") as tmp:
        cell = LocalCell(Path(tmp), 3, name=CELL, state_machine="chubby")
        cell.start_all()
        try:
            results = trio.run(_measure, list(cell.addresses.values()), args.pairs, args.rounds)
        finally:
            cell.stop_all()
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
