"""`ChubbyOperations`: filesystem requests from the kernel, answered by cells.

Layout: the mount root lists the cells of the cells file; `<root>/<cell>/x`
is the Chubby node `/ls/<cell>/x`; `<root>/<cell>/.chubby/` holds read-only
files describing the requesting user's session. Every request acts for the
user who made it (one session per (cell, user), `sessions.py`); the cell
enforces ACLs.

Open files read and write whole contents (`files.py`).

The kernel's caches follow the session's consistent cache: attributes and
names (also missing names) get long timeouts, and read-only opens keep their
pages (FOPEN_KEEP_CACHE), only when what they show is what a session holds
in its cache, because the master then invalidates that session before any
change and `on_invalidate` drops the kernel's copy before the invalidation
is acknowledged. Anything else is served with timeout 0 and FOPEN_DIRECT_IO.
Jeopardy, expiry and fail-over flush the kernel's copies of the whole cell.
Events on the open files' handles wake poll() sleepers (see docs/mount.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import select
import stat as st
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio

from chubbyfs._frozen import builder
from chubbyfs.cell import names
from chubbyfs.cell.acl import admits, parse_acl
from chubbyfs.client.connection import CellConnection, CellError, CellUnavailableError
from chubbyfs.client.events import Event, EventKind
from chubbyfs.client.session import ABSENT, Handle, SessionState
from chubbyfs.fuse import abi
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.errors import FuseError
from chubbyfs.fuse.ops import NOT_NOW, AnswerNow, Operations, RequestContext
from chubbyfs.fuse.replies import (
    Attr, AttrOut, CreateOut, DirEntry, DirEntryPlus, DirentBuffer, EntryOut, NotifyInvalEntry,
    NotifyInvalInode, NotifyPoll, OpenOut, StatfsOut, dirent_type,
)
from chubbyfs.fuse.requests import FileLock
from chubbyfs.fuse.session import FuseSession
from chubbyfs.locks import DEFAULT_LOCK_DELAY_MS, MAX_LOCK_DELAY_MS
from chubbyfs.wire.cell_protocol import Stat

from .errors import BadName, check_name, errno_for
from .files import FileBuffer, NeedContents
from .inodes import CONTROL_DIR, CONTROL_FILES, ROOT_INO, Inode, InodeTable
from .sessions import FILE_EVENTS, SessionPool, UserSession

log = logging.getLogger("chubbyfs.mount")

_open_out = builder(OpenOut)  # OpenOut(...) at half the cost: one per cached open

EVENT_CONTENTS_MODIFIED = int(EventKind.CONTENTS_MODIFIED)
# Negative entries the kernel may cache, remembered so that they can be
# expired; past this many, missing names get timeout 0.
MAX_NEGATIVE_ENTRIES = 16384
XATTR_PREFIX = "user.chubby."
READONLY_XATTRS = ("instance", "content_gen", "lock_gen", "acl_gen", "checksum", "ephemeral")
ACL_XATTRS = ("acl.read", "acl.write", "acl.change")
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
DIR_MODE = st.S_IFDIR | 0o755
FILE_MODE = st.S_IFREG | 0o644


@dataclass(frozen=True, slots=True)
class MountConfig:
    # Upper bounds of the kernel's cache lifetimes for what a session caches
    # (0: no kernel caching at all, every request reaches the daemon).
    attr_timeout_s: float = 60.0
    entry_timeout_s: float = 60.0
    max_file_bytes: int = 256 * 1024
    # How long an invalidation waits for the kernel to take its
    # notifications before it is acknowledged anyway (they stay queued).
    notify_wait_s: float = 1.0


@dataclass(slots=True)
class LockSlot:
    """One lock owner's lock on one open file: its own Chubby handle with the
    LOCK intent, opened at the first lock request."""

    is_flock: bool
    handle: Handle | None = None
    mode: str | None = None  # "exclusive" / "shared" while held
    sequencer: str | None = None
    pid: int = 0


@dataclass(slots=True)
class OpenFile:
    fh: int
    ino: int
    cell: str
    path: str
    us: UserSession | None  # None for control files
    handle: Handle | None
    buffer: FileBuffer | None
    writable: bool
    pid: int
    control_data: bytes = b""
    locks: dict[tuple[int, bool], LockSlot] = field(default_factory=dict)
    poll_khs: set[int] = field(default_factory=set)
    events_pending: bool = False
    bound_sequencer: str | None = None
    borrowed: bool = False  # `handle` is a shared read handle (sessions.ReadHandles)
    keep_cache: bool = False  # opened FOPEN_KEEP_CACHE: reads fill the kernel's pages


@dataclass(slots=True)
class OpenDir:
    fh: int
    ino: int
    listing: list[tuple[bytes, int, int, Stat | None]] | None = None  # name, ino, mode, stat


@contextlib.contextmanager
def cell_errors(what: str) -> Iterator[None]:
    """Turn the cell's refusal into the errno the caller sees."""
    try:
        yield
    except CellError as exc:
        err = errno_for(exc.code, exc.message)
        log.debug("%s: %s -> %s", what, exc, errno.errorcode.get(err, err))
        raise FuseError(err, f"{what}: {exc}") from None
    except BadName as exc:
        raise FuseError(exc.errno, f"{what}: {exc}") from None


