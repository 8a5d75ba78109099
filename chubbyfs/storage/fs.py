"""The file operations durable storage needs, behind a small protocol.

The WAL and the snapshot store use only these calls, so the same code runs on
the real disk (`RealFS`) and on the simulated one (`chubbyfs.sim.disk.SimFS`),
whose crash model decides what survives a power loss. Everything is
synchronous: the storage runs inline in the trio event loop, where a small
write plus fdatasync costs well under a millisecond.

Paths are POSIX strings; directory entries (create, rename, unlink, mkdir) are
durable only after `fsync_dir` on the containing directory, file contents only
after `fsync`/`fdatasync` on an open file.
"""

from __future__ import annotations

import os
from typing import Protocol


class AppendFile(Protocol):
    """A file opened for appending (the WAL tail, a snapshot being written)."""

    def write(self, data: bytes) -> None:
        """Append all of `data` at the end of the file."""
        ...

    def fdatasync(self) -> None:
        """Make this file's data (and the size needed to read it) durable."""
        ...

    def fsync(self) -> None:
        """Make this file's data and all of its metadata durable."""
        ...

    def truncate(self, size_bytes: int) -> None:
        """Cut the file to `size_bytes` (durable after the next sync)."""
        ...

    def size(self) -> int:
        """Current size in bytes, including writes not yet synced."""
        ...

    def close(self) -> None: ...


class FileSystem(Protocol):
    def open_append(self, path: str, *, create: bool) -> AppendFile:
        """Open for appending. create=True makes a new file and fails with
        FileExistsError if it exists; create=False requires the file
        (FileNotFoundError otherwise)."""
        ...

    def read_file(self, path: str) -> bytes:
        """The whole content as the running system sees it."""
        ...

    def file_size(self, path: str) -> int: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace `dst` with `src` (same directory)."""
        ...

    def unlink(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]:
        """Names in the directory, sorted."""
        ...

    def mkdir(self, path: str) -> None:
        """Create one directory if it does not exist yet; its parent must."""
        ...

    def exists(self, path: str) -> bool: ...

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        ...


class RealAppendFile:
    """An O_APPEND file descriptor; one write() syscall per call."""

    def __init__(self, path: str, *, create: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self._fd = os.open(path, flags, 0o644)
        self._size_bytes = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            # os.write may write less than asked (signals, huge buffers).
            written = os.write(self._fd, view)
            view = view[written:]
        self._size_bytes += len(data)

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def truncate(self, size_bytes: int) -> None:
        if size_bytes < 0:
            raise ValueError(f"cannot truncate to a negative size: {size_bytes}")
        os.ftruncate(self._fd, size_bytes)
        self._size_bytes = size_bytes

    def size(self) -> int:
        return self._size_bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RealFS:
    """FileSystem on the operating system's files."""

    def open_append(self, path: str, *, create: bool) -> RealAppendFile:
        return RealAppendFile(path, create=create)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def file_size(self, path: str) -> int:
        return os.stat(path).st_size

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def mkdir(self, path: str) -> None:
        if not os.path.isdir(path):
            os.mkdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
