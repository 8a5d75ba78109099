"""Requests built by hand from the fuse_kernel.h layouts, as the kernel sends
them, and replies taken apart the same way. Deliberately independent of
chubbyfs.fuse.abi so a wrong layout there cannot hide in both."""

from __future__ import annotations

import struct


def request(opcode: int, body: bytes = b"", *, unique: int = 2, nodeid: int = 1,
            uid: int = 1000, gid: int = 1000, pid: int = 4242, extlen: int = 0,
            length: int | None = None) -> bytes:
    # fuse_in_header: u32 len, u32 opcode, u64 unique, u64 nodeid, u32 uid,
    # u32 gid, u32 pid, u16 total_extlen, u16 padding
    total = 40 + len(body) if length is None else length
    return struct.pack("<IIQQIIIHH", total, opcode, unique, nodeid, uid, gid, pid, extlen,
                       0) + body


def init_body(major: int = 7, minor: int = 45, readahead: int = 131072,
              flags: int = 0xFFFFFFFF, flags2: int = 0) -> bytes:
    return struct.pack("<IIIII", major, minor, readahead, flags, flags2) + b"\0" * 44


def lk_body(fh: int, owner: int, start: int, end: int, typ: int, pid: int,
            lk_flags: int) -> bytes:
    return struct.pack("<QQQQIIII", fh, owner, start, end, typ, pid, lk_flags, 0)


def parse_reply(msg: bytes) -> tuple[int, int, bytes]:
    """(error, unique, payload) of one reply; checks the length field."""
    length, error, unique = struct.unpack_from("<IiQ", msg)
    assert length == len(msg), (length, len(msg))
    return error, unique, msg[16:]
