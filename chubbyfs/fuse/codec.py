"""Bytes <-> typed FUSE messages. Pure: no trio, os, socket, time or random.

`decode_request(buf)` turns one message read from /dev/fuse into a `Request`
or raises `FuseDecodeError`; it never raises anything else, whatever the
bytes, so a garbage message can cost one request but never the loop.
`encode_reply`, `encode_error` and `encode_notify` build whole messages for
one write(2) each.

The decoder is strict: a fixed-size body must have exactly its size, names
must be non-empty and NUL-terminated with no NUL inside, WRITE/SETXATTR data
must match their declared sizes. The kernel always sends exactly that, so
anything else means we misunderstand the protocol, and failing loudly is
better than serving a misread request.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chubbyfs._frozen import builder

from . import abi
from . import requests as rq
from .errors import FuseDecodeError, FuseEncodeError, FuseError
from .replies import Notification, XattrSizeOut


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """What INIT negotiated that changes request layouts."""

    setxattr_ext: bool = False


_DEFAULT_OPTIONS = DecodeOptions()


class _Malformed(Exception):
    """Internal: a body problem; decode_request adds the header context."""


# ---------------------------------------------------------------------------
# Body helpers


def _fixed(st: struct.Struct, body: bytes) -> tuple[int, ...]:
    if len(body) != st.size:
        raise _Malformed(f"body is {len(body)} bytes, expected {st.size}")
    return st.unpack(body)


def _prefix(st: struct.Struct, body: bytes) -> tuple[tuple[int, ...], bytes]:
    if len(body) < st.size:
        raise _Malformed(f"body is {len(body)} bytes, expected at least {st.size}")
    return st.unpack_from(body), body[st.size:]


def _names(rest: bytes, count: int) -> list[bytes]:
    """Exactly `count` non-empty NUL-terminated names filling `rest`."""
    if not rest.endswith(b"\0"):
        raise _Malformed("name is not NUL-terminated")
    parts = rest[:-1].split(b"\0")
    if len(parts) != count:
        raise _Malformed(f"expected {count} name(s), found {len(parts)}")
    if any(not p for p in parts):
        raise _Malformed("empty name")
    return parts


def _name(rest: bytes) -> bytes:
    return _names(rest, 1)[0]


def _no_body(body: bytes) -> None:
    if body:
        raise _Malformed(f"expected an empty body, got {len(body)} bytes")


def _lock(cls: type, nodeid: int, body: bytes) -> rq._LockRequest:
    fh, owner, start, end, typ, pid, lk_flags, _pad = _fixed(abi.LK_IN, body)
    if typ not in (abi.F_RDLCK, abi.F_WRLCK, abi.F_UNLCK):
        raise _Malformed(f"unknown lock type {typ}")
    return cls(nodeid, fh, owner, rq.FileLock(start, end, typ, pid), lk_flags)


# ---------------------------------------------------------------------------
# One decoder per opcode: (nodeid, body, options) -> request body


def _init(n: int, b: bytes, o: DecodeOptions) -> rq.Init:
    if len(b) == abi.INIT_IN_OLD.size:
        major, minor, readahead, flags = abi.INIT_IN_OLD.unpack(b)
        flags2 = 0
    else:
        major, minor, readahead, flags, flags2 = _fixed(abi.INIT_IN, b)
    return rq.Init(n, major, minor, readahead, flags | (flags2 << 32))


def _batch_forget(n: int, b: bytes, o: DecodeOptions) -> rq.BatchForget:
    (count, _pad), rest = _prefix(abi.BATCH_FORGET_IN, b)
    if len(rest) != count * abi.FORGET_ONE.size:
        raise _Malformed(f"count {count} does not match {len(rest)} bytes of entries")
    items = tuple(rq.Forget(*abi.FORGET_ONE.unpack_from(rest, i * abi.FORGET_ONE.size))
                  for i in range(count))
    return rq.BatchForget(n, items)


def _setattr(n: int, b: bytes, o: DecodeOptions) -> rq.SetAttr:
    (valid, _p, fh, size, owner, a, m, c, an, mn, cn, mode, _u4, uid, gid,
     _u5) = _fixed(abi.SETATTR_IN, b)
    ns = 1_000_000_000
    return rq.SetAttr(n, valid, fh, size, owner, a * ns + an, m * ns + mn, c * ns + cn,
                      mode, uid, gid)


def _symlink(n: int, b: bytes, o: DecodeOptions) -> rq.Symlink:
    name, target = _names(b, 2)
    return rq.Symlink(n, name, target)


def _mknod(n: int, b: bytes, o: DecodeOptions) -> rq.Mknod:
    (mode, rdev, umask, _pad), rest = _prefix(abi.MKNOD_IN, b)
    return rq.Mknod(n, _name(rest), mode, rdev, umask)


def _mkdir(n: int, b: bytes, o: DecodeOptions) -> rq.Mkdir:
    (mode, umask), rest = _prefix(abi.MKDIR_IN, b)
    return rq.Mkdir(n, _name(rest), mode, umask)


def _rename(n: int, b: bytes, o: DecodeOptions) -> rq.Rename:
    (newdir,), rest = _prefix(abi.RENAME_IN, b)
    old, new = _names(rest, 2)
    return rq.Rename(n, old, newdir, new)


def _rename2(n: int, b: bytes, o: DecodeOptions) -> rq.Rename2:
    (newdir, flags, _pad), rest = _prefix(abi.RENAME2_IN, b)
    old, new = _names(rest, 2)
    return rq.Rename2(n, old, newdir, new, flags)


def _link(n: int, b: bytes, o: DecodeOptions) -> rq.Link:
    (old,), rest = _prefix(abi.LINK_IN, b)
    return rq.Link(n, old, _name(rest))


def _read_like(cls: type) -> Callable[[int, bytes, DecodeOptions], object]:
    def dec(n: int, b: bytes, o: DecodeOptions) -> object:
        fh, off, size, rflags, owner, flags, _pad = _fixed(abi.READ_IN, b)
        if cls is rq.Read:
            return rq.Read(n, fh, off, size, rflags, owner, flags)
        return cls(n, fh, off, size)
    return dec


def _write(n: int, b: bytes, o: DecodeOptions) -> rq.Write:
    (fh, off, size, wflags, owner, flags, _pad), data = _prefix(abi.WRITE_IN, b)
    if len(data) != size:
        raise _Malformed(f"write declares {size} bytes but carries {len(data)}")
    return rq.Write(n, fh, off, data, wflags, owner, flags)


def _flush(n: int, b: bytes, o: DecodeOptions) -> rq.Flush:
    fh, _unused, _pad, owner = _fixed(abi.FLUSH_IN, b)
    return rq.Flush(n, fh, owner)


def _fsync_like(cls: type) -> Callable[[int, bytes, DecodeOptions], object]:
    def dec(n: int, b: bytes, o: DecodeOptions) -> object:
        fh, flags, _pad = _fixed(abi.FSYNC_IN, b)
        return cls(n, fh, flags)
    return dec


def _create(n: int, b: bytes, o: DecodeOptions) -> rq.Create:
    (flags, mode, umask, open_flags), rest = _prefix(abi.CREATE_IN, b)
    return rq.Create(n, _name(rest), flags, mode, umask, open_flags)


def _setxattr(n: int, b: bytes, o: DecodeOptions) -> rq.SetXattr:
    if o.setxattr_ext:
        (size, flags, sflags, _pad), rest = _prefix(abi.SETXATTR_IN_EXT, b)
    else:
        (size, flags), rest = _prefix(abi.SETXATTR_IN, b)
        sflags = 0
    nul = rest.find(b"\0")
    if nul < 0:
        raise _Malformed("name is not NUL-terminated")
    if nul == 0:
        raise _Malformed("empty name")
    value = rest[nul + 1:]
    if len(value) != size:
        raise _Malformed(f"setxattr declares {size} value bytes but carries {len(value)}")
    return rq.SetXattr(n, rest[:nul], value, flags, sflags)


def _getxattr(n: int, b: bytes, o: DecodeOptions) -> rq.GetXattr:
    (size, _pad), rest = _prefix(abi.GETXATTR_IN, b)
    return rq.GetXattr(n, _name(rest), size)


def _listxattr(n: int, b: bytes, o: DecodeOptions) -> rq.ListXattr:
    size, _pad = _fixed(abi.GETXATTR_IN, b)
    return rq.ListXattr(n, size)


def _fallocate(n: int, b: bytes, o: DecodeOptions) -> rq.Fallocate:
    fh, off, length, mode, _pad = _fixed(abi.FALLOCATE_IN, b)
    return rq.Fallocate(n, fh, off, length, mode)


def _lseek(n: int, b: bytes, o: DecodeOptions) -> rq.Lseek:
    fh, off, whence, _pad = _fixed(abi.LSEEK_IN, b)
    return rq.Lseek(n, fh, off, whence)


def _ioctl(n: int, b: bytes, o: DecodeOptions) -> rq.Ioctl:
    (fh, flags, cmd, arg, in_size, out_size), data = _prefix(abi.IOCTL_IN, b)
    if len(data) != in_size:
        raise _Malformed(f"ioctl declares {in_size} input bytes but carries {len(data)}")
    return rq.Ioctl(n, fh, flags, cmd, arg, data, out_size)


def _simple(cls: type, st: struct.Struct | None = None,
            name: bool = False) -> Callable[[int, bytes, DecodeOptions], object]:
    """Bodies that are one fixed struct, one name, or nothing."""
    def dec(n: int, b: bytes, o: DecodeOptions) -> object:
        if name:
            return cls(n, _name(b))
        if st is None:
            _no_body(b)
            return cls(n)
        return cls(n, *_fixed(st, b))
    return dec


def _fixed_drop_pad(cls: type, st: struct.Struct) -> Callable[[int, bytes, DecodeOptions], object]:
    def dec(n: int, b: bytes, o: DecodeOptions) -> object:
        return cls(n, *_fixed(st, b)[:-1])
    return dec


def _getattr(n: int, b: bytes, o: DecodeOptions) -> rq.GetAttr:
    flags, _dummy, fh = _fixed(abi.GETATTR_IN, b)
    return rq.GetAttr(n, flags, fh)


# Bodies that are exactly one struct whose fields follow nodeid one for one:
# unpacked straight from the read buffer (`decode_parts`), no body copy.
_WHOLE_STRUCT: dict[int, tuple[struct.Struct, type]] = {
    abi.Opcode.FORGET: (abi.FORGET_IN, rq.Forget),
    abi.Opcode.OPEN: (abi.OPEN_IN, rq.Open),
    abi.Opcode.OPENDIR: (abi.OPEN_IN, rq.OpenDir),
    abi.Opcode.RELEASE: (abi.RELEASE_IN, rq.Release),
    abi.Opcode.RELEASEDIR: (abi.RELEASE_IN, rq.ReleaseDir),
    abi.Opcode.INTERRUPT: (abi.INTERRUPT_IN, rq.Interrupt),
    abi.Opcode.POLL: (abi.POLL_IN, rq.Poll),
    abi.Opcode.COPY_FILE_RANGE: (abi.COPY_FILE_RANGE_IN, rq.CopyFileRange),
}

_DECODERS: dict[int, Callable[[int, bytes, DecodeOptions], object]] = {
    **{op: _simple(cls, st) for op, (st, cls) in _WHOLE_STRUCT.items()},
    abi.Opcode.INIT: _init,
    abi.Opcode.LOOKUP: _simple(rq.Lookup, name=True),
    abi.Opcode.BATCH_FORGET: _batch_forget,
    abi.Opcode.GETATTR: _getattr,
    abi.Opcode.SETATTR: _setattr,
    abi.Opcode.READLINK: _simple(rq.ReadLink),
    abi.Opcode.SYMLINK: _symlink,
    abi.Opcode.MKNOD: _mknod,
    abi.Opcode.MKDIR: _mkdir,
    abi.Opcode.UNLINK: _simple(rq.Unlink, name=True),
    abi.Opcode.RMDIR: _simple(rq.Rmdir, name=True),
    abi.Opcode.RENAME: _rename,
    abi.Opcode.RENAME2: _rename2,
    abi.Opcode.LINK: _link,
    abi.Opcode.READ: _read_like(rq.Read),
    abi.Opcode.WRITE: _write,
    abi.Opcode.READDIR: _read_like(rq.ReadDir),
    abi.Opcode.READDIRPLUS: _read_like(rq.ReadDirPlus),
    abi.Opcode.FLUSH: _flush,
    abi.Opcode.FSYNC: _fsync_like(rq.Fsync),
    abi.Opcode.FSYNCDIR: _fsync_like(rq.FsyncDir),
    abi.Opcode.CREATE: _create,
    abi.Opcode.STATFS: _simple(rq.StatFs),
    abi.Opcode.SETXATTR: _setxattr,
    abi.Opcode.GETXATTR: _getxattr,
    abi.Opcode.LISTXATTR: _listxattr,
    abi.Opcode.REMOVEXATTR: _simple(rq.RemoveXattr, name=True),
    abi.Opcode.ACCESS: _fixed_drop_pad(rq.Access, abi.ACCESS_IN),
    abi.Opcode.GETLK: lambda n, b, o: _lock(rq.GetLk, n, b),
    abi.Opcode.SETLK: lambda n, b, o: _lock(rq.SetLk, n, b),
    abi.Opcode.SETLKW: lambda n, b, o: _lock(rq.SetLkW, n, b),
    abi.Opcode.DESTROY: _simple(rq.Destroy),
    abi.Opcode.FALLOCATE: _fallocate,
    abi.Opcode.LSEEK: _lseek,
    abi.Opcode.IOCTL: _ioctl,
}

# Opcodes the layer decodes; every other opcode is answered ENOSYS.
DECODED_OPCODES: frozenset[int] = frozenset(int(op) for op in _DECODERS)


_HEADER_SIZE = abi.IN_HEADER.size
_unpack_header = abi.IN_HEADER.unpack_from

# decode_parts' fast path: opcode -> (whole request's length, body unpacker, body builder).
_WHOLE_FAST: dict[int, tuple[int, Callable[..., tuple[int, ...]], Callable[..., object]]] = {
    int(op): (_HEADER_SIZE + st.size, st.unpack_from, builder(cls)) for op, (st, cls) in _WHOLE_STRUCT.items()}


def _header_fields(buf: bytes | memoryview) -> tuple[int, ...]:
    """The header's fields as `abi.IN_HEADER` unpacks them (length, opcode,
    unique, nodeid, uid, gid, pid, total_extlen, padding), checked against
    the buffer's length."""
    fields = _unpack_header(buf) if len(buf) >= _HEADER_SIZE else None
    if fields is None or fields[0] != len(buf):
        raise _header_error(buf, fields)
    return fields


