"""Shared helpers for the storage tests."""

from __future__ import annotations

import posixpath
from collections import Counter

from chubbyfs.sim.disk import SimFS
from chubbyfs.storage.fs import FileSystem, RealFS


class CountingFS:
    """Wraps a FileSystem and counts the calls that reach it."""

    def __init__(self, inner: FileSystem) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def open_append(self, path: str, *, create: bool):
        self.calls["open_append"] += 1
        return _CountingFile(self, self.inner.open_append(path, create=create))

    def __getattr__(self, name: str):
        target = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return target(*args, **kwargs)

        return counted


class _CountingFile:
    def __init__(self, owner: CountingFS, inner) -> None:
        self._owner = owner
        self._inner = inner

    def __getattr__(self, name: str):
        target = getattr(self._inner, name)

        def counted(*args, **kwargs):
            self._owner.calls[f"file.{name}"] += 1
            return target(*args, **kwargs)

        return counted


def make_fs(kind: str, tmp_path) -> tuple[FileSystem, str]:
    """A filesystem of the given kind and a directory on it that exists."""
    if kind == "sim":
        fs = SimFS()
        fs.mkdir("/d")
        fs.fsync_dir("/")
        return fs, "/d"
    directory = tmp_path / "d"
    directory.mkdir()
    return RealFS(), str(directory)


def overwrite(fs: FileSystem, path: str, data: bytes) -> None:
    """Replace a file's content durably (to build damaged images)."""
    fs.unlink(path)
    f = fs.open_append(path, create=True)
    f.write(data)
    f.fsync()
    f.close()
    fs.fsync_dir(posixpath.dirname(path))


def append_raw(fs: FileSystem, path: str, data: bytes) -> None:
    f = fs.open_append(path, create=False)
    f.write(data)
    f.fsync()
    f.close()


def truncate_raw(fs: FileSystem, path: str, size: int) -> None:
    f = fs.open_append(path, create=False)
    f.truncate(size)
    f.fsync()
    f.close()


def flip_bit(fs: FileSystem, path: str, offset: int) -> None:
    data = bytearray(fs.read_file(path))
    data[offset] ^= 0x10
    overwrite(fs, path, bytes(data))
