"""Typed FUSE replies and notifications, and their byte encodings.

Filesystems return these from `Operations` methods; `pack()` gives the reply
payload (without the 16-byte out header, which `codec.encode_reply` adds).
Values are checked when packed: an out-of-range field raises
`FuseEncodeError` instead of reaching the kernel as garbage.

Times are integer nanoseconds since the epoch (`*_ns`), cache validities
integer nanoseconds (`*_valid_ns`), like `os.stat_result.st_mtime_ns`.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import abi
from chubbyfs._frozen import frozen
from .errors import FuseEncodeError
from .requests import FileLock

_NS = 1_000_000_000
_U64 = (1 << 64) - 1
S_IFMT = 0o170000


def _split_ns(ns: int) -> tuple[int, int]:
    """(seconds as u64 two's complement, nanoseconds) for a time or duration."""
    sec, nsec = divmod(ns, _NS)
    return sec & _U64, nsec


def _pack(st: struct.Struct, what: str, *values: int) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise FuseEncodeError(f"{what}: field out of range: {exc}") from None


@frozen
class Attr:
    ino: int
    mode: int  # file type and permission bits, as st_mode
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    rdev: int = 0
    blksize: int = 4096
    blocks: int | None = None  # 512-byte units; None = derived from size
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        blocks = (self.size + 511) // 512 if self.blocks is None else self.blocks
        a_s, a_n = _split_ns(self.atime_ns)
        m_s, m_n = _split_ns(self.mtime_ns)
        c_s, c_n = _split_ns(self.ctime_ns)
        return _pack(
            abi.ATTR, "fuse_attr",
            self.ino, self.size, blocks, a_s, m_s, c_s, a_n, m_n, c_n,
            self.mode, self.nlink, self.uid, self.gid, self.rdev, self.blksize, self.flags,
        )


@frozen
class EntryOut:
    """Answer to LOOKUP/MKDIR/CREATE/...: hands the kernel one lookup count.

    `nodeid = 0` with a non-zero `entry_valid_ns` caches a negative entry.
    """

    nodeid: int
    attr: Attr
    generation: int = 0
    entry_valid_ns: int = 1 * _NS
    attr_valid_ns: int = 1 * _NS

    def pack(self) -> bytes:
        e_s, e_n = _split_ns(self.entry_valid_ns)
        a_s, a_n = _split_ns(self.attr_valid_ns)
        head = _pack(abi.ENTRY_OUT_HEAD, "fuse_entry_out",
                     self.nodeid, self.generation, e_s, a_s, e_n, a_n)
        return head + self.attr.pack()


@frozen
class AttrOut:
    attr: Attr
    attr_valid_ns: int = 1 * _NS

    def pack(self) -> bytes:
        a_s, a_n = _split_ns(self.attr_valid_ns)
        return _pack(abi.ATTR_OUT_HEAD, "fuse_attr_out", a_s, a_n, 0) + self.attr.pack()


@frozen
class OpenOut:
    fh: int = 0
    open_flags: int = 0  # abi.FOPEN_*
    backing_id: int = 0  # passthrough only (7.40); 0 otherwise

    def pack(self) -> bytes:
        return _pack(abi.OPEN_OUT, "fuse_open_out", self.fh, self.open_flags, self.backing_id)


@frozen
class CreateOut:
    entry: EntryOut
    open: OpenOut

    def pack(self) -> bytes:
        return self.entry.pack() + self.open.pack()


@frozen
class WriteOut:
    size: int

    def pack(self) -> bytes:
        return _pack(abi.WRITE_OUT, "fuse_write_out", self.size, 0)


@frozen
class StatfsOut:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096

    def pack(self) -> bytes:
        return _pack(
            abi.KSTATFS, "fuse_kstatfs", self.blocks, self.bfree, self.bavail, self.files,
            self.ffree, self.bsize, self.namelen, self.frsize, 0,
        )


@frozen
class LkOut:
    lock: FileLock  # a conflicting lock, or type F_UNLCK for "none"

    def pack(self) -> bytes:
        lk = self.lock
        return _pack(abi.FILE_LOCK, "fuse_lk_out", lk.start, lk.end, lk.type, lk.pid)


@frozen
class PollOut:
    revents: int

    def pack(self) -> bytes:
        return _pack(abi.POLL_OUT, "fuse_poll_out", self.revents, 0)


@frozen
class XattrSizeOut:
    """Answer to a size-0 GETXATTR/LISTXATTR probe."""

    size: int

    def pack(self) -> bytes:
        return _pack(abi.GETXATTR_OUT, "fuse_getxattr_out", self.size, 0)


@frozen
class LseekOut:
    offset: int

    def pack(self) -> bytes:
        return _pack(abi.LSEEK_OUT, "fuse_lseek_out", self.offset)


@frozen
class IoctlOut:
    """A plain (non-retry) ioctl answer: result code plus output bytes."""

    result: int = 0
    data: bytes = b""

    def pack(self) -> bytes:
        return _pack(abi.IOCTL_OUT, "fuse_ioctl_out", self.result, 0, 0, 0) + self.data


@frozen
class InitOut:
    major: int
    minor: int
    max_readahead: int = 0
    flags: int = 0  # 64 bits; the high half goes to flags2 (needs INIT_EXT)
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 1
    max_pages: int = 0
    map_alignment: int = 0
    max_stack_depth: int = 0
    request_timeout_s: int = 0

    def pack(self) -> bytes:
        low, high = self.flags & 0xFFFFFFFF, self.flags >> 32
        if high and not low & abi.InitFlag.INIT_EXT:
            raise FuseEncodeError("INIT flags above bit 31 need INIT_EXT")
        return _pack(
            abi.INIT_OUT, "fuse_init_out", self.major, self.minor, self.max_readahead, low,
            self.max_background, self.congestion_threshold, self.max_write, self.time_gran,
            self.max_pages, self.map_alignment, high, self.max_stack_depth,
            self.request_timeout_s,
        )


# ---------------------------------------------------------------------------
# Directory entries


def dirent_type(mode: int) -> int:
    """The DT_* value the kernel wants in a dirent, from an st_mode."""
    return (mode & S_IFMT) >> 12


def _check_name(name: bytes, what: str) -> None:
    if not name or b"\0" in name or len(name) > 1024:
        raise FuseEncodeError(f"{what}: name must be 1..1024 bytes without NUL: {name!r}")


@frozen
class DirEntry:
    ino: int
    name: bytes
    type: int  # DT_*; use dirent_type(mode)
    offset: int  # cookie the kernel sends back to continue *after* this entry


@frozen
class DirEntryPlus:
    entry: EntryOut  # nodeid 0 = "don't instantiate" (no lookup count taken)
    name: bytes
    offset: int


def _align8(n: int) -> int:
    return (n + 7) & ~7


def pack_dirent(e: DirEntry) -> bytes:
    _check_name(e.name, "dirent")
    if b"/" in e.name:
        raise FuseEncodeError(f"dirent name contains '/': {e.name!r}")
    raw = _pack(abi.DIRENT_HEAD, "fuse_dirent", e.ino, e.offset, len(e.name), e.type) + e.name
    return raw.ljust(_align8(len(raw)), b"\0")


def pack_direntplus(e: DirEntryPlus) -> bytes:
    attr = e.entry.attr
    plain = DirEntry(ino=attr.ino, name=e.name, type=dirent_type(attr.mode), offset=e.offset)
    return e.entry.pack() + pack_dirent(plain)


@dataclass(slots=True)
class DirentBuffer:
    """Collects directory entries up to the kernel's `size` (like libfuse's
    fuse_add_direntry): `add` returns False, taking nothing, once the next
    entry would not fit. A READDIRPLUS filesystem must count a lookup only for
    entries `add` accepted, since only those reach the kernel.
    """

    size: int
    plus: bool
    _parts: list[bytes] = field(default_factory=list)
    _used: int = 0

    def add(self, entry: DirEntry | DirEntryPlus) -> bool:
        if self.plus != isinstance(entry, DirEntryPlus):
            want = "DirEntryPlus" if self.plus else "DirEntry"
            raise FuseEncodeError(f"this buffer takes {want}, got {type(entry).__name__}")
        raw = pack_direntplus(entry) if isinstance(entry, DirEntryPlus) else pack_dirent(entry)
        if self._used + len(raw) > self.size:
            return False
        self._parts.append(raw)
        self._used += len(raw)
        return True

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._parts)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def assert_invariants(self) -> None:
        assert self._used == sum(len(p) for p in self._parts)
        assert self._used <= self.size
        assert all(len(p) % 8 == 0 for p in self._parts)


