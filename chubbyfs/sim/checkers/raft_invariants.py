"""White-box Raft safety checks over the replicas' trace events.

The simulator feeds every `RaftNode` trace event here, tagged with the node
and its incarnation (bumped on every restart), and calls `check_leader_log`
and `check_logs` with read access to the replicas' storage. Checked:

- Election Safety: at most one leader per term.
- No double vote: a replica's persisted vote for a term never changes,
  including across restarts (so a persisted HardState that is lost, e.g.
  by a lying fsync, shows up).
- Persisted term never goes backwards across a restart.
- State Machine Safety: every replica that applies index i applies the same
  (term, data), on every incarnation; applies are contiguous per incarnation.
- Leader Completeness: every entry applied anywhere before a node became
  leader is in that leader's log.
- Log Matching (committed prefix): at the end, every pair of replicas agrees
  on every committed index both still hold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ...raft.storage import Storage, StorageError


class InvariantViolation(AssertionError):
    """A safety property of the replicated log was broken."""


def data_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(slots=True)
class _Incarnation:
    node_id: int
    number: int
    last_applied: int


class RaftInvariantChecker:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.leader_of_term: dict[int, int] = {}
        self.applied: dict[int, tuple[int, str]] = {}  # index -> (term, digest)
        self._applied_order: list[int] = []  # indices in first-applied order
        self._votes: dict[tuple[int, int], int] = {}  # (node, term) -> vote
        self._term_of: dict[int, int] = {}  # node -> last persisted term
        self._incarnations: dict[int, _Incarnation] = {}
        self._pending_leader_checks: list[tuple[int, int, int, int]] = []  # node, incarnation, term, known
        self.elections = 0

    # ---- feeding ---------------------------------------------------------------

    def _violate(self, message: str) -> None:
        self.violations.append(message)

    def on_start(self, node_id: int, incarnation: int, storage: Storage) -> None:
        """A replica (re)starts on `storage`: check what survived on its disk."""
        hs, _ = storage.initial_state()
        last_term = self._term_of.get(node_id, 0)
        if hs.term < last_term:
            self._violate(
                f"node {node_id} restarted with persisted term {hs.term} < {last_term} it had synced before"
            )
        self._record_vote(node_id, hs.term, hs.vote, "recovered")
        self._term_of[node_id] = max(last_term, hs.term)
        snap_index = storage.snapshot().meta.index
        self._incarnations[node_id] = _Incarnation(node_id, incarnation, snap_index)

    def on_event(self, node_id: int, incarnation: int, kind: str, fields: dict[str, Any]) -> None:
        inc = self._incarnations.get(node_id)
        if inc is None or inc.number != incarnation:
            return  # a stale incarnation's last gasp after a crash: ignore
        if kind == "role":
            if fields["role"] == "leader":
                term = fields["term"]
                self.elections += 1
                other = self.leader_of_term.setdefault(term, node_id)
                if other != node_id:
                    self._violate(f"election safety: nodes {other} and {node_id} both leader in term {term}")
                self._pending_leader_checks.append((node_id, incarnation, term, len(self._applied_order)))
        elif kind == "hard_state":
            term, vote = fields["term"], fields["vote"]
            last_term = self._term_of.get(node_id, 0)
            if term < last_term:
                self._violate(f"node {node_id} persisted term {term} after term {last_term}")
            self._term_of[node_id] = max(last_term, term)
            self._record_vote(node_id, term, vote, "persisted")
        elif kind == "apply":
            index, term = fields["index"], fields["term"]
            self._record_apply(node_id, index, term, data_digest(fields["data"]))
            if index != inc.last_applied + 1:
                self._violate(f"node {node_id} applied index {index} right after {inc.last_applied}")
            inc.last_applied = index
        elif kind == "restore":
            index, term = fields["index"], fields["term"]
            known = self.applied.get(index)
            if known is not None and known[0] != term:
                self._violate(
                    f"node {node_id} restored a snapshot at index {index} term {term}, "
                    f"but index {index} was applied with term {known[0]}"
                )
            if index < inc.last_applied:
                self._violate(f"node {node_id} restored snapshot {index} behind its applied {inc.last_applied}")
            inc.last_applied = index

    def _record_vote(self, node_id: int, term: int, vote: int, how: str) -> None:
        if vote == 0:
            return
        earlier = self._votes.setdefault((node_id, term), vote)
        if earlier != vote:
            self._violate(f"node {node_id} voted for {earlier} and then {vote} in term {term} ({how})")

    def _record_apply(self, node_id: int, index: int, term: int, digest: str) -> None:
        known = self.applied.get(index)
        if known is None:
            self.applied[index] = (term, digest)
            self._applied_order.append(index)
        elif known != (term, digest):
            self._violate(
                f"state machine safety: node {node_id} applied index {index} as term {term} "
                f"data {digest}, another replica applied term {known[0]} data {known[1]}"
            )

    # ---- storage inspection ----------------------------------------------------

    def check_leader_logs(self, storages: dict[int, tuple[int, Storage]]) -> None:
        """Leader Completeness for every election seen since the last call.

        `storages` maps node -> (incarnation, storage). Call this between
        scheduler steps, never in the middle of a replica's Ready handling
        (the shell persists a Ready's entries before it yields).
        """
        pending, self._pending_leader_checks = self._pending_leader_checks, []
        for node_id, incarnation, term, known_count in pending:
            current = storages.get(node_id)
            if current is None or current[0] != incarnation:
                continue  # crashed since; its disk is checked on restart
            storage = current[1]
            first, last = storage.first_index(), storage.last_index()
            for index in self._applied_order[:known_count]:
                entry_term = self.applied[index][0]
                if entry_term >= term or index < first:
                    continue  # not from an earlier term, or compacted into a snapshot
                if index > last:
                    self._violate(
                        f"leader completeness: leader {node_id} of term {term} lacks committed index {index}"
                    )
                    break
                if self._term_at(storage, index) != entry_term:
                    self._violate(
                        f"leader completeness: leader {node_id} of term {term} has a different entry "
                        f"at committed index {index}"
                    )
                    break

    @staticmethod
    def _term_at(storage: Storage, index: int) -> int | None:
        try:
            return storage.term(index)
        except StorageError:
            return None

    def check_logs(self, storages: dict[int, tuple[Storage, int]]) -> None:
        """Every entry a replica stores at or below its own commit index
        matches what was applied there. (Above its commit index a lagging
        replica may legally still hold an entry that another leader's
        entry replaced.) `storages` maps node -> (storage, commit index)."""
        for node_id in sorted(storages):
            storage, commit = storages[node_id]
            first, last = storage.first_index(), min(storage.last_index(), commit)
            indices = [i for i in self.applied if first <= i <= last]
            if not indices:
                continue
            lo, hi = min(indices), max(indices)
            entries = storage.entries(lo, hi + 1)
            for entry in entries:
                known = self.applied.get(entry.index)
                if known is not None and known != (entry.term, data_digest(entry.data)):
                    self._violate(
                        f"log matching: node {node_id} stores index {entry.index} term {entry.term} "
                        f"but term {known[0]} was applied there"
                    )
                    break

    def assert_ok(self) -> None:
        if self.violations:
            raise InvariantViolation("; ".join(self.violations[:5]))
