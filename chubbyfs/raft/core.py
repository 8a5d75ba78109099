"""The Raft state machine: roles, elections, replication, lease, transfer.

Pure and deterministic: every input comes through `step()`, `tick()` or a
proposal method, randomness only from the injected `rng`, time only as
ticks. Outputs accumulate in `msgs` and `read_states`; the log's unstable
tail and commit index tell `RawNode` what to persist and apply.

Shape follows etcd-io/raft (raft.go): `become_*` role transitions, one step
function per role, per-follower `Progress`, pure quorum maths. Differences:
- APPENDs are coalesced: proposals and acks mark followers "to be sent to",
  and `flush()` (called by `RawNode.ready()`) builds at most one stream of
  APPENDs per follower, so N proposals between two Readys make one message.
- Membership changes are single-server and take effect when appended.
- Snapshots travel in offset-checked chunks, accumulated in the core.
- A leader lease (Chubby master lease) built from echoed send ticks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from . import quorum
from .confchange import (
    BOOTSTRAP_TERM,
    apply_change,
    decode_conf_change,
    encode_conf_change,
    revert_change,
)
from .log import InvariantViolation, RaftLog
from .progress import Progress, ProgressState
from .read_index import ReadOnly
from .storage import CompactedError, Storage
from .types import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SoftState,
)

# VOTE context of a campaign started by TIMEOUT_NOW: voters grant it even
# while they believe the current leader is alive (the leader asked for it).
TRANSFER_CONTEXT = b"raft:transfer"

_LEADER_CONTACT = (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT)


class Rng(Protocol):
    def randrange(self, start: int, stop: int) -> int: ...

    def random(self) -> float: ...


class NotLeaderError(Exception):
    """Raised on a non-leader for leader-only requests; `leader` is a hint (0: unknown)."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not the leader (leader hint: {leader or 'unknown'})")
        self.leader = leader


class ProposalDroppedError(Exception):
    """The leader refused the request now (transfer, pending conf change, full queue)."""


@dataclass
class Config:
    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    pre_vote: bool = True
    check_quorum: bool = True
    lease_drift_ticks: int = 2
    snapshot_chunk_bytes: int = 256 * 1024
    applied: int = 0
    # Upper bound on the bytes of committed entries handed out in one Ready.
    max_committed_size_per_ready: int = 64 << 20
    # Upper bound on ReadIndex requests waiting for a heartbeat round.
    max_pending_read_index: int = 4096
    # DELIBERATE BUG, tests and simulator negative controls only: commit
    # entries of earlier terms by counting replicas (Raft paper Figure 8).
    unsafe_commit_previous_term: bool = False

    @property
    def lease_ticks(self) -> int:
        return self.election_tick - self.lease_drift_ticks

    def validate(self) -> None:
        if self.id <= 0:
            raise ValueError(f"id must be positive, got {self.id}")
        if self.heartbeat_tick < 1:
            raise ValueError("heartbeat_tick must be >= 1")
        if self.election_tick <= self.heartbeat_tick:
            raise ValueError("election_tick must be greater than heartbeat_tick")
        # At least one tick of margin is needed for tick-phase differences
        # between nodes (see docs/raft.md, "lease safety").
        if not 1 <= self.lease_drift_ticks < self.election_tick:
            raise ValueError("lease_drift_ticks must be in [1, election_tick)")
        if self.max_size_per_msg < 1:
            raise ValueError("max_size_per_msg must be >= 1")
        if self.max_inflight_msgs < 1:
            raise ValueError("max_inflight_msgs must be >= 1")
        if self.snapshot_chunk_bytes < 1:
            raise ValueError("snapshot_chunk_bytes must be >= 1")
        if self.applied < 0:
            raise ValueError("applied must be >= 0")
        if self.max_committed_size_per_ready < 1 or self.max_pending_read_index < 1:
            raise ValueError("limits must be >= 1")


@dataclass(slots=True)
class _SnapshotReceive:
    key: tuple[int, int, int]  # (leader term, snapshot index, snapshot term)
    buf: bytearray


# At most this many bytes of entries wait in the early-APPEND buffer.
EARLY_APPEND_BYTES_MAX = 16 << 20


def _entries_bytes(m: Message) -> int:
    return sum(len(e.data) for e in m.entries)


