"""The part of the Linux FUSE kernel ABI (`fuse_kernel.h`, protocol 7.45) we speak.

Only what this layer uses is mirrored here. Every struct is host-endian and
padded to 8 bytes by the kernel, so `struct` formats with `<` and no implicit
padding reproduce the kernel layout; sizes are asserted at import time so a
typo cannot silently shift a field. Comments name the protocol minor that
introduced a field when it matters.

Pure: no I/O, no trio, no os.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
# The highest minor we answer with; layouts below were checked against 7.45.
KERNEL_MINOR_VERSION = 45
# Oldest kernel we accept: 7.31 (Linux 5.10). Every fixed struct we decode has
# had its current size since 7.12 at the latest; 7.31 keeps us well clear.
MIN_KERNEL_MINOR_VERSION = 31

ROOT_ID = 1
# The kernel refuses reads with a buffer smaller than this.
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One row of the opcode table shared by decoder, dispatcher and tests.

    `method` is the `Operations` method that serves the opcode, or "" when the
    layer answers it itself (INIT, INTERRUPT) or answers ENOSYS without asking
    the filesystem. `replies` is False for the opcodes the kernel never wants an
    answer to.
    """

    opcode: Opcode
    method: str
    replies: bool = True


def _table(*rows: OpInfo) -> dict[int, OpInfo]:
    return {int(row.opcode): row for row in rows}


OPCODES: dict[int, OpInfo] = _table(
    OpInfo(Opcode.LOOKUP, "lookup"),
    OpInfo(Opcode.FORGET, "forget", replies=False),
    OpInfo(Opcode.GETATTR, "getattr"),
    OpInfo(Opcode.SETATTR, "setattr"),
    OpInfo(Opcode.READLINK, "readlink"),
    OpInfo(Opcode.SYMLINK, "symlink"),
    OpInfo(Opcode.MKNOD, "mknod"),
    OpInfo(Opcode.MKDIR, "mkdir"),
    OpInfo(Opcode.UNLINK, "unlink"),
    OpInfo(Opcode.RMDIR, "rmdir"),
    OpInfo(Opcode.RENAME, "rename"),
    OpInfo(Opcode.LINK, "link"),
    OpInfo(Opcode.OPEN, "open"),
    OpInfo(Opcode.READ, "read"),
    OpInfo(Opcode.WRITE, "write"),
    OpInfo(Opcode.STATFS, "statfs"),
    OpInfo(Opcode.RELEASE, "release"),
    OpInfo(Opcode.FSYNC, "fsync"),
    OpInfo(Opcode.SETXATTR, "setxattr"),
    OpInfo(Opcode.GETXATTR, "getxattr"),
    OpInfo(Opcode.LISTXATTR, "listxattr"),
    OpInfo(Opcode.REMOVEXATTR, "removexattr"),
    OpInfo(Opcode.FLUSH, "flush"),
    OpInfo(Opcode.INIT, ""),
    OpInfo(Opcode.OPENDIR, "opendir"),
    OpInfo(Opcode.READDIR, "readdir"),
    OpInfo(Opcode.RELEASEDIR, "releasedir"),
    OpInfo(Opcode.FSYNCDIR, "fsyncdir"),
    OpInfo(Opcode.GETLK, "getlk"),
    OpInfo(Opcode.SETLK, "setlk"),
    OpInfo(Opcode.SETLKW, "setlkw"),
    OpInfo(Opcode.ACCESS, "access"),
    OpInfo(Opcode.CREATE, "create"),
    # Answered by the session only (EAGAIN), never ENOSYS: see docs.
    OpInfo(Opcode.INTERRUPT, "", replies=False),
    OpInfo(Opcode.BMAP, ""),
    OpInfo(Opcode.DESTROY, "destroy"),
    OpInfo(Opcode.IOCTL, "ioctl"),
    OpInfo(Opcode.POLL, "poll"),
    OpInfo(Opcode.NOTIFY_REPLY, "", replies=False),
    OpInfo(Opcode.BATCH_FORGET, "batch_forget", replies=False),
    OpInfo(Opcode.FALLOCATE, "fallocate"),
    OpInfo(Opcode.READDIRPLUS, "readdirplus"),
    OpInfo(Opcode.RENAME2, "rename2"),
    OpInfo(Opcode.LSEEK, "lseek"),
    OpInfo(Opcode.COPY_FILE_RANGE, "copy_file_range"),
    OpInfo(Opcode.SETUPMAPPING, ""),
    OpInfo(Opcode.REMOVEMAPPING, ""),
    OpInfo(Opcode.SYNCFS, ""),
    OpInfo(Opcode.TMPFILE, ""),
    OpInfo(Opcode.STATX, ""),
    OpInfo(Opcode.COPY_FILE_RANGE_64, ""),
)


