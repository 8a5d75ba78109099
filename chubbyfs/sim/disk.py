"""SimFS: an in-memory FileSystem that loses what a power cut would lose.

The crash model (testing-anchors.md §6.4):

- Every file (inode) has durable bytes plus a list of pending operations
  (writes, truncations). `fsync`/`fdatasync` on an open file makes that
  file's pending operations durable.
- Directory entries (create, rename, unlink, mkdir) are pending per
  directory until `fsync_dir` on that directory.
- `crash(rng)` applies a seeded-random prefix of each file's pending
  operations; the last applied write may be torn at 512-byte sector
  granularity: the first sectors of the write are new, the rest keep the
  old bytes, read as zeros or hold garbage. Directory entries that were
  never fsynced are dropped. Open handles become invalid.
- `crash_images()` enumerates deterministic outcomes of a crash at the
  current point (nothing pending applied, everything applied, every tear of
  the last write) for exhaustive crash-point tests.
- Nemeses: `lying_fsync=True` acknowledges syncs without persisting (a
  negative control the durability checker must catch); `bitrot()` flips a
  bit in durable data.

Tears are prefix-shaped (new sectors first, then damaged ones): a disk that
persisted a later sector of one write but not an earlier one is not
modelled; docs/storage.md explains why the WAL refuses such an image.

Pure Python and deterministic given the rng: no trio, no real files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

SECTOR_BYTES = 512
TEAR_FILLS = ("old", "zero", "garbage")


class SimCrashedError(Exception):
    """A handle opened before a crash was used after it."""


class RandomSource(Protocol):
    """The part of random.Random that SimFS uses (injected, never global)."""

    def random(self) -> float: ...

    def randrange(self, start: int, stop: int | None = ..., step: int = ...) -> int: ...

    def randbytes(self, n: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Write:
    seq: int  # global issue order, to find "the last write"
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Truncate:
    seq: int
    size_bytes: int


@dataclass(slots=True)
class _Inode:
    durable: bytes = b""
    pending: list[_Write | _Truncate] = field(default_factory=list)
    current: bytearray = field(default_factory=bytearray)

    def recompute(self) -> None:
        content = bytearray(self.durable)
        for op in self.pending:
            _apply(content, op)
        self.current = content


def _apply(content: bytearray, op: _Write | _Truncate) -> None:
    if isinstance(op, _Write):
        end = op.offset + len(op.data)
        if len(content) < op.offset:
            content.extend(bytes(op.offset - len(content)))
        content[op.offset:end] = op.data
    elif op.size_bytes > len(content):
        content.extend(bytes(op.size_bytes - len(content)))
    else:
        del content[op.size_bytes:]


def _parent(path: str) -> str:
    head, _, _ = path.rpartition("/")
    return head or "/"


def _normalize(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"SimFS paths are absolute, got {path!r}")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"SimFS paths may not contain '..': {path!r}")
    return "/" + "/".join(parts)


# Directory operations, pending until fsync_dir(parent).
@dataclass(frozen=True, slots=True)
class _DirOp:
    kind: str  # "link", "unlink", "rename", "mkdir"
    directory: str
    path: str
    inode: int = 0
    dst: str = ""


class SimFile:
    def __init__(self, fs: SimFS, path: str, inode: int) -> None:
        self._fs = fs
        self._inode = inode
        self._generation = fs.generation
        self.path = path
        self._closed = False

    def _node(self) -> _Inode:
        if self._generation != self._fs.generation:
            raise SimCrashedError(f"{self.path}: handle opened before a crash")
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed file")
        return self._fs._inodes[self._inode]

    def write(self, data: bytes) -> None:
        node = self._node()
        op = _Write(self._fs._next_seq(), len(node.current), bytes(data))
        node.pending.append(op)
        _apply(node.current, op)
        self._fs._record(f"write {self.path} @{op.offset} +{len(data)}")

    def fdatasync(self) -> None:
        self._sync("fdatasync")

    def fsync(self) -> None:
        self._sync("fsync")

    def _sync(self, name: str) -> None:
        node = self._node()
        self._fs.statistics["syncs"] += 1
        if not self._fs.lying_fsync:
            node.durable = bytes(node.current)
            node.pending.clear()
        self._fs._record(f"{name} {self.path}")

    def truncate(self, size_bytes: int) -> None:
        if size_bytes < 0:
            raise ValueError(f"cannot truncate to a negative size: {size_bytes}")
        node = self._node()
        op = _Truncate(self._fs._next_seq(), size_bytes)
        node.pending.append(op)
        _apply(node.current, op)
        self._fs._record(f"truncate {self.path} {size_bytes}")

    def size(self) -> int:
        return len(self._node().current)

    def close(self) -> None:
        self._closed = True


class SimFS:
    """In-memory FileSystem with a power-loss model. See the module docstring."""

    def __init__(self, *, lying_fsync: bool = False) -> None:
        self.lying_fsync = lying_fsync
        self._inodes: dict[int, _Inode] = {}
        self._names: dict[str, int] = {}  # what the running system sees
        self._durable_names: dict[str, int] = {}  # what survives a crash
        self._dirs: set[str] = {"/"}
        self._durable_dirs: set[str] = {"/"}
        self._pending_dir_ops: list[_DirOp] = []
        self._inode_counter = 0
        self._seq = 0
        self.generation = 0  # bumped by each crash: older handles go stale
        self.op_count = 0  # mutating operations issued: the crash points
        self.op_log: list[str] = []
        self.on_op: Callable[[SimFS], None] | None = None
        self.statistics: dict[str, int] = {"syncs": 0, "dir_syncs": 0, "crashes": 0}

    # -- bookkeeping ---------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _record(self, text: str) -> None:
        self.op_count += 1
        self.op_log.append(text)
        if self.on_op is not None:
            self.on_op(self)

    def clone(self) -> SimFS:
        """An independent copy of the whole state (the on_op hook excluded)."""
        hook, self.on_op = self.on_op, None
        try:
            twin = copy.deepcopy(self)
        finally:
            self.on_op = hook
        return twin

    def _require_dir(self, directory: str) -> None:
        if directory not in self._dirs:
            raise FileNotFoundError(f"no such directory: {directory}")

    # -- FileSystem ----------------------------------------------------------

    def open_append(self, path: str, *, create: bool) -> SimFile:
        path = _normalize(path)
        if create:
            self._require_dir(_parent(path))
            if path in self._names or path in self._dirs:
                raise FileExistsError(f"file exists: {path}")
            self._inode_counter += 1
            ino = self._inode_counter
            self._inodes[ino] = _Inode()
            self._names[path] = ino
            self._pending_dir_ops.append(_DirOp("link", _parent(path), path, ino))
            self._record(f"create {path}")
            return SimFile(self, path, ino)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        return SimFile(self, path, self._names[path])

    def read_file(self, path: str) -> bytes:
        path = _normalize(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        return bytes(self._inodes[self._names[path]].current)

    def file_size(self, path: str) -> int:
        path = _normalize(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        return len(self._inodes[self._names[path]].current)

    def rename(self, src: str, dst: str) -> None:
        src, dst = _normalize(src), _normalize(dst)
        if src not in self._names:
            raise FileNotFoundError(f"no such file: {src}")
        if _parent(src) != _parent(dst):
            # One directory fsync then covers the whole rename.
            raise ValueError(f"SimFS renames stay in one directory: {src} -> {dst}")
        if dst in self._dirs:
            raise IsADirectoryError(f"is a directory: {dst}")
        ino = self._names.pop(src)
        self._names[dst] = ino
        self._pending_dir_ops.append(_DirOp("rename", _parent(src), src, ino, dst))
        self._record(f"rename {src} {dst}")

    def unlink(self, path: str) -> None:
        path = _normalize(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        del self._names[path]
        self._pending_dir_ops.append(_DirOp("unlink", _parent(path), path))
        self._record(f"unlink {path}")

    def listdir(self, path: str) -> list[str]:
        path = _normalize(path)
        self._require_dir(path)
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix):] for p in self._names if _parent(p) == path}
        names |= {d[len(prefix):] for d in self._dirs if d != "/" and _parent(d) == path}
        return sorted(names)

    def mkdir(self, path: str) -> None:
        path = _normalize(path)
        self._require_dir(_parent(path))
        if path in self._dirs:
            return  # idempotent, like the FileSystem protocol says
        if path in self._names:
            raise FileExistsError(f"a file has that name: {path}")
        self._dirs.add(path)
        self._pending_dir_ops.append(_DirOp("mkdir", _parent(path), path))
        self._record(f"mkdir {path}")

    def exists(self, path: str) -> bool:
        path = _normalize(path)
        return path in self._names or path in self._dirs

    def fsync_dir(self, path: str) -> None:
        path = _normalize(path)
        self._require_dir(path)
        self.statistics["dir_syncs"] += 1
        if not self.lying_fsync:
            keep: list[_DirOp] = []
            for op in self._pending_dir_ops:
                if op.directory == path:
                    self._apply_dir_op(op)
                else:
                    keep.append(op)
            self._pending_dir_ops = keep
        self._record(f"fsync_dir {path}")

    def _apply_dir_op(self, op: _DirOp) -> None:
        names = self._durable_names
        if op.kind == "link":
            names[op.path] = op.inode
        elif op.kind == "unlink":
            names.pop(op.path, None)
        elif op.kind == "rename":
            names.pop(op.path, None)
            names[op.dst] = op.inode
        else:
            self._durable_dirs.add(op.path)

    # -- crashes -------------------------------------------------------------

    def crash(self, rng: RandomSource, *, tear_probability: float = 0.5) -> None:
        """Power loss, then reboot: keep what the crash model says survives."""
        plan: dict[int, tuple[int, tuple[int, str] | None]] = {}
        for ino in sorted(self._inodes):
            node = self._inodes[ino]
            applied = rng.randrange(len(node.pending) + 1)
            tear = None
            if applied and isinstance(node.pending[applied - 1], _Write):
                if rng.random() < tear_probability:
                    chunks = len(_sector_chunks(node.pending[applied - 1]))
                    tear = (rng.randrange(chunks), TEAR_FILLS[rng.randrange(len(TEAR_FILLS))])
            plan[ino] = (applied, tear)
        self._reboot(plan, apply_dir_ops=False, rng=rng)

    def crash_images(self, garbage_seed: int = 0) -> Iterator[tuple[str, SimFS]]:
        """Every deterministic crash outcome worth checking at this point.

        Pending data (none / all) x pending directory entries (dropped /
        applied), plus every prefix tear of the globally last pending write
        (keep 0..n-1 of its sectors; the rest old, zero or garbage)."""
        last: tuple[int, _Write] | None = None
        for ino, node in self._inodes.items():
            for op in node.pending:
                if isinstance(op, _Write) and (last is None or op.seq > last[1].seq):
                    last = (ino, op)
        for dir_applied in (False, True):
            dir_label = "dirs-applied" if dir_applied else "dirs-dropped"
            for data_all in (False, True):
                plan = {
                    ino: (len(node.pending) if data_all else 0, None)
                    for ino, node in self._inodes.items()
                }
                label = f"{'data-all' if data_all else 'data-none'}/{dir_label}"
                yield label, self._image(plan, dir_applied, garbage_seed)
            if last is None:
                continue
            ino, write = last
            node = self._inodes[ino]
            position = node.pending.index(write) + 1
            for keep in range(len(_sector_chunks(write))):
                for fill in TEAR_FILLS:
                    plan = {i: (len(n.pending), None) for i, n in self._inodes.items()}
                    plan[ino] = (position, (keep, fill))
                    label = f"torn-keep{keep}-{fill}/{dir_label}"
                    yield label, self._image(plan, dir_applied, garbage_seed)

    def _image(
        self, plan: dict[int, tuple[int, tuple[int, str] | None]], dir_applied: bool, seed: int
    ) -> SimFS:
        twin = self.clone()
        twin._reboot(plan, apply_dir_ops=dir_applied, rng=_Lcg(seed))
        return twin

    def _reboot(
        self,
        plan: dict[int, tuple[int, tuple[int, str] | None]],
        *,
        apply_dir_ops: bool,
        rng: RandomSource,
    ) -> None:
        for ino, (applied, tear) in plan.items():
            node = self._inodes[ino]
            content = bytearray(node.durable)
            for i, op in enumerate(node.pending[:applied]):
                if tear is not None and i == applied - 1:
                    assert isinstance(op, _Write)
                    _apply_torn(content, op, tear[0], tear[1], rng)
                else:
                    _apply(content, op)
            node.durable = bytes(content)
            node.pending = []
            node.current = bytearray(content)
        if apply_dir_ops:
            for op in self._pending_dir_ops:
                self._apply_dir_op(op)
        self._pending_dir_ops = []
        self._names = dict(self._durable_names)
        self._dirs = set(self._durable_dirs)
        live = set(self._names.values())
        self._inodes = {ino: n for ino, n in self._inodes.items() if ino in live}
        self.generation += 1
        self.statistics["crashes"] += 1
        self.op_log.append("crash")

    # -- nemeses -------------------------------------------------------------

    def bitrot(self, path: str, rng: RandomSource | None = None, *, offset: int | None = None,
               bit: int | None = None) -> int:
        """Flip one bit of the durable bytes of `path` (a latent sector error
        that reads also see). Returns the byte offset flipped."""
        path = _normalize(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        node = self._inodes[self._names[path]]
        if not node.durable:
            raise ValueError(f"{path} has no durable bytes to rot")
        if offset is None:
            if rng is None:
                raise ValueError("bitrot needs an rng or an explicit offset")
            offset = rng.randrange(len(node.durable))
        if not 0 <= offset < len(node.durable):
            raise ValueError(f"offset {offset} outside the {len(node.durable)} durable bytes")
        if bit is None:
            bit = rng.randrange(8) if rng is not None else 0
        rotted = bytearray(node.durable)
        rotted[offset] ^= 1 << bit
        node.durable = bytes(rotted)
        node.recompute()
        return offset

    def durable_bytes(self, path: str) -> bytes:
        """What `path` would hold after a crash that applied nothing pending."""
        path = _normalize(path)
        return self._inodes[self._durable_names[path]].durable

    def assert_invariants(self) -> None:
        for path, ino in self._names.items():
            assert ino in self._inodes, f"{path} names a missing inode"
            assert _parent(path) in self._dirs, f"{path} has no parent directory"
        for path, ino in self._durable_names.items():
            assert ino in self._inodes, f"durable {path} names a missing inode"
        for node in self._inodes.values():
            expected = bytearray(node.durable)
            for op in node.pending:
                _apply(expected, op)
            assert expected == node.current, "current bytes diverge from durable + pending"


def _sector_chunks(write: _Write) -> list[tuple[int, int]]:
    """[start, end) file ranges of the write, cut at sector boundaries."""
    chunks = []
    start, end = write.offset, write.offset + len(write.data)
    while start < end:
        boundary = min(end, (start // SECTOR_BYTES + 1) * SECTOR_BYTES)
        chunks.append((start, boundary))
        start = boundary
    return chunks or [(write.offset, write.offset)]


def _apply_torn(content: bytearray, write: _Write, keep: int, fill: str, rng: RandomSource) -> None:
    """Apply `write` with only its first `keep` sectors landing intact."""
    chunks = _sector_chunks(write)
    old = bytes(content)
    _apply(content, write)
    if keep >= len(chunks):
        return
    for start, end in chunks[keep:]:
        if fill == "zero":
            content[start:end] = bytes(end - start)
        elif fill == "garbage":
            content[start:end] = rng.randbytes(end - start)
        elif fill == "old":
            content[start:end] = old[start:end] + bytes(max(0, end - max(start, len(old))))
        else:
            raise ValueError(f"unknown tear fill {fill!r}")
    if fill == "old":
        # Sectors past the old end of file never got their data: the size
        # stays where the last intact new sector ended.
        cut = max(len(old), chunks[keep - 1][1] if keep else write.offset)
        del content[cut:]


class _Lcg:
    """A tiny deterministic byte source for crash_images' garbage fills."""

    def __init__(self, seed: int) -> None:
        self._state = (seed * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)

    def _next(self) -> int:
        self._state = (self._state * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        return self._state >> 33

    def random(self) -> float:
        return self._next() / 2**31

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        if stop is None:
            start, stop = 0, start
        return start + self._next() % (stop - start)

    def randbytes(self, n: int) -> bytes:
        return bytes(self._next() & 0xFF for _ in range(n))