# ---------------------------------------------------------------------------
# Notifications (daemon -> kernel, unique 0, error = code)


@frozen
class NotifyPoll:
    kh: int

    code = abi.NotifyCode.POLL

    def pack(self) -> bytes:
        return _pack(abi.NOTIFY_POLL, "notify_poll", self.kh)


@frozen
class NotifyInvalInode:
    """Drop cached attributes; with offset >= 0 also pages [offset, offset+length)
    (length <= 0: to the end)."""

    ino: int
    offset: int = 0
    length: int = 0

    code = abi.NotifyCode.INVAL_INODE

    def pack(self) -> bytes:
        return _pack(abi.NOTIFY_INVAL_INODE, "notify_inval_inode", self.ino, self.offset,
                     self.length)


@frozen
class NotifyInvalEntry:
    parent: int
    name: bytes
    expire_only: bool = False  # needs HAS_EXPIRE_ONLY

    code = abi.NotifyCode.INVAL_ENTRY

    def pack(self) -> bytes:
        _check_name(self.name, "notify_inval_entry")
        flags = abi.EXPIRE_ONLY if self.expire_only else 0
        head = _pack(abi.NOTIFY_INVAL_ENTRY, "notify_inval_entry", self.parent,
                     len(self.name), flags)
        return head + self.name + b"\0"  # the kernel insists on the NUL


@frozen
class NotifyDelete:
    parent: int
    child: int
    name: bytes

    code = abi.NotifyCode.DELETE

    def pack(self) -> bytes:
        _check_name(self.name, "notify_delete")
        head = _pack(abi.NOTIFY_DELETE, "notify_delete", self.parent, self.child,
                     len(self.name), 0)
        return head + self.name + b"\0"


@frozen
class NotifyStore:
    nodeid: int
    offset: int
    data: bytes

    code = abi.NotifyCode.STORE

    def pack(self) -> bytes:
        head = _pack(abi.NOTIFY_STORE, "notify_store", self.nodeid, self.offset,
                     len(self.data), 0)
        return head + self.data


Notification = NotifyPoll | NotifyInvalInode | NotifyInvalEntry | NotifyDelete | NotifyStore