class InitFlag(enum.IntFlag):
    """INIT capability bits. Bits >= 32 travel in `flags2` and need INIT_EXT."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags: `fh` is valid
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1  # set on every file flock was ever tried on
LK_FLOCK = 1 << 0  # fuse_lk_in.lk_flags: a flock(2), not an fcntl lock
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
READ_LOCKOWNER = 1 << 1
POLL_SCHEDULE_NOTIFY = 1 << 0  # remember `kh` and send a POLL notification later
FSYNC_FDATASYNC = 1 << 0
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags (needs HAS_EXPIRE_ONLY)

# Lock types in fuse_file_lock.type (Linux values of F_RDLCK/F_WRLCK/F_UNLCK).
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2
OFFSET_MAX = (1 << 63) - 1  # fuse_file_lock.end meaning "to end of file"


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


def _s(fmt: str, size: int) -> struct.Struct:
    st = struct.Struct(fmt)
    assert st.size == size, (fmt, st.size, size)
    return st


IN_HEADER = _s("<IIQQIIIHH", 40)  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = _s("<IiQ", 16)  # len error unique
ATTR = _s("<QQQQQQIIIIIIIIII", 88)
ENTRY_OUT_HEAD = _s("<QQQQII", 40)  # nodeid generation entry_valid attr_valid *_nsec; + ATTR
ATTR_OUT_HEAD = _s("<QII", 16)  # attr_valid attr_valid_nsec dummy; + ATTR
INIT_IN = _s("<IIIII44x", 64)  # major minor max_readahead flags flags2 (7.36+)
INIT_IN_OLD = _s("<IIII", 16)  # before 7.36
INIT_OUT = _s("<IIIIHHIIHHIIH22x", 64)
FORGET_IN = _s("<Q", 8)
BATCH_FORGET_IN = _s("<II", 8)  # count pad
FORGET_ONE = _s("<QQ", 16)  # nodeid nlookup
GETATTR_IN = _s("<IIQ", 16)  # getattr_flags dummy fh
SETATTR_IN = _s("<IIQQQQQQIIIIIIII", 88)  # see SetAttr for the field order
OPEN_IN = _s("<II", 8)  # flags open_flags
OPEN_OUT = _s("<QIi", 16)  # fh open_flags backing_id
CREATE_IN = _s("<IIII", 16)  # flags mode umask open_flags
MKNOD_IN = _s("<IIII", 16)  # mode rdev umask pad
MKDIR_IN = _s("<II", 8)  # mode umask
RENAME_IN = _s("<Q", 8)  # newdir
RENAME2_IN = _s("<QII", 16)  # newdir flags pad
LINK_IN = _s("<Q", 8)  # oldnodeid
READ_IN = _s("<QQIIQII", 40)  # fh offset size read_flags lock_owner flags pad
WRITE_IN = _s("<QQIIQII", 40)  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = _s("<II", 8)
RELEASE_IN = _s("<QIIQ", 24)  # fh flags release_flags lock_owner
FLUSH_IN = _s("<QIIQ", 24)  # fh unused pad lock_owner
FSYNC_IN = _s("<QII", 16)  # fh fsync_flags pad
KSTATFS = _s("<QQQQQIIII24x", 80)
GETXATTR_IN = _s("<II", 8)  # size pad
GETXATTR_OUT = _s("<II", 8)
SETXATTR_IN = _s("<II", 8)  # size flags
SETXATTR_IN_EXT = _s("<IIII", 16)  # size flags setxattr_flags pad (SETXATTR_EXT)
FILE_LOCK = _s("<QQII", 24)  # start end type pid
LK_IN = _s("<QQQQIIII", 48)  # fh owner lock(start end type pid) lk_flags pad
ACCESS_IN = _s("<II", 8)  # mask pad
INTERRUPT_IN = _s("<Q", 8)
POLL_IN = _s("<QQII", 24)  # fh kh flags events
POLL_OUT = _s("<II", 8)
FALLOCATE_IN = _s("<QQQII", 32)  # fh offset length mode pad
LSEEK_IN = _s("<QQII", 24)  # fh offset whence pad
LSEEK_OUT = _s("<Q", 8)
COPY_FILE_RANGE_IN = _s("<QQQQQQQ", 56)  # fh_in off_in nodeid_out fh_out off_out len flags
IOCTL_IN = _s("<QIIQII", 32)  # fh flags cmd arg in_size out_size
IOCTL_OUT = _s("<iIII", 16)  # result flags in_iovs out_iovs
DIRENT_HEAD = _s("<QQII", 24)  # ino off namelen type
NOTIFY_POLL = _s("<Q", 8)  # kh
NOTIFY_INVAL_INODE = _s("<Qqq", 24)  # ino off len
NOTIFY_INVAL_ENTRY = _s("<QII", 16)  # parent namelen flags
NOTIFY_DELETE = _s("<QQII", 24)  # parent child namelen pad
NOTIFY_STORE = _s("<QQII", 24)  # nodeid offset size pad

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
assert ENTRY_OUT_SIZE == 128
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size
assert ATTR_OUT_SIZE == 104
DIRENTPLUS_HEAD_SIZE = ENTRY_OUT_SIZE + DIRENT_HEAD.size
assert DIRENTPLUS_HEAD_SIZE == 152

# Largest errno the kernel accepts in a reply (it rejects -error >= 512).
MAX_ERRNO = 511
