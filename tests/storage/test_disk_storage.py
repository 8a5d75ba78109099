"""DiskStorage beyond the shared contract: what survives a restart."""

from __future__ import annotations

import random

import pytest

from chubbyfs.raft.confchange import encode_conf_change
from chubbyfs.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from chubbyfs.sim.disk import SimFS
from chubbyfs.storage.raft_storage import DiskStorage, decode_entries, encode_entries
from chubbyfs.storage.snapshot import snapshot_name
from chubbyfs.storage.wal import WalCorruptionError, parse_segment_name

from .helpers import flip_bit, make_fs

D = "/raft"


def ents(lo: int, hi: int, term: int = 1, size: int = 30) -> list[Entry]:
    return [Entry(term=term, index=i, data=bytes([i % 256]) * size) for i in range(lo, hi)]


def reopen(fs, st: DiskStorage | None = None, **kw) -> DiskStorage:
    if st is not None:
        st.close()
    fresh = DiskStorage.open(fs, D, **kw)
    fresh.assert_invariants()
    return fresh


def append_in_batches(st: DiskStorage, lo: int, hi: int, term: int = 1, batch: int = 3) -> None:
    for start in range(lo, hi, batch):
        st.append(ents(start, min(start + batch, hi), term))
        st.sync()


def segments(fs) -> list[str]:
    return [n for n in fs.listdir(D) if parse_segment_name(n)]


def test_entry_codec_round_trip():
    batch = ents(5, 9, term=3) + [Entry(term=3, index=9, type=EntryType.CONF_CHANGE, data=b"cc")]
    assert decode_entries(encode_entries(batch)) == batch


@pytest.mark.parametrize("kind", ["sim", "real"])
def test_log_hard_state_and_conf_survive_restart(kind, tmp_path):
    fs, d = make_fs(kind, tmp_path)
    path = d + "/raft"
    st = DiskStorage.open(fs, path)
    cc = [Entry(term=1, index=i, type=EntryType.CONF_CHANGE,
                data=encode_conf_change(ConfChange(ConfChangeType.ADD_VOTER, i))) for i in (1, 2, 3)]
    st.append(cc + ents(4, 10))
    st.set_hard_state(HardState(term=1, vote=2, commit=9))
    st.sync()
    st.close()
    st = DiskStorage.open(fs, path)
    assert st.initial_state() == (HardState(term=1, vote=2, commit=9), ConfState((1, 2, 3)))
    assert st.entries(1, 10) == cc + ents(4, 10)
    assert st.recovery.wal.torn_tail is None and not st.recovery.wal.created


def test_overwrite_is_durable_across_segments():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=200)
    append_in_batches(st, 1, 20)
    st.append(ents(8, 11, term=2))
    st.sync()
    assert len(segments(fs)) > 2
    st = reopen(fs, st, segment_bytes_max=200)
    assert st.last_index() == 10
    assert st.entries(1, 11) == ents(1, 8) + ents(8, 11, term=2)


def test_snapshot_restart_starts_after_it():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    st.append(ents(1, 11))
    st.set_hard_state(HardState(term=1, commit=10))
    st.create_snapshot(6, ConfState((1,)), b"six")
    st.sync()
    st = reopen(fs, st)
    assert st.snapshot() == Snapshot(SnapshotMeta(6, 1, ConfState((1,))), b"six")
    assert st.first_index() == 7 and st.last_index() == 10 and st.term(6) == 1
    assert st.entries(7, 11) == ents(7, 11)
    assert st.recovery.snapshot_name == snapshot_name(6, 1)


def test_apply_snapshot_is_durable_and_discards_the_old_log():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=300)
    append_in_batches(st, 1, 30)  # a long divergent log from a stale term
    assert len(segments(fs)) > 2
    st.set_hard_state(HardState(term=1, vote=1, commit=2))
    st.sync()
    snap = Snapshot(SnapshotMeta(10, 2, ConfState((1, 2))), b"remote")
    st.apply_snapshot(snap)  # no explicit sync: apply_snapshot is durable by itself
    assert len(segments(fs)) == 1  # every older segment is gone
    st.append(ents(11, 13, term=2))
    st.sync()
    fs.crash(random.Random(0))
    st = reopen(fs, segment_bytes_max=300)
    assert st.snapshot() == snap
    assert st.first_index() == 11 and st.last_index() == 12
    assert st.initial_state() == (HardState(term=1, vote=1, commit=2), ConfState((1, 2)))


