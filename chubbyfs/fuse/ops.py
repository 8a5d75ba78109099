"""The filesystem interface: subclass `Operations` and override what you serve.

One async method per opcode. Each receives a `RequestContext` (who asks) and
the typed request; it returns the typed reply (or None for empty replies) or
raises `FuseError(errno)`. Any other exception is logged and answered EIO.
The defaults answer ENOSYS, except that `batch_forget` forwards to `forget`.

Cancellation: a kernel INTERRUPT cancels the request's task (trio
`Cancelled` at its next checkpoint) and the session answers EINTR. An
operation that must not be torn half-way (a write already committed to the
cell) shields that part with `trio.CancelScope(shield=True)`.

Traps a subclass must know (details in docs/fuse-layer.md):
* ENOSYS from getxattr/listxattr/setxattr/removexattr, flush or poll turns the
  feature off for the whole mount; answer ENODATA etc. once implemented.
* flock(LOCK_UN) arrives as SETLKW with F_UNLCK: never wait on an unlock.
* RELEASE with `flock_unlock` may name an owner that never held a lock.
* Never access the mount from the serving process: the kernel would wait for
  an answer that the blocked caller cannot give.

This module only declares the interface; it imports no trio.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from . import requests as rq
from .errors import FuseError
from .negotiate import Negotiated
from .requests import FileLock
from .replies import (
    AttrOut, CreateOut, DirentBuffer, EntryOut, IoctlOut, OpenOut, StatfsOut,
)


class RequestContext(NamedTuple):
    """Who asks. Immutable like the requests, but a tuple, in the order of
    the request header's fields: one is built for every request, straight
    from a slice of the unpacked header."""

    opcode: int
    unique: int
    nodeid: int
    uid: int  # fsuid of the caller
    gid: int
    pid: int  # 0 for RELEASE, FORGET, INTERRUPT (kernel-initiated)


def _enosys() -> FuseError:
    return FuseError(errno.ENOSYS)


# Returned by an `Operations.answer_now_handlers` handler when the request
# needs its async method.
NOT_NOW = object()

# A synchronous answer: (ctx, request body) -> the method's return value, or NOT_NOW.
AnswerNow = Callable[["RequestContext", Any], object]


def context_of(header_fields: tuple[int, ...]) -> RequestContext:
    """The context of a request from its header as `abi.IN_HEADER` unpacks it
    (length, opcode, unique, nodeid, uid, gid, pid, ...)."""
    return _new_tuple(RequestContext, header_fields[1:7])


_new_tuple = tuple.__new__  # RequestContext._make without its Python-level frame


class Operations:
    """Base class for filesystems served by `FuseSession`."""

    def answer_now_handlers(self) -> Mapping[str, AnswerNow]:
        """Synchronous answers, by method name (e.g. {"open": self.open_now}).

        The read loop offers each request of those methods to its handler
        first, before the next request is read: the handler must not block,
        and whatever it returns is sent as the method's reply (a raised
        `FuseError` as its error); `NOT_NOW` hands the request to the async
        method as usual. For requests a cache can answer: a task per request
        costs more than such an answer. Asked once, when the session is made.
        """
        return {}

    async def init(self, negotiated: Negotiated) -> None:
        """Called once INIT is answered; the mount is usable from then on."""

    async def destroy(self, ctx: RequestContext, req: rq.Destroy) -> None:
        return None

    async def lookup(self, ctx: RequestContext, req: rq.Lookup) -> EntryOut:
        raise _enosys()

    async def forget(self, ctx: RequestContext, req: rq.Forget) -> None:
        """The kernel dropped `nlookup` references to `req.nodeid`. No reply."""

    async def batch_forget(self, ctx: RequestContext, req: rq.BatchForget) -> None:
        for item in req.items:
            await self.forget(ctx, item)

    async def getattr(self, ctx: RequestContext, req: rq.GetAttr) -> AttrOut:
        raise _enosys()

    async def setattr(self, ctx: RequestContext, req: rq.SetAttr) -> AttrOut:
        raise _enosys()

    async def readlink(self, ctx: RequestContext, req: rq.ReadLink) -> bytes:
        raise _enosys()

    async def symlink(self, ctx: RequestContext, req: rq.Symlink) -> EntryOut:
        raise _enosys()

    async def mknod(self, ctx: RequestContext, req: rq.Mknod) -> EntryOut:
        raise _enosys()

    async def mkdir(self, ctx: RequestContext, req: rq.Mkdir) -> EntryOut:
        raise _enosys()

    async def unlink(self, ctx: RequestContext, req: rq.Unlink) -> None:
        raise _enosys()

    async def rmdir(self, ctx: RequestContext, req: rq.Rmdir) -> None:
        raise _enosys()

    async def rename(self, ctx: RequestContext, req: rq.Rename) -> None:
        raise _enosys()

    async def rename2(self, ctx: RequestContext, req: rq.Rename2) -> None:
        raise _enosys()

    async def link(self, ctx: RequestContext, req: rq.Link) -> EntryOut:
        raise _enosys()

    async def open(self, ctx: RequestContext, req: rq.Open) -> OpenOut:
        raise _enosys()

    async def read(self, ctx: RequestContext, req: rq.Read) -> bytes:
        """Return at most `req.size` bytes; fewer means end of file."""
        raise _enosys()

    async def write(self, ctx: RequestContext, req: rq.Write) -> int:
        """Return the number of bytes written."""
        raise _enosys()

    async def statfs(self, ctx: RequestContext, req: rq.StatFs) -> StatfsOut:
        raise _enosys()

    async def release(self, ctx: RequestContext, req: rq.Release) -> None:
        raise _enosys()

    async def fsync(self, ctx: RequestContext, req: rq.Fsync) -> None:
        raise _enosys()

    async def flush(self, ctx: RequestContext, req: rq.Flush) -> None:
        raise _enosys()

    async def setxattr(self, ctx: RequestContext, req: rq.SetXattr) -> None:
        raise _enosys()

    async def getxattr(self, ctx: RequestContext, req: rq.GetXattr) -> bytes:
        """Return the whole value; the layer applies the size-0 / ERANGE rules."""
        raise _enosys()

    async def listxattr(self, ctx: RequestContext, req: rq.ListXattr) -> Sequence[bytes]:
        """Return the names; the layer NUL-separates them and applies size rules."""
        raise _enosys()

    async def removexattr(self, ctx: RequestContext, req: rq.RemoveXattr) -> None:
        raise _enosys()

    async def opendir(self, ctx: RequestContext, req: rq.OpenDir) -> OpenOut:
        raise _enosys()

    async def readdir(self, ctx: RequestContext, req: rq.ReadDir, out: DirentBuffer) -> None:
        """Add entries after cookie `req.offset` to `out` until `add` says full."""
        raise _enosys()

    async def readdirplus(self, ctx: RequestContext, req: rq.ReadDirPlus,
                          out: DirentBuffer) -> None:
        """Like readdir; each entry `out.add` accepts (except "." and "..",
        which the kernel never instantiates) hands the kernel a lookup count.
        Overriding this makes the session negotiate DO_READDIRPLUS."""
        raise _enosys()

    async def releasedir(self, ctx: RequestContext, req: rq.ReleaseDir) -> None:
        raise _enosys()

    async def fsyncdir(self, ctx: RequestContext, req: rq.FsyncDir) -> None:
        raise _enosys()

    async def getlk(self, ctx: RequestContext, req: rq.GetLk) -> FileLock:
        """Return one conflicting lock, or one with type F_UNLCK."""
        raise _enosys()

    async def setlk(self, ctx: RequestContext, req: rq.SetLk) -> None:
        """Non-blocking lock/unlock: raise FuseError(EAGAIN) on conflict."""
        raise _enosys()

    async def setlkw(self, ctx: RequestContext, req: rq.SetLkW) -> None:
        """Blocking lock: wait until granted; the wait is cancelled by INTERRUPT."""
        raise _enosys()

    async def access(self, ctx: RequestContext, req: rq.Access) -> None:
        raise _enosys()

    async def create(self, ctx: RequestContext, req: rq.Create) -> CreateOut:
        raise _enosys()

    async def poll(self, ctx: RequestContext, req: rq.Poll) -> int:
        """Return revents at once (never wait). If `req.schedule_notify`,
        remember `req.kh` and call `session.notify_poll(kh)` when ready."""
        raise _enosys()

    async def fallocate(self, ctx: RequestContext, req: rq.Fallocate) -> None:
        raise _enosys()

    async def lseek(self, ctx: RequestContext, req: rq.Lseek) -> int:
        raise _enosys()

    async def copy_file_range(self, ctx: RequestContext, req: rq.CopyFileRange) -> int:
        raise _enosys()

    async def ioctl(self, ctx: RequestContext, req: rq.Ioctl) -> IoctlOut:
        raise _enosys()


def overrides(ops: Operations, method: str) -> bool:
    """Whether `ops` implements `method` itself rather than inheriting the default."""
    return getattr(type(ops), method) is not getattr(Operations, method)