class Raft:
    def __init__(self, config: Config, storage: Storage, rng: Any) -> None:
        config.validate()
        self.cfg = config
        self.id = config.id
        self.rng = rng
        self.log = RaftLog(storage, config.max_committed_size_per_ready)
        hs, conf = storage.initial_state()
        self.term = hs.term
        self.vote = hs.vote
        if hs.commit > self.log.last_index():
            raise InvariantViolation(
                f"stored commit {hs.commit} beyond last index {self.log.last_index()}"
            )
        self.log.commit_to(hs.commit)
        if config.applied > self.log.committed:
            raise ValueError(f"applied {config.applied} beyond commit {self.log.committed}")
        # The shell restored storage.snapshot() before starting us, so
        # anything the snapshot covers counts as applied.
        self.log.applied_to(max(config.applied, self.log.applied))

        self.now_tick = 0
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.read_only = ReadOnly()
        self.pending_reads: list[bytes] = []  # waiting for the first commit of the term
        self.lead = NONE
        self.role = Role.FOLLOWER
        self.votes: dict[int, bool] = {}
        self.prs: dict[int, Progress] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        # Local tick of the last message from a leader; None: never. A node
        # that has been in an electable term may have acknowledged a leader
        # just before it crashed, so it treats its restart as leader contact
        # (keeps refusing votes for an election timeout) to protect that
        # leader's lease. No leader exists in the bootstrap term.
        self.leader_contact_tick: int | None = 0 if hs.term > BOOTSTRAP_TERM else None
        self.lead_transferee = NONE
        self.transfer_elapsed = 0
        self.lease_revoked = False
        self._append_all = False
        self._append_all_if_empty = False
        self._append_to: dict[int, bool] = {}
        self._snapshot_receive: _SnapshotReceive | None = None
        # APPENDs of this term's leader that arrived ahead of the entries
        # before them (a link that reorders), by previous index; applied once
        # the gap fills. Rejecting them instead makes the leader resend its
        # whole window for every overtaking message. TCP never reorders, so
        # in production this stays empty.
        self._early_appends: dict[int, Message] = {}
        self._early_bytes = 0

        # Membership: base (as of conf_base_index) + one record per conf
        # entry above it, so truncating a conf entry reverts it.
        self.conf_base, self.conf_base_index, self.conf_history = self._load_conf(storage, conf)
        self.conf = self.conf_history[-1][2] if self.conf_history else self.conf_base
        self.become_follower(self.term, NONE)

    # -- membership ---------------------------------------------------------

    @staticmethod
    def _load_conf(
        storage: Storage, conf: ConfState
    ) -> tuple[ConfState, int, list[tuple[int, ConfChange, ConfState]]]:
        snap = storage.snapshot()
        base_index = snap.meta.index
        if base_index + 1 < storage.first_index():
            raise InvariantViolation("storage compacted beyond its snapshot")
        changes: list[tuple[int, ConfChange]] = []
        lo, last = base_index + 1, storage.last_index()
        while lo <= last:
            chunk = storage.entries(lo, last + 1, 16 << 20)
            for e in chunk:
                if e.type == EntryType.CONF_CHANGE:
                    changes.append((e.index, decode_conf_change(e.data)))
            lo = chunk[-1].index + 1
        if snap.is_empty():
            # Bootstrap membership is not stored apart from the log's
            # changes; recover it by undoing them from the final state.
            base = conf
            for _, cc in reversed(changes):
                base = revert_change(base, cc)
        else:
            base = snap.meta.conf
        history = []
        cur = base
        for index, cc in changes:
            cur = apply_change(cur, cc)
            history.append((index, cc, cur))
        if cur != conf:
            raise InvariantViolation(f"storage membership {conf} != replayed log {cur}")
        return base, base_index, history

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    def conf_state_at(self, index: int) -> ConfState:
        """Membership as of `index` (for snapshots the shell creates)."""
        if index < self.conf_base_index:
            raise ValueError(f"membership at {index} is older than {self.conf_base_index}")
        conf = self.conf_base
        for i, _, c in self.conf_history:
            if i > index:
                break
            conf = c
        return conf

    def _append(self, ents: list[Entry]) -> None:
        """Append to the log, applying or reverting membership as it changes."""
        first = ents[0].index
        changed = False
        if first <= self.log.last_index():
            while self.conf_history and self.conf_history[-1][0] >= first:
                self.conf_history.pop()
                changed = True
        self.log.append(ents)
        for e in ents:
            if e.type == EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                cur = self.conf_history[-1][2] if self.conf_history else self.conf_base
                self.conf_history.append((e.index, cc, apply_change(cur, cc)))
                changed = True
        if changed:
            self._conf_changed()

    def _conf_changed(self) -> None:
        self.conf = self.conf_history[-1][2] if self.conf_history else self.conf_base
        if self.role != Role.LEADER:
            return
        voters = self.conf.voters
        for pid in list(self.prs):
            if pid not in voters:
                del self.prs[pid]
                self._append_to.pop(pid, None)
                if pid == self.lead_transferee:
                    self.abort_leader_transfer()
        for pid in voters:
            if pid not in self.prs:
                pr = Progress(self.log.last_index() + 1, self.cfg.max_inflight_msgs, self.now_tick)
                if pid == self.id:
                    pr.match = self.log.stable_last_index()
                    pr.next = pr.match + 1
                self.prs[pid] = pr
                self._append_to.setdefault(pid, True)
        # A smaller majority may already hold a newer index.
        self._maybe_commit()

    def pending_conf_index(self) -> int:
        return self.conf_history[-1][0] if self.conf_history else 0

    def prune_conf_history(self) -> None:
        """Fold conf records the log has compacted away into the base.

        Records above the compaction point stay so that `conf_state_at`
        answers for any index the shell may still snapshot at."""
        bound = min(self.log.applied, self.log.first_index() - 1)
        h = self.conf_history
        n = 0
        while n < len(h) and h[n][0] <= bound:
            n += 1
        if n:
            self.conf_base_index, _, self.conf_base = h[n - 1]
            del h[:n]

    # -- role transitions -----------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(leader=self.lead, role=self.role)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.rng.randrange(
            self.cfg.election_tick, 2 * self.cfg.election_tick
        )
        self.lead_transferee = NONE
        self.transfer_elapsed = 0
        self.lease_revoked = False
        self.votes = {}
        self.prs = {}
        self.read_only.reset()
        self.pending_reads = []
        self._append_all = False
        self._append_all_if_empty = False
        self._append_to = {}
        self._early_appends = {}
        self._early_bytes = 0

    def become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def become_pre_candidate(self) -> None:
        if self.role == Role.LEADER:
            raise InvariantViolation("leader cannot become pre-candidate")
        # Pre-vote changes neither term nor vote: a node that cannot win
        # leaves no trace on the cluster.
        self.votes = {}
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE

    def become_candidate(self) -> None:
        if self.role == Role.LEADER:
            raise InvariantViolation("leader cannot become candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def become_leader(self) -> None:
        if self.role == Role.FOLLOWER:
            raise InvariantViolation("follower cannot become leader directly")
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.log.last_index()
        for pid in self.conf.voters:
            pr = Progress(last + 1, self.cfg.max_inflight_msgs, self.now_tick)
            if pid == self.id:
                # Our own copy counts once persisted (see on_persisted).
                pr.match = self.log.stable_last_index()
                pr.state = ProgressState.REPLICATE
            self.prs[pid] = pr
        # §5.4.2/§8: an entry of the new term commits everything before it
        # and is needed before serving reads.
        self._append([Entry(term=self.term, index=last + 1)])
        self._append_all = True

    # -- ticks ----------------------------------------------------------------

    def tick(self) -> None:
        self.now_tick += 1
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def ticks_until_due(self) -> int:
        """Ticks until `tick()` next acts: a leader's heartbeat (or a transfer
        timing out), anyone else's election timeout. Until then ticks only
        count, so a shell may sleep that long and deliver them in a burst
        (as after a stall); a leader then checks its quorum at heartbeat
        ticks only, at most a heartbeat interval late, which only delays a
        step-down (its lease is judged from acknowledgement ticks at read
        time, not from this check)."""
        if self.role == Role.LEADER:
            due = self.cfg.heartbeat_tick - self.heartbeat_elapsed
            if self.lead_transferee != NONE:
                due = min(due, self.cfg.election_tick - self.transfer_elapsed)
        elif self.promotable():
            due = self.randomized_election_timeout - self.election_elapsed
        else:
            due = self.cfg.election_tick
        return max(1, due)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.step(Message(type=MessageType.HUP, frm=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        if self.lead_transferee != NONE:
            self.transfer_elapsed += 1
            if self.transfer_elapsed >= self.cfg.election_tick:
                self.abort_leader_transfer()
        if self.cfg.check_quorum and not self._quorum_recently_active():
            self.become_follower(self.term, NONE)
            return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat()

    def _quorum_recently_active(self) -> bool:
        heard = {pid: pr.last_heard_tick for pid, pr in self.prs.items()}
        heard[self.id] = self.now_tick
        newest_quorum_tick = quorum.quorum_value(self.conf.voters, heard, missing=-(1 << 62))
        return self.now_tick - newest_quorum_tick < self.cfg.election_tick

    def in_lease(self) -> bool:
        """Whether this node must refuse to help elect a new leader now."""
        if not self.cfg.check_quorum:
            return False
        if self.role == Role.LEADER:
            return True
        return (
            self.leader_contact_tick is not None
            and self.now_tick - self.leader_contact_tick < self.cfg.election_tick
        )

    # -- lease ------------------------------------------------------------------

    def committed_in_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def lease_expiry_tick(self) -> int | None:
        """First tick at which the lease no longer holds (None: no lease)."""
        if (
            self.role != Role.LEADER
            or not self.cfg.check_quorum
            or self.lease_revoked
            or self.id not in self.conf.voters
            or not self.committed_in_term()
        ):
            return None
        acks = {pid: pr.lease_ack_tick for pid, pr in self.prs.items()}
        acks[self.id] = self.now_tick
        sent = quorum.quorum_value(self.conf.voters, acks, missing=-1)
        if sent < 0:
            return None
        return sent + self.cfg.lease_ticks

    def lease_valid(self) -> bool:
        expiry = self.lease_expiry_tick()
        return expiry is not None and self.now_tick < expiry

    # -- sending ------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def mark_append(self, to: int, send_if_empty: bool) -> None:
        self._append_to[to] = self._append_to.get(to, False) or send_if_empty

    def _mark_append_all(self, send_if_empty: bool) -> None:
        self._append_all = True
        self._append_all_if_empty = self._append_all_if_empty or send_if_empty

    def flush(self) -> None:
        """Turn the coalesced 'send to X' marks into APPEND / SNAPSHOT messages."""
        if self.role != Role.LEADER:
            self._append_to = {}
            self._append_all = False
            self._append_all_if_empty = False
            return
        if not self._append_all and not self._append_to:
            return
        targets = dict(self._append_to)
        if self._append_all:
            for pid in self.prs:
                targets[pid] = targets.get(pid, False) or self._append_all_if_empty
        self._append_to = {}
        self._append_all = False
        self._append_all_if_empty = False
        last = self.log.last_index()
        for pid in sorted(targets):
            if pid == self.id:
                continue
            pr = self.prs.get(pid)
            if pr is None:
                continue
            sent = self._send_append(pid, pr, targets[pid])
            # Pipelining: keep streaming until the window is full.
            while sent and pr.state == ProgressState.REPLICATE and pr.next <= last:
                sent = self._send_append(pid, pr, False)

    def has_pending_flush(self) -> bool:
        return self.role == Role.LEADER and (self._append_all or bool(self._append_to))

    def _send_append(self, to: int, pr: Progress, send_if_empty: bool) -> bool:
        if pr.state == ProgressState.SNAPSHOT:
            return self._send_snapshot_chunk(to, pr)
        if pr.is_paused():
            return False
        prev = pr.next - 1
        try:
            prev_term = self.log.term(prev)
            ents = self.log.entries_from(pr.next, self.cfg.max_size_per_msg)
        except CompactedError:
            return self._start_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self._send(
            Message(
                type=MessageType.APPEND,
                to=to,
                frm=self.id,
                term=self.term,
                log_term=prev_term,
                index=prev,
                entries=tuple(ents),
                commit=self.log.committed,
                lease_tick=self.now_tick,
                streamed=pr.state == ProgressState.REPLICATE,
            )
        )
        pr.sent_entries(ents[-1].index if ents else None, self.now_tick)
        return True

    def _start_snapshot(self, to: int, pr: Progress) -> bool:
        if self.now_tick - pr.last_heard_tick >= self.cfg.election_tick:
            return False  # not worth streaming a snapshot into the void
        snap = self.log.snapshot()
        if snap.is_empty():
            raise InvariantViolation("storage compacted entries without a snapshot")
        pr.become_snapshot(snap)
        return self._send_snapshot_chunk(to, pr)

    def _send_snapshot_chunk(self, to: int, pr: Progress) -> bool:
        t = pr.transfer
        assert t is not None
        if t.chunk_sent:
            return False
        data = t.snapshot.data
        end = min(t.offset + self.cfg.snapshot_chunk_bytes, len(data))
        self._send(
            Message(
                type=MessageType.SNAPSHOT,
                to=to,
                frm=self.id,
                term=self.term,
                commit=self.log.committed,
                lease_tick=self.now_tick,
                snapshot_meta=t.snapshot.meta,
                snapshot_offset=t.offset,
                snapshot_data=data[t.offset : end],
                snapshot_done=end >= len(data),
            )
        )
        t.chunk_sent = True
        return True

    def bcast_heartbeat(self, ctx: bytes | None = None) -> None:
        if ctx is None:
            ctx = self.read_only.last_pending_ctx()
        committed = self.log.committed
        for pid in sorted(self.prs):
            if pid == self.id:
                continue
            pr = self.prs[pid]
            self._send(
                Message(
                    type=MessageType.HEARTBEAT,
                    to=pid,
                    frm=self.id,
                    term=self.term,
                    commit=min(pr.match, committed),
                    context=ctx,
                    lease_tick=self.now_tick,
                )
            )

    def _send_timeout_now(self, to: int) -> None:
        self.lease_revoked = True
        self._send(Message(type=MessageType.TIMEOUT_NOW, to=to, frm=self.id, term=self.term))

    # -- elections ------------------------------------------------------------------

    def campaign(self, transfer: bool) -> None:
        if not self.promotable() or self.role == Role.LEADER:
            return
        if not transfer and self.in_lease():
            # We heard from a leader less than an election timeout ago; our
            # own vote is part of its lease (see docs/raft.md).
            return
        if self.cfg.pre_vote and not transfer:
            self.become_pre_candidate()
            vote_type = MessageType.PRE_VOTE
            term = self.term + 1
        else:
            self.become_candidate()
            vote_type = MessageType.VOTE
            term = self.term
        if self._poll(self.id, True) == quorum.VoteResult.WON:
            self._won_election()
            return
        last = self.log.last_index()
        last_term = self.log.last_term()
        ctx = TRANSFER_CONTEXT if transfer else b""
        for pid in self.conf.voters:
            if pid == self.id:
                continue
            self._send(
                Message(
                    type=vote_type,
                    to=pid,
                    frm=self.id,
                    term=term,
                    index=last,
                    log_term=last_term,
                    context=ctx,
                )
            )

    def _poll(self, frm: int, granted: bool) -> quorum.VoteResult:
        self.votes.setdefault(frm, granted)
        return quorum.vote_result(self.conf.voters, self.votes)

    def _won_election(self) -> None:
        if self.role == Role.PRE_CANDIDATE:
            self.campaign(transfer=True)  # real election, no second pre-vote
        else:
            self.become_leader()

    # -- step -----------------------------------------------------------------------

    def step(self, m: Message) -> None:
        if m.type == MessageType.HUP:
            if self.role != Role.LEADER:
                self.campaign(transfer=m.context == TRANSFER_CONTEXT)
            return
        if m.type == MessageType.BEAT:
            if self.role == Role.LEADER:
                self.bcast_heartbeat()
            return
        if m.term == 0 or m.frm == NONE or m.frm == self.id:
            return  # not a well-formed network message
        if m.term > self.term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                if m.context != TRANSFER_CONTEXT and self.in_lease():
                    return  # the leader we know is alive: do not help unseat it
            if m.type == MessageType.PRE_VOTE:
                pass  # never changes our term
            elif m.type == MessageType.PRE_VOTE_RESP and not m.reject:
                pass  # granted pre-votes carry the future term
            elif m.type in _LEADER_CONTACT:
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT):
                # A deposed leader: tell it the new term so it steps down.
                self._send(
                    Message(type=MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term)
                )
            elif m.type == MessageType.PRE_VOTE:
                self._send(
                    Message(
                        type=MessageType.PRE_VOTE_RESP,
                        to=m.frm,
                        frm=self.id,
                        term=self.term,
                        reject=True,
                    )
                )
            return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == MessageType.PRE_VOTE and m.term > self.term)
        )
        resp_type = (
            MessageType.VOTE_RESP if m.type == MessageType.VOTE else MessageType.PRE_VOTE_RESP
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(type=resp_type, to=m.frm, frm=self.id, term=m.term))
            if m.type == MessageType.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(
                Message(type=resp_type, to=m.frm, frm=self.id, term=self.term, reject=True)
            )

    def _step_candidate(self, m: Message) -> None:
        if m.type in _LEADER_CONTACT:
            # Someone won this term (m.term == self.term here).
            self.become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        expected = (
            MessageType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        )
        if m.type != expected or m.frm not in self.conf.voters:
            return
        result = self._poll(m.frm, not m.reject)
        if result == quorum.VoteResult.WON:
            self._won_election()
        elif result == quorum.VoteResult.LOST:
            self.become_follower(self.term, NONE)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t in _LEADER_CONTACT:
            self.election_elapsed = 0
            self.lead = m.frm
            self.leader_contact_tick = self.now_tick
            if t == MessageType.APPEND:
                self._handle_append(m)
            elif t == MessageType.HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
        elif t == MessageType.TIMEOUT_NOW:
            if self.promotable():
                self.campaign(transfer=True)
        elif t == MessageType.TRANSFER_LEADER:
            if self.lead != NONE:
                self._send(
                    Message(type=MessageType.TRANSFER_LEADER, to=self.lead, frm=m.frm, term=self.term)
                )

    # -- follower handlers ----------------------------------------------------------

    def _reply(self, m: Message, **fields: Any) -> None:
        self._send(Message(to=m.frm, frm=self.id, term=self.term, lease_tick=m.lease_tick, **fields))

    def _handle_append(self, m: Message) -> None:
        self._append_one(m)
        early = self._early_appends
        while early:
            prev = min(early)
            if prev > self.log.last_index():
                break
            held = early.pop(prev)
            self._early_bytes -= _entries_bytes(held)
            self._append_one(held)

    def _hold_early_append(self, m: Message) -> bool:
        """Keep an APPEND that starts past our last entry until the gap
        fills; False when the buffer is full (then it is rejected, and the
        rejection tells the leader where our log ends)."""
        size = _entries_bytes(m)
        if (len(self._early_appends) >= self.cfg.max_inflight_msgs
                or self._early_bytes + size > EARLY_APPEND_BYTES_MAX):
            return False
        previous = self._early_appends.get(m.index)
        if previous is not None:
            if len(previous.entries) >= len(m.entries):
                return True  # a duplicate
            self._early_bytes -= _entries_bytes(previous)
        self._early_appends[m.index] = m
        self._early_bytes += size
        return True

    def _append_one(self, m: Message) -> None:
        log = self.log
        if m.streamed and m.index > log.last_index() and m.entries and self._hold_early_append(m):
            return
        if m.index < log.committed:
            self._reply(m, type=MessageType.APPEND_RESP, index=log.committed)
            return
        if log.match_term(m.index, m.log_term):
            last_new = m.index + len(m.entries)
            if m.entries:
                conflict = log.find_conflict(m.entries)
                if conflict:
                    if conflict <= log.committed:
                        raise InvariantViolation(
                            f"entry {conflict} conflicts with committed {log.committed}"
                        )
                    self._append(list(m.entries[conflict - m.index - 1 :]))
            log.commit_to(min(m.commit, last_new))
            self._reply(m, type=MessageType.APPEND_RESP, index=last_new)
            return
        hint_index, hint_term = log.find_conflict_by_term(min(m.index, log.last_index()), m.log_term)
        self._reply(
            m,
            type=MessageType.APPEND_RESP,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._reply(m, type=MessageType.HEARTBEAT_RESP, context=m.context)

    def _handle_snapshot(self, m: Message) -> None:
        meta = m.snapshot_meta
        if meta is None:
            return
        key = (m.term, meta.index, meta.term)
        rcv = self._snapshot_receive
        if m.snapshot_offset == 0:
            rcv = self._snapshot_receive = _SnapshotReceive(key, bytearray())
        elif rcv is None or rcv.key != key:
            # We lost the earlier chunks (restart, or a newer snapshot began):
            # ask the leader to start over.
            self._snapshot_receive = None
            self._reply(m, type=MessageType.SNAPSHOT_RESP, snapshot_meta=meta, reject=True)
            return
        elif m.snapshot_offset != len(rcv.buf):
            # Duplicate (behind) or gap (ahead): tell the leader where we are.
            self._reply(
                m,
                type=MessageType.SNAPSHOT_RESP,
                snapshot_meta=meta,
                index=len(rcv.buf),
                reject=m.snapshot_offset > len(rcv.buf),
            )
            return
        rcv.buf += m.snapshot_data
        if not m.snapshot_done:
            self._reply(m, type=MessageType.SNAPSHOT_RESP, snapshot_meta=meta, index=len(rcv.buf))
            return
        self._snapshot_receive = None
        snap = Snapshot(meta=meta, data=bytes(rcv.buf))
        if self._restore(snap):
            index = meta.index
        else:
            index = self.log.committed
        self._reply(
            m, type=MessageType.SNAPSHOT_RESP, snapshot_meta=meta, index=index, snapshot_done=True
        )

    def _restore(self, snap: Snapshot) -> bool:
        """Install a complete snapshot if it is news; False if not needed."""
        meta = snap.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # We already have the entries: just learn they are committed.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snap)
        self.conf_base = meta.conf
        self.conf_base_index = meta.index
        self.conf_history = []
        self._conf_changed()
        return True

    # -- leader handlers --------------------------------------------------------------

    def _record_contact(self, pr: Progress, m: Message) -> None:
        pr.last_heard_tick = self.now_tick
        if m.lease_tick > pr.lease_ack_tick:
            pr.lease_ack_tick = m.lease_tick

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MessageType.TRANSFER_LEADER:
            if m.frm in self.conf.voters and m.frm != self.id:
                self.transfer_leadership(m.frm)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t == MessageType.APPEND_RESP:
            self._record_contact(pr, m)
            self._handle_append_resp(m, pr)
        elif t == MessageType.HEARTBEAT_RESP:
            self._record_contact(pr, m)
            self._handle_heartbeat_resp(m, pr)
        elif t == MessageType.SNAPSHOT_RESP:
            self._record_contact(pr, m)
            self._handle_snapshot_resp(m, pr)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self.mark_append(m.frm, True)
            return
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        self._maybe_commit()
        self.mark_append(m.frm, False)
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.frm)

    def _handle_heartbeat_resp(self, m: Message, pr: Progress) -> None:
        pr.probe_sent = False
        oldest = pr.inflights.oldest_send_tick()
        if pr.state == ProgressState.REPLICATE and oldest is not None and oldest < m.lease_tick:
            # Links are FIFO: an APPEND sent before this heartbeat and still
            # unacknowledged was lost. Without this, a lost APPEND at the end
            # of a burst (or with a full window) would never be resent.
            pr.become_probe()
            self.mark_append(m.frm, True)
        elif pr.state == ProgressState.SNAPSHOT:
            assert pr.transfer is not None
            pr.transfer.chunk_sent = False  # the chunk or its answer was lost
            self.mark_append(m.frm, False)
        elif pr.match < self.log.last_index():
            # A follower behind us gets an APPEND even when it would carry no
            # entries: in probe state that empty APPEND is the probe whose
            # rejection walks `next` back (the first one may have been lost).
            self.mark_append(m.frm, True)
        if m.context:
            acks = self.read_only.recv_ack(m.frm, m.context)
            if acks is not None and quorum.has_quorum(self.conf.voters, acks):
                for rs in self.read_only.advance(m.context):
                    self.read_states.append(ReadState(rs.index, rs.request_ctx))

    def _handle_snapshot_resp(self, m: Message, pr: Progress) -> None:
        meta = m.snapshot_meta
        if m.snapshot_done:
            # Installed (index = snapshot index) or not needed (index = the
            # follower's commit); either way its log matches ours up to index.
            pr.maybe_update(min(m.index, self.log.last_index()))
            if pr.state != ProgressState.REPLICATE:
                pr.become_replicate()
            self._maybe_commit()
            self.mark_append(m.frm, True)
            return
        if pr.state != ProgressState.SNAPSHOT or meta is None or meta.index != pr.pending_snapshot:
            return
        t = pr.transfer
        assert t is not None
        if m.reject or m.index >= t.offset:
            t.offset = min(max(m.index, 0), len(t.snapshot.data))
            t.chunk_sent = False
            self.mark_append(m.frm, False)

    def _maybe_commit(self) -> bool:
        match = {pid: pr.match for pid, pr in self.prs.items()}
        index = quorum.committed_index(self.conf.voters, match)
        if self.cfg.unsafe_commit_previous_term:
            changed = index > self.log.committed
            if changed:
                self.log.commit_to(index)
        else:
            changed = self.log.maybe_commit(index, self.term)
        if changed:
            self._on_commit()
        return changed

    def _on_commit(self) -> None:
        # Followers learn the new commit index from the next APPEND or
        # heartbeat rather than from an empty APPEND now: that would double
        # the messages (and their acknowledgements) of every lone write, and
        # only the leader serves reads. Entries still waiting go out.
        self._mark_append_all(False)
        if self.pending_reads and self.committed_in_term():
            pending, self.pending_reads = self.pending_reads, []
            for ctx in pending:
                self._serve_read(ctx)
        if self.id not in self.conf.voters and self.log.committed >= self.pending_conf_index():
            # Our removal is committed: hand over to the most caught-up voter
            # rather than make the cluster wait for an election timeout.
            best = max(self.prs.items(), key=lambda kv: (kv[1].match, -kv[0]), default=None)
            if best is not None and best[1].match == self.log.last_index():
                self._send_timeout_now(best[0])
            self.become_follower(self.term, NONE)

    def on_persisted(self) -> None:
        """The shell persisted the unstable tail: our own copy now counts."""
        if self.role != Role.LEADER:
            return
        pr = self.prs.get(self.id)
        if pr is not None and pr.maybe_update(self.log.stable_last_index()):
            self._maybe_commit()

    # -- client requests --------------------------------------------------------------

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeaderError(self.lead)
        if self.lead_transferee != NONE:
            raise ProposalDroppedError(f"leadership transfer to {self.lead_transferee} in progress")
        if self.id not in self.conf.voters:
            raise ProposalDroppedError("this leader is being removed from the configuration")

    def propose(self, data: bytes) -> tuple[int, int]:
        self._check_can_propose()
        index = self.log.last_index() + 1
        self._append([Entry(term=self.term, index=index, type=EntryType.NORMAL, data=data)])
        self._append_all = True
        return index, self.term

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        self._check_can_propose()
        if self.pending_conf_index() > self.log.committed:
            raise ProposalDroppedError(
                f"conf change at {self.pending_conf_index()} is not committed yet"
            )
        apply_change(self.conf, cc)  # raises InvalidConfChangeError if senseless
        index = self.log.last_index() + 1
        entry = Entry(
            term=self.term, index=index, type=EntryType.CONF_CHANGE, data=encode_conf_change(cc)
        )
        self._append([entry])
        self._append_all = True
        return index, self.term

    def read_index(self, request_ctx: bytes) -> None:
        if self.role != Role.LEADER:
            raise NotLeaderError(self.lead)
        if not request_ctx:
            raise ValueError("read_index needs a non-empty, unique request_ctx")
        if self.read_only.count() + len(self.pending_reads) >= self.cfg.max_pending_read_index:
            raise ProposalDroppedError("too many pending read_index requests")
        if not self.committed_in_term():
            # §8: our commit index is only known to be current once an
            # entry of our term commits.
            self.pending_reads.append(request_ctx)
            return
        self._serve_read(request_ctx)

    def _serve_read(self, ctx: bytes) -> None:
        voters = self.conf.voters
        if self.lease_valid() or voters == (self.id,):
            self.read_states.append(ReadState(self.log.committed, ctx))
            return
        if self.read_only.add_request(self.log.committed, ctx) is None:
            return  # same context already pending
        if self.id in voters:
            self.read_only.recv_ack(self.id, ctx)
        self.bcast_heartbeat(ctx)

    def transfer_leadership(self, target: int) -> None:
        if self.role != Role.LEADER:
            raise NotLeaderError(self.lead)
        if target not in self.conf.voters:
            raise ValueError(f"transfer target {target} is not a voter")
        if target == self.id:
            self.abort_leader_transfer()
            return
        if self.lead_transferee == target:
            return
        self.lead_transferee = target
        self.transfer_elapsed = 0
        # The target will be elected over our followers' leases, so ours is
        # void for the rest of this term.
        self.lease_revoked = True
        pr = self.prs[target]
        if pr.match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self.mark_append(target, True)

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE
        self.transfer_elapsed = 0

    def report_unreachable(self, peer: int) -> None:
        if self.role != Role.LEADER:
            return
        pr = self.prs.get(peer)
        if pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    # -- checks -------------------------------------------------------------------------

    def assert_invariants(self) -> None:
        self.log.assert_invariants()
        self.read_only.assert_invariants()
        log = self.log
        assert self._early_bytes == sum(_entries_bytes(m) for m in self._early_appends.values())
        # A pre-candidate keeps them: pre-vote changes no term, and the term's
        # leader may still fill the gap.
        assert self.role in (Role.FOLLOWER, Role.PRE_CANDIDATE) or not self._early_appends, \
            "only followers hold early APPENDs"
        assert all(prev > log.last_index() for prev in self._early_appends), "a held APPEND was not applied"
        assert self.log.term_or_zero(log.committed) <= self.term
        assert self.log.last_term() <= self.term, (self.log.last_term(), self.term)
        if self.role == Role.LEADER:
            assert self.lead == self.id
            assert self.vote == self.id or self.term == 0, (self.vote, self.id)
            assert set(self.prs) == set(self.conf.voters), (self.prs, self.conf)
            last = log.last_index()
            for pid, pr in self.prs.items():
                pr.assert_invariants()
                assert pr.match <= last, (pid, pr, last)
        else:
            assert self.lead_transferee == NONE
            assert not self.read_only.count() and not self.pending_reads
        if self.role == Role.CANDIDATE:
            assert self.vote == self.id
        prev = self.conf_base_index
        cur = self.conf_base
        for index, cc, conf in self.conf_history:
            assert prev < index <= log.last_index(), (prev, index, log.last_index())
            assert apply_change(cur, cc) == conf
            prev, cur = index, conf
        assert cur == self.conf
        assert self.pending_conf_index() <= log.last_index()