def test_marker_replays_when_old_segments_were_not_deleted():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=300)
    append_in_batches(st, 1, 30)
    # Keep the old segments by making their removal fail silently: replay
    # must still drop the stale entries 11..29 thanks to the SNAPSHOT record.
    st._wal.remove_segments_through = lambda seq: []
    st.apply_snapshot(Snapshot(SnapshotMeta(10, 2, ConfState((1,))), b""))
    assert len(segments(fs)) > 2
    st.close()
    fs.crash(random.Random(0))
    # The replay itself, without the cleanup at open:
    original = DiskStorage._remove_segments_below
    DiskStorage._remove_segments_below = lambda self, index: None
    try:
        st = reopen(fs, segment_bytes_max=300)
    finally:
        DiskStorage._remove_segments_below = original
    assert st.first_index() == 11 and st.last_index() == 10
    st = reopen(fs, st, segment_bytes_max=300)  # now the obsolete segments go
    assert st.first_index() == 11 and st.last_index() == 10
    assert len(segments(fs)) == 1


def test_compact_deletes_whole_segments_and_keeps_hard_state():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=300)
    st.set_hard_state(HardState(term=5, vote=3, commit=0))  # written once, early
    for lo in range(1, 60, 3):
        st.append(ents(lo, lo + 3, term=5))
        st.sync()
    st.set_hard_state(HardState(term=5, vote=3, commit=50))
    st.sync()
    before = len(segments(fs))
    st.create_snapshot(50, ConfState((1,)), b"s")
    st.compact(45)
    stats = st.statistics()
    assert stats.segments_removed > 0 and len(segments(fs)) == before - stats.segments_removed
    assert stats.first_index == 45
    st = reopen(fs, st, segment_bytes_max=300)
    assert st.initial_state()[0] == HardState(term=5, vote=3, commit=50)
    assert st.first_index() == 51 and st.last_index() == 60


def test_statistics_count_bytes_syncs_segments():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=400)
    base = st.statistics()
    for lo in range(1, 30, 2):
        st.append(ents(lo, lo + 2))
        st.set_hard_state(HardState(term=1, commit=lo))
        st.sync()
    stats = st.statistics()
    assert stats.syncs - base.syncs >= 15
    assert stats.bytes_written > 15 * 2 * 30
    assert stats.records_appended >= 30
    assert stats.segments_created >= 2 and stats.segment_count == len(segments(fs))
    assert (stats.first_index, stats.last_index) == (1, 30)


def test_corruption_refuses_to_start():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    for lo in range(1, 20):
        st.append(ents(lo, lo + 1))
        st.sync()
    st.close()
    flip_bit(fs, f"{D}/{segments(fs)[0]}", 200)
    with pytest.raises(WalCorruptionError, match="followed by a valid record"):
        DiskStorage.open(fs, D)


def test_torn_tail_is_repaired_and_reported():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    st.append(ents(1, 5))
    st.sync()
    st.append(ents(5, 30, size=100))
    st._wal.flush()  # written, never synced: then the power goes
    images = dict(fs.crash_images())
    img = images["torn-keep1-garbage/dirs-applied"]
    st = DiskStorage.open(img, D)
    torn = st.recovery.wal.torn_tail
    assert torn is not None and torn.kind == "garbage"
    assert 4 <= st.last_index() < 29
    assert img.exists(f"{D}/{torn.broken_copy}")
    st.append(ents(st.last_index() + 1, st.last_index() + 2, term=1))
    st.sync()
    assert DiskStorage.open(img, D).recovery.wal.torn_tail is None


