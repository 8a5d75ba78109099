"""Typed FUSE requests: one frozen dataclass per opcode body, plus the header.

Every body carries `nodeid`, the inode the request targets (0 for INIT and
INTERRUPT, 1 for the root). Names are raw `bytes` without their NUL: Linux
file names are byte strings and the layer does not guess an encoding.
Objects are built only by `codec.decode_request`, which validates lengths and
NULs; the classes themselves stay plain so tests can build them directly.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi


@dataclass(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int  # trailing extensions, in 8-byte units (7.38+)


@dataclass(frozen=True, slots=True)
class FileLock:
    """A byte-range lock as FUSE describes it; `end` is inclusive."""

    start: int
    end: int
    type: int  # abi.F_RDLCK / F_WRLCK / F_UNLCK
    pid: int


@dataclass(frozen=True, slots=True)
class Init:
    nodeid: int
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 capability bits: flags | flags2 << 32


@dataclass(frozen=True, slots=True)
class Lookup:
    nodeid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Forget:
    nodeid: int
    nlookup: int


@dataclass(frozen=True, slots=True)
class BatchForget:
    nodeid: int
    items: tuple[Forget, ...]  # each with its own nodeid


@dataclass(frozen=True, slots=True)
class GetAttr:
    nodeid: int
    getattr_flags: int
    fh: int  # meaningful only when getattr_flags & abi.GETATTR_FH

    @property
    def has_fh(self) -> bool:
        return bool(self.getattr_flags & abi.GETATTR_FH)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class ReadLink:
    nodeid: int


@dataclass(frozen=True, slots=True)
class Symlink:
    nodeid: int  # parent directory
    name: bytes
    target: bytes


@dataclass(frozen=True, slots=True)
class Mknod:
    nodeid: int
    name: bytes
    mode: int
    rdev: int
    umask: int


@dataclass(frozen=True, slots=True)
class Mkdir:
    nodeid: int
    name: bytes
    mode: int
    umask: int


@dataclass(frozen=True, slots=True)
class Unlink:
    nodeid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rmdir:
    nodeid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    nodeid: int  # old parent
    name: bytes
    newdir: int
    newname: bytes


@dataclass(frozen=True, slots=True)
class Rename2:
    nodeid: int
    name: bytes
    newdir: int
    newname: bytes
    flags: int  # RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4


@dataclass(frozen=True, slots=True)
class Link:
    nodeid: int  # new parent
    oldnodeid: int
    newname: bytes


@dataclass(frozen=True, slots=True)
class Open:
    nodeid: int
    flags: int  # open(2) flags
    open_flags: int


@dataclass(frozen=True, slots=True)
class OpenDir:
    nodeid: int
    flags: int
    open_flags: int


@dataclass(frozen=True, slots=True)
class Read:
    nodeid: int
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@dataclass(frozen=True, slots=True)
class Write:
    nodeid: int
    fh: int
    offset: int
    data: bytes
    write_flags: int
    lock_owner: int
    flags: int


@dataclass(frozen=True, slots=True)
class ReadDir:
    nodeid: int
    fh: int
    offset: int  # cookie of the first entry wanted (0 = start)
    size: int  # bytes of packed entries the kernel can take


@dataclass(frozen=True, slots=True)
class ReadDirPlus:
    nodeid: int
    fh: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class ReleaseDir:
    nodeid: int
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class Flush:
    nodeid: int
    fh: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class Fsync:
    nodeid: int
    fh: int
    fsync_flags: int

    @property
    def datasync(self) -> bool:
        return bool(self.fsync_flags & abi.FSYNC_FDATASYNC)


@dataclass(frozen=True, slots=True)
class FsyncDir:
    nodeid: int
    fh: int
    fsync_flags: int


@dataclass(frozen=True, slots=True)
class Create:
    nodeid: int  # parent
    name: bytes
    flags: int
    mode: int
    umask: int
    open_flags: int


@dataclass(frozen=True, slots=True)
class StatFs:
    nodeid: int


@dataclass(frozen=True, slots=True)
class GetXattr:
    nodeid: int
    name: bytes
    size: int  # 0 = "how long is it?"


@dataclass(frozen=True, slots=True)
class SetXattr:
    nodeid: int
    name: bytes
    value: bytes
    flags: int  # XATTR_CREATE 1 / XATTR_REPLACE 2
    setxattr_flags: int  # only with SETXATTR_EXT


@dataclass(frozen=True, slots=True)
class ListXattr:
    nodeid: int
    size: int


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    nodeid: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Access:
    nodeid: int
    mask: int


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class GetLk(_LockRequest):
    pass


@dataclass(frozen=True, slots=True)
class SetLk(_LockRequest):
    pass


@dataclass(frozen=True, slots=True)
class SetLkW(_LockRequest):
    """Blocking lock. Note: flock(LOCK_UN) also arrives as SETLKW (F_UNLCK)."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    nodeid: int
    target: int  # unique of the request to interrupt


@dataclass(frozen=True, slots=True)
class Poll:
    nodeid: int
    fh: int
    kh: int  # kernel handle to name in a later POLL notification
    flags: int
    events: int

    @property
    def schedule_notify(self) -> bool:
        return bool(self.flags & abi.POLL_SCHEDULE_NOTIFY)


@dataclass(frozen=True, slots=True)
class Destroy:
    nodeid: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    nodeid: int
    fh: int
    offset: int
    length: int
    mode: int


@dataclass(frozen=True, slots=True)
class Lseek:
    nodeid: int
    fh: int
    offset: int
    whence: int


@dataclass(frozen=True, slots=True)
class CopyFileRange:
    nodeid: int
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Request:
    header: InHeader
    body: RequestBody

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def opcode(self) -> int:
        return self.header.opcode
