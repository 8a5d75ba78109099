"""Raft white-box checkers and the durability checker on hand-made traces."""

from __future__ import annotations

import pytest

from chubbyfs.raft.storage import CompactedError, UnavailableError
from chubbyfs.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from chubbyfs.sim.checkers.durability import AckedWrite, ReplicaView, check_durability
from chubbyfs.sim.checkers.raft_invariants import InvariantViolation, RaftInvariantChecker


class FakeStorage:
    """A read-only log: entries first..last plus a snapshot below them."""

    def __init__(self, entries: list[Entry], hs: HardState = HardState(), snap_index: int = 0, snap_term: int = 0):
        self._entries = entries
        self._hs = hs
        self._snap = Snapshot(SnapshotMeta(snap_index, snap_term, ConfState((1, 2, 3))))

    def initial_state(self):
        return self._hs, ConfState((1, 2, 3))

    def first_index(self) -> int:
        return self._snap.meta.index + 1

    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self._snap.meta.index

    def term(self, index: int) -> int:
        if index == self._snap.meta.index:
            return self._snap.meta.term
        if index < self.first_index():
            raise CompactedError(index)
        if index > self.last_index():
            raise UnavailableError(index)
        return self._entries[index - self.first_index()].term

    def entries(self, lo: int, hi: int, max_bytes=None):
        if lo < self.first_index():
            raise CompactedError(lo)
        return self._entries[lo - self.first_index(): hi - self.first_index()]

    def snapshot(self) -> Snapshot:
        return self._snap


def log(*terms_and_data: tuple[int, bytes], start: int = 1) -> list[Entry]:
    return [Entry(term=t, index=start + i, data=d) for i, (t, d) in enumerate(terms_and_data)]


def started(*nodes: int) -> RaftInvariantChecker:
    c = RaftInvariantChecker()
    for n in nodes:
        c.on_start(n, 0, FakeStorage([]))
    return c


def test_clean_trace_has_no_violations() -> None:
    c = started(1, 2)
    c.on_event(1, 0, "hard_state", {"term": 2, "vote": 1, "commit": 0})
    c.on_event(2, 0, "hard_state", {"term": 2, "vote": 1, "commit": 0})
    c.on_event(1, 0, "role", {"role": "leader", "term": 2, "leader": 1})
    for n in (1, 2):
        c.on_event(n, 0, "apply", {"index": 1, "term": 2, "data": b"a"})
        c.on_event(n, 0, "apply", {"index": 2, "term": 2, "data": b"b"})
    c.check_leader_logs({1: (0, FakeStorage(log((2, b"a"), (2, b"b"))))})
    c.check_logs({1: (FakeStorage(log((2, b"a"), (2, b"b"))), 2), 2: (FakeStorage(log((2, b"a"))), 1)})
    c.assert_ok()
    assert c.elections == 1


def test_two_leaders_in_one_term() -> None:
    c = started(1, 2)
    c.on_event(1, 0, "role", {"role": "leader", "term": 3, "leader": 1})
    c.on_event(2, 0, "role", {"role": "leader", "term": 3, "leader": 2})
    with pytest.raises(InvariantViolation, match="election safety"):
        c.assert_ok()


def test_different_entries_applied_at_the_same_index() -> None:
    c = started(1, 2)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    c.on_event(2, 0, "apply", {"index": 1, "term": 1, "data": b"b"})
    with pytest.raises(InvariantViolation, match="state machine safety"):
        c.assert_ok()


def test_reapply_after_restart_must_match() -> None:
    c = started(1)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    c.on_start(1, 1, FakeStorage([]))
    c.on_event(1, 1, "apply", {"index": 1, "term": 2, "data": b"z"})
    assert any("state machine safety" in v for v in c.violations)


def test_gap_in_applies() -> None:
    c = started(1)
    c.on_event(1, 0, "apply", {"index": 2, "term": 1, "data": b"a"})
    assert any("applied index 2 right after 0" in v for v in c.violations)


def test_restore_must_agree_with_applied_terms_and_not_go_back() -> None:
    c = started(1, 2)
    for i in (1, 2, 3):
        c.on_event(1, 0, "apply", {"index": i, "term": 1, "data": b"x"})
    c.on_event(2, 0, "restore", {"index": 2, "term": 1})
    c.assert_ok()
    c.on_event(2, 0, "restore", {"index": 3, "term": 5})
    assert any("restored a snapshot" in v for v in c.violations)
    c.on_event(1, 0, "restore", {"index": 1, "term": 1})
    assert any("behind its applied" in v for v in c.violations)


