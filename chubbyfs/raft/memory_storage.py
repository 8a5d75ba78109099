"""In-memory `WritableStorage`: the reference implementation for tests.

The log is a list whose element 0 is a "dummy" entry standing for the last
compacted (snapshot) position, so `term(first_index() - 1)` is always known.
`MemoryStorage(ConfState(voters=(1, 2, 3)))` is a founding member: its log
starts with the committed bootstrap entries (`confchange.bootstrap_log`).
`MemoryStorage()` is empty: a node about to be added to a running cluster.
"""

from __future__ import annotations

from .confchange import apply_change, bootstrap_log, decode_conf_change
from .storage import InMemoryLog, SnapshotOutOfDateError, UnavailableError
from .types import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta


class MemoryStorage(InMemoryLog):
    def __init__(self, conf: ConfState | None = None) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._entries: list[Entry] = [Entry(term=0, index=0)]
        if conf is not None and conf.voters:
            entries, self._hard_state = bootstrap_log(conf.voters)
            self._entries.extend(entries)
        # Counters the tests use to check the core reads storage sparingly.
        self.sync_count = 0

    # -- Storage (read side) ------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        conf = self._snapshot.meta.conf
        for e in self._entries[1:]:
            if e.type == EntryType.CONF_CHANGE and e.index > self._snapshot.meta.index:
                conf = apply_change(conf, decode_conf_change(e.data))
        return self._hard_state, conf

    # -- WritableStorage ----------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        first = self.first_index()
        if entries[-1].index < first:
            return  # wholly compacted: already covered by the snapshot
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        start = entries[0].index - self._entries[0].index
        if start > len(self._entries):
            raise UnavailableError(
                f"gap: appending at {entries[0].index} after last {self.last_index()}"
            )
        if start < len(self._entries):
            del self._entries[start:]
        self._entries.extend(entries)

    def set_hard_state(self, hs: HardState) -> None:
        self._hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        if snap.meta.index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot {snap.meta.index} is not newer than {self._snapshot.meta.index}"
            )
        self._snapshot = snap
        self._entries = [Entry(term=snap.meta.term, index=snap.meta.index)]

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot {index} is not newer than {self._snapshot.meta.index}"
            )
        if index > self.last_index():
            raise UnavailableError(f"snapshot index {index} is beyond last {self.last_index()}")
        if index > self._hard_state.commit:
            raise ValueError(f"snapshot index {index} is beyond commit {self._hard_state.commit}")
        snap = Snapshot(meta=SnapshotMeta(index=index, term=self.term(index), conf=conf), data=data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """Discard entries before `index`; afterwards first_index() == index."""
        self._discard_before(index)

    def sync(self) -> None:
        self.sync_count += 1

    # -- test helpers -------------------------------------------------------

    def hard_state(self) -> HardState:
        return self._hard_state

    def all_entries(self) -> list[Entry]:
        return self._entries[1:]
