"""Snapshot files: written atomically, checksummed, newest valid one wins.

File `<index:016x>-<term:016x>.snap`:

    magic "CHUBSNAP" | u32 version | u32 crc32c(body) | u64 body length | body
    body = msgpack [index, term, [voters...], data]

Writing goes to `<name>.tmp`, is fsynced, renamed into place and the
directory fsynced: a crash leaves either no file under the final name or the
complete one. A `.snap` that fails its checksum is therefore damage, not a
crash: it is renamed to `.broken` and the next older one is used (the WAL
replay then refuses to start if the log does not reach back that far).
"""

from __future__ import annotations

import posixpath
import re
import struct
from dataclasses import dataclass

import crc32c
import msgpack

from ..raft.types import ConfState, Snapshot, SnapshotMeta
from .fs import FileSystem

SNAPSHOT_MAGIC = b"CHUBSNAP"
SNAPSHOT_FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIIQ")  # magic, version, crc32c(body), body length
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
TEMP_SUFFIX = ".tmp"


class SnapshotFormatError(Exception):
    """A snapshot file is truncated, has a bad checksum or does not decode."""


def snapshot_name(index: int, term: int) -> str:
    return f"{index:016x}-{term:016x}.snap"


def parse_snapshot_name(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return None if m is None else (int(m.group(1), 16), int(m.group(2), 16))


def encode_snapshot(snap: Snapshot) -> bytes:
    meta = snap.meta
    body = msgpack.packb([meta.index, meta.term, list(meta.conf.voters), snap.data], use_bin_type=True)
    return _HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT_VERSION, crc32c.crc32c(body), len(body)) + body


def decode_snapshot(data: bytes) -> Snapshot:
    if len(data) < _HEAD.size:
        raise SnapshotFormatError(f"{len(data)} bytes is shorter than the header")
    magic, version, crc, length = _HEAD.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotFormatError("bad magic")
    if version != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotFormatError(f"unknown format version {version}")
    body = data[_HEAD.size :]
    if len(body) != length:
        raise SnapshotFormatError(f"body is {len(body)} bytes, header says {length}")
    if crc32c.crc32c(body) != crc:
        raise SnapshotFormatError("checksum mismatch")
    try:
        index, term, voters, payload = msgpack.unpackb(body, raw=False)
        return Snapshot(SnapshotMeta(index, term, ConfState(tuple(voters))), payload)
    except (ValueError, TypeError) as exc:  # well-checksummed but not ours
        raise SnapshotFormatError(f"undecodable body: {exc}") from exc


@dataclass(frozen=True, slots=True)
class LoadResult:
    snapshot: Snapshot  # Snapshot() when there is none
    name: str | None
    broken: tuple[str, ...]  # damaged files renamed to .broken
    removed_temp_files: tuple[str, ...]


class SnapshotStore:
    """The snapshot files of one storage directory."""

    def __init__(self, fs: FileSystem, directory: str, *, retain: int = 2) -> None:
        if retain < 1:
            raise ValueError(f"must retain at least one snapshot, got {retain}")
        self._fs = fs
        self._directory = directory
        # One older snapshot is kept as a fallback against damage to the newest.
        self.retain = retain

    def _path(self, name: str) -> str:
        return posixpath.join(self._directory, name)

    def names(self) -> list[str]:
        """Snapshot file names, oldest first."""
        found = []
        for name in self._fs.listdir(self._directory):
            parsed = parse_snapshot_name(name)
            if parsed is not None:
                found.append((parsed, name))
        return [name for _, name in sorted(found)]

    def save(self, snap: Snapshot) -> str:
        """Write `snap` durably and atomically; returns the file name."""
        if snap.is_empty():
            raise ValueError("refusing to save an empty snapshot (index 0)")
        name = snapshot_name(snap.meta.index, snap.meta.term)
        temp = self._path(name + TEMP_SUFFIX)
        if self._fs.exists(temp):  # a leftover of an earlier crash
            self._fs.unlink(temp)
        file = self._fs.open_append(temp, create=True)
        try:
            file.write(encode_snapshot(snap))
            file.fsync()
        finally:
            file.close()
        self._fs.rename(temp, self._path(name))
        self._fs.fsync_dir(self._directory)
        return name

    def load_newest(self) -> LoadResult:
        """Clean up temp files, then load the newest snapshot that verifies."""
        removed = []
        for name in self._fs.listdir(self._directory):
            if name.endswith(".snap" + TEMP_SUFFIX):
                self._fs.unlink(self._path(name))
                removed.append(name)
        broken = []
        chosen: tuple[Snapshot, str] | None = None
        for name in reversed(self.names()):
            try:
                snap = decode_snapshot(self._fs.read_file(self._path(name)))
                if (snap.meta.index, snap.meta.term) != parse_snapshot_name(name):
                    raise SnapshotFormatError("content does not match the file name")
            except SnapshotFormatError:
                self._fs.rename(self._path(name), self._path(name + ".broken"))
                broken.append(name)
                continue
            chosen = (snap, name)
            break
        if removed or broken:
            self._fs.fsync_dir(self._directory)
        if chosen is None:
            return LoadResult(Snapshot(), None, tuple(broken), tuple(removed))
        return LoadResult(chosen[0], chosen[1], tuple(broken), tuple(removed))

    def prune(self) -> list[str]:
        """Remove all but the newest `retain` snapshot files."""
        names = self.names()
        doomed = names[: max(0, len(names) - self.retain)]
        for name in doomed:
            self._fs.unlink(self._path(name))
        if doomed:
            self._fs.fsync_dir(self._directory)
        return doomed
