"""The leader's view of one follower: how far it matches, what is in flight.

States (etcd-io/raft's design.md):
- PROBE: the leader does not know where the follower's log diverges; it
  sends one APPEND per heartbeat interval and waits for the answer.
- REPLICATE: the follower is known to match up to `match`; the leader
  streams entries optimistically (advancing `next` on send), bounded by the
  in-flight window.
- SNAPSHOT: the follower needs entries that were compacted away; the leader
  streams snapshot chunks and sends no entries until the snapshot is in.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .types import Snapshot


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """Bounded FIFO of (last index, send tick) of each unacknowledged APPEND."""

    __slots__ = ("capacity", "_last_indexes", "_send_ticks")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"inflight capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._last_indexes: deque[int] = deque()
        self._send_ticks: deque[int] = deque()

    def add(self, last_index: int, send_tick: int = 0) -> None:
        if self.full():
            raise OverflowError("inflight window is full")
        if self._last_indexes and last_index < self._last_indexes[-1]:
            raise ValueError("inflight indexes must not decrease")
        self._last_indexes.append(last_index)
        self._send_ticks.append(send_tick)

    def free_le(self, index: int) -> None:
        """An ack up to `index` frees every message ending at or before it."""
        q = self._last_indexes
        while q and q[0] <= index:
            q.popleft()
            self._send_ticks.popleft()

    def oldest_send_tick(self) -> int | None:
        return self._send_ticks[0] if self._send_ticks else None

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def count(self) -> int:
        return len(self._last_indexes)

    def reset(self) -> None:
        self._last_indexes.clear()
        self._send_ticks.clear()


@dataclass(slots=True)
class SnapshotTransfer:
    """A snapshot being streamed to one follower in chunks (stop-and-wait)."""

    snapshot: Snapshot
    offset: int = 0  # bytes the follower has acknowledged
    chunk_sent: bool = False  # a chunk is outstanding; wait for its answer


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "pending_snapshot",
        "transfer",
        "inflights",
        "last_heard_tick",
        "lease_ack_tick",
    )

    def __init__(self, next_index: int, max_inflight: int, now_tick: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        # PROBE: an APPEND is outstanding, wait for its answer or a heartbeat.
        self.probe_sent = False
        # SNAPSHOT: index of the snapshot being sent.
        self.pending_snapshot = 0
        self.transfer: SnapshotTransfer | None = None
        self.inflights = Inflights(max_inflight)
        # For check-quorum: when (leader ticks) we last heard anything.
        self.last_heard_tick = now_tick
        # For the lease: the largest leader send tick echoed back this term
        # (-1: none yet).
        self.lease_ack_tick = -1

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.transfer = None
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            # The snapshot (if it arrived) covers everything up to it.
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot.meta.index
        self.transfer = SnapshotTransfer(snapshot)

    def maybe_update(self, index: int) -> bool:
        """Record an acknowledgement up to `index`; False if it was stale."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        if self.next < index + 1:
            self.next = index + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an APPEND whose previous index was `rejected`.

        `match_hint` is the leader's best guess of the last index that can
        match (from the follower's reject_hint/log_term). Returns False if
        the rejection is stale (answers an older APPEND).
        """
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        """Whether the leader should hold back new APPENDs to this follower."""
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def sent_entries(self, last_index: int | None, now_tick: int = 0) -> None:
        """Book an APPEND just sent; `last_index` None if it had no entries."""
        if self.state == ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.add(last_index, now_tick)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def assert_invariants(self) -> None:
        assert self.match < self.next, (self.match, self.next)
        if self.state == ProgressState.SNAPSHOT:
            assert self.transfer is not None
            assert self.pending_snapshot == self.transfer.snapshot.meta.index
        else:
            assert self.transfer is None
        if self.state != ProgressState.REPLICATE:
            assert self.inflights.count() == 0

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.name}, "
            f"inflight={self.inflights.count()})"
        )
