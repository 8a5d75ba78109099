"""The Raft log as the core sees it: stable `Storage` plus an unstable tail.

Invariants (checked by `assert_invariants`):
- applied <= applying <= committed <= last_index()
- unstable entries are contiguous from `unstable.offset`; everything below
  `unstable.offset` is in storage (storage entries at or above it are stale
  and will be overwritten by the next persisted append);
- committed entries are never truncated.
"""

from __future__ import annotations

from .storage import CompactedError, Storage, StorageError, UnavailableError
from .types import Entry, Snapshot


class InvariantViolation(AssertionError):
    """A Raft safety invariant was about to be broken: a bug, not bad input."""


class Unstable:
    """Entries (and possibly a snapshot) not yet confirmed persisted.

    `offset_in_progress` marks the entries already handed to the shell in a
    Ready that has not been advanced yet, so they are not handed out twice.
    """

    __slots__ = ("snapshot", "entries", "offset", "offset_in_progress", "snapshot_in_progress")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset
        self.offset_in_progress = offset
        self.snapshot_in_progress = False

    def maybe_first_index(self) -> int | None:
        return self.snapshot.meta.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        pos = index - self.offset
        if pos < len(self.entries):
            return self.entries[pos].term
        return None

    def next_entries(self) -> list[Entry]:
        start = self.offset_in_progress - self.offset
        return self.entries[start:] if start < len(self.entries) else []

    def next_snapshot(self) -> Snapshot | None:
        if self.snapshot is None or self.snapshot_in_progress:
            return None
        return self.snapshot

    def accept_in_progress(self) -> None:
        self.offset_in_progress = self.offset + len(self.entries)
        if self.snapshot is not None:
            self.snapshot_in_progress = True

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to (index, term) are persisted; drop them if still ours."""
        pos = index - self.offset
        if pos < 0 or pos >= len(self.entries) or self.entries[pos].term != term:
            return  # replaced (truncated) since that Ready: nothing to drop
        if pos == len(self.entries) - 1:
            self.entries = []
        else:
            del self.entries[: pos + 1]
        self.offset = index + 1
        self.offset_in_progress = max(self.offset_in_progress, self.offset)

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None
            self.snapshot_in_progress = False

    def restore(self, snap: Snapshot) -> None:
        self.offset = snap.meta.index + 1
        self.offset_in_progress = self.offset
        self.entries = []
        self.snapshot = snap
        self.snapshot_in_progress = False

    def truncate_and_append(self, ents: list[Entry]) -> None:
        after = ents[0].index
        end = self.offset + len(self.entries)
        if after == end:
            self.entries.extend(ents)
        elif after <= self.offset:
            # Replaces everything unstable and a suffix of storage.
            self.offset = after
            self.offset_in_progress = after
            self.entries = list(ents)
        elif after < end:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)
            self.offset_in_progress = min(self.offset_in_progress, after)
        else:
            raise InvariantViolation(f"gap in unstable log: append at {after}, end {end}")


class RaftLog:
    __slots__ = ("storage", "unstable", "committed", "applying", "applied", "max_committed_bytes")

    def __init__(self, storage: Storage, max_committed_bytes: int) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Everything up to the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applying = first - 1
        self.applied = first - 1
        self.max_committed_bytes = max_committed_bytes

    # -- indexes and terms --------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def stable_last_index(self) -> int:
        """Last index that is persisted and still part of this log."""
        return self.unstable.offset - 1

    def term(self, index: int) -> int:
        """Term at `index`; CompactedError / UnavailableError out of range."""
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond last {self.last_index()}")
        if index < self.first_index() - 1:
            raise CompactedError(f"index {index} is compacted")
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except StorageError:
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except StorageError:
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """§5.4.1: is a log ending at (last_index, term) at least as new as ours?"""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    def find_conflict(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry not already in the log (0 if none)."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, term(i)) with i <= index and term(i) <= term.

        Lets a rejection skip every entry of a term the other side does not
        have in one round trip. Returns (i, 0) if it runs into compaction.
        """
        index = min(index, self.last_index())
        while index > 0:
            try:
                t = self.term(index)
            except CompactedError:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    # -- mutation -----------------------------------------------------------

    def append(self, ents: list[Entry]) -> int:
        if not ents:
            return self.last_index()
        if ents[0].index - 1 < self.committed:
            raise InvariantViolation(
                f"append at {ents[0].index} would truncate committed {self.committed}"
            )
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise InvariantViolation(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit `index` if it is newer and of `term` (§5.4.2)."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def restore(self, snap: Snapshot) -> None:
        self.committed = snap.meta.index
        self.unstable.restore(snap)

    def applied_to(self, index: int) -> None:
        if index > self.committed:
            raise InvariantViolation(f"applied {index} beyond committed {self.committed}")
        if index > self.applied:
            self.applied = index
        if index > self.applying:
            self.applying = index

    # -- reading entries ----------------------------------------------------

    def slice(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Entries [lo, hi), at least one if lo < hi, at most ~max_bytes."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(f"index {lo} is compacted")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"index {hi - 1} is beyond last {self.last_index()}")
        u = self.unstable
        result: list[Entry] = []
        budget = max_bytes
        if lo < u.offset:
            stored_hi = min(hi, u.offset)
            result = self.storage.entries(lo, stored_hi, max_bytes)
            if len(result) < stored_hi - lo:
                return result  # size limit reached inside storage
            if budget is not None:
                budget -= sum(e.size() for e in result)
        if hi > u.offset:
            start = max(lo, u.offset) - u.offset
            tail = u.entries[start : hi - u.offset]
            if budget is None:
                result = tail if not result else [*result, *tail]
            else:
                result = list(result)
                for e in tail:
                    if result and budget - e.size() < 0:
                        break
                    budget -= e.size()
                    result.append(e)
        return result

    def entries_from(self, lo: int, max_bytes: int | None) -> list[Entry]:
        return self.slice(lo, self.last_index() + 1, max_bytes)

    def has_next_committed_entries(self) -> bool:
        if self.unstable.snapshot is not None:
            return False
        return min(self.committed, self.stable_last_index()) > self.applying

    def next_committed_entries(self) -> list[Entry]:
        """Committed, persisted entries not yet handed out for applying."""
        if self.unstable.snapshot is not None:
            return []  # the snapshot must be applied first
        hi = min(self.committed, self.stable_last_index()) + 1
        lo = self.applying + 1
        if lo >= hi:
            return []
        return self.slice(lo, hi, self.max_committed_bytes)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    def assert_invariants(self) -> None:
        assert self.applied <= self.applying <= self.committed, (
            self.applied,
            self.applying,
            self.committed,
        )
        assert self.committed <= self.last_index(), (self.committed, self.last_index())
        u = self.unstable
        assert u.offset <= u.offset_in_progress <= u.offset + len(u.entries)
        if u.entries:
            assert u.entries[0].index == u.offset, (u.entries[0].index, u.offset)
            assert u.entries[-1].index == u.offset + len(u.entries) - 1
        if u.snapshot is not None:
            assert u.offset == u.snapshot.meta.index + 1
