"""DiskStorage: Raft's WritableStorage on a write-ahead log and snapshot files.

The live log is kept in memory (etcd MemoryStorage's shape: `_entries[0]` is
a dummy holding the index and term of the last compacted entry) so reads
never touch the disk; the WAL is only its durable backing, read once at
`open()`.

What is written where:

- append(entries)         -> one ENTRIES record (its first index says where
                             it overwrites a conflicting suffix)
- set_hard_state(hs)      -> one HARD_STATE record
- sync()                  -> one write + one fdatasync for all of the above
- create_snapshot(...)    -> sync, then an atomic snapshot file (durable on
                             return)
- apply_snapshot(snap)    -> sync, the snapshot file, then a new segment that
                             starts with the hard state and a SNAPSHOT record
                             (the log was replaced), then the older segments
                             are deleted (durable on return)
- compact(index)          -> memory only, plus deletion of whole segments
                             whose entries are all < index

Every new segment starts with a copy of the hard state, so deleting old
segments never loses the latest one.

Replay at open starts from the newest valid snapshot (index s) and applies the
records in order, restricted to indexes > s: an ENTRIES record [a..b] cuts the
log after max(a, s+1) - 1 and appends what is above s; a SNAPSHOT record
clears it. This reproduces the live log above s exactly; entries at or below
s come back as compacted (first_index() == s + 1 after a restart).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import msgpack

from ..raft.confchange import apply_change, decode_conf_change
from ..raft.storage import InMemoryLog, SnapshotOutOfDateError, UnavailableError
from ..raft.types import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta
from .fs import FileSystem
from .snapshot import SnapshotStore, parse_snapshot_name
from .wal import (
    BUFFER_BYTES_MAX_DEFAULT,
    SEGMENT_BYTES_MAX_DEFAULT,
    RecordType,
    RecoveryReport,
    WalCorruptionError,
    WalRecord,
    open_wal,
    parse_segment_name,
)

_ENTRY_TYPES = {int(t): t for t in EntryType}


@dataclass(frozen=True, slots=True)
class StorageRecovery:
    """What `open` found and repaired."""

    wal: RecoveryReport
    snapshot_name: str | None
    broken_snapshots: tuple[str, ...]
    removed_temp_files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StorageStatistics:
    bytes_written: int
    records_appended: int
    syncs: int
    segments_created: int
    segments_removed: int
    segment_count: int
    snapshots_written: int
    first_index: int
    last_index: int


def encode_entries(entries: list[Entry]) -> bytes:
    return msgpack.packb(
        [entries[0].index, [(e.term, int(e.type), e.data) for e in entries]], use_bin_type=True
    )


def decode_entries(payload: bytes) -> list[Entry]:
    first, rows = msgpack.unpackb(payload, raw=False, use_list=False)
    return [
        Entry(term=term, index=first + i, type=_ENTRY_TYPES[etype], data=data)
        for i, (term, etype, data) in enumerate(rows)
    ]


def encode_hard_state(hs: HardState) -> bytes:
    return msgpack.packb([hs.term, hs.vote, hs.commit])


def decode_hard_state(payload: bytes) -> HardState:
    term, vote, commit = msgpack.unpackb(payload)
    return HardState(term=term, vote=vote, commit=commit)


def encode_snapshot_marker(index: int, term: int) -> bytes:
    return msgpack.packb([index, term])


def decode_snapshot_marker(payload: bytes) -> tuple[int, int]:
    index, term = msgpack.unpackb(payload)
    return index, term


class DiskStorage(InMemoryLog):
    """Durable WritableStorage. `DiskStorage.open(fs, directory)` (or the
    constructor, which does the same) recovers the directory; both raise
    WalCorruptionError when the log is damaged beyond a torn tail."""

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        *,
        segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT,
        buffer_bytes_max: int = BUFFER_BYTES_MAX_DEFAULT,
        snapshots_retained: int = 2,
    ) -> None:
        self._fs = fs
        self._directory = directory
        if not fs.exists(directory):
            fs.mkdir(directory)
            fs.fsync_dir(posixpath.dirname(directory.rstrip("/")) or "/")
        names = fs.listdir(directory)
        has_segments = any(parse_segment_name(n) is not None for n in names)
        has_snapshots = any(parse_snapshot_name(n) is not None for n in names)
        if has_snapshots and not has_segments:
            raise WalCorruptionError(directory, 0, "snapshot files exist but every WAL segment is gone")
        self._snapshots = SnapshotStore(fs, directory, retain=snapshots_retained)
        loaded = self._snapshots.load_newest()
        self._snapshot = loaded.snapshot
        meta = self._snapshot.meta
        self._entries: list[Entry] = [Entry(term=meta.term, index=meta.index)]
        self._hard_state = HardState()
        self._snapshots_written = 0
        # Highest entry index written into each segment: a segment can go once
        # every index in it is covered by a snapshot (0: nothing needed).
        self._segment_max_index: dict[int, int] = {}
        self._wal, records, report = open_wal(
            fs,
            directory,
            first_index=meta.index + 1,
            segment_bytes_max=segment_bytes_max,
            buffer_bytes_max=buffer_bytes_max,
            segment_start=self._segment_start,
        )
        self._replay(records)
        # Segments a crash kept from being deleted (after compaction or an
        # installed snapshot) go now.
        self._remove_segments_below(meta.index + 1)
        self.recovery = StorageRecovery(report, loaded.name, loaded.broken, loaded.removed_temp_files)
        self.assert_invariants()

    @classmethod
    def open(cls, fs: FileSystem, directory: str, **options: int) -> DiskStorage:
        """Recover `directory` (created if missing) and return the storage."""
        return cls(fs, directory, **options)

    # -- recovery ------------------------------------------------------------

    def _replay(self, records: list[WalRecord]) -> None:
        snap_index = self._entries[0].index
        for rec in records:
            self._segment_max_index.setdefault(rec.segment_seq, 0)
            try:
                if rec.type == RecordType.ENTRIES:
                    entries = decode_entries(rec.payload)
                elif rec.type == RecordType.HARD_STATE:
                    hs = decode_hard_state(rec.payload)
                else:
                    marker = decode_snapshot_marker(rec.payload)
            except (ValueError, TypeError, KeyError) as exc:
                raise WalCorruptionError(rec.segment, rec.offset, f"undecodable {rec.type.name} record: {exc}") from exc
            if rec.type == RecordType.HARD_STATE:
                self._hard_state = hs
            elif rec.type == RecordType.SNAPSHOT:
                if marker[0] > snap_index:
                    raise WalCorruptionError(
                        rec.segment, rec.offset,
                        f"the log was replaced by snapshot {marker[0]} but the newest valid "
                        f"snapshot file is at index {snap_index}",
                    )
                del self._entries[1:]
                # Everything before this record is obsolete.
                for seq in self._segment_max_index:
                    if seq != rec.segment_seq:
                        self._segment_max_index[seq] = 0
                self._segment_max_index[rec.segment_seq] = marker[0]
            else:
                if not entries:
                    raise WalCorruptionError(rec.segment, rec.offset, "empty ENTRIES record")
                last = entries[-1].index
                seq_max = self._segment_max_index[rec.segment_seq]
                self._segment_max_index[rec.segment_seq] = max(seq_max, last)
                above = [e for e in entries if e.index > snap_index]
                if not above:
                    del self._entries[1:]  # the live log ended at or below s here
                    continue
                first = above[0].index
                if first > self.last_index() + 1:
                    raise WalCorruptionError(
                        rec.segment, rec.offset,
                        f"gap in the log: entries start at {first} but the log ends at "
                        f"{self.last_index()} (snapshot index {snap_index})",
                    )
                del self._entries[first - self._entries[0].index :]
                self._entries.extend(above)
        for seq in (s.seq for s in self._wal.segments()):
            self._segment_max_index.setdefault(seq, 0)

    def _segment_start(self) -> tuple[int, list[tuple[RecordType, bytes]]]:
        preamble = []
        if self._hard_state != HardState():
            preamble.append((RecordType.HARD_STATE, encode_hard_state(self._hard_state)))
        return self.last_index() + 1, preamble

    # -- Storage -------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        conf = self._snapshot.meta.conf
        snap_index = self._snapshot.meta.index
        for e in self._entries[1:]:
            # Entries at or below the snapshot are already in its ConfState.
            if e.type == EntryType.CONF_CHANGE and e.index > snap_index:
                conf = apply_change(conf, decode_conf_change(e.data))
        return self._hard_state, conf

    # -- WritableStorage -----------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        for prev, nxt in zip(entries, entries[1:]):
            if nxt.index != prev.index + 1:
                raise ValueError(f"entries not contiguous: {prev.index} then {nxt.index}")
        first = entries[0].index
        if first > self.last_index() + 1:
            raise UnavailableError(f"gap: appending at {first} after last {self.last_index()}")
        offset = self._entries[0].index
        if entries[-1].index <= offset:
            return  # all compacted already: nothing to do (as MemoryStorage)
        if first <= offset:
            entries = entries[offset + 1 - first :]
            first = offset + 1
        seq = self._wal.append(RecordType.ENTRIES, encode_entries(entries))
        self._segment_max_index[seq] = max(self._segment_max_index.get(seq, 0), entries[-1].index)
        del self._entries[first - offset :]
        self._entries.extend(entries)

    def set_hard_state(self, hs: HardState) -> None:
        if hs == self._hard_state:
            return  # the record already written (synced or not) says the same
        seq = self._wal.append(RecordType.HARD_STATE, encode_hard_state(hs))
        self._segment_max_index.setdefault(seq, 0)
        self._hard_state = hs

    def sync(self) -> None:
        self._wal.sync()

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {index} is not newer than the one at {self._snapshot.meta.index}"
            )
        if index > self.last_index():
            raise UnavailableError(f"snapshot index {index} is beyond last {self.last_index()}")
        if index > self._hard_state.commit:
            raise ValueError(f"snapshot index {index} is beyond commit {self._hard_state.commit}")
        snap = Snapshot(SnapshotMeta(index=index, term=self.term(index), conf=conf), data)
        # Records written before this call become durable before the
        # snapshot file does, so recovery never sees them reordered.
        self._wal.sync()
        self._snapshots.save(snap)
        self._snapshots_written += 1
        self._snapshot = snap
        self._snapshots.prune()
        return snap

    def apply_snapshot(self, snap: Snapshot) -> None:
        if snap.meta.index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {snap.meta.index} is not newer than the one at {self._snapshot.meta.index}"
            )
        # Order matters: earlier records are durable before the snapshot file,
        # the snapshot file before the WAL says the log was replaced, and the
        # new segment before the old segments (now meaningless) are deleted.
        self._wal.sync()
        self._snapshots.save(snap)
        self._snapshots_written += 1
        self._snapshot = snap
        self._entries = [Entry(term=snap.meta.term, index=snap.meta.index)]
        preamble = []
        if self._hard_state != HardState():
            preamble.append((RecordType.HARD_STATE, encode_hard_state(self._hard_state)))
        preamble.append((RecordType.SNAPSHOT, encode_snapshot_marker(snap.meta.index, snap.meta.term)))
        seq = self._wal.cut(snap.meta.index + 1, preamble)
        self._segment_max_index = {seq: snap.meta.index}
        for name in self._wal.remove_segments_through(seq - 1):
            self._segment_max_index.pop(parse_segment_name(name)[0], None)  # type: ignore[index]
        self._snapshots.prune()

    def compact(self, index: int) -> None:
        """Discard entries before `index`; afterwards first_index() == index
        (as MemoryStorage). Also deletes the whole segments that only held
        entries below `index`."""
        if self._discard_before(index):
            self._remove_segments_below(index)

    def _remove_segments_below(self, index: int) -> None:
        """Delete the oldest segments whose entries all lie below `index`
        (covered by the snapshot). Never the current segment; the hard state
        survives because every segment starts with a copy of it."""
        current = self._wal.current_segment().seq
        removable = -1
        for seg in self._wal.segments():
            if seg.seq == current or self._segment_max_index.get(seg.seq, 0) >= index:
                break
            removable = seg.seq
        for name in self._wal.remove_segments_through(removable):
            self._segment_max_index.pop(parse_segment_name(name)[0], None)  # type: ignore[index]

    # -- introspection -------------------------------------------------------

    def close(self) -> None:
        self._wal.close()

    def statistics(self) -> StorageStatistics:
        w = self._wal.statistics()
        return StorageStatistics(
            bytes_written=w.bytes_written,
            records_appended=w.records_appended,
            syncs=w.syncs,
            segments_created=w.segments_created,
            segments_removed=w.segments_removed,
            segment_count=w.segment_count,
            snapshots_written=self._snapshots_written,
            first_index=self.first_index(),
            last_index=self.last_index(),
        )

    def assert_invariants(self) -> None:
        self._wal.assert_invariants()
        dummy = self._entries[0]
        for i, e in enumerate(self._entries):
            assert e.index == dummy.index + i, f"log not contiguous at position {i}: {e.index}"
        for prev, nxt in zip(self._entries, self._entries[1:]):
            assert nxt.term >= prev.term, f"terms go backwards at {nxt.index}"
        assert dummy.index >= 0
        assert self._snapshot.meta.index >= dummy.index, "compacted beyond the snapshot"
        seqs = {s.seq for s in self._wal.segments()}
        assert set(self._segment_max_index) == seqs, (
            f"segment bookkeeping {sorted(self._segment_max_index)} vs {sorted(seqs)}"
        )
