"""A small in-memory filesystem used only by the tests, to prove the layer
with real tools: files, directories, xattrs, flock (a local lock table with
blocking waits that an INTERRUPT cancels) and poll (readable after a write
the handle has not read yet)."""

from __future__ import annotations

import errno
import select
import stat
import time
from dataclasses import dataclass, field

import trio

from chubbyfs.fuse import abi
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.errors import FuseError
from chubbyfs.fuse.ops import Operations, RequestContext
from chubbyfs.fuse.replies import (
    Attr, AttrOut, CreateOut, DirEntry, DirEntryPlus, DirentBuffer, EntryOut, NotifyPoll,
    OpenOut, StatfsOut, dirent_type,
)
from chubbyfs.fuse.requests import FileLock
from chubbyfs.fuse.session import FuseSession

XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass
class Node:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    parent: int = abi.ROOT_ID
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mtime_ns: int = 0
    ctime_ns: int = 0
    version: int = 0  # bumped by every content change; poll readiness
    poll_khs: set[int] = field(default_factory=set)
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class Handle:
    ino: int
    seen_version: int


@dataclass
class FlockState:
    holders: dict[int, int] = field(default_factory=dict)  # owner -> F_RDLCK/F_WRLCK
    changed: trio.Event = field(default_factory=trio.Event)


