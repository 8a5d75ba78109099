"""The pure codec: hand-built request vectors, truncation of every request,
garbage, and reply/notification bytes checked against the kernel layouts."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chubbyfs.fuse import abi
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.codec import (
    DECODED_OPCODES, DecodeOptions, decode_parts, decode_request, encode_error, encode_notify,
    encode_reply, xattr_list_payload, xattr_payload,
)
from chubbyfs.fuse.errors import FuseDecodeError, FuseEncodeError, FuseError
from chubbyfs.fuse.replies import (
    Attr, AttrOut, CreateOut, DirEntry, DirEntryPlus, DirentBuffer, EntryOut, InitOut,
    IoctlOut, LkOut, LseekOut, NotifyDelete, NotifyInvalEntry, NotifyInvalInode, NotifyPoll,
    NotifyStore, OpenOut, PollOut, StatfsOut, WriteOut, dirent_type,
)

from .kernel_bytes import init_body, lk_body, parse_reply, request

N = 5  # nodeid used by the vectors
MAXOFF = (1 << 63) - 1

# (opcode, body bytes built from the C layouts, expected decoded body)
VECTORS: list[tuple[int, bytes, object]] = [
    (26, init_body(7, 45, 131072, 0x4000_0003, 0x9), rq.Init(N, 7, 45, 131072, 0x9_4000_0003)),
    (26, struct.pack("<IIII", 7, 31, 4096, 1), rq.Init(N, 7, 31, 4096, 1)),
    (1, b"hello\0", rq.Lookup(N, b"hello")),
    (2, struct.pack("<Q", 3), rq.Forget(N, 3)),
    (42, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 7, 1, 8, 2),
     rq.BatchForget(N, (rq.Forget(7, 1), rq.Forget(8, 2)))),
    (3, struct.pack("<IIQ", 1, 0, 99), rq.GetAttr(N, 1, 99)),
    (4, struct.pack("<IIQQQQQQIIIIIIII", 0x29, 0, 7, 4096, 0, 10, 20, 30, 1, 2, 3, 0o644,
                    0, 1000, 100, 0),
     rq.SetAttr(N, 0x29, 7, 4096, 0, 10_000_000_001, 20_000_000_002, 30_000_000_003,
                0o644, 1000, 100)),
    (5, b"", rq.ReadLink(N)),
    (6, b"link\0/target/path\0", rq.Symlink(N, b"link", b"/target/path")),
    (8, struct.pack("<IIII", 0o10644, 0, 0o22, 0) + b"fifo\0",
     rq.Mknod(N, b"fifo", 0o10644, 0, 0o22)),
    (9, struct.pack("<II", 0o755, 0o22) + b"dir\0", rq.Mkdir(N, b"dir", 0o755, 0o22)),
    (10, b"f\0", rq.Unlink(N, b"f")),
    (11, b"d\0", rq.Rmdir(N, b"d")),
    (12, struct.pack("<Q", 9) + b"a\0b\0", rq.Rename(N, b"a", 9, b"b")),
    (45, struct.pack("<QII", 9, 1, 0) + b"a\0b\0", rq.Rename2(N, b"a", 9, b"b", 1)),
    (13, struct.pack("<Q", 7) + b"hard\0", rq.Link(N, 7, b"hard")),
    (14, struct.pack("<II", 0o2, 0), rq.Open(N, 2, 0)),
    (27, struct.pack("<II", 0o200000, 0), rq.OpenDir(N, 0o200000, 0)),
    (15, struct.pack("<QQIIQII", 3, 4096, 8192, 2, 77, 0o2, 0),
     rq.Read(N, 3, 4096, 8192, 2, 77, 2)),
    (16, struct.pack("<QQIIQII", 3, 10, 5, 0, 0, 0o1, 0) + b"hello",
     rq.Write(N, 3, 10, b"hello", 0, 0, 1)),
    (28, struct.pack("<QQIIQII", 4, 2, 4096, 0, 0, 0, 0), rq.ReadDir(N, 4, 2, 4096)),
    (44, struct.pack("<QQIIQII", 4, 0, 4096, 0, 0, 0, 0), rq.ReadDirPlus(N, 4, 0, 4096)),
    (18, struct.pack("<QIIQ", 3, 0o2, 2, 0xABC), rq.Release(N, 3, 2, 2, 0xABC)),
    (29, struct.pack("<QIIQ", 4, 0, 0, 0), rq.ReleaseDir(N, 4, 0, 0, 0)),
    (25, struct.pack("<QIIQ", 3, 0, 0, 0xDEF), rq.Flush(N, 3, 0xDEF)),
    (20, struct.pack("<QII", 3, 1, 0), rq.Fsync(N, 3, 1)),
    (30, struct.pack("<QII", 4, 0, 0), rq.FsyncDir(N, 4, 0)),
    (35, struct.pack("<IIII", 0o101, 0o644, 0o22, 0) + b"new\0",
     rq.Create(N, b"new", 0o101, 0o644, 0o22, 0)),
    (17, b"", rq.StatFs(N)),
    (21, struct.pack("<II", 3, 1) + b"user.k\0" + b"v\0w",
     rq.SetXattr(N, b"user.k", b"v\0w", 1, 0)),
    (22, struct.pack("<II", 0, 0) + b"user.k\0", rq.GetXattr(N, b"user.k", 0)),
    (23, struct.pack("<II", 256, 0), rq.ListXattr(N, 256)),
    (24, b"user.k\0", rq.RemoveXattr(N, b"user.k")),
    (34, struct.pack("<II", 4, 0), rq.Access(N, 4)),
    (31, lk_body(3, 0x55, 0, MAXOFF, 1, 0, 0),
     rq.GetLk(N, 3, 0x55, rq.FileLock(0, MAXOFF, 1, 0), 0)),
    (32, lk_body(3, 0x55, 0, MAXOFF, 1, 321, 1),
     rq.SetLk(N, 3, 0x55, rq.FileLock(0, MAXOFF, 1, 321), 1)),
    (33, lk_body(3, 0x55, 0, MAXOFF, 2, 0, 1),
     rq.SetLkW(N, 3, 0x55, rq.FileLock(0, MAXOFF, 2, 0), 1)),
    (36, struct.pack("<Q", 12), rq.Interrupt(N, 12)),
    (40, struct.pack("<QQII", 3, 1, 1, 0x19), rq.Poll(N, 3, 1, 1, 0x19)),
    (38, b"", rq.Destroy(N)),
    (43, struct.pack("<QQQII", 3, 0, 4096, 1, 0), rq.Fallocate(N, 3, 0, 4096, 1)),
    (46, struct.pack("<QQII", 3, 100, 3, 0), rq.Lseek(N, 3, 100, 3)),
    (47, struct.pack("<QQQQQQQ", 3, 0, 9, 4, 10, 100, 0),
     rq.CopyFileRange(N, 3, 0, 9, 4, 10, 100, 0)),
    (39, struct.pack("<QIIQII", 3, 0, 0x5401, 0xFF, 2, 8) + b"ab",
     rq.Ioctl(N, 3, 0, 0x5401, 0xFF, b"ab", 8)),
]


@pytest.mark.parametrize("opcode,body,expected", VECTORS,
                         ids=[f"{abi.Opcode(v[0]).name}-{i}" for i, v in enumerate(VECTORS)])
def test_vectors_decode(opcode: int, body: bytes, expected: object) -> None:
    req = decode_request(request(opcode, body, unique=0x20, nodeid=N, pid=7))
    assert req.body == expected
    assert req.header == rq.InHeader(40 + len(body), opcode, 0x20, N, 1000, 1000, 7, 0)


def test_every_decoded_opcode_has_a_vector_and_a_table_row() -> None:
    assert {v[0] for v in VECTORS} == set(DECODED_OPCODES)
    for opcode in DECODED_OPCODES:
        info = abi.OPCODES[opcode]
        assert info.opcode == opcode
    assert all(int(op) in abi.OPCODES for op in abi.Opcode)


@pytest.mark.parametrize("opcode,body,expected", VECTORS,
                         ids=[f"{abi.Opcode(v[0]).name}-{i}" for i, v in enumerate(VECTORS)])
def test_truncation_byte_at_a_time(opcode: int, body: bytes, expected: object) -> None:
    full = request(opcode, body, unique=0x20, nodeid=N)
    for cut in range(len(full)):
        # Consistent header (len = bytes present) and stale header (len = full).
        consistent = struct.pack("<I", cut) + full[4:cut] if cut >= 4 else full[:cut]
        for msg in (consistent, full[:cut]):
            try:
                got = decode_request(msg)
            except FuseDecodeError as exc:
                if cut >= 40 and msg is not consistent:
                    assert exc.unique == 0x20
                continue
            # Only INIT has two legal sizes (16 bytes before 7.36, 64 after).
            assert opcode == 26 and cut == 56 and isinstance(got.body, rq.Init), (opcode, cut)


def test_extra_bytes_are_rejected_for_fixed_bodies() -> None:
    for opcode, body, _ in VECTORS:
        if opcode in (16, 21, 39, 42):  # trailing data belongs to these bodies
            continue
        with pytest.raises(FuseDecodeError) as info:
            decode_request(request(opcode, body + b"\0" * 8, unique=6))
        assert info.value.unique == 6 and info.value.errno == errno.EIO


@pytest.mark.parametrize("opcode,bad", [
    (1, b"hello"),  # no NUL
    (1, b"\0"),  # empty name
    (1, b"a\0b\0"),  # two names where one is expected
    (10, b""),
    (12, struct.pack("<Q", 9) + b"a\0"),  # one name where two are expected
    (12, struct.pack("<Q", 9) + b"a\0\0"),  # second name empty
    (6, b"link\0target"),  # target without NUL
    (21, struct.pack("<II", 5, 0) + b"user.k\0" + b"v"),  # value shorter than size
    (21, struct.pack("<II", 0, 0) + b"user.k"),  # name without NUL
    (16, struct.pack("<QQIIQII", 3, 0, 10, 0, 0, 0, 0) + b"short"),  # data < size
    (42, struct.pack("<II", 3, 0) + struct.pack("<QQ", 1, 1)),  # count > entries
    (32, lk_body(3, 1, 0, 0, 7, 0, 1)),  # unknown lock type
    (39, struct.pack("<QIIQII", 3, 0, 1, 0, 4, 0) + b"ab"),  # ioctl in_size mismatch
])
def test_malformed_bodies(opcode: int, bad: bytes) -> None:
    with pytest.raises(FuseDecodeError) as info:
        decode_request(request(opcode, bad, unique=8))
    assert (info.value.unique, info.value.opcode, info.value.errno) == (8, opcode, errno.EIO)


def test_header_problems() -> None:
    with pytest.raises(FuseDecodeError, match="shorter than"):
        decode_request(b"\0" * 39)
    with pytest.raises(FuseDecodeError, match="header says"):
        decode_request(request(1, b"a\0", length=100))
    with pytest.raises(FuseDecodeError, match="extensions"):
        decode_request(request(1, b"a\0", extlen=1))


def test_extensions_are_stripped() -> None:
    # CREATE with an 8-byte extension record appended (SECURITY_CTX style).
    req = request(35, struct.pack("<IIII", 0o101, 0o644, 0o22, 0) + b"new\0" + b"X" * 8,
                  extlen=1)
    assert decode_request(req).body == rq.Create(1, b"new", 0o101, 0o644, 0o22, 0)


def test_decode_parts_copies_out_of_a_reused_read_buffer() -> None:
    # The session reads every request into one buffer and decodes a view of
    # it: what decode_parts returns must not change when the next read
    # overwrites the buffer.
    buffer = bytearray(1 << 16)
    for opcode, body, expected in VECTORS:
        msg = request(opcode, body, unique=0x20, nodeid=N, pid=7)
        buffer[:len(msg)] = msg
        fields, got = decode_parts(memoryview(buffer)[:len(msg)])
        buffer[:len(msg)] = b"\xff" * len(msg)
        assert got == expected, abi.Opcode(opcode).name
        assert fields[:8] == (40 + len(body), opcode, 0x20, N, 1000, 1000, 7, 0)


def test_whole_struct_bodies_with_extensions() -> None:
    # OPEN and RELEASE are unpacked in place when they have their exact
    # size; with an extension record the body still ends before it.
    open_in = struct.pack("<II", 0o100002, 0)
    got = decode_request(request(14, open_in + b"X" * 8, extlen=1)).body
    assert got == rq.Open(1, 0o100002, 0)
    # An extension that claims the body's own bytes leaves too short a body.
    with pytest.raises(FuseDecodeError, match="OPEN"):
        decode_request(request(14, open_in, extlen=1))
    release_in = struct.pack("<QIIQ", 9, 0, 0, 0)
    with pytest.raises(FuseDecodeError, match="extensions"):
        decode_request(request(18, release_in, extlen=5))


@pytest.mark.parametrize("opcode", [52, 37, 50, 51, 48, 200, 4096])
def test_unserved_opcodes_are_enosys(opcode: int) -> None:
    with pytest.raises(FuseDecodeError) as info:
        decode_request(request(opcode, b"", unique=10))
    assert (info.value.unique, info.value.errno) == (10, errno.ENOSYS)


def test_setxattr_ext_layout() -> None:
    body = struct.pack("<IIII", 1, 2, 4, 0) + b"user.a\0" + b"z"
    req = decode_request(request(21, body), DecodeOptions(setxattr_ext=True))
    assert req.body == rq.SetXattr(1, b"user.a", b"z", 2, 4)
    with pytest.raises(FuseDecodeError):  # same bytes read without the extension
        decode_request(request(21, body))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_decode_errors(data: bytes) -> None:
    try:
        decode_request(data)
    except FuseDecodeError:
        pass


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(DECODED_OPCODES) + [52, 999]), st.binary(max_size=200),
       st.booleans())
def test_garbage_bodies_under_valid_headers(opcode: int, body: bytes, ext: bool) -> None:
    try:
        req = decode_request(request(opcode, body, unique=4), DecodeOptions(ext))
    except FuseDecodeError as exc:
        assert exc.unique == 4 and exc.opcode == opcode
    else:
        assert req.opcode == opcode and req.unique == 4


# ---------------------------------------------------------------- replies

ATTR = Attr(ino=7, mode=0o100644, nlink=1, uid=1000, gid=100, size=5000,
            atime_ns=1_500_000_000, mtime_ns=2_000_000_001, ctime_ns=3_999_999_999)
ATTR_BYTES = struct.pack("<QQQQQQIIIIIIIIII", 7, 5000, 10, 1, 2, 3, 500_000_000, 1,
                         999_999_999, 0o100644, 1, 1000, 100, 0, 4096, 0)


def test_attr_layout() -> None:
    assert ATTR.pack() == ATTR_BYTES
    assert len(ATTR_BYTES) == 88


def test_entry_and_attr_out_layouts() -> None:
    entry = EntryOut(7, ATTR, generation=3, entry_valid_ns=2_000_000_005,
                     attr_valid_ns=1_000_000_000)
    assert entry.pack() == struct.pack("<QQQQII", 7, 3, 2, 1, 5, 0) + ATTR_BYTES
    assert AttrOut(ATTR, 1_500_000_000).pack() == struct.pack("<QII", 1, 500_000_000, 0) + ATTR_BYTES
    create = CreateOut(entry, OpenOut(9, abi.FOPEN_KEEP_CACHE))
    assert create.pack() == entry.pack() + struct.pack("<QIi", 9, 2, 0)
    assert len(create.pack()) == 144


def test_small_reply_layouts() -> None:
    assert WriteOut(5).pack() == struct.pack("<II", 5, 0)
    assert StatfsOut(1, 2, 3, 4, 5, 4096, 255, 4096).pack() == (
        struct.pack("<QQQQQIIII", 1, 2, 3, 4, 5, 4096, 255, 4096, 0) + b"\0" * 24)
    assert LkOut(rq.FileLock(0, MAXOFF, 1, 42)).pack() == struct.pack("<QQII", 0, MAXOFF, 1, 42)
    assert PollOut(1).pack() == struct.pack("<II", 1, 0)
    assert LseekOut(77).pack() == struct.pack("<Q", 77)
    assert IoctlOut(0, b"xy").pack() == struct.pack("<iIII", 0, 0, 0, 0) + b"xy"


def test_init_out_layout_and_flags2() -> None:
    flags = int(abi.InitFlag.INIT_EXT | abi.InitFlag.FLOCK_LOCKS | abi.InitFlag.HAS_EXPIRE_ONLY)
    out = InitOut(7, 45, 65536, flags, 16, 12, 131072, 1, 32)
    assert out.pack() == struct.pack("<IIIIHHIIHHIIH", 7, 45, 65536, flags & 0xFFFFFFFF, 16,
                                     12, 131072, 1, 32, 0, 1 << 3, 0, 0) + b"\0" * 22
    with pytest.raises(FuseEncodeError, match="INIT_EXT"):
        InitOut(7, 45, flags=1 << 35).pack()


def test_reply_headers() -> None:
    assert encode_reply(4, b"abc") == struct.pack("<IiQ", 19, 0, 4) + b"abc"
    assert encode_error(4, errno.ENOENT) == struct.pack("<IiQ", 16, -errno.ENOENT, 4)
    assert parse_reply(encode_error(13, errno.EAGAIN)) == (-errno.EAGAIN, 13, b"")
    for bad in (0, -1, 512):
        with pytest.raises(FuseEncodeError):
            encode_error(4, bad)
    with pytest.raises(FuseEncodeError):
        encode_reply(0, b"")
    with pytest.raises(FuseEncodeError, match="out of range"):
        WriteOut(-1).pack()
    with pytest.raises(ValueError):
        FuseError(0)


def test_dirent_packing_is_8_byte_aligned() -> None:
    buf = DirentBuffer(size=4096, plus=False)
    assert buf.add(DirEntry(7, b"abc", dirent_type(0o100644), 1))
    assert buf.add(DirEntry(8, b"12345678", dirent_type(0o40755), 2))
    want = (struct.pack("<QQII", 7, 1, 3, 8) + b"abc" + b"\0" * 5
            + struct.pack("<QQII", 8, 2, 8, 4) + b"12345678")
    assert buf.getvalue() == want
    buf.assert_invariants()


def test_dirent_buffer_stops_when_full() -> None:
    buf = DirentBuffer(size=64, plus=False)
    assert buf.add(DirEntry(1, b"a" * 8, 8, 1))  # 32 bytes
    assert buf.add(DirEntry(2, b"b" * 8, 8, 2))  # 64 bytes
    assert not buf.add(DirEntry(3, b"c", 8, 3))
    assert len(buf) == 2 and buf.used == 64
    with pytest.raises(FuseEncodeError, match="DirEntry"):
        buf.add(DirEntryPlus(EntryOut(1, ATTR), b"x", 1))
    for bad in (b"", b"a/b", b"a\0b"):
        with pytest.raises(FuseEncodeError):
            DirentBuffer(4096, False).add(DirEntry(1, bad, 8, 1))


def test_direntplus_layout() -> None:
    entry = EntryOut(7, ATTR)
    buf = DirentBuffer(size=4096, plus=True)
    assert buf.add(DirEntryPlus(entry, b"file", 3))
    raw = buf.getvalue()
    assert len(raw) == 152 + 8
    assert raw[:128] == entry.pack()
    assert raw[128:] == struct.pack("<QQII", 7, 3, 4, 8) + b"file" + b"\0" * 4


def test_notifications() -> None:
    assert encode_notify(NotifyPoll(5)) == struct.pack("<IiQQ", 24, 1, 0, 5)
    assert encode_notify(NotifyInvalInode(9, 0, -1)) == struct.pack("<IiQQqq", 40, 2, 0, 9, 0, -1)
    assert encode_notify(NotifyInvalEntry(1, b"name")) == (
        struct.pack("<IiQQII", 37, 3, 0, 1, 4, 0) + b"name\0")
    assert encode_notify(NotifyInvalEntry(1, b"n", expire_only=True))[28:32] == b"\1\0\0\0"
    assert encode_notify(NotifyDelete(1, 9, b"gone")) == (
        struct.pack("<IiQQQII", 45, 6, 0, 1, 9, 4, 0) + b"gone\0")
    assert encode_notify(NotifyStore(9, 4096, b"data")) == (
        struct.pack("<IiQQQII", 44, 4, 0, 9, 4096, 4, 0) + b"data")
    with pytest.raises(FuseEncodeError):
        encode_notify(NotifyInvalEntry(1, b"bad\0name"))


def test_xattr_size_rules() -> None:
    assert xattr_payload(0, b"hello") == struct.pack("<II", 5, 0)
    assert xattr_payload(5, b"hello") == b"hello"
    with pytest.raises(FuseError) as info:
        xattr_payload(4, b"hello")
    assert info.value.errno == errno.ERANGE
    assert xattr_list_payload(0, [b"user.a", b"user.b"]) == struct.pack("<II", 14, 0)
    assert xattr_list_payload(100, [b"user.a", b"user.b"]) == b"user.a\0user.b\0"
    with pytest.raises(FuseEncodeError):
        xattr_list_payload(100, [b""])