def test_missing_snapshot_referenced_by_the_log_refuses():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    st.append(ents(1, 5))
    st.sync()
    st.apply_snapshot(Snapshot(SnapshotMeta(10, 2, ConfState((1,))), b""))
    st.close()
    fs.unlink(f"{D}/{snapshot_name(10, 2)}")
    fs.fsync_dir(D)
    with pytest.raises(WalCorruptionError, match="newest valid snapshot"):
        DiskStorage.open(fs, D)


def test_damaged_snapshot_falls_back_when_the_log_reaches_back():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    st.append(ents(1, 11))
    st.set_hard_state(HardState(term=1, commit=10))
    st.create_snapshot(3, ConfState((1,)), b"three")
    st.create_snapshot(8, ConfState((1,)), b"eight")
    st.close()
    flip_bit(fs, f"{D}/{snapshot_name(8, 1)}", 25)
    st = DiskStorage.open(fs, D)
    assert st.snapshot().data == b"three" and st.first_index() == 4 and st.last_index() == 10
    assert st.recovery.broken_snapshots == (snapshot_name(8, 1),)


def test_damaged_snapshot_refuses_when_the_log_was_compacted():
    fs = SimFS()
    st = DiskStorage.open(fs, D, segment_bytes_max=200)
    append_in_batches(st, 1, 30)
    st.set_hard_state(HardState(term=1, commit=29))
    st.sync()
    st.create_snapshot(25, ConfState((1,)), b"s")
    st.compact(26)
    st.close()
    flip_bit(fs, f"{D}/{snapshot_name(25, 1)}", 25)
    with pytest.raises(WalCorruptionError, match="gap in the log"):
        DiskStorage.open(fs, D, segment_bytes_max=200)


def test_snapshots_without_segments_refuse():
    fs = SimFS()
    st = DiskStorage.open(fs, D)
    st.append(ents(1, 3))
    st.set_hard_state(HardState(term=1, commit=2))
    st.create_snapshot(2, ConfState((1,)), b"")
    st.close()
    for name in segments(fs):
        fs.unlink(f"{D}/{name}")
    with pytest.raises(WalCorruptionError, match="every WAL segment is gone"):
        DiskStorage.open(fs, D)


def test_non_contiguous_append_is_refused():
    st = DiskStorage.open(SimFS(), D)
    with pytest.raises(ValueError, match="not contiguous"):
        st.append([Entry(1, 1), Entry(1, 3)])
    assert st.last_index() == 0


def test_creates_missing_directory_durably():
    fs = SimFS()
    st = DiskStorage.open(fs, "/raft")
    st.append(ents(1, 2))
    st.sync()
    fs.crash(random.Random(0))
    assert DiskStorage.open(fs, "/raft").last_index() == 1


def test_group_commit_through_disk_storage():
    from .helpers import CountingFS

    counting = CountingFS(SimFS())
    st = DiskStorage.open(counting, D)
    counting.calls.clear()
    for i in range(1, 65):
        st.append(ents(i, i + 1))
        st.set_hard_state(HardState(term=1, commit=i - 1))
    st.sync()
    assert counting.calls["file.write"] == 1 and counting.calls["file.fdatasync"] == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1", "undecodable ENTRIES record"),
        (b"\x92\x01\x90", "empty ENTRIES record"),  # msgpack [1, []]
        (encode_entries(ents(5, 6)), "gap in the log"),
    ],
)
def test_logically_bad_records_refuse(payload, message):
    from chubbyfs.storage.wal import RecordType, open_wal

    fs = SimFS()
    fs.mkdir(D)
    wal, _, _ = open_wal(fs, D)
    wal.append(RecordType.ENTRIES, payload)
    wal.sync()
    wal.close()
    with pytest.raises(WalCorruptionError, match=message) as info:
        DiskStorage.open(fs, D)
    assert info.value.offset == 40


def test_undecodable_hard_state_refuses():
    from chubbyfs.storage.wal import RecordType, open_wal

    fs = SimFS()
    fs.mkdir(D)
    wal, _, _ = open_wal(fs, D)
    wal.append(RecordType.HARD_STATE, b"\x91\x01")  # [1]: too short
    wal.sync()
    wal.close()
    with pytest.raises(WalCorruptionError, match="undecodable HARD_STATE"):
        DiskStorage.open(fs, D)