class MemFS(Operations):
    def __init__(self, ttl_ns: int = 1_000_000_000, keep_cache: bool = False) -> None:
        self.ttl_ns = ttl_ns
        self.keep_cache = keep_cache
        self.session: FuseSession | None = None
        now = time.time_ns()
        self.nodes: dict[int, Node] = {
            abi.ROOT_ID: Node(abi.ROOT_ID, stat.S_IFDIR | 0o755, mtime_ns=now, ctime_ns=now,
                              nlink=2)}
        self.next_ino = 2
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.flocks: dict[int, FlockState] = {}
        self.lock_waiters = 0
        self.interrupted_waits = 0
        self.forgets = 0

    # --------------------------------------------------------------- helpers

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FuseError(errno.ENOENT) from None

    def dir(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise FuseError(errno.ENOTDIR)
        return node

    def attr(self, node: Node) -> Attr:
        size = len(node.data)
        return Attr(ino=node.ino, mode=node.mode, nlink=node.nlink, uid=node.uid,
                    gid=node.gid, size=size, atime_ns=node.mtime_ns, mtime_ns=node.mtime_ns,
                    ctime_ns=node.ctime_ns)

    def entry(self, node: Node) -> EntryOut:
        return EntryOut(node.ino, self.attr(node), entry_valid_ns=self.ttl_ns,
                        attr_valid_ns=self.ttl_ns)

    def new_node(self, parent: Node, name: bytes, mode: int, ctx: RequestContext) -> Node:
        if name in parent.children:
            raise FuseError(errno.EEXIST)
        now = time.time_ns()
        node = Node(self.next_ino, mode, uid=ctx.uid, gid=ctx.gid, parent=parent.ino,
                    mtime_ns=now, ctime_ns=now, nlink=2 if stat.S_ISDIR(mode) else 1)
        self.next_ino += 1
        self.nodes[node.ino] = node
        parent.children[name] = node.ino
        parent.mtime_ns = now
        return node

    def new_handle(self, node: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(node.ino, node.version)
        return fh

    def resolve(self, path: str) -> Node:
        node = self.nodes[abi.ROOT_ID]
        for part in path.strip("/").split("/"):
            if part:
                node = self.node(self.dir(node.ino).children.get(part.encode(), 0))
        return node

    def changed(self, node: Node) -> None:
        """Content changed: bump the version and wake pollers."""
        node.version += 1
        node.mtime_ns = node.ctime_ns = time.time_ns()
        khs, node.poll_khs = node.poll_khs, set()
        for kh in khs:
            if self.session is not None:
                self.session.notify_soon(NotifyPoll(kh))

    # ------------------------------------------------------------ namespace

    async def lookup(self, ctx: RequestContext, req: rq.Lookup) -> EntryOut:
        parent = self.dir(req.nodeid)
        ino = parent.children.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        return self.entry(self.nodes[ino])

    async def forget(self, ctx: RequestContext, req: rq.Forget) -> None:
        self.forgets += 1

    async def getattr(self, ctx: RequestContext, req: rq.GetAttr) -> AttrOut:
        return AttrOut(self.attr(self.node(req.nodeid)), attr_valid_ns=self.ttl_ns)

    async def setattr(self, ctx: RequestContext, req: rq.SetAttr) -> AttrOut:
        node = self.node(req.nodeid)
        if req.has(abi.FATTR_MODE):
            node.mode = (node.mode & stat.S_IFMT(node.mode)) | stat.S_IMODE(req.mode)
        if req.has(abi.FATTR_UID):
            node.uid = req.uid
        if req.has(abi.FATTR_GID):
            node.gid = req.gid
        if req.has(abi.FATTR_SIZE):
            if node.is_dir:
                raise FuseError(errno.EISDIR)
            del node.data[req.size:]
            node.data.extend(b"\0" * (req.size - len(node.data)))
            self.changed(node)
        if req.has(abi.FATTR_MTIME):
            node.mtime_ns = req.mtime_ns
        elif req.has(abi.FATTR_MTIME_NOW):
            node.mtime_ns = time.time_ns()
        node.ctime_ns = time.time_ns()
        return AttrOut(self.attr(node), attr_valid_ns=self.ttl_ns)

    async def mkdir(self, ctx: RequestContext, req: rq.Mkdir) -> EntryOut:
        parent = self.dir(req.nodeid)
        node = self.new_node(parent, req.name, stat.S_IFDIR | (req.mode & ~req.umask & 0o7777),
                             ctx)
        parent.nlink += 1
        return self.entry(node)

    async def create(self, ctx: RequestContext, req: rq.Create) -> CreateOut:
        parent = self.dir(req.nodeid)
        node = self.new_node(parent, req.name, stat.S_IFREG | (req.mode & ~req.umask & 0o7777),
                             ctx)
        return CreateOut(self.entry(node), OpenOut(self.new_handle(node), self.open_flags()))

    async def unlink(self, ctx: RequestContext, req: rq.Unlink) -> None:
        parent = self.dir(req.nodeid)
        ino = parent.children.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        if self.nodes[ino].is_dir:
            raise FuseError(errno.EISDIR)
        del parent.children[req.name]

    async def rmdir(self, ctx: RequestContext, req: rq.Rmdir) -> None:
        parent = self.dir(req.nodeid)
        ino = parent.children.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        if self.dir(ino).children:
            raise FuseError(errno.ENOTEMPTY)
        del parent.children[req.name]
        parent.nlink -= 1

    async def rename(self, ctx: RequestContext, req: rq.Rename) -> None:
        old_parent, new_parent = self.dir(req.nodeid), self.dir(req.newdir)
        ino = old_parent.children.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        target = new_parent.children.get(req.newname)
        if target is not None and self.nodes[target].is_dir and self.nodes[target].children:
            raise FuseError(errno.ENOTEMPTY)
        del old_parent.children[req.name]
        new_parent.children[req.newname] = ino
        self.nodes[ino].parent = new_parent.ino

    async def statfs(self, ctx: RequestContext, req: rq.StatFs) -> StatfsOut:
        used = sum(len(n.data) for n in self.nodes.values()) // 4096
        return StatfsOut(blocks=1 << 20, bfree=(1 << 20) - used, bavail=(1 << 20) - used,
                         files=1 << 16, ffree=(1 << 16) - len(self.nodes))

    # ---------------------------------------------------------------- files

    def open_flags(self) -> int:
        return abi.FOPEN_KEEP_CACHE if self.keep_cache else 0

    async def open(self, ctx: RequestContext, req: rq.Open) -> OpenOut:
        node = self.node(req.nodeid)
        if node.is_dir:
            raise FuseError(errno.EISDIR)
        return OpenOut(self.new_handle(node), self.open_flags())

    async def read(self, ctx: RequestContext, req: rq.Read) -> bytes:
        handle = self.handles[req.fh]
        node = self.node(handle.ino)
        handle.seen_version = node.version
        return bytes(node.data[req.offset:req.offset + req.size])

    async def write(self, ctx: RequestContext, req: rq.Write) -> int:
        node = self.node(self.handles[req.fh].ino)
        end = req.offset + len(req.data)
        if len(node.data) < req.offset:
            node.data.extend(b"\0" * (req.offset - len(node.data)))
        node.data[req.offset:end] = req.data
        self.changed(node)
        return len(req.data)

    async def flush(self, ctx: RequestContext, req: rq.Flush) -> None:
        return None

    async def fsync(self, ctx: RequestContext, req: rq.Fsync) -> None:
        return None

    async def release(self, ctx: RequestContext, req: rq.Release) -> None:
        handle = self.handles.pop(req.fh)
        if req.flock_unlock:
            self.unlock(handle.ino, req.lock_owner)

    # ---------------------------------------------------------- directories

    async def opendir(self, ctx: RequestContext, req: rq.OpenDir) -> OpenOut:
        return OpenOut(self.new_handle(self.dir(req.nodeid)))

    async def releasedir(self, ctx: RequestContext, req: rq.ReleaseDir) -> None:
        self.handles.pop(req.fh, None)

    def listing(self, node: Node) -> list[tuple[bytes, Node]]:
        items = [(b".", node), (b"..", self.nodes[node.parent])]
        items += [(name, self.nodes[ino]) for name, ino in sorted(node.children.items())]
        return items

    async def readdir(self, ctx: RequestContext, req: rq.ReadDir, out: DirentBuffer) -> None:
        for index, (name, child) in enumerate(self.listing(self.dir(req.nodeid))):
            if index >= req.offset and not out.add(
                    DirEntry(child.ino, name, dirent_type(child.mode), index + 1)):
                break

    async def readdirplus(self, ctx: RequestContext, req: rq.ReadDirPlus,
                          out: DirentBuffer) -> None:
        for index, (name, child) in enumerate(self.listing(self.dir(req.nodeid))):
            if index >= req.offset and not out.add(
                    DirEntryPlus(self.entry(child), name, index + 1)):
                break

    # --------------------------------------------------------------- xattrs

    async def setxattr(self, ctx: RequestContext, req: rq.SetXattr) -> None:
        node = self.node(req.nodeid)
        if req.flags & XATTR_CREATE and req.name in node.xattrs:
            raise FuseError(errno.EEXIST)
        if req.flags & XATTR_REPLACE and req.name not in node.xattrs:
            raise FuseError(errno.ENODATA)
        node.xattrs[req.name] = req.value

    async def getxattr(self, ctx: RequestContext, req: rq.GetXattr) -> bytes:
        try:
            return self.node(req.nodeid).xattrs[req.name]
        except KeyError:
            raise FuseError(errno.ENODATA) from None

    async def listxattr(self, ctx: RequestContext, req: rq.ListXattr) -> list[bytes]:
        return sorted(self.node(req.nodeid).xattrs)

    async def removexattr(self, ctx: RequestContext, req: rq.RemoveXattr) -> None:
        if self.node(req.nodeid).xattrs.pop(req.name, None) is None:
            raise FuseError(errno.ENODATA)

    # ---------------------------------------------------------------- locks

    def conflicts(self, ino: int, owner: int, kind: int) -> bool:
        holders = self.flocks.get(ino, FlockState()).holders
        others = [t for o, t in holders.items() if o != owner]
        return bool(others) and (kind == abi.F_WRLCK or abi.F_WRLCK in others)

    def unlock(self, ino: int, owner: int) -> None:
        state = self.flocks.get(ino)
        if state is None or state.holders.pop(owner, None) is None:
            return  # unlocking what was never held is a silent no-op
        state.changed.set()
        state.changed = trio.Event()
        if not state.holders:
            del self.flocks[ino]

    def try_lock(self, req: rq.SetLk | rq.SetLkW) -> bool:
        if not req.is_flock:
            raise FuseError(errno.ENOLCK)  # fcntl byte-range locks: not in this toy
        if req.lock.type == abi.F_UNLCK:
            self.unlock(req.nodeid, req.owner)
            return True
        if self.conflicts(req.nodeid, req.owner, req.lock.type):
            return False
        self.flocks.setdefault(req.nodeid, FlockState()).holders[req.owner] = req.lock.type
        return True

    async def getlk(self, ctx: RequestContext, req: rq.GetLk) -> FileLock:
        if self.conflicts(req.nodeid, req.owner, req.lock.type):
            kind = max(self.flocks[req.nodeid].holders.values())
            return FileLock(0, abi.OFFSET_MAX, kind, 0)
        return FileLock(0, 0, abi.F_UNLCK, 0)

    async def setlk(self, ctx: RequestContext, req: rq.SetLk) -> None:
        if not self.try_lock(req):
            raise FuseError(errno.EAGAIN)

    async def setlkw(self, ctx: RequestContext, req: rq.SetLkW) -> None:
        self.lock_waiters += 1
        try:
            while not self.try_lock(req):
                await self.flocks[req.nodeid].changed.wait()
        except trio.Cancelled:
            self.interrupted_waits += 1
            raise
        finally:
            self.lock_waiters -= 1

    # ----------------------------------------------------------------- poll

    async def poll(self, ctx: RequestContext, req: rq.Poll) -> int:
        handle = self.handles[req.fh]
        node = self.node(handle.ino)
        revents = select.POLLOUT
        if handle.seen_version < node.version:
            revents |= select.POLLIN
        elif req.schedule_notify:
            node.poll_khs.add(req.kh)
        return revents & (req.events | select.POLLERR | select.POLLHUP)

    # ------------------------------------------------------------- checking

    def assert_invariants(self) -> None:
        for node in self.nodes.values():
            for ino in node.children.values():
                assert ino in self.nodes
        for state in self.flocks.values():
            kinds = list(state.holders.values())
            assert kinds, "empty lock state kept"
            assert abi.F_WRLCK not in kinds or len(kinds) == 1
