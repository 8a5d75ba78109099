"""The Storage interface between the Raft core and stable storage.

The core only reads through `Storage` (etcd-io/raft's narrow read interface);
the shell writes through `WritableStorage` while handling a `Ready`.
`MemoryStorage` (in `memory_storage.py`) is the reference implementation used
by unit tests; `chubbyfs.storage.raft_storage.DiskStorage` keeps the same
contract on a write-ahead log and snapshot files.

Index conventions (as in etcd): the storage holds a "dummy" position at
`first_index() - 1` whose term is known (the last compacted / snapshot entry),
followed by entries `first_index() .. last_index()`. An empty log has
first_index() == 1 and last_index() == 0 and term(0) == 0.
"""

from __future__ import annotations

from typing import Protocol

from .types import ConfState, Entry, HardState, Snapshot


class StorageError(Exception):
    pass


class CompactedError(StorageError):
    """The requested index is before first_index(): it is only in the snapshot."""


class UnavailableError(StorageError):
    """The requested index is after last_index()."""


class SnapshotOutOfDateError(StorageError):
    """A snapshot older than the one already held was offered."""


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """Hard state and membership as of the last persisted state.

        The ConfState is that of the snapshot plus every CONF_CHANGE entry in
        the stored log (membership takes effect when appended)."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi). Always returns at least one entry if lo < hi, even
        if it exceeds max_bytes. Raises CompactedError / UnavailableError."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at index; valid for first_index()-1 .. last_index()."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (empty Snapshot() if none)."""
        ...


class WritableStorage(Storage, Protocol):
    def append(self, entries: list[Entry]) -> None:
        """Append entries; an entry at an index <= last_index() truncates the
        stored log from that index first (a conflicting suffix is replaced)."""
        ...

    def set_hard_state(self, hs: HardState) -> None: ...

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with a snapshot received from the leader."""
        ...

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the applied state at `index` (<= applied)."""
        ...

    def compact(self, index: int) -> None:
        """Discard entries before `index` (they must be covered by a snapshot)."""
        ...

    def sync(self) -> None:
        """Make everything written so far durable (fsync). A no-op in memory."""
        ...


class InMemoryLog:
    """The read side that `MemoryStorage` and `DiskStorage` share: the live
    log as a list whose first element is the dummy entry at
    first_index() - 1 (the snapshot point; term known, data not kept)."""

    _entries: list[Entry]
    _snapshot: Snapshot

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        offset = self._entries[0].index
        if lo <= offset:
            raise CompactedError(f"entry {lo} is compacted (first index {offset + 1})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries up to {hi - 1} requested, last index is {self.last_index()}")
        if lo >= hi:
            return []
        selected = self._entries[lo - offset : hi - offset]
        if max_bytes is None:
            return selected
        total = 0
        for n, e in enumerate(selected):
            total += e.size()
            if total > max_bytes and n > 0:  # at least one entry, whatever its size
                return selected[:n]
        return selected

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise CompactedError(f"term of {index} is compacted (dummy index {offset})")
        if index > self.last_index():
            raise UnavailableError(f"term of {index} requested, last index is {self.last_index()}")
        return self._entries[index - offset].term

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def _discard_before(self, index: int) -> bool:
        """Drop the live entries before `index` (first_index() becomes
        `index`); False if there was nothing (more) to drop. The entries must
        be covered by the snapshot: the log is their only other copy."""
        offset = self._entries[0].index
        if index <= offset + 1:
            return False
        if index - 1 > self._snapshot.meta.index:
            raise ValueError(f"cannot compact before {index}: snapshot only covers {self._snapshot.meta.index}")
        if index - 1 > self.last_index():
            raise UnavailableError(f"compact {index} is beyond last {self.last_index()}")
        dummy = self._entries[index - 1 - offset]
        self._entries = [Entry(term=dummy.term, index=dummy.index)] + self._entries[index - offset :]
        return True