def _header_error(buf: bytes | memoryview, fields: tuple[int, ...] | None) -> FuseDecodeError:
    if fields is None:
        return FuseDecodeError(f"request of {len(buf)} bytes is shorter than the {_HEADER_SIZE}-byte header")
    return FuseDecodeError(f"header says {fields[0]} bytes but the request has {len(buf)}",
                           unique=fields[2], opcode=fields[1])


def header_of(fields: tuple[int, ...]) -> rq.InHeader:
    """`decode_parts`' header fields as an `InHeader`."""
    return rq.InHeader(*fields[:-1])  # drop padding


def decode_header(buf: bytes) -> rq.InHeader:
    """The 40-byte header of one request, checked against the buffer."""
    return header_of(_header_fields(buf))


def decode_parts(buf: bytes | memoryview,
                 options: DecodeOptions = _DEFAULT_OPTIONS) -> tuple[tuple[int, ...], rq.RequestBody]:
    """One request as its header's plain fields (see `_header_fields`) and
    its typed body; raises `FuseDecodeError` as `decode_request` does.

    The session's hot path uses this: building `InHeader` and `Request`
    objects for a request answered at once would cost more than answering
    it. `buf` may be a view of a buffer reused for the next read: nothing
    returned refers to it.
    """
    # _header_fields, inline: a call per request is worth saving here.
    size = len(buf)
    fields = _unpack_header(buf) if size >= _HEADER_SIZE else None
    if fields is None or fields[0] != size:
        raise _header_error(buf, fields)
    opcode = fields[1]
    whole = _WHOLE_FAST.get(opcode)
    if whole is not None and whole[0] == size and not fields[7]:
        # The common fixed-size bodies (OPEN, RELEASE...), without extensions.
        return fields, whole[2](fields[3], *whole[1](buf, _HEADER_SIZE))
    body_end = len(buf) - fields[7] * 8
    if body_end < abi.IN_HEADER.size:
        raise FuseDecodeError(f"extensions of {fields[7] * 8} bytes exceed the body",
                              unique=fields[2], opcode=opcode)
    decoder = _DECODERS.get(opcode)
    if decoder is None:
        info = abi.OPCODES.get(opcode)
        name = info.opcode.name if info else "unknown opcode"
        raise FuseDecodeError(f"{name} ({opcode}) is not served",
                              unique=fields[2], opcode=opcode, errno=errno.ENOSYS)
    try:
        return fields, decoder(fields[3], bytes(buf[abi.IN_HEADER.size:body_end]), options)  # type: ignore[return-value]
    except (_Malformed, struct.error) as exc:
        name = abi.Opcode(opcode).name
        raise FuseDecodeError(f"{name} unique={fields[2]}: {exc}",
                              unique=fields[2], opcode=opcode) from None


