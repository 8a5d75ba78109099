"""The session loop against a fake kernel: a SOCK_SEQPACKET socketpair keeps
message boundaries like /dev/fuse (one read = one request, one write = one
reply), so INIT, dispatch, interrupts, notifications and error handling are
tested without root or a mount."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from chubbyfs.fuse import abi
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.errors import FuseError
from chubbyfs.fuse.negotiate import FuseConfig
from chubbyfs.fuse.ops import NOT_NOW, AnswerNow, Operations, RequestContext
from chubbyfs.fuse.replies import (
    Attr, DirEntry, DirentBuffer, EntryOut, NotifyInvalEntry, OpenOut,
)
from chubbyfs.fuse.session import FuseProtocolError, FuseSession

from .kernel_bytes import init_body, lk_body, parse_reply, request

F = abi.InitFlag
ALL_FLAGS = 0xFFFFFFFF


class Kernel:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send(self, msg: bytes) -> None:
        await self.sock.send(msg)

    async def recv(self, timeout_s: float = 2.0) -> tuple[int, int, bytes]:
        with trio.fail_after(timeout_s):
            return parse_reply(await self.sock.recv(1 << 20))

    async def expect_silence(self, wait_s: float = 0.1) -> None:
        with trio.move_on_after(wait_s):
            msg = await self.sock.recv(1 << 20)
            raise AssertionError(f"unexpected message {msg!r}")

    async def call(self, opcode: int, body: bytes = b"", unique: int = 4,
                   nodeid: int = 1) -> tuple[int, int, bytes]:
        await self.send(request(opcode, body, unique=unique, nodeid=nodeid))
        return await self.recv()


@asynccontextmanager
async def fake_mount(ops: Operations, config: FuseConfig | None = None, *, init: bool = True,
                     ) -> AsyncIterator[tuple[Kernel, FuseSession]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session = FuseSession(ours.fileno(), ops, config)
    kernel = Kernel(trio.socket.from_stdlib_socket(theirs))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            if init:
                await kernel.send(request(26, init_body(flags=ALL_FLAGS), unique=2, nodeid=0))
                error, unique, payload = await kernel.recv()
                assert (error, unique, len(payload)) == (0, 2, 64)
            yield kernel, session
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()
        ours.close()


ROOT_ATTR = Attr(ino=1, mode=0o40755, nlink=2)


class Toy(Operations):
    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []
        self.lock_waits_cancelled = 0
        self.handler_ran = trio.Event()
        self.session: FuseSession | None = None
        self.inited = trio.Event()

    async def init(self, negotiated: object) -> None:
        self.inited.set()

    async def lookup(self, ctx: RequestContext, req: rq.Lookup) -> EntryOut:
        if req.name == b"boom":
            raise ValueError("a bug in the filesystem")
        if req.name == b"wrongtype":
            return "not an entry"  # type: ignore[return-value]
        if req.name == b"denied":
            raise PermissionError(errno.EACCES, "no")
        if req.name == b"notify":
            assert self.session is not None
            self.session.notify_soon(NotifyInvalEntry(1, b"x"))
        if req.name != b"file":
            raise FuseError(errno.ENOENT)
        return EntryOut(2, Attr(ino=2, mode=0o100644, size=3))

    async def forget(self, ctx: RequestContext, req: rq.Forget) -> None:
        self.forgotten.append((req.nodeid, req.nlookup))

    async def setlkw(self, ctx: RequestContext, req: rq.SetLkW) -> None:
        self.handler_ran.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.lock_waits_cancelled += 1
            raise

    async def getxattr(self, ctx: RequestContext, req: rq.GetXattr) -> bytes:
        return b"value"

    async def listxattr(self, ctx: RequestContext, req: rq.ListXattr) -> list[bytes]:
        return [b"user.a", b"user.b"]

    async def readdir(self, ctx: RequestContext, req: rq.ReadDir, out: DirentBuffer) -> None:
        for i in range(req.offset, 100):
            if not out.add(DirEntry(10 + i, f"entry{i:03d}".encode(), 8, i + 1)):
                return


async def test_init_then_requests_and_errors() -> None:
    ops = Toy()
    async with fake_mount(ops) as (kernel, session):
        negotiated = await session.wait_initialized()
        await ops.inited.wait()
        # Toy implements setlkw, so lock requests must reach it.
        assert negotiated.has(F.FLOCK_LOCKS | F.POSIX_LOCKS)
        assert not negotiated.has(F.DO_READDIRPLUS)
        error, unique, payload = await kernel.call(1, b"file\0", unique=4)
        assert (error, unique, len(payload)) == (0, 4, 128)
        assert struct.unpack_from("<Q", payload)[0] == 2
        assert (await kernel.call(1, b"nope\0", unique=6))[:2] == (-errno.ENOENT, 6)
        assert (await kernel.call(1, b"boom\0", unique=8))[:2] == (-errno.EIO, 8)
        assert (await kernel.call(1, b"wrongtype\0", unique=10))[:2] == (-errno.EIO, 10)
        assert (await kernel.call(1, b"denied\0", unique=12))[:2] == (-errno.EACCES, 12)
        # Not implemented by Toy: the base class answers ENOSYS.
        mkdir = struct.pack("<II", 0o755, 0) + b"d\0"
        assert (await kernel.call(9, mkdir, unique=14))[:2] == (-errno.ENOSYS, 14)
        # Opcodes the layer does not serve, and unknown ones.
        assert (await kernel.call(52, b"\0" * 24, unique=16))[:2] == (-errno.ENOSYS, 16)
        assert (await kernel.call(999, b"", unique=18))[:2] == (-errno.ENOSYS, 18)
        # Malformed: answered EIO; too short to name a request: dropped.
        assert (await kernel.call(1, b"no-nul", unique=20))[:2] == (-errno.EIO, 20)
        await kernel.send(b"\x07" * 10)
        await kernel.expect_silence()
        # FORGET / BATCH_FORGET are never answered.
        await kernel.send(request(2, struct.pack("<Q", 1), unique=22, nodeid=2))
        batch = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 3, 1, 4, 2)
        await kernel.send(request(42, batch, unique=24, nodeid=0))
        await kernel.expect_silence()
        assert sorted(ops.forgotten) == [(2, 1), (3, 1), (4, 2)]  # one task each: any order
        stats = session.statistics()
        assert stats.decode_errors == 4 and stats.handler_crashes == 2
        assert stats.in_flight == 0 and stats.replies == 10  # INIT + 9 answers
        session.assert_invariants()


class Quick(Toy):
    """Opens of inode 2 answered at once; others by the async handler."""

    def __init__(self) -> None:
        super().__init__()
        self.handled: list[int] = []

    def answer_now_handlers(self) -> dict[str, AnswerNow]:
        return {"open": self.open_now}

    def open_now(self, ctx: RequestContext, req: object) -> object:
        assert isinstance(req, rq.Open) and ctx.pid == 4242
        if req.nodeid == 3:
            raise FuseError(errno.EACCES)
        if req.nodeid == 4:
            raise RuntimeError("a bug in the fast path")
        return OpenOut(7, 0) if req.nodeid == 2 else NOT_NOW

    async def open(self, ctx: RequestContext, req: rq.Open) -> OpenOut:
        self.handled.append(req.nodeid)
        return OpenOut(8, 0)


async def test_answer_now_replies_without_a_task_or_falls_back() -> None:
    ops = Quick()
    async with fake_mount(ops) as (kernel, session):
        open_in = struct.pack("<II", 0, 0)
        error, unique, payload = await kernel.call(14, open_in, unique=4, nodeid=2)
        assert (error, unique, struct.unpack_from("<Q", payload)[0]) == (0, 4, 7)
        error, unique, payload = await kernel.call(14, open_in, unique=6, nodeid=5)
        assert (error, unique, struct.unpack_from("<Q", payload)[0]) == (0, 6, 8)
        assert (await kernel.call(14, open_in, unique=8, nodeid=3))[:2] == (-errno.EACCES, 8)
        assert (await kernel.call(14, open_in, unique=10, nodeid=4))[:2] == (-errno.EIO, 10)
        assert ops.handled == [5]
        stats = session.statistics()
        assert stats.handler_crashes == 1
        # INIT and four opens; two of the answers were errors.
        assert (stats.requests, stats.replies, stats.error_replies) == (5, 5, 2)
        session.assert_invariants()


def test_answer_now_handlers_must_name_answered_methods() -> None:
    class Wrong(Toy):
        def answer_now_handlers(self) -> dict[str, AnswerNow]:
            return {"forget": lambda ctx, req: None}  # FORGET is never answered

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, pytest.raises(ValueError, match="forget"):
        FuseSession(ours.fileno(), Wrong())


async def test_answer_now_waits_for_init() -> None:
    # Before INIT every request is EIO, including those answered at once after it.
    ops = Quick()
    async with fake_mount(ops, init=False) as (kernel, session):
        assert (await kernel.call(14, struct.pack("<II", 0, 0), unique=4, nodeid=2))[:2] == (-errno.EIO, 4)
        await kernel.send(request(26, init_body(flags=ALL_FLAGS), unique=6, nodeid=0))
        assert (await kernel.recv())[:2] == (0, 6)
        error, unique, payload = await kernel.call(14, struct.pack("<II", 0, 0), unique=8, nodeid=2)
        assert (error, unique, struct.unpack_from("<Q", payload)[0]) == (0, 8, 7)
        assert ops.handled == []


async def test_xattr_and_readdir_through_the_session() -> None:
    async with fake_mount(Toy()) as (kernel, _):
        probe = await kernel.call(22, struct.pack("<II", 0, 0) + b"user.a\0", unique=4)
        assert probe == (0, 4, struct.pack("<II", 5, 0))
        assert await kernel.call(22, struct.pack("<II", 64, 0) + b"user.a\0", unique=6) == (
            0, 6, b"value")
        too_small = await kernel.call(22, struct.pack("<II", 2, 0) + b"user.a\0", unique=8)
        assert too_small[:2] == (-errno.ERANGE, 8)
        names = await kernel.call(23, struct.pack("<II", 100, 0), unique=10)
        assert names == (0, 10, b"user.a\0user.b\0")
        read_in = struct.pack("<QQIIQII", 1, 5, 100, 0, 0, 0, 0)
        error, _, payload = await kernel.call(28, read_in, unique=12)
        assert error == 0 and len(payload) == 96  # three 32-byte dirents fit in 100
        assert struct.unpack_from("<QQII", payload) == (15, 6, 8, 8)


async def test_interrupt_cancels_a_blocked_lock_wait() -> None:
    ops = Toy()
    async with fake_mount(ops) as (kernel, session):
        lk = lk_body(1, 0x77, 0, (1 << 63) - 1, abi.F_WRLCK, 99, abi.LK_FLOCK)
        await kernel.send(request(33, lk, unique=30, nodeid=2))
        await ops.handler_ran.wait()
        await kernel.expect_silence()  # still waiting for the lock
        await kernel.send(request(36, struct.pack("<Q", 30), unique=31, nodeid=0, pid=0))
        assert await kernel.recv() == (-errno.EINTR, 30, b"")
        await kernel.expect_silence()  # the INTERRUPT itself is not answered
        assert ops.lock_waits_cancelled == 1
        assert session.statistics().interrupts_delivered == 1
        session.assert_invariants()


async def test_interrupt_arriving_before_its_request() -> None:
    ops = Toy()
    async with fake_mount(ops) as (kernel, session):
        await kernel.send(request(36, struct.pack("<Q", 40), unique=41, nodeid=0))
        lk = lk_body(1, 0x77, 0, (1 << 63) - 1, abi.F_WRLCK, 99, abi.LK_FLOCK)
        await kernel.send(request(33, lk, unique=40, nodeid=2))
        assert await kernel.recv() == (-errno.EINTR, 40, b"")
        assert not ops.handler_ran.is_set()  # cancelled before it could block
        assert session.statistics().interrupts_delivered == 1


async def test_unmatched_interrupt_expires_with_eagain() -> None:
    config = FuseConfig(interrupt_memory_s=0.2)
    async with fake_mount(Toy(), config) as (kernel, session):
        await kernel.send(request(36, struct.pack("<Q", 50), unique=51, nodeid=0))
        await kernel.expect_silence(0.05)  # not an immediate EAGAIN busy loop
        assert await kernel.recv() == (-errno.EAGAIN, 51, b"")
        assert session.statistics().interrupts_received == 1


async def test_notifications_from_a_handler_and_from_outside() -> None:
    ops = Toy()
    async with fake_mount(ops) as (kernel, session):
        ops.session = session
        await kernel.send(request(1, b"notify\0", unique=4))
        got = sorted([await kernel.recv(), await kernel.recv()], key=lambda r: r[1])
        assert got[0] == (3, 0, struct.pack("<QII", 1, 1, 0) + b"x\0")  # INVAL_ENTRY
        assert got[1][:2] == (-errno.ENOENT, 4)
        assert await session.notify_inval_inode(7, 0, -1) is True
        assert await kernel.recv() == (2, 0, struct.pack("<Qqq", 7, 0, -1))
        assert await session.notify_poll(3) is True
        assert await kernel.recv() == (1, 0, struct.pack("<Q", 3))
        assert await session.notify_delete(1, 9, b"gone") is True
        assert (await kernel.recv())[0] == 6
        assert await session.notify_store(9, 0, b"abc") is True
        assert (await kernel.recv())[0] == 4
        await session.detach()
        assert await session.notify_inval_inode(7) is False
        assert session.statistics().notifications_sent == 5


async def test_requests_before_init_and_second_init() -> None:
    async with fake_mount(Toy(), init=False) as (kernel, session):
        assert (await kernel.call(1, b"file\0", unique=4))[:2] == (-errno.EIO, 4)
        await kernel.send(request(26, init_body(), unique=6, nodeid=0))
        assert (await kernel.recv())[:2] == (0, 6)
        await kernel.send(request(26, init_body(), unique=8, nodeid=0))
        assert (await kernel.recv())[:2] == (-errno.EPROTO, 8)


async def test_newer_major_gets_a_retry_answer() -> None:
    async with fake_mount(Toy(), init=False) as (kernel, session):
        await kernel.send(request(26, init_body(major=8, minor=0), unique=2, nodeid=0))
        error, _, payload = await kernel.recv()
        assert error == 0 and struct.unpack_from("<II", payload) == (7, 45)
        assert session.negotiated is None
        await kernel.send(request(26, init_body(), unique=4, nodeid=0))
        assert (await kernel.recv())[:2] == (0, 4)
        assert session.negotiated is not None and session.negotiated.minor == 45


async def test_failed_negotiation_stops_the_session() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        session = FuseSession(ours.fileno(), Toy())
        theirs.send(request(26, init_body(minor=20), unique=2, nodeid=0))
        with pytest.raises(FuseProtocolError, match="older than"):
            await session.serve()
        assert parse_reply(theirs.recv(100))[:2] == (-errno.EPROTO, 2)
        assert session.closed


async def test_eof_ends_serve_and_cancels_running_requests() -> None:
    ops = Toy()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        session = FuseSession(ours.fileno(), ops)
        theirs.send(request(26, init_body(), unique=2, nodeid=0))
        lk = lk_body(1, 0x77, 0, 0, abi.F_WRLCK, 99, abi.LK_FLOCK)
        theirs.send(request(33, lk, unique=4, nodeid=2))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            await ops.handler_ran.wait()
            assert parse_reply(theirs.recv(100))[:2] == (0, 2)  # unread data -> ECONNRESET
            theirs.close()
            with trio.fail_after(2):
                await session.wait_closed()
        assert ops.lock_waits_cancelled == 1
        with pytest.raises(RuntimeError, match="once"):
            await session.serve()


def test_effective_want_follows_what_ops_implement() -> None:
    class NoLocks(Operations):
        async def readdirplus(self, ctx: RequestContext, req: rq.ReadDirPlus,
                              out: DirentBuffer) -> None:
            return None

    want = FuseSession(-1, NoLocks()).effective_want()
    assert want & F.DO_READDIRPLUS and not want & (F.FLOCK_LOCKS | F.POSIX_LOCKS)
    required = FuseSession(-1, NoLocks(), FuseConfig(require=int(F.FLOCK_LOCKS)))
    assert required.effective_want() & F.FLOCK_LOCKS


def _kernel_in_a_thread(sock: socket.socket, opens: int) -> list[tuple[int, int]]:
    """A blocking kernel outside the trio loop (as the real one is): each
    OPEN sent as soon as the previous one was answered."""
    got = []
    open_in = struct.pack("<II", 0, 0)
    for i in range(opens):
        sock.send(request(14, open_in, unique=100 + 2 * i, nodeid=2))
        error, unique, _ = parse_reply(sock.recv(1 << 20))
        got.append((error, unique))
    return got


@pytest.mark.parametrize("one_cpu", [False, True])
async def test_busy_poll_finds_the_next_request_unless_on_one_cpu(one_cpu: bool) -> None:
    # The kernel is a thread sending each OPEN as soon as the previous one
    # is answered. With a second CPU the loop finds most of them by polling;
    # pinned to one CPU (or on a one-CPU machine) it never polls, since the
    # poll would hold the CPU the sender needs.
    cpus = os.sched_getaffinity(0)
    expect_polls = not one_cpu and len(cpus) > 1
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # A long poll window, so that the thread's next request falls inside it.
    session = FuseSession(ours.fileno(), Quick(), FuseConfig(busy_poll_us=5_000))
    if one_cpu:
        os.sched_setaffinity(0, {min(cpus)})  # this thread: the session's loop
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            kernel = Kernel(trio.socket.from_stdlib_socket(theirs.dup()))
            await kernel.send(request(26, init_body(flags=ALL_FLAGS), unique=2, nodeid=0))
            assert (await kernel.recv())[:2] == (0, 2)
            theirs.setblocking(True)  # from here on only the thread uses it
            got = await trio.to_thread.run_sync(_kernel_in_a_thread, theirs, 50)
            assert got == [(0, 100 + 2 * i) for i in range(50)]
            stats = session.statistics()
            if expect_polls:
                assert stats.busy_poll_hits > 0
            else:
                assert stats.busy_polls == 0
            nursery.cancel_scope.cancel()
    finally:
        os.sched_setaffinity(0, cpus)
        theirs.close()
        ours.close()


async def test_no_busy_poll_while_a_task_waits_to_run() -> None:
    # Requests answered by their tasks: the loop must not poll while such a
    # task is ready, or each answer would wait out the poll window.
    ops = Quick()
    async with fake_mount(ops, FuseConfig(busy_poll_us=10_000)) as (kernel, session):
        open_in = struct.pack("<II", 0, 0)
        with trio.fail_after(5):
            for i in range(20):
                assert (await kernel.call(14, open_in, unique=4 + 2 * i, nodeid=5))[:2] == (0, 4 + 2 * i)
        assert ops.handled == [5] * 20
        # (The fake kernel runs in the loop's own thread: a poll could never
        # find its next request, only delay it.)
        assert session.statistics().busy_polls == 0


def test_busy_poll_bounds() -> None:
    with pytest.raises(ValueError):
        FuseConfig(busy_poll_us=-1)
    with pytest.raises(ValueError):
        FuseConfig(busy_poll_us=10_001)
    assert FuseConfig(busy_poll_us=0).busy_poll_us == 0