class ChubbyOperations(Operations):
    def __init__(self, pool: SessionPool, config: MountConfig | None = None) -> None:
        self.pool = pool
        self.config = config or MountConfig()
        self.cells = sorted(pool.cells)
        self.inodes = InodeTable(self.cells)
        self.session: FuseSession | None = None  # set once mounted (for notifications)
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self.lock_delays: dict[tuple[str, str], int] = {}  # (cell, path) -> ms for later opens
        self.cas_arms: dict[tuple[int, str], int] = {}  # (ino, principal) -> generation
        self._principals: dict[int, str] = {}
        self._cell_roots: dict[str, Stat] = {}
        self._started_ns = time.time_ns()
        self._attr_ns = int(self.config.attr_timeout_s * 1e9)
        self._entry_ns = int(self.config.entry_timeout_s * 1e9)
        self._paged: set[int] = set()  # inodes opened FOPEN_KEEP_CACHE (may have pages)
        # (cell, ACL name) -> session id -> admitted as a reader (_admitted_reader).
        self._admitted: dict[tuple[str, str], dict[int, bool]] = {}
        # Inodes whose pages may hold contents no session caches, until the
        # queued invalidation is taken (no FOPEN_KEEP_CACHE meanwhile).
        self._suspect: dict[int, trio.Event] = {}
        self._negatives: dict[int, set[str]] = {}  # parent ino -> names cached as missing
        self._negative_count = 0
        # Directories in which a request of ours may hold the kernel's
        # directory lock while it waits for the cell (create, unlink, ...).
        self._busy_dirs: dict[int, int] = {}
        # Inode -> fcntl (POSIX) lock slots on its open files, held or asked
        # for. The kernel releases a process's POSIX locks at each close of
        # the file by sending FLUSH with its lock owner, and skips FLUSH for
        # opens answered FOPEN_NOFLUSH. So cached read-only opens get
        # NOFLUSH only while no such slot exists; one opened before the lock
        # was asked for does not release it when closed (docs/mount.md).
        self._posix_locks: dict[int, int] = {}
        pool.listener = self

    # ----------------------------------------------------------------- identity

    def principal(self, uid: int) -> str:
        name = self._principals.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = f"uid{uid}"
            self._principals[uid] = name
        return name

    async def user_session(self, ctx: RequestContext, cell: str) -> UserSession:
        with cell_errors(f"session in {cell}"):
            return await self.pool.get(cell, self.principal(ctx.uid))

    # ------------------------------------------------------------------ inodes

    def inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FuseError(errno.ESTALE, f"unknown inode {ino}")
        return inode

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _mode(self, stat: Stat) -> int:
        mode = DIR_MODE if stat.is_directory else FILE_MODE
        return mode | st.S_ISVTX if stat.ephemeral else mode

    def _attr(self, ino: int, stat: Stat, size: int | None = None) -> Attr:
        return Attr(ino=ino, mode=self._mode(stat), nlink=2 if stat.is_directory else 1,
                    size=stat.size if size is None else size, atime_ns=self._started_ns,
                    mtime_ns=self._started_ns, ctime_ns=self._started_ns)

    def _virtual_attr(self, inode: Inode) -> Attr:
        mode = DIR_MODE if inode.is_dir else st.S_IFREG | 0o444
        return Attr(ino=inode.ino, mode=mode, nlink=2 if inode.is_dir else 1,
                    atime_ns=self._started_ns, mtime_ns=self._started_ns, ctime_ns=self._started_ns)

    def _virtual_entry(self, inode: Inode) -> EntryOut:
        # Cells and control files never change shape: cache them for good.
        return EntryOut(inode.ino, self._virtual_attr(inode), entry_valid_ns=self._entry_ns,
                        attr_valid_ns=self._attr_ns)

    def _lease_left_ns(self, us: UserSession) -> int:
        left_s = us.session.core.local_lease_end_ms / 1000 - trio.current_time()
        return max(0, int(left_s * 1e9))

    def _ttls(self, us: UserSession | None, stat: Stat) -> tuple[int, int]:
        """(entry, attr) lifetimes for `stat` as `us` served it: long only if
        the session's cache holds exactly this stat (the master invalidates
        it before any change), and never past the session's local lease, so
        even a frozen daemon's kernel copies end with its lease."""
        if us is None or not (self._entry_ns or self._attr_ns):
            return 0, 0
        if us.session.lookup_cached(stat.path) != stat:
            return 0, 0
        lease_ns = self._lease_left_ns(us)
        return min(self._entry_ns, lease_ns), min(self._attr_ns, lease_ns)

    def _attr_out(self, us: UserSession | None, ino: int, stat: Stat, size: int | None = None) -> AttrOut:
        ttl = self._ttls(us, stat)[1] if size is None else 0
        return AttrOut(self._attr(ino, stat, size), attr_valid_ns=ttl)

    def _node_entry(self, cell: str, stat: Stat, us: UserSession | None) -> EntryOut:
        """An entry for the kernel: takes one lookup reference."""
        inode = self.inodes.node(cell, stat.instance, stat.path, stat.is_directory)
        self.inodes.ref(inode.ino)
        entry_ns, attr_ns = self._ttls(us, stat)
        return EntryOut(inode.ino, self._attr(inode.ino, stat), entry_valid_ns=entry_ns, attr_valid_ns=attr_ns)

    def _negative_entry(self, us: UserSession, parent: Inode, name: str) -> EntryOut | None:
        """A cacheable "no such name" if the session knows the name is missing
        (its cached listing of the parent lacks it)."""
        if (not self._entry_ns or self._negative_count >= MAX_NEGATIVE_ENTRIES
                or us.session.lookup_cached(f"{parent.path}/{name}") is not ABSENT):
            return None
        names = self._negatives.setdefault(parent.ino, set())
        if name not in names:
            names.add(name)
            self._negative_count += 1
        ttl = min(self._entry_ns, self._lease_left_ns(us))
        return EntryOut(0, Attr(ino=0, mode=0), entry_valid_ns=ttl, attr_valid_ns=0)

    async def _child_stat(self, us: UserSession, parent: Inode, name: str) -> Stat:
        path = f"{parent.path}/{name}"
        with cell_errors(f"lookup {path}"):
            try:
                entries = await us.reads.list(parent.path)
            except CellError as exc:
                if exc.code != "permission_denied":
                    raise
                # No right to list the directory; the node itself may still
                # be readable: ask for it directly.
                async with await us.session.open(path, read=True) as h:
                    return h.stat
        for entry in entries:
            if entry.name == name:
                return entry.stat
        raise FuseError(errno.ENOENT)

    def _is_cell_root(self, inode: Inode) -> bool:
        return inode.virtual is None and inode.path == f"/ls/{inode.cell}"

    # ---------------------------------------------------------------- namespace

    async def lookup(self, ctx: RequestContext, req: rq.Lookup) -> EntryOut:
        parent = self.inode(req.nodeid)
        if not parent.is_dir:
            raise FuseError(errno.ENOTDIR)
        if parent.virtual == "root":
            cell = req.name.decode("utf-8", "replace")
            if not self.inodes.has_cell(cell):
                raise FuseError(errno.ENOENT)
            known = self._cell_roots.get(cell)
            us = self.pool.peek(cell, self.principal(ctx.uid))
            if known is not None and (us is None or us.expired):
                # Cell roots are never deleted: walking into a cell needs no
                # session, so .chubby/state can still say "expired".
                return self._node_entry(cell, known, None)
            us = await self.user_session(ctx, cell)
            with cell_errors(f"lookup cell {cell}"):
                stat = await us.reads.stat(f"/ls/{cell}")
            self._cell_roots[cell] = stat
            return self._node_entry(cell, stat, us)
        if parent.virtual == "control":
            inode = self.inodes.control_file(parent.cell, req.name.decode("utf-8", "replace"))
            if inode is None:
                raise FuseError(errno.ENOENT)
            return self._virtual_entry(inode)
        with cell_errors("lookup"):
            name = check_name(req.name)
        if name == CONTROL_DIR and self._is_cell_root(parent):
            return self._virtual_entry(self.inodes.control_dir(parent.cell))
        us = await self.user_session(ctx, parent.cell)
        try:
            stat = await self._child_stat(us, parent, name)
        except FuseError as exc:
            negative = self._negative_entry(us, parent, name) if exc.errno == errno.ENOENT else None
            if negative is None:
                raise
            return negative
        return self._node_entry(parent.cell, stat, us)

    async def forget(self, ctx: RequestContext, req: rq.Forget) -> None:
        self.inodes.forget(req.nodeid, req.nlookup)
        if self.inodes.get(req.nodeid) is None:
            # The kernel evicted the inode, and its pages and children with it.
            self._paged.discard(req.nodeid)
            self._suspect.pop(req.nodeid, None)
            self._negative_count -= len(self._negatives.pop(req.nodeid, ()))

    async def getattr(self, ctx: RequestContext, req: rq.GetAttr) -> AttrOut:
        inode = self.inode(req.nodeid)
        if inode.virtual is not None:
            return AttrOut(self._virtual_attr(inode), attr_valid_ns=self._attr_ns)
        f = self.files.get(req.fh) if req.has_fh else None
        if f is not None and f.handle is not None:
            self._check_alive(f)
            with cell_errors(f"getattr {f.path}"):
                stat = await f.handle.get_stat()
            size = f.buffer.size() if f.buffer is not None and f.buffer.dirty else None
            return self._attr_out(f.us, inode.ino, stat, size)
        us = await self.user_session(ctx, inode.cell)
        stat = await self._stat_inode(ctx, inode, us)
        return self._attr_out(us, inode.ino, stat)

    async def _stat_inode(self, ctx: RequestContext, inode: Inode, us: UserSession | None = None) -> Stat:
        us = us or await self.user_session(ctx, inode.cell)
        with cell_errors(f"stat {inode.path}"):
            try:
                stat = await us.reads.stat(inode.path)
            except CellError as exc:
                if exc.code != "permission_denied":
                    raise
                async with await us.session.open(inode.path, read=False) as h:
                    stat = h.stat
        if stat.instance != inode.instance:
            # Another node lives at this path now; ours was deleted or moved.
            raise FuseError(errno.ENOENT)
        return stat

    async def setattr(self, ctx: RequestContext, req: rq.SetAttr) -> AttrOut:
        inode = self.inode(req.nodeid)
        if inode.virtual is not None:
            raise FuseError(errno.EPERM, "control files cannot be changed")
        f = self.files.get(req.fh) if req.has(abi.FATTR_FH) else None
        current = await self._stat_inode(ctx, inode) if f is None else None
        if f is not None:
            self._check_alive(f)
            assert f.handle is not None
            with cell_errors(f"setattr {f.path}"):
                current = await f.handle.get_stat()
        assert current is not None
        self._check_metadata_change(req, current)
        if req.has(abi.FATTR_SIZE):
            if current.is_directory:
                raise FuseError(errno.EISDIR)
            if req.size > self.config.max_file_bytes:
                raise FuseError(errno.EFBIG)
            if f is not None:
                await self._truncate_open_file(f, req.size)
                return AttrOut(self._attr(inode.ino, current, req.size))
            current = await self._truncate_path(ctx, inode, req.size)
        return AttrOut(self._attr(inode.ino, current))

    def _check_metadata_change(self, req: rq.SetAttr, current: Stat) -> None:
        """Modes, owners and times are not stored in Chubby: a request that
        would change them fails with EPERM; one restating them succeeds."""
        if req.has(abi.FATTR_MODE) and st.S_IMODE(req.mode) != st.S_IMODE(self._mode(current)):
            raise FuseError(errno.EPERM, "modes are fixed (access is controlled by ACLs)")
        if req.has(abi.FATTR_UID) and req.uid != 0 or req.has(abi.FATTR_GID) and req.gid != 0:
            raise FuseError(errno.EPERM, "owners are fixed (access is controlled by ACLs)")
        # Setting times to "now" (touch) is accepted: nodes have no stored
        # times to contradict; explicit times are refused.
        if req.has(abi.FATTR_ATIME) and not req.has(abi.FATTR_ATIME_NOW):
            raise FuseError(errno.EPERM, "explicit times are not stored")
        if req.has(abi.FATTR_MTIME) and not req.has(abi.FATTR_MTIME_NOW):
            raise FuseError(errno.EPERM, "explicit times are not stored")

    async def _truncate_open_file(self, f: OpenFile, size: int) -> None:
        buffer = self._buffer(f)
        try:
            buffer.truncate(size)
        except NeedContents:
            await self._fetch(f)
            buffer.truncate(size)

    async def _truncate_path(self, ctx: RequestContext, inode: Inode, size: int) -> Stat:
        """truncate(2) on a path: a read-modify-write committed at once, with
        compare-and-swap on the generation read."""
        us = await self.user_session(ctx, inode.cell)
        with cell_errors(f"truncate {inode.path}"):
            async with await us.session.open(inode.path, read=size > 0, write=True) as h:
                if size == 0:
                    return await h.set_contents(b"")
                contents, stat = await h.get_contents_and_stat()
                new = contents[:size].ljust(size, b"\0")
                return await h.set_contents(new, expected_generation=stat.content_generation)

    @contextlib.contextmanager
    def _changing(self, directory: Inode) -> Iterator[None]:
        """Around a request that changes `directory`: the kernel holds the
        directory's lock until we answer, and our answer may wait for the
        cell, which may wait for this daemon's acknowledgement of an
        invalidation: entry invalidations in it must not be waited for."""
        _count(self._busy_dirs, directory.ino, 1)
        try:
            yield
        finally:
            _count(self._busy_dirs, directory.ino, -1)

    def _new_child_path(self, parent: Inode, raw_name: bytes) -> tuple[str, str]:
        if parent.virtual is not None:
            raise FuseError(errno.EPERM, "cells and control files are fixed")
        with cell_errors("name"):
            name = check_name(raw_name)
        if name == CONTROL_DIR and self._is_cell_root(parent):
            raise FuseError(errno.EEXIST, f"{CONTROL_DIR} is reserved for the control files")
        return name, f"{parent.path}/{name}"

    async def mkdir(self, ctx: RequestContext, req: rq.Mkdir) -> EntryOut:
        parent = self.inode(req.nodeid)
        _, path = self._new_child_path(parent, req.name)
        if req.mode & st.S_ISVTX:
            raise FuseError(errno.EPERM, "ephemeral directories need a held handle; create files instead")
        us = await self.user_session(ctx, parent.cell)
        with self._changing(parent), cell_errors(f"mkdir {path}"):
            async with await us.session.open(path, read=False, write=True, create="directory",
                                             exclusive=True) as h:
                stat = h.stat
        return self._node_entry(parent.cell, stat, us)

    async def create(self, ctx: RequestContext, req: rq.Create) -> CreateOut:
        parent = self.inode(req.nodeid)
        _, path = self._new_child_path(parent, req.name)
        us = await self.user_session(ctx, parent.cell)
        with self._changing(parent), cell_errors(f"create {path}"):
            h = await us.session.open(
                path, read=True, write=True, create="file",
                exclusive=bool(req.flags & os.O_EXCL), ephemeral=bool(req.mode & st.S_ISVTX),
                events=FILE_EVENTS)
        if h.stat.is_directory:
            await self._close_handle(h)
            raise FuseError(errno.EISDIR)
        us.watch(h)
        entry = self._node_entry(parent.cell, h.stat, us)
        f = self._open_file(ctx, entry.nodeid, parent.cell, path, us, h, req.flags)
        buffer = self._buffer(f)
        if h.created:
            buffer.load(b"", h.stat.content_generation)
        elif req.flags & os.O_TRUNC:
            buffer.truncate(0)  # created meanwhile by someone else: O_TRUNC still applies
        return CreateOut(entry, OpenOut(f.fh, abi.FOPEN_DIRECT_IO))

    async def _remove(self, ctx: RequestContext, parent_ino: int, raw_name: bytes, *, directory: bool) -> None:
        parent = self.inode(parent_ino)
        _, path = self._new_child_path(parent, raw_name)
        us = await self.user_session(ctx, parent.cell)
        with self._changing(parent), cell_errors(f"remove {path}"):
            async with await us.session.open(path, read=False, write=True) as h:
                if h.stat.is_directory != directory:
                    raise FuseError(errno.ENOTDIR if directory else errno.EISDIR)
                await h.delete()
        self._forget_path(parent.cell, path)

    async def unlink(self, ctx: RequestContext, req: rq.Unlink) -> None:
        await self._remove(ctx, req.nodeid, req.name, directory=False)

    async def rmdir(self, ctx: RequestContext, req: rq.Rmdir) -> None:
        await self._remove(ctx, req.nodeid, req.name, directory=True)

    def _forget_path(self, cell: str, path: str, *, subtree: bool = True) -> None:
        for us in self.pool.all():
            if us.cell == cell:
                us.reads.drop(path, subtree=subtree)

    async def rename(self, ctx: RequestContext, req: rq.Rename) -> None:
        await self._rename(ctx, req.nodeid, req.name, req.newdir, req.newname, 0)

    async def rename2(self, ctx: RequestContext, req: rq.Rename2) -> None:
        await self._rename(ctx, req.nodeid, req.name, req.newdir, req.newname, req.flags)

    async def _rename(self, ctx: RequestContext, olddir: int, name: bytes, newdir: int,
                      newname: bytes, flags: int) -> None:
        if flags & (RENAME_EXCHANGE | RENAME_WHITEOUT) or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE
                                                                     | RENAME_WHITEOUT):
            raise FuseError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        parent = self.inode(olddir)
        if newdir != olddir:
            # Directories are independent (a cell may be partitioned by
            # directory): mv falls back to copy and delete.
            raise FuseError(errno.EXDEV)
        _, src = self._new_child_path(parent, name)
        _, dst = self._new_child_path(parent, newname)
        us = await self.user_session(ctx, parent.cell)
        with self._changing(parent), cell_errors(f"rename {src} {dst}"):
            if flags & RENAME_NOREPLACE:
                # Not atomic with the rename: a racing create can still be replaced.
                listing = await us.reads.list(parent.path)
                if any(e.name == dst.rsplit("/", 1)[1] for e in listing):
                    raise FuseError(errno.EEXIST)
            await us.session.rename(src, dst)
        self._forget_path(parent.cell, src)
        self._forget_path(parent.cell, dst)
        self.inodes.moved(parent.cell, src, dst)
        for f in self.files.values():
            if f.cell == parent.cell and (f.path == src or f.path.startswith(src + "/")):
                f.path = dst + f.path[len(src):]

    async def link(self, ctx: RequestContext, req: rq.Link) -> EntryOut:
        raise FuseError(errno.EPERM, "Chubby has no hard links")

    async def symlink(self, ctx: RequestContext, req: rq.Symlink) -> EntryOut:
        raise FuseError(errno.EPERM, "Chubby has no symbolic links")

    async def mknod(self, ctx: RequestContext, req: rq.Mknod) -> EntryOut:
        raise FuseError(errno.EPERM, "only files and directories exist in Chubby")

    async def readlink(self, ctx: RequestContext, req: rq.ReadLink) -> bytes:
        raise FuseError(errno.EINVAL, "not a symbolic link")

    async def access(self, ctx: RequestContext, req: rq.Access) -> None:
        # The cell checks the ACL at each request; mode bits mean nothing here.
        self.inode(req.nodeid)

    async def statfs(self, ctx: RequestContext, req: rq.StatFs) -> StatfsOut:
        blocks = self.config.max_file_bytes // 4096
        return StatfsOut(blocks=blocks, bfree=blocks, bavail=blocks, files=1 << 20, ffree=1 << 20,
                         namelen=255)

    # ------------------------------------------------------------------- files

    def _open_file(self, ctx: RequestContext, ino: int, cell: str, path: str, us: UserSession | None,
                   handle: Handle | None, flags: int) -> OpenFile:
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        buffer = None
        if handle is not None and writable:
            armed = self.cas_arms.pop((ino, us.principal), None) if us else None
            buffer = FileBuffer(append=bool(flags & os.O_APPEND), max_bytes=self.config.max_file_bytes,
                                cas_generation=armed)
        fh = self._next_fh  # self._fh() inline: every cached `cat` comes here
        self._next_fh = fh + 1
        f = self.files[fh] = OpenFile(fh, ino, cell, path, us, handle, buffer, writable, ctx.pid)
        return f

    def _buffer(self, f: OpenFile) -> FileBuffer:
        """The contents buffer of an open node; a read-only open gets one at
        its first read (a `cat` served from the kernel's pages needs none)."""
        if f.buffer is None:
            assert f.handle is not None
            f.buffer = FileBuffer(append=False, max_bytes=self.config.max_file_bytes)
        return f.buffer

    async def open(self, ctx: RequestContext, req: rq.Open) -> OpenOut:
        inode = self.inode(req.nodeid)
        if inode.is_dir:
            raise FuseError(errno.EISDIR)
        acc = req.flags & os.O_ACCMODE
        if inode.virtual is not None:
            if acc != os.O_RDONLY:
                raise FuseError(errno.EACCES, "control files are read-only")
            f = self._open_file(ctx, inode.ino, inode.cell, inode.path, None, None, req.flags)
            f.control_data = (await self._control_text(ctx, inode)).encode()
            return OpenOut(f.fh, abi.FOPEN_DIRECT_IO)
        us = await self.user_session(ctx, inode.cell)
        if acc == os.O_RDONLY and await self._admits_reader(us, inode):
            # Readers share the session's read handle on the path: opening a
            # file already walked to costs no round trip.
            with cell_errors(f"open {inode.path}"):
                h = await us.reads.borrow(inode.path)
            return self._open_borrowed(ctx, inode, us, h, req.flags)
        with cell_errors(f"open {inode.path}"):
            if acc == os.O_RDONLY:
                # Not known to be admitted: the cell decides, on a handle of
                # this open's own.
                h = await us.session.open(inode.path, read=True, events=FILE_EVENTS)
            else:
                try:
                    # Writers read too: appends and edits in place start from
                    # the current contents.
                    h = await us.session.open(inode.path, read=True, write=True, events=FILE_EVENTS)
                except CellError as exc:
                    if exc.code != "permission_denied" or acc != os.O_WRONLY:
                        raise
                    # A write-only user can still replace the whole file.
                    h = await us.session.open(inode.path, read=False, write=True, events=FILE_EVENTS)
        if h.stat.is_directory:
            await self._close_handle(h)
            raise FuseError(errno.EISDIR)
        us.watch(h)
        f = self._open_file(ctx, inode.ino, inode.cell, inode.path, us, h, req.flags)
        if req.flags & os.O_TRUNC and f.writable:
            # ATOMIC_O_TRUNC: the truncation is part of the buffer, committed
            # with the new contents; readers never see the empty file between.
            assert f.buffer is not None
            f.buffer.truncate(0)
        return OpenOut(f.fh, abi.FOPEN_DIRECT_IO)

    def _open_borrowed(self, ctx: RequestContext, inode: Inode, us: UserSession, h: Handle,
                       flags: int, cached: Stat | object | None = None) -> OpenOut:
        """A read-only open on the session's read handle `h`; `cached` is what
        the session's cache says of the path, if the caller asked already."""
        if h.stat.is_directory:
            us.reads.give_back(h)
            raise FuseError(errno.EISDIR)
        f = self._open_file(ctx, inode.ino, inode.cell, inode.path, us, h, flags)
        f.borrowed = True
        if cached is None:
            cached = us.session.lookup_cached(inode.path)
        if (self._attr_ns and isinstance(cached, Stat) and cached.instance == h.instance
                and self._pages_trusted(inode.ino)):
            f.keep_cache = True
            self._paged.add(inode.ino)
            if inode.ino in self._posix_locks:
                # Someone holds (or asks for) an fcntl lock on this file: a
                # close of this descriptor must send the FLUSH that releases
                # its process's POSIX locks.
                return _open_out(f.fh, abi.FOPEN_KEEP_CACHE)
            # No FLUSH at close (nothing to commit): one round trip less per
            # open/close. See _posix_locks for what that means for fcntl locks.
            return _open_out(f.fh, abi.FOPEN_KEEP_CACHE | abi.FOPEN_NOFLUSH)
        return OpenOut(f.fh, abi.FOPEN_DIRECT_IO)

    def answer_now_handlers(self) -> dict[str, AnswerNow]:
        """Requests that need nothing from the cell, answered without a task:
        read-only opens of files whose read handle is at hand, flushes with
        nothing to commit and no fcntl lock to release, and releases of
        read-only opens that hold no lock."""
        return {"open": self.open_now, "flush": self.flush_now, "release": self.release_now}

    def open_now(self, ctx: RequestContext, req: rq.Open) -> object:
        inode = self.inodes.get(req.nodeid)
        if inode is None or inode.virtual is not None or inode.is_dir or req.flags & os.O_ACCMODE:
            return NOT_NOW
        us = self.pool.peek(inode.cell, self._principals.get(ctx.uid) or self.principal(ctx.uid))
        if us is None:
            return NOT_NOW
        # A Stat here means the session is safe within its lease. The cached
        # handle was opened (and the ACL checked) for an earlier open: lend it
        # only if the read ACL, as the coherent cache holds it, still admits
        # this user.
        cached = us.session.lookup_cached(inode.path)
        if not isinstance(cached, Stat) or not self._admitted_reader(us, inode.cell, cached):
            return NOT_NOW
        h = us.reads.borrow_cached(inode.path)
        return NOT_NOW if h is None else self._open_borrowed(ctx, inode, us, h, req.flags, cached)

    def flush_now(self, ctx: RequestContext, req: rq.Flush) -> object:
        f = self.files.get(req.fh)
        if f is None or (f.buffer is not None and f.buffer.flush_pending) or f.ino in self._posix_locks:
            return NOT_NOW
        return None

    def release_now(self, ctx: RequestContext, req: rq.Release) -> object:
        f = self.files.get(req.fh)
        if f is None or not f.borrowed or f.locks or (f.buffer is not None and f.buffer.dirty):
            return NOT_NOW
        del self.files[req.fh]
        assert f.us is not None and f.handle is not None
        f.us.reads.give_back(f.handle)
        return None

    def _admitted_reader(self, us: UserSession, cell: str, stat: Stat) -> bool | None:
        """Whether the read ACL of the node `stat` describes admits the
        session's user, from the session's cache: the master drops a cached
        ACL file (and the node's stat, when its ACL names change) before any
        change to them is acknowledged, so a reader struck from the ACL is
        refused at its next open. None if the ACL file is not cached. False
        where the cell might still admit (an administrator not listed): the
        caller then lets the cell decide. Answers are kept per (ACL, session)
        until that ACL file's invalidation or the cell's flush."""
        known = self._admitted.get((cell, stat.acl_read))
        session_id = us.session.id
        if known is not None and session_id in known:
            return known[session_id]
        acl_path = names.acl_file_path(cell, stat.acl_read)
        hit = us.session.cached_contents(acl_path)
        if hit is None:
            # ACL files are often readable by administrators only: the
            # daemon's own session (root's) reads them for everyone.
            own = self.pool.peek(cell, self.principal(0))
            hit = own.session.cached_contents(acl_path) if own is not None else None
        if hit is None:
            return None
        admitted = admits(parse_acl(hit[0]), us.principal)
        self._admitted.setdefault((cell, stat.acl_read), {})[session_id] = admitted
        return admitted

    async def _admits_reader(self, us: UserSession, inode: Inode) -> bool:
        """`_admitted_reader`, reading the node's stat and its ACL file into
        the sessions' caches first if need be; False when that cannot be known
        (no session of the daemon may read the ACL file, say)."""
        try:
            stat = us.session.lookup_cached(inode.path)
            if not isinstance(stat, Stat):
                stat = await us.reads.stat(inode.path)
            admitted = self._admitted_reader(us, inode.cell, stat)
            if admitted is None:
                acl_path = names.acl_file_path(inode.cell, stat.acl_read)
                try:
                    await us.reads.contents(acl_path)
                except CellError:  # the user may not read it (see _admitted_reader)
                    own = await self.pool.get(inode.cell, self.principal(0))
                    await own.reads.contents(acl_path)
                admitted = self._admitted_reader(us, inode.cell, stat)
        except CellError:
            return False
        return bool(admitted)

    def _cached_generation(self, us: UserSession, path: str, instance: int) -> int | None:
        """The content generation of `path` the session caches (so the master
        will invalidate it before any change), if it is node `instance`."""
        stat = us.session.lookup_cached(path)
        if isinstance(stat, Stat) and stat.instance == instance:
            return stat.content_generation
        return None

    def _file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise FuseError(errno.EBADF)
        return f

    def _check_alive(self, f: OpenFile) -> None:
        if f.us is not None and f.us.expired:
            raise FuseError(errno.ESTALE, "the session that opened this file has expired")

    async def _fetch(self, f: OpenFile) -> None:
        assert f.handle is not None
        with cell_errors(f"read {f.path}"):
            contents, stat = await f.handle.get_contents_and_stat()
        self._buffer(f).load(contents, stat.content_generation)

    async def read(self, ctx: RequestContext, req: rq.Read) -> bytes:
        f = self._file(req.fh)
        if f.handle is None:
            return f.control_data[req.offset:req.offset + req.size]
        self._check_alive(f)
        buffer = self._buffer(f)
        if req.offset == 0:
            # A new pass over the file: read what the cell holds now.
            buffer.forget_snapshot()
            f.events_pending = False
        try:
            data = buffer.read(req.offset, req.size)
        except NeedContents:
            await self._fetch(f)
            data = buffer.read(req.offset, req.size)
        if f.keep_cache and (buffer.dirty or buffer.base_generation != self._cached_generation(
                f.us, f.path, f.handle.instance)):
            # These bytes go into the kernel's pages but no session caches
            # them (an invalidation came since): drop them once served.
            self._suspect_pages(f.ino)
        return data

    def _pages_trusted(self, ino: int) -> bool:
        pending = self._suspect.get(ino)
        if pending is None:
            return True
        if pending.is_set():
            del self._suspect[ino]
            return True
        return False

    def _suspect_pages(self, ino: int) -> None:
        if self.session is None or self.session.closed:
            return
        pending = self._suspect.get(ino)
        if pending is not None and not pending.is_set():
            return
        self._suspect[ino] = self.session.notify_batch_soon([NotifyInvalInode(ino, 0, 0)])

    async def write(self, ctx: RequestContext, req: rq.Write) -> int:
        f = self._file(req.fh)
        if f.buffer is None or not f.writable:
            raise FuseError(errno.EBADF)
        self._check_alive(f)
        try:
            written = f.buffer.write(req.offset, req.data)
        except NeedContents:
            await self._fetch(f)
            written = f.buffer.write(req.offset, req.data)
        if f.buffer.too_large:
            # Like a file size limit: the write that crosses it fails (shells
            # report write errors but ignore close errors), and so does close.
            raise FuseError(errno.EFBIG, f"{f.path}: contents over {self.config.max_file_bytes} bytes")
        return written

    async def _commit(self, f: OpenFile, *, final: bool = True) -> None:
        if f.buffer is None:
            return
        plan = f.buffer.pending_commit(final=final)
        if plan is None:
            return
        if plan.too_large:
            f.buffer.discard()
            raise FuseError(errno.EFBIG, f"{f.path}: contents over {self.config.max_file_bytes} bytes")
        self._check_alive(f)
        assert f.handle is not None
        # A commit that was sent must not be torn by an interrupt.
        with trio.CancelScope(shield=True):
            try:
                with cell_errors(f"commit {f.path}"):
                    stat = await f.handle.set_contents(plan.contents,
                                                       expected_generation=plan.expected_generation)
            except FuseError:
                f.buffer.discard()
                raise
        f.buffer.committed(plan.contents, stat.content_generation)
        self.on_event(f.cell, f.path, EVENT_CONTENTS_MODIFIED)

    async def flush(self, ctx: RequestContext, req: rq.Flush) -> None:
        f = self._file(req.fh)
        try:
            await self._commit(f, final=False)
        finally:
            # POSIX record locks end when their process closes any descriptor
            # of the file.
            if f.ino in self._posix_locks:
                for other in [o for o in self.files.values() if o.ino == f.ino]:
                    slot = other.locks.pop((req.lock_owner, False), None)
                    if slot is not None:
                        _count(self._posix_locks, f.ino, -1)
                        await self._drop_slot(slot)

    async def fsync(self, ctx: RequestContext, req: rq.Fsync) -> None:
        await self._commit(self._file(req.fh))

    async def release(self, ctx: RequestContext, req: rq.Release) -> None:
        f = self.files.pop(req.fh, None)
        if f is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self._commit(f)
            except FuseError as exc:
                log.warning("%s: commit at release failed (the writer had closed already): %s", f.path, exc)
            slots = list(f.locks.values())
            f.locks.clear()
            for slot in slots:
                if not slot.is_flock:
                    _count(self._posix_locks, f.ino, -1)
                await self._drop_slot(slot)
            if f.handle is not None and f.borrowed:
                assert f.us is not None
                f.us.reads.give_back(f.handle)
            elif f.handle is not None:
                await self._close_handle(f.handle)

    async def _close_handle(self, handle: Handle) -> None:
        with trio.CancelScope(shield=True):
            try:
                await handle.close()
            except CellError as exc:
                log.debug("close %s: %s", handle.path, exc)

    # ------------------------------------------------------------- directories

    async def opendir(self, ctx: RequestContext, req: rq.OpenDir) -> OpenOut:
        inode = self.inode(req.nodeid)
        if not inode.is_dir:
            raise FuseError(errno.ENOTDIR)
        d = OpenDir(self._fh(), inode.ino)
        self.dirs[d.fh] = d
        return OpenOut(d.fh)

    async def releasedir(self, ctx: RequestContext, req: rq.ReleaseDir) -> None:
        self.dirs.pop(req.fh, None)

    async def _listing(self, ctx: RequestContext, d: OpenDir) -> list[tuple[bytes, int, int, Stat | None]]:
        """(name, ino, mode, stat) of every entry, fetched at offset 0 and
        kept for the rest of this pass so cookies stay consistent."""
        inode = self.inode(d.ino)
        items: list[tuple[bytes, int, int, Stat | None]] = [(b".", inode.ino, DIR_MODE, None),
                                                           (b"..", ROOT_INO, DIR_MODE, None)]
        if inode.virtual == "root":
            for cell in self.cells:
                # Placeholder inode numbers: listing the root opens no sessions.
                items.append((cell.encode(), self.inodes.control_dir(cell).ino - 1, DIR_MODE, None))
        elif inode.virtual == "control":
            for name in CONTROL_FILES:
                ctl = self.inodes.control_file(inode.cell, name)
                assert ctl is not None
                items.append((name.encode(), ctl.ino, st.S_IFREG | 0o444, None))
        else:
            us = await self.user_session(ctx, inode.cell)
            with cell_errors(f"readdir {inode.path}"):
                entries = await us.reads.list(inode.path)
            if self._is_cell_root(inode):
                items.append((CONTROL_DIR.encode(), self.inodes.control_dir(inode.cell).ino, DIR_MODE, None))
            for e in entries:
                items.append((e.name.encode(), self.inodes.ino_of(inode.cell, e.stat.instance),
                              self._mode(e.stat), e.stat))
        return items

    async def readdir(self, ctx: RequestContext, req: rq.ReadDir, out: DirentBuffer) -> None:
        d = self.dirs.get(req.fh) or OpenDir(0, req.nodeid)
        if d.listing is None or req.offset == 0:
            d.listing = await self._listing(ctx, d)
        for index in range(req.offset, len(d.listing)):
            name, ino, mode, _ = d.listing[index]
            if not out.add(DirEntry(ino, name, dirent_type(mode), index + 1)):
                break

    async def readdirplus(self, ctx: RequestContext, req: rq.ReadDirPlus, out: DirentBuffer) -> None:
        d = self.dirs.get(req.fh) or OpenDir(0, req.nodeid)
        if d.listing is None or req.offset == 0:
            d.listing = await self._listing(ctx, d)
        cell = self.inode(d.ino).cell
        us = self.pool.peek(cell, self.principal(ctx.uid)) if cell else None
        for index in range(req.offset, len(d.listing)):
            name, ino, mode, stat = d.listing[index]
            if stat is None:
                # nodeid 0: the kernel takes the name, no inode, no reference.
                entry = EntryOut(0, Attr(ino=ino, mode=mode), entry_valid_ns=0, attr_valid_ns=0)
                if not out.add(DirEntryPlus(entry, name, index + 1)):
                    break
                continue
            inode = self.inodes.node(cell, stat.instance, stat.path, stat.is_directory)
            entry_ns, attr_ns = self._ttls(us, stat)
            entry = EntryOut(inode.ino, self._attr(inode.ino, stat), entry_valid_ns=entry_ns,
                             attr_valid_ns=attr_ns)
            if not out.add(DirEntryPlus(entry, name, index + 1)):
                self.inodes.drop_unreferenced(inode.ino)
                break
            self.inodes.ref(inode.ino)

    # ------------------------------------------------------------------ xattrs

    async def _stat_for_xattr(self, ctx: RequestContext, inode: Inode) -> Stat:
        return await self._stat_inode(ctx, inode)

    def _held_slots(self, ino: int, principal: str) -> list[tuple[OpenFile, LockSlot]]:
        return [(f, slot) for f in self.files.values() if f.ino == ino and f.us is not None
                and f.us.principal == principal for slot in f.locks.values() if slot.mode is not None]

    async def getxattr(self, ctx: RequestContext, req: rq.GetXattr) -> bytes:
        inode = self.inode(req.nodeid)
        name = req.name.decode("utf-8", "replace")
        if inode.virtual is not None or not name.startswith(XATTR_PREFIX):
            raise FuseError(errno.ENODATA)
        key = name[len(XATTR_PREFIX):]
        principal = self.principal(ctx.uid)
        if key == "sequencer":
            held = self._held_slots(inode.ino, principal)
            if not held:
                raise FuseError(errno.ENODATA, "no lock held on this file through this mount")
            family = _ancestors(ctx.pid)
            held.sort(key=lambda fs: fs[1].pid in family, reverse=True)
            seq = held[0][1].sequencer
            assert seq is not None
            return seq.encode()
        if key == "lock_delay_ms":
            return str(self.lock_delays.get((inode.cell, inode.path), DEFAULT_LOCK_DELAY_MS)).encode()
        if key == "cas":
            gen = self.cas_arms.get((inode.ino, principal))
            if gen is None:
                raise FuseError(errno.ENODATA)
            return str(gen).encode()
        if key not in READONLY_XATTRS and key not in ACL_XATTRS:
            raise FuseError(errno.ENODATA)
        s = await self._stat_for_xattr(ctx, inode)
        value = {
            "instance": s.instance, "content_gen": s.content_generation, "lock_gen": s.lock_generation,
            "acl_gen": s.acl_generation, "checksum": f"{s.checksum:#018x}", "ephemeral": int(s.ephemeral),
            "acl.read": s.acl_read, "acl.write": s.acl_write, "acl.change": s.acl_change,
        }[key]
        return str(value).encode()

    async def listxattr(self, ctx: RequestContext, req: rq.ListXattr) -> Sequence[bytes]:
        inode = self.inode(req.nodeid)
        if inode.virtual is not None:
            return []
        principal = self.principal(ctx.uid)
        names = [*READONLY_XATTRS, *ACL_XATTRS, "lock_delay_ms"]
        if self._held_slots(inode.ino, principal):
            names.append("sequencer")
        if (inode.ino, principal) in self.cas_arms:
            names.append("cas")
        return [(XATTR_PREFIX + n).encode() for n in names]

    async def setxattr(self, ctx: RequestContext, req: rq.SetXattr) -> None:
        inode = self.inode(req.nodeid)
        name = req.name.decode("utf-8", "replace")
        if inode.virtual is not None:
            raise FuseError(errno.EPERM, "control files have no attributes")
        if not name.startswith(XATTR_PREFIX):
            raise FuseError(errno.EOPNOTSUPP, "only user.chubby.* attributes exist")
        key = name[len(XATTR_PREFIX):]
        text = req.value.decode("utf-8", "replace").strip()
        if key in ACL_XATTRS:
            await self._set_acl(ctx, inode, key, text)
        elif key == "lock_delay_ms":
            ms = _parse_int(text, 0, MAX_LOCK_DELAY_MS)
            self.lock_delays[(inode.cell, inode.path)] = ms
        elif key == "cas":
            self.cas_arms[(inode.ino, self.principal(ctx.uid))] = _parse_int(text, 0, (1 << 64) - 1)
        elif key == "sequencer":
            await self._bind_sequencer(ctx, inode, text)
        elif key in READONLY_XATTRS:
            # EOPNOTSUPP, not EPERM: cp -a / mv across directories copy
            # xattrs and skip the ones a filesystem does not support.
            raise FuseError(errno.EOPNOTSUPP, f"{name} is read-only")
        else:
            raise FuseError(errno.EOPNOTSUPP, f"no attribute {name}")

    async def removexattr(self, ctx: RequestContext, req: rq.RemoveXattr) -> None:
        inode = self.inode(req.nodeid)
        name = req.name.decode("utf-8", "replace")
        key = name[len(XATTR_PREFIX):] if name.startswith(XATTR_PREFIX) else None
        if inode.virtual is not None or key is None:
            raise FuseError(errno.ENODATA)
        if key == "cas":
            if self.cas_arms.pop((inode.ino, self.principal(ctx.uid)), None) is None:
                raise FuseError(errno.ENODATA)
        elif key == "lock_delay_ms":
            self.lock_delays.pop((inode.cell, inode.path), None)
        elif key in READONLY_XATTRS or key in ACL_XATTRS or key == "sequencer":
            raise FuseError(errno.EPERM, f"{name} cannot be removed")
        else:
            raise FuseError(errno.ENODATA)

    async def _set_acl(self, ctx: RequestContext, inode: Inode, key: str, value: str) -> None:
        us = await self.user_session(ctx, inode.cell)
        with cell_errors(f"set {key} on {inode.path}"):
            if not value:
                raise FuseError(errno.EINVAL, "an ACL name cannot be empty")
            check_name(value.encode())
            async with await us.session.open(inode.path, read=False, change_acl=True) as h:
                s = h.stat
                names = {"acl.read": s.acl_read, "acl.write": s.acl_write, "acl.change": s.acl_change}
                names[key] = value
                await h.set_acl(names["acl.read"], names["acl.write"], names["acl.change"])

    async def _bind_sequencer(self, ctx: RequestContext, inode: Inode, sequencer: str) -> None:
        """Bind to the open files of this node held by the calling process or
        one of its ancestors (so `setfattr` from a shell works on the shell's
        descriptors)."""
        principal = self.principal(ctx.uid)
        family = _ancestors(ctx.pid)
        targets = [f for f in self.files.values() if f.ino == inode.ino and f.handle is not None
                   and f.us is not None and f.us.principal == principal and f.pid in family]
        if not targets:
            raise FuseError(errno.EBADF, "no file of this node is open in the calling process or its parents")
        for f in targets:
            assert f.handle is not None and f.us is not None
            with cell_errors(f"bind sequencer on {f.path}"):
                if f.borrowed:
                    # A binding belongs to this open file, not to the shared read handle.
                    own = await f.us.session.open(f.path, read=True, events=FILE_EVENTS)
                    f.us.watch(own)
                    f.us.reads.give_back(f.handle)
                    f.handle, f.borrowed = own, False
                await f.handle.set_sequencer(sequencer)
            f.bound_sequencer = sequencer

    # ------------------------------------------------------------------- locks

    def _lock_mode(self, lock: FileLock) -> str | None:
        return {abi.F_RDLCK: "shared", abi.F_WRLCK: "exclusive"}.get(lock.type)

    def _whole_file(self, req: rq.GetLk | rq.SetLk | rq.SetLkW) -> None:
        if not req.is_flock and not (req.lock.start == 0 and req.lock.end == abi.OFFSET_MAX):
            log.info("refusing a byte-range fcntl lock on %s (only whole-file locks exist)",
                     self.inode(req.nodeid).path)
            raise FuseError(errno.EOPNOTSUPP, "byte-range locks are not supported")

    async def _lock_handle(self, f: OpenFile, slot: LockSlot) -> Handle:
        if slot.handle is None:
            assert f.us is not None
            delay = self.lock_delays.get((f.cell, f.path))
            with cell_errors(f"lock {f.path}"):
                slot.handle = await f.us.session.open(f.path, read=False, lock=True, lock_delay_ms=delay)
        return slot.handle

    async def _drop_slot(self, slot: LockSlot) -> None:
        """Give the lock up (or the queued Acquire): closing the handle does both."""
        handle, slot.handle, slot.mode, slot.sequencer = slot.handle, None, None, None
        if handle is not None:
            await self._close_handle(handle)

    async def _set_lock(self, ctx: RequestContext, req: rq.SetLk | rq.SetLkW, wait: bool) -> None:
        f = self._file(req.fh)
        if f.handle is None:
            raise FuseError(errno.EINVAL, "control files cannot be locked")
        self._whole_file(req)
        self._check_alive(f)
        key = (req.owner, req.is_flock)
        mode = self._lock_mode(req.lock)
        slot = f.locks.get(key)
        if mode is None:  # unlock: never waits
            if slot is not None:
                with trio.CancelScope(shield=True):
                    await self._release_slot(slot)
            return
        if slot is None:
            slot = f.locks[key] = LockSlot(req.is_flock)
            if not slot.is_flock:
                _count(self._posix_locks, f.ino, 1)
        if slot.mode == mode:
            return
        if slot.mode is not None:
            # Conversion: like flock(2), not atomic.
            await self._release_slot(slot)
        handle = await self._lock_handle(f, slot)
        with cell_errors(f"lock {f.path}"):
            if wait:
                try:
                    while True:
                        try:
                            sequencer = await handle.acquire(mode)
                            break
                        except CellUnavailableError:
                            # A long wait outlasts one call's timeout; the
                            # queued Acquire is idempotent, ask again.
                            continue
                except trio.Cancelled:
                    # Interrupted (Ctrl-C, flock -w): withdraw the queued Acquire.
                    with trio.CancelScope(shield=True):
                        await self._drop_slot(slot)
                    raise
            else:
                got = await handle.try_acquire(mode)
                if got is None:
                    raise FuseError(errno.EWOULDBLOCK)
                sequencer = got
        slot.mode, slot.sequencer, slot.pid = mode, sequencer, ctx.pid

    async def _release_slot(self, slot: LockSlot) -> None:
        if slot.handle is not None and slot.mode is not None:
            try:
                await slot.handle.release()
            except CellError as exc:
                log.debug("release: %s", exc)
                await self._drop_slot(slot)
        slot.mode = slot.sequencer = None

    async def setlk(self, ctx: RequestContext, req: rq.SetLk) -> None:
        await self._set_lock(ctx, req, wait=False)

    async def setlkw(self, ctx: RequestContext, req: rq.SetLkW) -> None:
        await self._set_lock(ctx, req, wait=True)

    async def getlk(self, ctx: RequestContext, req: rq.GetLk) -> FileLock:
        f = self._file(req.fh)
        if f.handle is None:
            raise FuseError(errno.EINVAL, "control files cannot be locked")
        self._whole_file(req)
        mode = self._lock_mode(req.lock)
        free = FileLock(req.lock.start, req.lock.end, abi.F_UNLCK, 0)
        slot = f.locks.get((req.owner, req.is_flock))
        if mode is None or (slot is not None and slot.mode is not None):
            return free
        probe = LockSlot(req.is_flock)
        try:
            handle = await self._lock_handle(f, probe)
            with cell_errors(f"getlk {f.path}"):
                got = await handle.try_acquire(mode)
        finally:
            await self._drop_slot(probe)
        if got is not None:
            return free
        return FileLock(0, abi.OFFSET_MAX, abi.F_WRLCK, 0)

    # -------------------------------------------------------------- poll/events

    async def poll(self, ctx: RequestContext, req: rq.Poll) -> int:
        f = self._file(req.fh)
        revents = select.POLLOUT if f.writable else 0
        if f.us is not None and f.us.expired:
            revents |= select.POLLERR
        if f.events_pending:
            # Reported once per change: a file read through the kernel's
            # pages sends no READ that could say it was read again.
            f.events_pending = False
            revents |= select.POLLIN
        elif req.schedule_notify:
            f.poll_khs.add(req.kh)
        return revents & (req.events | select.POLLERR | select.POLLHUP)

    def _wake(self, files: list[OpenFile]) -> None:
        """Mark `files` changed and wake their poll() sleepers."""
        notes: list[NotifyPoll] = []
        for f in files:
            f.events_pending = True
            notes.extend(NotifyPoll(kh) for kh in f.poll_khs)
            f.poll_khs = set()
        if notes and self.session is not None and not self.session.closed:
            self.session.notify_batch_soon(notes)

    def on_event(self, cell: str, path: str, kind: int) -> None:
        """A change of `path` made through this mount: files open on it
        become readable for poll(), sleepers wake."""
        self._wake([f for f in self.files.values()
                    if f.cell == cell and f.path == path and f.handle is not None])

    def on_handle_event(self, handle: Handle, event: Event) -> None:
        """The master's event for `handle` (contents modified, node deleted,
        or a fail-over after which events may have been lost)."""
        self._wake([f for f in self.files.values() if f.handle is handle])

    async def on_session_state(self, us: UserSession, state: SessionState) -> None:
        """Jeopardy or expiry: the session's cache is gone, and so must be the
        kernel's copies of it; at expiry, pollers of its files get POLLERR."""
        if state in (SessionState.JEOPARDY, SessionState.EXPIRED):
            await self.on_flush(us.cell)
        if state == SessionState.EXPIRED:
            self._wake([f for f in self.files.values() if f.us is us])

    @property
    def _expire_only(self) -> bool:
        negotiated = self.session.negotiated if self.session is not None else None
        # An offer, not a negotiated feature: the kernel accepts the flag if it has it.
        return negotiated is not None and bool(negotiated.kernel_flags & abi.InitFlag.HAS_EXPIRE_ONLY)

    def _inode_note(self, inode: Inode) -> NotifyInvalInode:
        # Pages only where there may be some: a page invalidation waits for
        # reads in flight, attributes never wait.
        return NotifyInvalInode(inode.ino, 0 if inode.ino in self._paged else -1, 0)

    async def _deliver(self, inodes: list[Inode], entries: list[tuple[int, str]], why: str) -> None:
        """Drop the kernel's attributes and pages of `inodes` and its entries
        (parent ino, name), waiting (bounded) until the kernel took them.

        An entry invalidation takes the kernel's lock of its directory. In a
        directory where a request of ours is being served (a create that may
        itself wait for this acknowledgement) it is queued, not waited for:
        it goes out as soon as that request is answered, and that request's
        own answer updates the kernel's entry. Entries are only marked
        expired (FUSE_EXPIRE_ONLY, if the kernel has it): the next lookup
        asks us, and a directory's cached subtree survives."""
        if self.session is None or self.session.closed:
            return
        notes: list[NotifyInvalInode | NotifyInvalEntry] = [self._inode_note(i) for i in inodes]
        queued: list[NotifyInvalEntry] = []
        for parent, name in entries:
            self._negative_count -= int(name in self._negatives.get(parent, ()))
            self._negatives.get(parent, set()).discard(name)
            note = NotifyInvalEntry(parent, name.encode(), self._expire_only)
            (queued if parent in self._busy_dirs else notes).append(note)
        if queued:
            self.session.notify_batch_soon(queued)
        if not await self.session.notify_many(notes, wait_s=self.config.notify_wait_s):
            log.warning("%s: the kernel did not take %d invalidations within %.1f s; acknowledging anyway",
                        why, len(notes), self.config.notify_wait_s)

    async def on_invalidate(self, cell: str, path: str) -> None:
        """The master invalidated `path` in a session's cache: drop the
        kernel's attributes and pages of the node, its entry, and (a
        directory's listing changed) its children's attributes, pages and
        entries, including missing names; awaited before the acknowledgement."""
        parent_path, _, name = path.rpartition("/")
        if parent_path == names.acl_directory(cell):
            self._admitted.pop((cell, name), None)  # before any await: no open may use it again
        for us in self.pool.all():
            if us.cell == cell:
                us.reads.suspect(path)
        nodes = self.inodes.by_path(cell, path)
        inodes = list(nodes)
        entries = [(parent.ino, name) for parent in self.inodes.by_path(cell, parent_path)]
        if nodes:
            children = self.inodes.children(cell, path)
            inodes.extend(children)
            for directory in nodes:
                entries.extend((directory.ino, child.path.rpartition("/")[2]) for child in children)
                entries.extend((directory.ino, missing) for missing in self._negatives.get(directory.ino, ()))
        await self._deliver(inodes, entries, f"invalidate {path}")

    async def on_flush(self, cell: str) -> None:
        """A session's whole cache was dropped: drop every kernel copy of the cell."""
        for key in [key for key in self._admitted if key[0] == cell]:
            del self._admitted[key]
        inodes = self.inodes.of_cell(cell)
        entries: list[tuple[int, str]] = []
        for inode in inodes:
            parent_path, _, name = inode.path.rpartition("/")
            entries.extend((parent.ino, name) for parent in self.inodes.by_path(cell, parent_path))
            entries.extend((inode.ino, missing) for missing in self._negatives.get(inode.ino, ()))
        await self._deliver(inodes, entries, f"flush cell {cell}")

    # ---------------------------------------------------------------- control

    async def _control_text(self, ctx: RequestContext, inode: Inode) -> str:
        principal = self.principal(ctx.uid)
        us = self.pool.peek(inode.cell, principal)
        if inode.virtual == "state":
            return ("none" if us is None else "expired" if us.expired else "ok") + "\n"
        if us is None or us.expired:
            us = await self.user_session(ctx, inode.cell)
        master = us.master_address()
        if inode.virtual == "master":
            return f"{master or 'unknown'}\n"
        if inode.virtual == "epoch":
            return f"{await self._epoch(us, master)}\n"
        return (f"cell: {inode.cell}\nprincipal: {principal}\nsession: {us.session.id}\n"
                f"state: {'expired' if us.expired else 'ok'}\nlease_ms: {us.session.lease_ms}\n"
                f"master: {master or 'unknown'}\n")

    async def _epoch(self, us: UserSession, master: str | None) -> str:
        if master is None:
            return "unknown"
        conn: CellConnection = us.session.conn
        try:
            reply = await conn.call_replica(master, "status", timeout_s=2.0)
        except (OSError, EOFError, trio.TooSlowError) as exc:
            log.info("epoch: status of %s failed: %s", master, exc)
            return "unknown"
        status = reply.get("status", {})
        return str(status.get("term", "unknown")) if status.get("role") == "leader" else "unknown"

    def assert_invariants(self) -> None:
        self.inodes.assert_invariants()
        for fh, f in self.files.items():
            assert f.fh == fh
            if f.buffer is not None:
                f.buffer.assert_invariants()
            for slot in f.locks.values():
                assert slot.mode is None or slot.handle is not None
                assert (slot.mode is None) == (slot.sequencer is None)
            assert not f.borrowed or (f.handle is not None and f.us is not None and not f.writable)
            assert not f.keep_cache or (f.borrowed and f.ino in self._paged)
        assert self._negative_count == sum(len(names) for names in self._negatives.values())
        assert all(count > 0 for count in self._busy_dirs.values())
        posix: dict[int, int] = {}
        for f in self.files.values():
            for slot in f.locks.values():
                if not slot.is_flock:
                    _count(posix, f.ino, 1)
        assert posix == self._posix_locks, (posix, self._posix_locks)
        for us in self.pool.all():
            us.reads.assert_invariants()


def _count(counts: dict[int, int], key: int, delta: int) -> None:
    """Add `delta` to a count kept only while positive."""
    left = counts.pop(key, 0) + delta
    if left:
        counts[key] = left


def _parse_int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FuseError(errno.EINVAL, f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise FuseError(errno.EINVAL, f"{value} is outside {low}..{high}")
    return value


def _ancestors(pid: int, depth: int = 8) -> set[int]:
    """`pid` and its parents (through /proc), for "the caller or its shell"."""
    family = {pid}
    for _ in range(depth):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # The command name may contain spaces and parentheses: split after the last ')'.
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
        family.add(pid)
    return family