def decode_request(buf: bytes | memoryview, options: DecodeOptions = _DEFAULT_OPTIONS) -> rq.Request:
    """Decode one whole request as read from /dev/fuse.

    Raises `FuseDecodeError` for every problem; `unique`/`opcode` are filled in
    whenever the header was readable, and `errno` is ENOSYS for an opcode the
    layer does not serve, EIO for a malformed message.
    """
    fields, body = decode_parts(buf, options)
    return rq.Request(header_of(fields), body)


# ---------------------------------------------------------------------------
# Encoding


def encode_reply(unique: int, payload: bytes = b"") -> bytes:
    """A success reply: out header + payload."""
    if unique <= 0:
        raise FuseEncodeError(f"replies need the request's unique, got {unique}")
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique) + payload


def encode_error(unique: int, errno_: int) -> bytes:
    """An error reply: header only, error = -errno."""
    if unique <= 0:
        raise FuseEncodeError(f"replies need the request's unique, got {unique}")
    if not 0 < errno_ <= abi.MAX_ERRNO:
        raise FuseEncodeError(f"errno must be in 1..{abi.MAX_ERRNO}, got {errno_}")
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno_, unique)


def encode_notify(note: Notification) -> bytes:
    payload = note.pack()
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), int(note.code), 0) + payload


def xattr_payload(requested_size: int, value: bytes) -> bytes:
    """GETXATTR size rules: size 0 asks for the length; too small is ERANGE."""
    if requested_size == 0:
        return XattrSizeOut(len(value)).pack()
    if len(value) > requested_size:
        raise FuseError(errno.ERANGE)
    return value


def xattr_list_payload(requested_size: int, names: Iterable[bytes]) -> bytes:
    """LISTXATTR: each name followed by NUL, same size rules as GETXATTR."""
    names = list(names)
    for name in names:
        if not name or b"\0" in name:
            raise FuseEncodeError(f"xattr name must be non-empty without NUL: {name!r}")
    return xattr_payload(requested_size, b"".join(n + b"\0" for n in names))
