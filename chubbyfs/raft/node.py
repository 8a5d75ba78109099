"""The trio shell around the pure Raft core: one replica's event loop.

`RaftNode` owns a `RawNode`, a `WritableStorage`, a `Transport` and a
`StateMachine`, and drives them in the order the core's `Ready` demands:

    persist (snapshot, entries, hard state; fsync if must_sync)
      -> send messages -> apply (snapshot, committed entries) -> advance

The same code runs in production (DiskStorage on RealFS, TCP transport, the
real clock) and in the simulator (DiskStorage on SimFS, SimNetwork, MockClock):
it makes no protocol decisions and reads time only through trio.

Why inline fsync: on this class of machine fdatasync costs well under a
millisecond, and doing it inline keeps group commit natural (every proposal
that arrives while the loop is busy joins the next Ready's single sync);
a worker thread measured slower.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .confchange import apply_change, decode_conf_change, encode_conf_change
from .rawnode import Config, NotLeaderError, ProposalDroppedError, RawNode
from .storage import WritableStorage
from .types import (ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType, Ready,
                    Role)

log = logging.getLogger(__name__)

__all__ = [
    "NodeStoppedError",
    "NotLeaderError",
    "ProposalLostError",
    "ProposalOutcomeUnknownError",
    "RaftNode",
    "StateMachine",
    "Transport",
    "bootstrap_storage",
]


class ProposalLostError(Exception):
    """The proposal's log position was taken by another leader's entry: it was
    definitely not applied, so the client may retry."""


class ProposalOutcomeUnknownError(Exception):
    """The proposal may or may not have been applied (its position was covered
    by a snapshot from the leader before this replica applied it)."""


class NodeStoppedError(ProposalOutcomeUnknownError):
    """The replica's loop ended while the request was outstanding; its outcome
    is unknown."""


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> Any: ...

    def query(self, query: Any) -> Any: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class Transport(Protocol):
    def send(self, msg: Message) -> None:
        """Queue msg for its destination; never blocks, may drop."""
        ...

    def flush(self) -> None:
        """Start delivering what `send` queued (called once per Ready);
        never blocks."""
        ...


@dataclass(slots=True)
class _Waiter:
    """A one-shot result slot that a task can await."""

    event: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None
    term: int = 0

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.value, self.error = value, error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Callback:
    """A proposal answered by calling a function from the apply step itself:
    no task, no event; the cheapest way to answer many small writes."""

    __slots__ = ("term", "_on_done")

    def __init__(self, term: int, on_done: Callable[[Any, BaseException | None], None]) -> None:
        self.term = term
        self._on_done: Callable[[Any, BaseException | None], None] | None = on_done

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(value, error)


TraceFn = Callable[[str, dict], None]


class RaftNode:
    """One replica. A brand-new replica's storage must first be given its
    membership with `bootstrap_storage` (founding members) or be left empty
    (a replica that joins and learns membership from the leader)."""

    def __init__(
        self,
        *,
        config: Config,
        storage: WritableStorage,
        transport: Transport,
        state_machine: StateMachine,
        rng: Any,
        tick_seconds: float = 0.01,
        snapshot_every: int = 10_000,
        snapshot_keep_entries: int = 1_000,
        snapshot_log_ratio: float = 1.0,
        inbound_capacity: int = 8_192,
        trace: TraceFn | None = None,
        after_ready: Callable[[], None] | None = None,
    ) -> None:
        self.id = config.id
        self.storage = storage
        self.transport = transport
        self.state_machine = state_machine
        self.tick_seconds = tick_seconds
        self.snapshot_every = snapshot_every
        self.snapshot_keep_entries = snapshot_keep_entries
        # A snapshot costs time in proportion to the state, compaction saves
        # in proportion to the log it drops: take one only once the entries
        # applied since the last one hold at least `snapshot_log_ratio` times
        # its size (besides `snapshot_every` entries). A large state is then
        # written in proportion to what changed, not every N entries, and the
        # log still never holds much more than the state (LogCabin's rule).
        self.snapshot_log_ratio = snapshot_log_ratio
        self._last_tick_at = 0.0  # set when run() starts
        self._max_tick_burst = 2 * config.election_tick + 2
        self._trace = trace
        # Called after each round of Ready handling: the shell writes the
        # replies that round's applies produced in one go (never blocks).
        self._after_ready = after_ready
        snap = storage.snapshot()
        if not snap.is_empty():
            state_machine.restore(snap.data)
        # The state machine is rebuilt from the snapshot; every committed entry
        # after it is re-delivered by the core and re-applied.
        config.applied = snap.meta.index
        self.applied = snap.meta.index
        # Membership as of `applied`; conf entries after the snapshot are
        # re-applied along with everything else.
        self._applied_conf: ConfState = snap.meta.conf
        self._last_snapshot_index = snap.meta.index
        self._last_snapshot_bytes = len(snap.data)
        self._log_bytes_since_snapshot = 0
        self.raw = RawNode(config, storage, rng)
        self.role = Role.FOLLOWER
        self.leader = 0
        initial = self.raw.status()
        self.term = initial.term
        self.commit = initial.commit
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[Message](inbound_capacity)
        self._wakeup = trio.Event()
        self._proposals: dict[int, _Waiter] = {}
        self._reads_by_ctx: dict[bytes, _Waiter] = {}
        self._reads_waiting_apply: list[tuple[int, _Waiter]] = []
        self._read_ids = itertools.count(1)
        self._applied_changed = trio.Event()
        self._resumed = trio.Event()
        self._resumed.set()
        self._running = False
        self._processing = False  # inside _process: a nested call must wait for the loop
        self._riders = 0  # lazy proposals appended but not yet in a Ready
        # Followers in the order they acknowledged the newest index (leader only).
        self._ack_index = 0
        self._first_ackers: list[int] = []
        self._failure: Exception | None = None  # raised in deliver_now, re-raised by run
        self.dropped_inbound = 0
        self.snapshots_restored = 0

    # ---- inputs from other tasks -------------------------------------------------

    def deliver(self, msg: Message) -> None:
        """Hand in a message received from the network (never blocks)."""
        if self._enqueue(msg):
            self._wakeup.set()

    def _enqueue(self, msg: Message) -> bool:
        try:
            self._inbound_send.send_nowait(msg)
        except trio.WouldBlock:
            # A full queue means we are far behind; Raft retransmits, so
            # dropping is safe and bounds memory.
            self.dropped_inbound += 1
            return False
        return True

    async def propose(self, command: bytes, *, lazy: bool = False) -> Any:
        """Replicate `command`; return the state machine's result once applied.

        `lazy`: the entry is appended now (so it keeps its place in the log)
        but, when nothing else is in flight, it is not sent on its own: it
        goes out with the next Ready (the next proposal, message or tick,
        within a tick). For a request that waits anyway, e.g. an Acquire of a
        held lock, which can then share one round with the Release that ends
        its wait.

        Raises NotLeaderError (with .leader) if this replica is not the leader,
        ProposalLostError if another leader's entry took its place.

        The entry is appended before this coroutine first yields, so proposals
        made in turn by one task reach the log in that order (the master
        relies on it for increasing session ids).
        """
        if not self._resumed.is_set():
            await self._resumed.wait()
        index, term = self.raw.propose(command)
        return await self._await_index(index, term, lazy)

    def propose_nowait(self, command: bytes, on_done: Callable[[Any, BaseException | None], None], *,
                       lazy: bool = False) -> None:
        """Replicate `command`; `on_done(result, error)` is called from the
        apply step (or with an error as `propose` would raise it). Raises
        NotLeaderError / ProposalDroppedError at once, like `propose`; `lazy`
        as there."""
        if not self._resumed.is_set():
            raise ProposalDroppedError("replica is paused")
        index, term = self.raw.propose(command)
        self._register_proposal(index, _Callback(term, on_done))
        self._kick(lazy)

    def read_nowait(self, query: Any) -> tuple[bool, Any]:
        """(True, answer) if the lease lets us answer at once, else (False, None)."""
        if self.role != Role.LEADER or not self._resumed.is_set():
            return False, None
        self._catch_up_ticks()  # the lease is judged by the time now, not at the last tick
        if self.raw.lease_valid() and self.applied >= self.commit:
            return True, self.state_machine.query(query)
        return False, None

    async def read(self, query: Any) -> Any:
        """A linearizable read of the state machine (lease, else ReadIndex)."""
        await self._resumed.wait()
        # Fast path: within the lease no other leader can have committed
        # anything, and every entry this leader committed is applied.
        answered, answer = self.read_nowait(query)
        if answered:
            return answer
        ctx = next(self._read_ids).to_bytes(8, "big")
        waiter = _Waiter()
        self._reads_by_ctx[ctx] = waiter
        try:
            self.raw.read_index(ctx)
        except BaseException:
            del self._reads_by_ctx[ctx]
            raise
        self._wakeup.set()
        try:
            await waiter.wait()
        finally:
            self._reads_by_ctx.pop(ctx, None)
        return self.state_machine.query(query)

    async def add_voter(self, node_id: int, context: bytes = b"") -> None:
        await self._propose_conf(ConfChange(ConfChangeType.ADD_VOTER, node_id, context))

    async def remove_voter(self, node_id: int) -> None:
        await self._propose_conf(ConfChange(ConfChangeType.REMOVE_VOTER, node_id))

    async def transfer_leadership(self, target: int) -> None:
        self.raw.transfer_leadership(target)
        self._wakeup.set()

    def pause(self) -> None:
        """Stop ticking and processing (a GC pause or SIGSTOP, for the simulator)."""
        self._resumed = trio.Event()

    def resume(self) -> None:
        self._resumed.set()

    async def wait_applied(self, index: int) -> None:
        while self.applied < index:
            await self._applied_changed.wait()

    def status(self) -> dict:
        raw = self.raw.status()
        return {
            "id": self.id,
            "role": self.role.name.lower(),
            "term": self.term,
            "leader": self.leader,
            "commit": self.commit,
            "applied": self.applied,
            "last_index": self.storage.last_index(),
            "lease_valid": self.role == Role.LEADER and self.raw.lease_valid(),
            "voters": list(self._applied_conf.voters),
            "snapshot_index": self._last_snapshot_index,
            "snapshots_restored": self.snapshots_restored,
            # The leader's view of each follower: how far behind it is.
            "progress": {str(pid): {"match": p.match, "next": p.next, "state": p.state.name.lower()}
                         for pid, p in raw.progress.items()},
        }

    # ---- the loop ------------------------------------------------------------------

    def _catch_up_ticks(self, *, wake: bool = True) -> None:
        """Tell the core about every tick that has passed in real time
        (`wake`: have the loop handle what they produce; not needed from
        inside `_process`, which handles it itself).

        After a stall (a GC pause, SIGSTOP, a slow disk) the core must learn
        that time went on: its lease and election timers count ticks, and a
        leader that slept through its lease must not wake up trusting it.
        A burst longer than twice the election timeout changes nothing more,
        so it is capped there."""
        now = trio.current_time()
        if now < self._last_tick_at + self.tick_seconds:
            return
        # At least one tick once its deadline has passed, whatever rounding
        # says: the loop sleeps until exactly that deadline.
        due = 1 + int((now - self._last_tick_at - self.tick_seconds) / self.tick_seconds)
        for _ in range(min(due, self._max_tick_burst)):
            self.raw.tick()
        self._last_tick_at += due * self.tick_seconds
        if wake:
            self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self._last_tick_at = trio.current_time()
        self._running = True
        try:
            while True:
                if not self._resumed.is_set():
                    await self._resumed.wait()
                if not self._wakeup.is_set():
                    # Sleep until a tick would do something, not every tick:
                    # an idle replica otherwise wakes 100 times a second for
                    # nothing. Ticks missed meanwhile come in one burst.
                    ticks = self.raw.ticks_until_due()
                    with trio.move_on_at(self._last_tick_at + self.tick_seconds * ticks):
                        await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self._failure is not None:
                    raise self._failure
                if not self._resumed.is_set():
                    continue
                self._process()
                # Proposers and readers run while we wait for the next wakeup,
                # so their requests batch into the next Ready (group commit);
                # if it came already, yield once anyway for the same reason.
                if self._wakeup.is_set():
                    await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            self._fail_all(NodeStoppedError(f"replica {self.id} stopped"))

    def _kick(self, lazy: bool = False) -> None:
        """After a proposal: handle it at once when it is the only one in
        flight (a lone client: its entry goes out without a switch to the
        Raft loop task), else let the loop gather it with the others into one
        Ready (group commit). A lazy one alone rides with the next Ready."""
        in_flight = len(self._proposals) - self._riders
        if in_flight == 1 and lazy:
            self._riders += 1
        elif in_flight == 1:
            self._process_now()
        else:
            self._wakeup.set()

    def _process_now(self) -> None:
        """The loop's work in the calling task (see `deliver_now`); a
        failure goes to the loop, which raises it. Nested calls (from an
        apply callback, say) and a paused or stopped node leave it to the loop."""
        if self._processing or not self._running or not self._resumed.is_set() or self._failure is not None:
            self._wakeup.set()
            return
        try:
            self._process()
        except Exception as exc:
            self._failure = exc
            self._wakeup.set()

    def deliver_now(self, msgs: list[Message]) -> None:
        """Hand in messages that arrived together and handle them at once, in
        the calling task: the same work as the Raft loop's, minus the switch
        to it (in Python, a fair part of what a message costs). While the
        node is paused or not running they wait for the loop instead. All of
        it is synchronous, so it never interleaves with the loop; a failure
        (a disk error, say) is passed to the loop, which raises it, rather
        than to the caller."""
        if self._processing or not self._running or not self._resumed.is_set() or self._failure is not None:
            for msg in msgs:
                self.deliver(msg)
            return
        for msg in msgs:
            self._enqueue(msg)
        self._process_now()

    def _process(self) -> None:
        self._processing = True
        self._riders = 0  # every unsent entry goes out with this Ready
        try:
            self._catch_up_ticks(wake=False)
            while True:
                try:
                    msg = self._inbound_recv.receive_nowait()
                except trio.WouldBlock:
                    break
                if msg.type == MessageType.APPEND_RESP and not msg.reject:
                    self._note_ack(msg.frm, msg.index)
                self.raw.step(msg)
            while self.raw.has_ready():
                self._handle_ready(self.raw.ready())
        finally:
            self._processing = False
        if self._after_ready is not None:
            self._after_ready()

    def _handle_ready(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.role, rd.soft_state.leader)
        # A leader may replicate its new entries while it writes them itself
        # (Raft §10.2.1; the core counts the leader's own copy only once
        # persisted): hand the APPENDs to the transport and let its tasks put
        # them on the wire before our fsync, so the followers' fsyncs overlap
        # ours. Anything else (votes, acknowledgements) waits for the disk.
        early = self.role == Role.LEADER and rd.snapshot is None and (
            rd.hard_state is None or rd.hard_state.term == self.term)
        send = self.transport.send
        held: list[Message] = []
        if early and rd.messages:
            # Only the followers that answered first last time get new
            # entries before our fsync; the rest right after it. On two
            # cores a commit needs one follower's CPU, and waking them all
            # at once makes the one we wait for share it with the others.
            fast = self._fast_followers()
            for m in rd.messages:
                if fast is not None and m.to not in fast and m.entries and m.type == MessageType.APPEND:
                    held.append(m)
                else:
                    send(m)
            self.transport.flush()
        st = self.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        if rd.must_sync or rd.snapshot is not None:
            st.sync()
        if rd.hard_state is not None:
            self.term = rd.hard_state.term
            self.commit = max(self.commit, rd.hard_state.commit)
            if self._trace:
                hs = rd.hard_state
                self._trace("hard_state", {"term": hs.term, "vote": hs.vote, "commit": hs.commit})
        if held or (not early and rd.messages):
            for m in held or rd.messages:
                send(m)
            self.transport.flush()
        if rd.snapshot is not None:
            self._apply_snapshot(rd)
        if rd.committed_entries:
            self._apply_entries(rd)
        for rs in rd.read_states:
            waiter = self._reads_by_ctx.get(rs.request_ctx)
            if waiter is not None:
                if self.applied >= rs.index:
                    waiter.resolve()
                else:
                    self._reads_waiting_apply.append((rs.index, waiter))
        self.raw.advance(rd)
        if (self.applied - self._last_snapshot_index >= self.snapshot_every
                and self._log_bytes_since_snapshot >= self.snapshot_log_ratio * self._last_snapshot_bytes):
            self._take_snapshot()

    def _note_ack(self, peer: int, index: int) -> None:
        """Remember which followers acknowledged the newest index first."""
        if index > self._ack_index:
            self._ack_index, self._first_ackers = index, [peer]
        elif index == self._ack_index and peer not in self._first_ackers:
            self._first_ackers.append(peer)

    def _fast_followers(self) -> list[int] | None:
        """The followers a commit needs (a majority counting us), fastest
        first by the last acknowledgements; None: not known, send to all."""
        needed = len(self._applied_conf.voters) // 2
        if needed <= 0 or len(self._first_ackers) < needed:
            return None
        return self._first_ackers[:needed]

    def _on_soft_state(self, role: Role, leader: int) -> None:
        was_leader = self.role == Role.LEADER
        self.role, self.leader = role, leader
        self._wakeup.set()  # the loop's next deadline depends on the role
        if self._trace:
            self._trace("role", {"role": role.name.lower(), "term": self.raw.status().term, "leader": leader})
        if was_leader and role != Role.LEADER:
            # Pending ReadIndex requests die with leadership; proposals stay:
            # their entries may still commit under the next leader, and the
            # apply of their index settles them either way.
            err = NotLeaderError(leader)
            for waiter in self._reads_by_ctx.values():
                waiter.resolve(error=err)
            self._reads_by_ctx.clear()
            for _, waiter in self._reads_waiting_apply:
                waiter.resolve(error=err)
            self._reads_waiting_apply.clear()

    def _apply_snapshot(self, rd: Ready) -> None:
        snap = rd.snapshot
        assert snap is not None
        self.state_machine.restore(snap.data)
        self.applied = snap.meta.index
        self.commit = max(self.commit, snap.meta.index)
        self._applied_conf = snap.meta.conf
        self._last_snapshot_index = snap.meta.index
        self._last_snapshot_bytes, self._log_bytes_since_snapshot = len(snap.data), 0
        self.snapshots_restored += 1
        # Proposals at or below the snapshot index were decided elsewhere; we
        # cannot tell which of them survived.
        for index in [i for i in self._proposals if i <= snap.meta.index]:
            self._proposals.pop(index).resolve(error=ProposalOutcomeUnknownError(
                f"entry {index} was superseded by a snapshot; outcome unknown"))
        if self._trace:
            self._trace("restore", {"index": snap.meta.index, "term": snap.meta.term})
        self._notify_applied()

    def _apply_entries(self, rd: Ready) -> None:
        sm = self.state_machine
        trace = self._trace
        proposals = self._proposals
        applied_bytes = 0
        for e in rd.committed_entries:
            if e.index <= self.applied:
                continue  # already covered by a restored snapshot
            applied_bytes += len(e.data)
            if e.type == EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                self._applied_conf = apply_change(self._applied_conf, cc)
                result: Any = None
            else:
                result = sm.apply(e.index, e.data)
            self.applied = e.index
            if trace:
                trace("apply", {"index": e.index, "term": e.term, "data": e.data})
            waiter = proposals.pop(e.index, None)
            if waiter is not None:
                if waiter.term == e.term:
                    waiter.resolve(result)
                else:
                    waiter.resolve(error=ProposalLostError(
                        f"entry {e.index} of term {waiter.term} was replaced by term {e.term}"))
        self._log_bytes_since_snapshot += applied_bytes
        self.commit = max(self.commit, self.applied)
        self._notify_applied()

    def _notify_applied(self) -> None:
        if self._reads_waiting_apply:
            still = []
            for index, waiter in self._reads_waiting_apply:
                if self.applied >= index:
                    waiter.resolve()
                else:
                    still.append((index, waiter))
            self._reads_waiting_apply = still
        self._applied_changed.set()
        self._applied_changed = trio.Event()

    def _take_snapshot(self) -> None:
        data = self.state_machine.snapshot()
        self.storage.create_snapshot(self.applied, self._applied_conf, data)
        compact_to = self.applied - self.snapshot_keep_entries
        if compact_to > self.storage.first_index():
            self.storage.compact(compact_to)
        self._last_snapshot_index = self.applied
        self._last_snapshot_bytes, self._log_bytes_since_snapshot = len(data), 0

    def _register_proposal(self, index: int, waiter: Any) -> None:
        # An older proposal at this index whose entry a later leader replaced
        # (and which we now reuse, leading again) will never apply: settle it.
        previous = self._proposals.get(index)
        if previous is not None:
            previous.resolve(error=ProposalLostError(
                f"entry {index} of term {previous.term} was replaced by term {waiter.term}"))
        self._proposals[index] = waiter

    async def _await_index(self, index: int, term: int, lazy: bool = False) -> Any:
        waiter = _Waiter(term=term)
        self._register_proposal(index, waiter)
        self._kick(lazy)
        try:
            return await waiter.wait()
        finally:
            if self._proposals.get(index) is waiter:
                del self._proposals[index]

    async def _propose_conf(self, cc: ConfChange) -> None:
        await self._resumed.wait()
        index, term = self.raw.propose_conf_change(cc)
        await self._await_index(index, term)

    def _fail_all(self, err: BaseException) -> None:
        for waiter in self._proposals.values():
            waiter.resolve(error=err)
        for waiter in self._reads_by_ctx.values():
            waiter.resolve(error=err)
        for _, waiter in self._reads_waiting_apply:
            waiter.resolve(error=err)


def bootstrap_storage(storage: WritableStorage, voters: list[int]) -> bool:
    """Give a brand-new replica its initial membership, as etcd does: one
    committed ADD_VOTER entry per voter at term 1. Every founding replica
    writes the identical prefix, so their logs agree from the start. Returns
    False (and changes nothing) if the storage already holds state; a
    replica joining an existing cell is not bootstrapped at all and learns
    membership from the leader.
    """
    hs, _ = storage.initial_state()
    if storage.last_index() > 0 or hs.term > 0 or not storage.snapshot().is_empty():
        return False
    entries = [
        Entry(term=1, index=i + 1, type=EntryType.CONF_CHANGE,
              data=encode_conf_change(ConfChange(ConfChangeType.ADD_VOTER, voter)))
        for i, voter in enumerate(sorted(voters))
    ]
    storage.append(entries)
    storage.set_hard_state(HardState(term=1, vote=0, commit=len(entries)))
    storage.sync()
    return True


def ticks_for(seconds: float, tick_seconds: float) -> int:
    """Whole ticks covering `seconds` (configs are written in seconds)."""
    return max(1, math.ceil(seconds / tick_seconds))
