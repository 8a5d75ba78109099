"""Test harness: several RawNodes, MemoryStorage "disks", a message list.

Ready handling follows the contract: persist (snapshot, entries, hard
state), then send, then apply, then advance. The storage is the durable
state: `crash()` drops the RawNode and everything not yet handled;
`restart()` rebuilds from storage. Messages in flight are explicit, so
tests choose what to deliver, drop, duplicate or reorder.

Safety checkers (Raft paper Figure 3) run after each `check()`:
election safety, log matching, leader completeness, state-machine safety.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack

from chubbyfs.raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    RawNode,
    ReadState,
    Role,
)


def encode_state(applied: list[tuple[int, int, bytes]]) -> bytes:
    return msgpack.packb(applied, use_bin_type=True)


def decode_state(data: bytes) -> list[tuple[int, int, bytes]]:
    return [tuple(x) for x in msgpack.unpackb(data, raw=False)] if data else []


@dataclass
class Node:
    id: int
    storage: MemoryStorage
    raw: RawNode | None
    config: Config
    # The state machine: every applied (index, term, data), NORMAL entries only.
    applied: list[tuple[int, int, bytes]] = field(default_factory=list)
    applied_index: int = 0
    read_states: list[ReadState] = field(default_factory=list)
    readies: int = 0

    @property
    def alive(self) -> bool:
        return self.raw is not None


class SafetyViolation(AssertionError):
    pass


class Network:
    def __init__(
        self,
        ids: Iterable[int],
        seed: int = 0,
        configure: Callable[[Config], None] | None = None,
        voters: Iterable[int] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.configure = configure
        ids = list(ids)
        conf = ConfState(voters=tuple(sorted(voters if voters is not None else ids)))
        self.nodes: dict[int, Node] = {}
        self.msgs: list[Message] = []
        self.cut_links: set[tuple[int, int]] = set()
        self.sent_count: dict[MessageType, int] = {}
        # Checker state.
        self.leader_of_term: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes, int]] = {}  # index -> (term, data, commit term)
        self.applied_global: dict[int, tuple[int, bytes]] = {}
        self.persisted: dict[tuple[int, int], bytes] = {}
        for i in ids:
            self.add_node(i, MemoryStorage(conf))

    # -- membership of the harness ---------------------------------------------------

    def make_config(self, node_id: int, applied: int = 0) -> Config:
        cfg = Config(id=node_id, applied=applied)
        if self.configure is not None:
            self.configure(cfg)
        return cfg

    def add_node(self, node_id: int, storage: MemoryStorage | None = None) -> Node:
        storage = storage if storage is not None else MemoryStorage()
        cfg = self.make_config(node_id)
        node = Node(node_id, storage, RawNode(cfg, storage, random.Random(self.rng.random())), cfg)
        self.nodes[node_id] = node
        return node

    def raw(self, node_id: int) -> RawNode:
        r = self.nodes[node_id].raw
        assert r is not None, f"node {node_id} is down"
        return r

    def crash(self, node_id: int) -> None:
        self.nodes[node_id].raw = None

    def restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        snap = node.storage.snapshot()
        # The state machine restarts from the snapshot; the core re-delivers
        # committed entries after it.
        node.applied = decode_state(snap.data)
        node.applied_index = snap.meta.index
        node.config = self.make_config(node_id, applied=snap.meta.index)
        node.raw = RawNode(node.config, node.storage, random.Random(self.rng.random()))
        node.read_states = []

    # -- ready handling -----------------------------------------------------------

    def process_ready(self, node_id: int) -> bool:
        node = self.nodes[node_id]
        raw = node.raw
        if raw is None or not raw.has_ready():
            return False
        rd = raw.ready()
        node.readies += 1
        st = node.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            st.append(rd.entries)
            for e in rd.entries:
                self._check_persisted(e)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        if rd.must_sync:
            st.sync()
        for m in rd.messages:
            self.sent_count[m.type] = self.sent_count.get(m.type, 0) + 1
            if (m.frm, m.to) not in self.cut_links:
                self.msgs.append(m)
        if rd.snapshot is not None:
            node.applied = decode_state(rd.snapshot.data)
            node.applied_index = rd.snapshot.meta.index
            for index, term, data in node.applied:
                self._check_applied(node_id, index, term, data)
        for e in rd.committed_entries:
            if e.index != node.applied_index + 1:
                raise SafetyViolation(f"node {node_id} applies {e.index} after {node.applied_index}")
            node.applied_index = e.index
            if e.type == EntryType.NORMAL and e.data:
                node.applied.append((e.index, e.term, e.data))
            self._check_applied(node_id, e.index, e.term, e.data)
        node.read_states.extend(rd.read_states)
        raw.advance(rd)
        self._observe(node_id)
        return True

    def _check_persisted(self, e: Entry) -> None:
        key = (e.index, e.term)
        prev = self.persisted.setdefault(key, e.data)
        if prev != e.data:
            raise SafetyViolation(f"two different entries at index {e.index} term {e.term}")

    def _check_applied(self, node_id: int, index: int, term: int, data: bytes) -> None:
        prev = self.applied_global.setdefault(index, (term, data))
        if prev != (term, data):
            raise SafetyViolation(
                f"state machine safety: node {node_id} applied {(term, data)} at {index}, "
                f"another node applied {prev}"
            )

    def _observe(self, node_id: int) -> None:
        """Election safety and the commit record, after every input."""
        raw = self.nodes[node_id].raw
        if raw is None:
            return
        st = raw.status()
        if st.role == Role.LEADER:
            first = self.leader_of_term.setdefault(st.term, node_id)
            if first != node_id:
                raise SafetyViolation(f"two leaders in term {st.term}: {first} and {node_id}")
            # Record what this leader has committed, with the term it did so in.
            log = self._log_of(node_id)
            for index in range(max(1, st.commit - 64), st.commit + 1):
                if index in log and index not in self.committed:
                    term, data = log[index]
                    self.committed[index] = (term, data, st.term)

    def _log_of(self, node_id: int) -> dict[int, tuple[int, bytes]]:
        """The node's persisted log (plus its snapshot index as a marker)."""
        return {e.index: (e.term, e.data) for e in self.nodes[node_id].storage.all_entries()}

    # -- network ------------------------------------------------------------------

    def deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        if node is None or node.raw is None or (m.frm, m.to) in self.cut_links:
            return
        node.raw.step(m)
        self._observe(m.to)

    def deliver_all(self, keep: Callable[[Message], bool] | None = None) -> int:
        msgs, self.msgs = self.msgs, []
        n = 0
        for m in msgs:
            if keep is None or keep(m):
                self.deliver(m)
                n += 1
        return n

    def stabilize(self, max_rounds: int = 10_000, keep: Callable[[Message], bool] | None = None) -> None:
        for _ in range(max_rounds):
            progressed = False
            for i in sorted(self.nodes):
                while self.process_ready(i):
                    progressed = True
            if self.msgs:
                self.deliver_all(keep)
                progressed = True
            if not progressed:
                self.check()
                return
        raise AssertionError("network did not stabilize")

    def tick(self, node_id: int, n: int = 1) -> None:
        for _ in range(n):
            self.raw(node_id).tick()
            self._observe(node_id)

    def heartbeat(self, leader: int, max_ticks: int = 100) -> None:
        """Tick only the leader until a heartbeat round has gone out, then
        stabilize: followers learn the commit index from it (§5.3: from later
        AppendEntries, heartbeats included; no empty APPEND goes out just to
        announce a commit)."""
        for _ in range(max_ticks):
            self.tick(leader)
            self.process_ready(leader)
            sent = any(m.type == MessageType.HEARTBEAT for m in self.msgs)
            self.stabilize()
            if sent:
                return
        raise AssertionError(f"node {leader} sent no heartbeat in {max_ticks} ticks")

    def tick_all(self, n: int = 1, stabilize: bool = True) -> None:
        for _ in range(n):
            for i in sorted(self.nodes):
                if self.nodes[i].alive:
                    self.raw(i).tick()
                    self._observe(i)
            if stabilize:
                self.stabilize()

    def cut(self, a: int, b: int) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, a: int) -> None:
        for b in self.nodes:
            if b != a:
                self.cut(a, b)

    def recover(self) -> None:
        self.cut_links.clear()

    # -- conveniences ---------------------------------------------------------------

    def elect(self, node_id: int) -> None:
        self.raw(node_id).campaign()
        self.stabilize()
        assert self.raw(node_id).status().role == Role.LEADER, self.raw(node_id).status()

    def leader(self) -> int:
        best = (0, 0)
        for i, node in self.nodes.items():
            if node.raw is not None:
                st = node.raw.status()
                if st.role == Role.LEADER and st.term > best[0]:
                    best = (st.term, i)
        return best[1]

    def propose(self, node_id: int, data: bytes) -> tuple[int, int]:
        return self.raw(node_id).propose(data)

    def compact(self, node_id: int, index: int) -> None:
        """What the shell does: snapshot the applied state, then compact."""
        node = self.nodes[node_id]
        assert index <= node.applied_index
        state = [x for x in node.applied if x[0] <= index]
        node.storage.create_snapshot(index, self.raw(node_id).conf_state_at(index), encode_state(state))
        node.storage.compact(index + 1)

    # -- checkers ------------------------------------------------------------------

    def check(self) -> None:
        """All four Figure 3 properties plus each core's own invariants."""
        for node in self.nodes.values():
            if node.raw is not None:
                node.raw.assert_invariants()
        self.check_log_matching()
        self.check_leader_completeness()

    def check_log_matching(self) -> None:
        logs = {i: self._log_of(i) for i in self.nodes}
        ids = sorted(logs)
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                a, b = logs[ids[x]], logs[ids[y]]
                common = sorted(set(a) & set(b))
                matched = False
                for index in reversed(common):
                    if not matched and a[index][0] == b[index][0]:
                        matched = True
                    if matched and a[index] != b[index]:
                        raise SafetyViolation(
                            f"log matching: nodes {ids[x]} and {ids[y]} differ at {index} "
                            "below a common (index, term)"
                        )

    def check_leader_completeness(self) -> None:
        for i, node in self.nodes.items():
            if node.raw is None:
                continue
            st = node.raw.status()
            if st.role != Role.LEADER:
                continue
            log = self._log_of(i)
            snap_index = node.storage.snapshot().meta.index
            for index, (term, data, commit_term) in self.committed.items():
                if commit_term < st.term and index > snap_index:
                    if log.get(index) != (term, data):
                        raise SafetyViolation(
                            f"leader completeness: leader {i} of term {st.term} lacks "
                            f"entry {index} committed in term {commit_term}"
                        )
