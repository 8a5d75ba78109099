"""Typed FUSE requests: one frozen dataclass per opcode body, plus the header.

Every body carries `nodeid`, the inode the request targets (0 for INIT and
INTERRUPT, 1 for the root). Names are raw `bytes` without their NUL: Linux
file names are byte strings and the layer does not guess an encoding.
Objects are built only by `codec.decode_request`, which validates lengths and
NULs; the classes themselves stay plain so tests can build them directly.

Pure: no I/O.
"""

from __future__ import annotations

from chubbyfs._frozen import frozen

from . import abi


@frozen
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int  # trailing extensions, in 8-byte units (7.38+)


@frozen
class FileLock:
    """A byte-range lock as FUSE describes it; `end` is inclusive."""

    start: int
    end: int
    type: int  # abi.F_RDLCK / F_WRLCK / F_UNLCK
    pid: int


@frozen
class Init:
    nodeid: int
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 capability bits: flags | flags2 << 32


@frozen
class Lookup:
    nodeid: int
    name: bytes


@frozen
class Forget:
    nodeid: int
    nlookup: int


@frozen
class BatchForget:
    nodeid: int
    items: tuple[Forget, ...]  # each with its own nodeid


@frozen
class GetAttr:
    nodeid: int
    getattr_flags: int
    fh: int  # meaningful only when getattr_flags & abi.GETATTR_FH

    @property
    def has_fh(self) -> bool:
        return bool(self.getattr_flags & abi.GETATTR_FH)


@frozen
class SetAttr:
    """Attribute changes; only fields whose FATTR_* bit is in `valid` apply."""

    nodeid: int
    valid: int
    fh: int
    size: int
    lock_owner: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    uid: int
    gid: int

    def has(self, fattr_bit: int) -> bool:
        return bool(self.valid & fattr_bit)


@frozen
class ReadLink:
    nodeid: int


@frozen
class Symlink:
    nodeid: int  # parent directory
    name: bytes
    target: bytes


@frozen
class Mknod:
    nodeid: int
    name: bytes
    mode: int
    rdev: int
    umask: int


@frozen
class Mkdir:
    nodeid: int
    name: bytes
    mode: int
    umask: int


@frozen
class Unlink:
    nodeid: int
    name: bytes


@frozen
class Rmdir:
    nodeid: int
    name: bytes


@frozen
class Rename:
    nodeid: int  # old parent
    name: bytes
    newdir: int
    newname: bytes


@frozen
class Rename2:
    nodeid: int
    name: bytes
    newdir: int
    newname: bytes
    flags: int  # RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4


@frozen
class Link:
    nodeid: int  # new parent
    oldnodeid: int
    newname: bytes


@frozen
class Open:
    nodeid: int
    flags: int  # open(2) flags
    open_flags: int


@frozen
class OpenDir:
    nodeid: int
    flags: int
    open_flags: int


@frozen
class Read:
    nodeid: int
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@frozen
class Write:
    nodeid: int
    fh: int
    offset: int
    data: bytes
    write_flags: int
    lock_owner: int
    flags: int


@frozen
class ReadDir:
    nodeid: int
    fh: int
    offset: int  # cookie of the first entry wanted (0 = start)
    size: int  # bytes of packed entries the kernel can take


@frozen
class ReadDirPlus:
    nodeid: int
    fh: int
    offset: int
    size: int


@frozen
class Release:
    nodeid: int
    fh: int
    flags: int
    release_flags: int
    lock_owner: int

    @property
    def flock_unlock(self) -> bool:
        """The kernel asks to drop the flock held by `lock_owner` (if any)."""
        return bool(self.release_flags & abi.RELEASE_FLOCK_UNLOCK)


@frozen
class ReleaseDir:
    nodeid: int
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@frozen
class Flush:
    nodeid: int
    fh: int
    lock_owner: int


@frozen
class Fsync:
    nodeid: int
    fh: int
    fsync_flags: int

    @property
    def datasync(self) -> bool:
        return bool(self.fsync_flags & abi.FSYNC_FDATASYNC)


@frozen
class FsyncDir:
    nodeid: int
    fh: int
    fsync_flags: int


@frozen
class Create:
    nodeid: int  # parent
    name: bytes
    flags: int
    mode: int
    umask: int
    open_flags: int


@frozen
class StatFs:
    nodeid: int


@frozen
class GetXattr:
    nodeid: int
    name: bytes
    size: int  # 0 = "how long is it?"


@frozen
class SetXattr:
    nodeid: int
    name: bytes
    value: bytes
    flags: int  # XATTR_CREATE 1 / XATTR_REPLACE 2
    setxattr_flags: int  # only with SETXATTR_EXT


@frozen
class ListXattr:
    nodeid: int
    size: int


@frozen
class RemoveXattr:
    nodeid: int
    name: bytes


@frozen
class Access:
    nodeid: int
    mask: int


@frozen
class _LockRequest:
    nodeid: int
    fh: int
    owner: int
    lock: FileLock
    lk_flags: int

    @property
    def is_flock(self) -> bool:
        """flock(2) (whole file, owner = open file description), not fcntl."""
        return bool(self.lk_flags & abi.LK_FLOCK)


@frozen
class GetLk(_LockRequest):
    pass


@frozen
class SetLk(_LockRequest):
    pass


@frozen
class SetLkW(_LockRequest):
    """Blocking lock. Note: flock(LOCK_UN) also arrives as SETLKW (F_UNLCK)."""


@frozen
class Interrupt:
    nodeid: int
    target: int  # unique of the request to interrupt


@frozen
class Poll:
    nodeid: int
    fh: int
    kh: int  # kernel handle to name in a later POLL notification
    flags: int
    events: int

    @property
    def schedule_notify(self) -> bool:
        return bool(self.flags & abi.POLL_SCHEDULE_NOTIFY)


@frozen
class Destroy:
    nodeid: int


@frozen
class Fallocate:
    nodeid: int
    fh: int
    offset: int
    length: int
    mode: int


@frozen
class Lseek:
    nodeid: int
    fh: int
    offset: int
    whence: int


@frozen
class CopyFileRange:
    nodeid: int
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int


@frozen
class Ioctl:
    nodeid: int
    fh: int
    flags: int
    cmd: int
    arg: int
    in_data: bytes
    out_size: int


RequestBody = (
    Init | Lookup | Forget | BatchForget | GetAttr | SetAttr | ReadLink | Symlink | Mknod
    | Mkdir | Unlink | Rmdir | Rename | Rename2 | Link | Open | OpenDir | Read | Write
    | ReadDir | ReadDirPlus | Release | ReleaseDir | Flush | Fsync | FsyncDir | Create
    | StatFs | GetXattr | SetXattr | ListXattr | RemoveXattr | Access | GetLk | SetLk
    | SetLkW | Interrupt | Poll | Destroy | Fallocate | Lseek | CopyFileRange | Ioctl
)


@frozen
class Request:
    header: InHeader
    body: RequestBody

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def opcode(self) -> int:
        return self.header.opcode