def test_double_vote_across_restart() -> None:
    c = started(1)
    c.on_event(1, 0, "hard_state", {"term": 4, "vote": 2, "commit": 0})
    # The disk "lost" the vote: restart at term 4 with no vote, then vote again.
    c.on_start(1, 1, FakeStorage([], HardState(term=4, vote=0)))
    c.on_event(1, 1, "hard_state", {"term": 4, "vote": 3, "commit": 0})
    with pytest.raises(InvariantViolation, match="voted for 2 and then 3 in term 4"):
        c.assert_ok()


def test_persisted_term_going_back_is_caught() -> None:
    c = started(1)
    c.on_event(1, 0, "hard_state", {"term": 7, "vote": 1, "commit": 0})
    c.on_start(1, 1, FakeStorage([], HardState(term=5, vote=1)))
    assert any("restarted with persisted term 5" in v for v in c.violations)
    c.on_event(1, 1, "hard_state", {"term": 4, "vote": 1, "commit": 0})
    assert any("persisted term 4 after term 7" in v for v in c.violations)


def test_events_of_a_stale_incarnation_are_ignored() -> None:
    c = started(1)
    c.on_start(1, 1, FakeStorage([]))
    c.on_event(1, 0, "apply", {"index": 9, "term": 1, "data": b"a"})
    c.assert_ok()


def test_leader_missing_a_committed_entry() -> None:
    c = started(1, 2)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    c.on_event(1, 0, "apply", {"index": 2, "term": 1, "data": b"b"})
    c.on_event(2, 0, "role", {"role": "leader", "term": 2, "leader": 2})
    c.check_leader_logs({2: (0, FakeStorage(log((1, b"a"))))})
    with pytest.raises(InvariantViolation, match="lacks committed index 2"):
        c.assert_ok()


def test_leader_with_a_different_committed_entry() -> None:
    c = started(1, 2)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    c.on_event(2, 0, "role", {"role": "leader", "term": 3, "leader": 2})
    c.check_leader_logs({2: (0, FakeStorage(log((2, b"q"))))})
    assert any("different entry at committed index 1" in v for v in c.violations)


def test_leader_check_skips_compacted_entries_and_crashed_leaders() -> None:
    c = started(1, 2, 3)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    c.on_event(2, 0, "role", {"role": "leader", "term": 2, "leader": 2})
    c.on_event(3, 0, "role", {"role": "leader", "term": 3, "leader": 3})
    c.check_leader_logs({2: (0, FakeStorage([], snap_index=1, snap_term=1)), 3: (1, FakeStorage([]))})
    c.assert_ok()


def test_stored_log_disagreeing_with_applied_entries() -> None:
    c = started(1)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"a"})
    # Above its own commit index a lagging replica may hold a replaced entry...
    c.check_logs({2: (FakeStorage(log((1, b"other"))), 0)})
    c.assert_ok()
    # ...at or below it, never.
    c.check_logs({2: (FakeStorage(log((1, b"other"))), 1)})
    with pytest.raises(InvariantViolation, match="log matching"):
        c.assert_ok()


def test_durability_accepts_surviving_writes() -> None:
    c = started(1)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"w1"})
    c.on_event(1, 0, "apply", {"index": 2, "term": 1, "data": b"w2"})
    applied = c.applied
    acked = [AckedWrite(1, b"w1", "put k=1"), AckedWrite(2, b"w2", "put k=2")]
    replicas = [
        ReplicaView(1, 2, FakeStorage(log((1, b"w1"), (1, b"w2")))),
        ReplicaView(2, 2, FakeStorage(log((1, b"w2"), start=2), snap_index=1, snap_term=1)),
    ]
    assert check_durability(acked, applied, replicas) == []


def test_durability_reports_each_kind_of_loss() -> None:
    c = started(1)
    c.on_event(1, 0, "apply", {"index": 1, "term": 1, "data": b"w1"})
    acked = [AckedWrite(1, b"w1", "put k=1"), AckedWrite(2, b"w2", "put k=2")]
    replicas = [
        ReplicaView(1, 1, FakeStorage(log((1, b"w1")))),
        ReplicaView(2, 0, FakeStorage([])),
        ReplicaView(3, 5, FakeStorage(log((2, b"zz")))),
        ReplicaView(4, 5, FakeStorage([])),
    ]
    problems = check_durability(acked, c.applied, replicas)
    text = "\n".join(problems)
    assert "put k=2 at index 2 is not the entry applied there" in text
    assert "node 2 applied only 0" in text
    assert "node 3 holds a different entry" in text
    assert "node 4 lost acked put k=1" in text
