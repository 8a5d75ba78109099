"""RawNode: the whole public API of the Raft core (etcd-io/raft rawnode.go).

The shell drives it: `tick()` on a timer, `step()` for every message off the
network, proposals from clients, and a loop of
`if has_ready(): rd = ready(); <persist, send, apply>; advance(rd)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .core import Config, NotLeaderError, ProposalDroppedError, Raft
from .progress import ProgressState
from .storage import Storage
from .types import ConfChange, ConfState, Message, MessageType, Ready, Role

__all__ = ["Config", "NotLeaderError", "PeerProgress", "ProposalDroppedError", "RawNode", "Status"]

_LOCAL_ONLY = (MessageType.HUP, MessageType.BEAT)


@dataclass(frozen=True, slots=True)
class PeerProgress:
    match: int
    next: int
    state: ProgressState


@dataclass(frozen=True, slots=True)
class Status:
    id: int
    role: Role
    term: int
    vote: int
    leader: int
    commit: int
    applied: int
    last_index: int
    conf: ConfState
    lease_valid: bool
    # Only on the leader: its view of every voter (itself included).
    progress: dict[int, PeerProgress] = field(default_factory=dict)


class RawNode:
    def __init__(self, config: Config, storage: Storage, rng: Any) -> None:
        self._raft = Raft(config, storage, rng)
        self._prev_hard_state = self._raft.hard_state()
        self._prev_soft_state = self._raft.soft_state()
        self._outstanding: Ready | None = None

    # -- inputs ----------------------------------------------------------------

    def tick(self) -> None:
        self._raft.tick()

    def ticks_until_due(self) -> int:
        """Ticks the shell may let pass before ticking again (see Raft.ticks_until_due)."""
        return self._raft.ticks_until_due()

    def campaign(self) -> None:
        """Start an election now (ignored while a live leader is known: its
        lease counts on our vote)."""
        self._raft.step(Message(type=MessageType.HUP, frm=self._raft.id))

    def step(self, msg: Message) -> None:
        """Feed one network message; misrouted, local-only or stale ones are ignored."""
        if msg.type in _LOCAL_ONLY or msg.to != self._raft.id:
            return
        self._raft.step(msg)

    def propose(self, data: bytes) -> tuple[int, int]:
        return self._raft.propose(data)

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        return self._raft.propose_conf_change(cc)

    def read_index(self, request_ctx: bytes) -> None:
        self._raft.read_index(request_ctx)

    def transfer_leadership(self, target: int) -> None:
        self._raft.transfer_leadership(target)

    def report_unreachable(self, peer: int) -> None:
        self._raft.report_unreachable(peer)

    # -- queries -----------------------------------------------------------------

    def lease_valid(self) -> bool:
        return self._raft.lease_valid()

    def lease_expiry_tick(self) -> int | None:
        """The node-local tick (see `now_tick`) at which the lease ends."""
        return self._raft.lease_expiry_tick()

    @property
    def now_tick(self) -> int:
        return self._raft.now_tick

    def conf_state_at(self, index: int) -> ConfState:
        """Membership as of `index` (>= the last applied snapshot or conf
        change): what the shell passes to `create_snapshot(index, ...)`."""
        return self._raft.conf_state_at(index)

    def status(self) -> Status:
        r = self._raft
        progress = {}
        if r.role == Role.LEADER:
            progress = {
                pid: PeerProgress(pr.match, pr.next, pr.state) for pid, pr in sorted(r.prs.items())
            }
        return Status(
            id=r.id,
            role=r.role,
            term=r.term,
            vote=r.vote,
            leader=r.lead,
            commit=r.log.committed,
            applied=r.log.applied,
            last_index=r.log.last_index(),
            conf=r.conf,
            lease_valid=r.lease_valid(),
            progress=progress,
        )

    # -- Ready ---------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether `ready()` has work. False while a Ready is outstanding."""
        if self._outstanding is not None:
            return False
        r = self._raft
        r.flush()
        u = r.log.unstable
        return bool(
            r.msgs
            or r.read_states
            or self._state_changed()
            or u.next_snapshot() is not None
            or u.offset_in_progress < u.offset + len(u.entries)
            or r.log.has_next_committed_entries()
        )

    def _state_changed(self) -> bool:
        """Whether soft or hard state moved since the last Ready, compared
        field by field: this runs several times per message, and building the
        two state objects just to compare them was a visible share of it."""
        r, ss, hs = self._raft, self._prev_soft_state, self._prev_hard_state
        return (r.lead != ss.leader or r.role != ss.role or r.term != hs.term
                or r.vote != hs.vote or r.log.committed != hs.commit)

    def ready(self) -> Ready:
        """What to persist, send and apply; hand it back to `advance()`."""
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance() of the previous Ready")
        r = self._raft
        r.flush()
        log = r.log
        rd = Ready()
        ss = r.soft_state()
        if ss != self._prev_soft_state:
            rd.soft_state = ss
            self._prev_soft_state = ss
        hs = r.hard_state()
        prev = self._prev_hard_state
        if hs != prev:
            rd.hard_state = hs
            self._prev_hard_state = hs
        rd.entries = log.unstable.next_entries()
        rd.snapshot = log.unstable.next_snapshot()
        rd.committed_entries = log.next_committed_entries()
        rd.messages, r.msgs = r.msgs, []
        rd.read_states, r.read_states = r.read_states, []
        rd.must_sync = (
            bool(rd.entries)
            or rd.snapshot is not None
            or hs.term != prev.term
            or hs.vote != prev.vote
        )
        log.unstable.accept_in_progress()
        if rd.committed_entries:
            log.applying = rd.committed_entries[-1].index
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The shell has persisted, sent and applied `rd`."""
        if rd is not self._outstanding:
            raise RuntimeError("advance() must get the Ready returned by the last ready()")
        self._outstanding = None
        r = self._raft
        log = r.log
        if rd.snapshot is not None:
            log.unstable.stable_snap_to(rd.snapshot.meta.index)
            log.applied_to(rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            log.unstable.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
        r.on_persisted()
        r.prune_conf_history()

    def assert_invariants(self) -> None:
        self._raft.assert_invariants()
        hs = self._raft.hard_state()
        assert hs.term >= self._prev_hard_state.term
        assert hs.commit >= self._prev_hard_state.commit
