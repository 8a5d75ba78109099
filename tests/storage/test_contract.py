"""The Storage contract, run against MemoryStorage and DiskStorage alike."""

from __future__ import annotations

import pytest

from chubbyfs.raft.confchange import encode_conf_change
from chubbyfs.raft.memory_storage import MemoryStorage
from chubbyfs.raft.storage import CompactedError, SnapshotOutOfDateError, UnavailableError
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
from chubbyfs.storage.fs import RealFS
from chubbyfs.storage.raft_storage import DiskStorage


@pytest.fixture(params=["memory", "disk-sim", "disk-real", "disk-sim-tiny-segments"])
def storage(request, tmp_path):
    if request.param == "memory":
        yield MemoryStorage()
        return
    if request.param == "disk-real":
        st = DiskStorage.open(RealFS(), str(tmp_path / "raft"))
    elif request.param == "disk-sim":
        st = DiskStorage.open(SimFS(), "/raft")
    else:
        st = DiskStorage.open(SimFS(), "/raft", segment_bytes_max=128)
    yield st
    st.assert_invariants()
    st.close()


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term=term, index=i, data=f"e{i}".encode()) for i in range(lo, hi)]


def conf_entry(index: int, term: int, kind: ConfChangeType, node: int) -> Entry:
    return Entry(term=term, index=index, type=EntryType.CONF_CHANGE,
                 data=encode_conf_change(ConfChange(kind, node)))


def fill(st, n: int = 10, term: int = 1, commit: int | None = None) -> None:
    st.append(ents(1, n + 1, term))
    st.set_hard_state(HardState(term=term, vote=1, commit=n if commit is None else commit))
    st.sync()


def test_empty(storage):
    assert storage.first_index() == 1 and storage.last_index() == 0
    assert storage.term(0) == 0
    assert storage.entries(1, 1) == []
    assert storage.initial_state() == (HardState(), ConfState())
    assert storage.snapshot().is_empty()
    with pytest.raises(UnavailableError):
        storage.term(1)
    with pytest.raises(UnavailableError):
        storage.entries(1, 2)


def test_append_and_read(storage):
    fill(storage)
    assert storage.last_index() == 10
    assert storage.entries(3, 6) == ents(3, 6)
    assert storage.entries(5, 5) == []
    assert storage.term(10) == 1
    assert storage.entries(1, 11) == ents(1, 11)


def test_entries_max_bytes_returns_at_least_one(storage):
    fill(storage)
    one = ents(1, 2)[0].size()
    assert storage.entries(1, 11, max_bytes=0) == ents(1, 2)
    assert storage.entries(1, 11, max_bytes=one * 3) == ents(1, 4)
    assert storage.entries(1, 11, max_bytes=one * 3 + 1) == ents(1, 4)
    assert storage.entries(1, 11, max_bytes=10**9) == ents(1, 11)


def test_append_overwrites_conflicting_suffix(storage):
    fill(storage)
    storage.append(ents(6, 8, term=2))
    assert storage.last_index() == 7
    assert [storage.term(i) for i in range(1, 8)] == [1] * 5 + [2, 2]
    storage.append(ents(8, 9, term=2))
    assert storage.entries(6, 9) == ents(6, 9, term=2)


def test_append_gap_is_refused(storage):
    fill(storage, 3)
    with pytest.raises(UnavailableError):
        storage.append(ents(6, 7))
    assert storage.last_index() == 3


def test_append_empty_is_a_no_op(storage):
    storage.append([])
    assert storage.last_index() == 0


def test_hard_state(storage):
    storage.set_hard_state(HardState(term=3, vote=2, commit=0))
    storage.sync()
    assert storage.initial_state()[0] == HardState(term=3, vote=2, commit=0)


def test_initial_state_applies_conf_changes_in_log(storage):
    storage.append([
        conf_entry(1, 1, ConfChangeType.ADD_VOTER, 1),
        conf_entry(2, 1, ConfChangeType.ADD_VOTER, 2),
        Entry(term=1, index=3, data=b"x"),
        conf_entry(4, 1, ConfChangeType.ADD_VOTER, 3),
    ])
    assert storage.initial_state()[1] == ConfState((1, 2, 3))
    # A conf change that is overwritten no longer counts.
    storage.append([Entry(term=2, index=4, data=b"y")])
    assert storage.initial_state()[1] == ConfState((1, 2))


def test_create_snapshot(storage):
    fill(storage, 10, commit=8)
    snap = storage.create_snapshot(5, ConfState((1, 2, 3)), b"state")
    assert snap.meta == SnapshotMeta(index=5, term=1, conf=ConfState((1, 2, 3)))
    assert storage.snapshot() == snap
    with pytest.raises(SnapshotOutOfDateError):
        storage.create_snapshot(5, ConfState((1,)), b"")
    with pytest.raises(ValueError):
        storage.create_snapshot(9, ConfState((1,)), b"")  # beyond commit
    with pytest.raises(UnavailableError):
        storage.create_snapshot(11, ConfState((1,)), b"")
    assert storage.first_index() == 1  # creating a snapshot compacts nothing


def test_compact(storage):
    fill(storage)
    storage.create_snapshot(7, ConfState((1,)), b"s")
    storage.compact(5)
    assert storage.first_index() == 5 and storage.last_index() == 10
    assert storage.term(4) == 1
    with pytest.raises(CompactedError):
        storage.term(3)
    with pytest.raises(CompactedError):
        storage.entries(4, 6)
    assert storage.entries(5, 11) == ents(5, 11)
    storage.compact(3)  # already compacted: nothing to do
    assert storage.first_index() == 5
    with pytest.raises(ValueError):
        storage.compact(9)  # the snapshot only covers 7
    storage.compact(8)
    assert storage.first_index() == 8


def test_append_over_compacted_prefix(storage):
    fill(storage)
    storage.create_snapshot(6, ConfState((1,)), b"s")
    storage.compact(7)
    storage.append(ents(2, 5))  # wholly compacted: ignored
    assert storage.last_index() == 10
    storage.append(ents(4, 9, term=2))  # partly compacted: 7 and 8 remain
    assert storage.first_index() == 7 and storage.last_index() == 8
    assert storage.term(7) == 2 and storage.term(6) == 1


def test_apply_snapshot(storage):
    fill(storage, 5)
    snap = Snapshot(SnapshotMeta(index=20, term=3, conf=ConfState((1, 2))), b"big")
    storage.apply_snapshot(snap)
    storage.sync()
    assert storage.snapshot() == snap
    assert storage.first_index() == 21 and storage.last_index() == 20
    assert storage.term(20) == 3
    assert storage.initial_state()[1] == ConfState((1, 2))
    with pytest.raises(CompactedError):
        storage.entries(5, 6)
    with pytest.raises(SnapshotOutOfDateError):
        storage.apply_snapshot(Snapshot(SnapshotMeta(index=20, term=3), b""))
    storage.append(ents(21, 23, term=3))
    assert storage.entries(21, 23) == ents(21, 23, term=3)


def test_conf_changes_below_the_snapshot_are_not_applied_twice(storage):
    storage.append([conf_entry(1, 1, ConfChangeType.ADD_VOTER, 1),
                    conf_entry(2, 1, ConfChangeType.ADD_VOTER, 2),
                    conf_entry(3, 1, ConfChangeType.ADD_VOTER, 3)])
    storage.set_hard_state(HardState(term=1, commit=3))
    storage.create_snapshot(2, ConfState((1, 2)), b"")
    assert storage.initial_state()[1] == ConfState((1, 2, 3))
