"""Which kernel copies an invalidation, a flush or a session state change
drops, checked against a recording stand-in for the FUSE session (no
kernel, no cell): the notifications, which are awaited and which only
queued, and the invariants after; and which FLUSHes are answered in the
read loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import trio

from chubbyfs.client.session import SessionState
from chubbyfs.fuse import abi
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.ops import NOT_NOW, context_of
from chubbyfs.fuse.replies import NotifyInvalEntry, NotifyInvalInode, NotifyPoll
from chubbyfs.mount.files import FileBuffer
from chubbyfs.mount.ops import ChubbyOperations, LockSlot, MountConfig, OpenFile
from chubbyfs.mount.sessions import SessionPool


@dataclass
class Negotiated:
    kernel_flags: int = int(abi.InitFlag.HAS_EXPIRE_ONLY)


@dataclass
class RecordingSession:
    """What ChubbyOperations asks of a FuseSession to notify the kernel."""

    kernel_takes_them: bool = True
    negotiated: Negotiated = field(default_factory=Negotiated)
    closed: bool = False
    awaited: list[object] = field(default_factory=list)
    queued: list[object] = field(default_factory=list)

    async def notify_many(self, notes: list, *, wait_s: float) -> bool:
        self.awaited.extend(notes)
        return self.kernel_takes_them

    def notify_batch_soon(self, notes: list) -> trio.Event:
        self.queued.extend(notes)
        done = trio.Event()
        done.set()
        return done


CELL = "t"


@pytest.fixture
async def ops():
    async with trio.open_nursery() as nursery:
        o = ChubbyOperations(SessionPool(nursery, {CELL: ["127.0.0.1:1"]}), MountConfig())
        o.session = RecordingSession()  # type: ignore[assignment]
        yield o
        nursery.cancel_scope.cancel()


def node(o: ChubbyOperations, instance: int, path: str, is_dir: bool = False) -> int:
    inode = o.inodes.node(CELL, instance, f"/ls/{CELL}{path}", is_dir)
    o.inodes.ref(inode.ino)
    return inode.ino


def missing(o: ChubbyOperations, parent: int, *names: str) -> None:
    o._negatives.setdefault(parent, set()).update(names)
    o._negative_count += len(names)


def expire(parent: int, name: str) -> NotifyInvalEntry:
    return NotifyInvalEntry(parent, name.encode(), True)


async def test_a_directory_invalidation_drops_its_children_and_missing_names(ops: ChubbyOperations) -> None:
    root, d, f, g = node(ops, 1, "", True), node(ops, 2, "/d", True), node(ops, 3, "/d/f"), node(ops, 4, "/d/g")
    ops._paged.add(f)  # f was opened from cache: its pages go too
    missing(ops, d, "nope")
    await ops.on_invalidate(CELL, f"/ls/{CELL}/d")
    rec = ops.session
    assert set(rec.awaited) == {
        NotifyInvalInode(d, -1, 0), NotifyInvalInode(f, 0, 0), NotifyInvalInode(g, -1, 0),
        expire(root, "d"), expire(d, "f"), expire(d, "g"), expire(d, "nope")}
    assert rec.queued == [] and ops._negative_count == 0
    ops.assert_invariants()


async def test_entries_in_a_directory_we_are_changing_are_queued_not_awaited(ops: ChubbyOperations) -> None:
    root, d = node(ops, 1, "", True), node(ops, 2, "/d", True)
    missing(ops, d, "new")
    with ops._changing(ops.inodes.get(d)):  # our create of d/new waits for the cell
        await ops.on_invalidate(CELL, f"/ls/{CELL}/d/new")
        await ops.on_invalidate(CELL, f"/ls/{CELL}/d")
    rec = ops.session
    assert rec.queued == [expire(d, "new")]  # would wait for the create's own reply
    assert set(rec.awaited) == {NotifyInvalInode(d, -1, 0), expire(root, "d")}
    assert ops._busy_dirs == {}
    ops.assert_invariants()


async def test_without_expire_only_entries_are_dropped_instead(ops: ChubbyOperations) -> None:
    # Both kinds take the directory's lock: the same rule decides what is awaited.
    ops.session.negotiated = Negotiated(kernel_flags=0)
    root, f = node(ops, 1, "", True), node(ops, 3, "/f")
    await ops.on_invalidate(CELL, f"/ls/{CELL}/f")
    assert ops.session.awaited == [NotifyInvalInode(f, -1, 0), NotifyInvalEntry(root, b"f", False)]
    assert ops.session.queued == []


async def test_a_flush_drops_every_copy_of_the_cell(ops: ChubbyOperations, caplog) -> None:
    ops.session.kernel_takes_them = False  # the kernel is slow: logged, acknowledged anyway
    root, d, f = node(ops, 1, "", True), node(ops, 2, "/d", True), node(ops, 3, "/d/f")
    missing(ops, root, "x")
    missing(ops, d, "y", "z")
    with caplog.at_level(logging.WARNING, logger="chubbyfs.mount"):
        await ops.on_flush(CELL)
    assert set(ops.session.awaited) == {
        NotifyInvalInode(root, -1, 0), NotifyInvalInode(d, -1, 0), NotifyInvalInode(f, -1, 0),
        expire(root, "d"), expire(d, "f"), expire(root, "x"), expire(d, "y"), expire(d, "z")}
    assert "did not take" in caplog.text
    assert ops._negative_count == 0
    ops.assert_invariants()


class FakeUserSession:
    def __init__(self, expired: bool) -> None:
        self.cell = CELL
        self.principal = "root"
        self.expired = expired


async def test_jeopardy_flushes_and_expiry_also_wakes_pollers(ops: ChubbyOperations) -> None:
    f = node(ops, 3, "/f")
    us = FakeUserSession(expired=False)
    other = FakeUserSession(expired=False)
    for fh, owner, khs in ((1, us, {11, 12}), (2, other, {13})):
        ops.files[fh] = OpenFile(fh, f, CELL, f"/ls/{CELL}/f", owner, object(),  # type: ignore[arg-type]
                                 FileBuffer(append=False, max_bytes=10), False, 1, poll_khs=set(khs))
    await ops.on_session_state(us, SessionState.JEOPARDY)
    assert ops.session.awaited == [NotifyInvalInode(f, -1, 0)] and ops.session.queued == []
    us.expired = True
    await ops.on_session_state(us, SessionState.EXPIRED)
    assert set(ops.session.queued) == {NotifyPoll(11), NotifyPoll(12)}
    assert ops.files[1].events_pending and not ops.files[2].events_pending
    assert ops.files[2].poll_khs == {13}


async def test_flush_is_answered_at_once_unless_it_has_work(ops: ChubbyOperations) -> None:
    """FLUSH comes at every close (of opens without FOPEN_NOFLUSH) and the
    closer waits for it: answered in the read loop when there is nothing to
    commit and no fcntl lock to release, otherwise by the async handler."""
    ino = node(ops, 3, "/f")
    path = f"/ls/{CELL}/f"
    ctx = context_of((0, abi.Opcode.FLUSH, 10, ino, 0, 0, 77, 0, 0))
    reader = ops.files[1] = OpenFile(1, ino, CELL, path, None, None, None, False, 77)
    assert ops.flush_now(ctx, rq.Flush(ino, 1, 99)) is None
    writer = ops.files[2] = OpenFile(2, ino, CELL, path, None, None, FileBuffer(append=False, max_bytes=64),
                                     True, 77)
    assert writer.buffer is not None
    writer.buffer.truncate(0)  # only truncated: a flush commits nothing (the last close will)
    assert ops.flush_now(ctx, rq.Flush(ino, 2, 99)) is None
    writer.buffer.write(0, b"x")
    assert ops.flush_now(ctx, rq.Flush(ino, 2, 99)) is NOT_NOW
    assert ops.flush_now(ctx, rq.Flush(ino, 5, 99)) is NOT_NOW  # unknown: EBADF from flush()
    # An fcntl lock slot on any open file of the node: the flush may end the
    # closing process's POSIX locks, so it takes the async path.
    reader.locks[(99, False)] = LockSlot(is_flock=False)
    ops._posix_locks[ino] = 1
    assert ops.flush_now(ctx, rq.Flush(ino, 1, 12)) is NOT_NOW
    ops.assert_invariants()
    await ops.flush(ctx, rq.Flush(ino, 1, 99))  # the lock owner closes a descriptor: its slot goes
    assert reader.locks == {} and ops._posix_locks == {}
    ops.assert_invariants()
