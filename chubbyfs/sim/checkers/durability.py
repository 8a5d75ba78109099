"""Durability: every acknowledged write survives in the final cell state.

A write acknowledged to a client reports the log index it was applied at
(KVStateMachine returns it as the version). At the end of a run, after the
liveness phase has let every live replica catch up, each such write must be
the entry applied at its index, and every live replica must have applied
past it and still hold it (in its log, or covered by its snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...raft.storage import Storage
from .raft_invariants import data_digest


@dataclass(frozen=True, slots=True)
class AckedWrite:
    index: int
    data: bytes
    description: str


@dataclass(frozen=True, slots=True)
class ReplicaView:
    node_id: int
    applied: int
    storage: Storage


def check_durability(
    acked: list[AckedWrite],
    applied: dict[int, tuple[int, str]],
    replicas: list[ReplicaView],
) -> list[str]:
    """Return one message per lost or altered acknowledged write."""
    problems: list[str] = []
    for write in acked:
        digest = data_digest(write.data)
        known = applied.get(write.index)
        if known is None or known[1] != digest:
            problems.append(f"acked {write.description} at index {write.index} is not the entry applied there")
            continue
        for replica in replicas:
            problem = _check_replica(write, digest, replica)
            if problem:
                problems.append(problem)
    return problems


def _check_replica(write: AckedWrite, digest: str, replica: ReplicaView) -> str | None:
    storage = replica.storage
    if replica.applied < write.index:
        return f"node {replica.node_id} applied only {replica.applied}, not acked index {write.index}"
    if write.index < storage.first_index():
        if storage.snapshot().meta.index < write.index:
            return f"node {replica.node_id} compacted acked index {write.index} without a snapshot"
        return None
    if write.index > storage.last_index():
        return f"node {replica.node_id} lost acked {write.description} at index {write.index}"
    entry = storage.entries(write.index, write.index + 1)[0]
    if data_digest(entry.data) != digest:
        return f"node {replica.node_id} holds a different entry at acked index {write.index}"
    return None
