"""SimCluster: real RaftNodes on simulated disks and a simulated network,
with register clients recording a Knossos history, and the checkers wired in.

Scenario tests drive it directly::

    async with open_cluster(SimConfig(node_count=3), seed=7) as cluster:
        await cluster.client(0).put("k", b"v")
        cluster.node(1).crash()
        cluster.partition({1}, {2, 3})
        ...
    cluster.check()          # raises on any violation

Everything random comes from named streams of one seed (rng.py), so a run is
a pure function of (seed, config, plan) under determinism.run_deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ..cell import kv
from ..raft.node import (
    NodeStoppedError, NotLeaderError, ProposalLostError, ProposalOutcomeUnknownError, RaftNode, bootstrap_storage,
)
from ..raft import Config, ProposalDroppedError
from ..raft.types import Message
from ..storage.raft_storage import DiskStorage
from ..storage.snapshot import SnapshotFormatError
from ..storage.wal import WalCorruptionError
from .checkers.durability import AckedWrite, ReplicaView, check_durability
from .checkers.raft_invariants import RaftInvariantChecker
from .checkers.wgl import CheckResult, RegisterModel, check_operations
from .disk import SimFS
from .history import HistoryRecorder
from .network import NetworkConfig, SimNetwork
from .rng import SimRandom

DATA_DIRECTORY = "/raft"


@dataclass(frozen=True)
class SimConfig:
    node_count: int = 3
    client_count: int = 3
    keys: tuple[str, ...] = ("a", "b", "c")
    # Time is virtual, so these only need to be consistent with each other
    # and with the network delays; a small tick keeps message counts low.
    tick_seconds: float = 0.01
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    snapshot_every: int = 50
    snapshot_keep_entries: int = 10
    # By count alone: the simulator wants snapshots often, for coverage.
    snapshot_log_ratio: float = 0.0
    inbound_capacity: int = 512
    # Bytes of entries per APPEND; a tiny value makes a lagging follower
    # catch up one entry per message (BUGGIFY-style: legal but rare timing).
    max_size_per_msg: int = 1 << 20
    network: NetworkConfig = field(default_factory=NetworkConfig)
    request_timeout_seconds: float = 0.6
    client_think_seconds: float = 0.02  # mean pause between a client's ops
    lying_fsync: bool = False  # negative control: SimFS acknowledges fsync without persisting
    unsafe_commit_previous_term: bool = False  # negative control: Raft commits old-term entries by counting
    unsafe_local_reads: bool = False  # negative control: clients read any replica's state machine directly
    liveness_seconds: float = 6.0  # bound for recovery after the final heal
    # Livelock guard: a run is stopped (and fails) when it delivers more than
    # this many messages in all, or more than storm_messages_per_second for
    # half a virtual second in a row. It also bounds a bad seed's wall time.
    max_messages_total: int = 100_000
    storm_messages_per_second: int = 5_000
    wgl_max_steps: int = 2_000_000

    def __post_init__(self) -> None:
        if self.node_count < 1:
            raise ValueError("node_count must be at least 1")
        if self.client_count < 0:
            raise ValueError("client_count must be non-negative")
        if not self.keys:
            raise ValueError("at least one key is needed")


class SimViolation(AssertionError):
    """A checker found a safety or liveness violation in a simulated run."""


class SimNode:
    """One replica slot: its disk survives crashes, everything else does not."""

    def __init__(self, cluster: SimCluster, node_id: int) -> None:
        self.cluster = cluster
        self.id = node_id
        self.fs = SimFS()
        self.raft: RaftNode | None = None
        self.incarnation = -1
        self._scope: trio.CancelScope | None = None
        self.paused = False
        self.crashes = 0

    @property
    def up(self) -> bool:
        return self.raft is not None

    def _start(self, *, bootstrap_voters: list[int] | None) -> None:
        cluster = self.cluster
        cfg = cluster.config
        if bootstrap_voters is not None:
            storage = DiskStorage(self.fs, DATA_DIRECTORY)
            bootstrap_storage(storage, bootstrap_voters)
            # The negative control lies only after the founding state is
            # down, so a crash rolls back to a bootstrapped replica rather
            # than to an empty disk.
            self.fs.lying_fsync = cfg.lying_fsync
        else:
            try:
                storage = DiskStorage.open(self.fs, DATA_DIRECTORY)
            except (WalCorruptionError, SnapshotFormatError) as exc:
                # Refusing to start on a damaged log is the designed outcome
                # for corruption; with an honest disk it is a bug.
                cluster.violations.append(f"node {self.id} refused to start: {exc}")
                cluster.log(f"n{self.id} refused to start: {exc}")
                return
        self.incarnation += 1
        incarnation = self.incarnation
        cluster.checker.on_start(self.id, incarnation, storage)
        raft_config = Config(
            id=self.id,
            election_tick=cfg.election_ticks,
            heartbeat_tick=cfg.heartbeat_ticks,
            max_size_per_msg=cfg.max_size_per_msg,
            unsafe_commit_previous_term=cfg.unsafe_commit_previous_term,
        )
        node = RaftNode(
            config=raft_config,
            storage=storage,
            transport=cluster.network.transport(self.id),
            state_machine=self._make_state_machine(),
            rng=cluster.rng.fresh(f"node-{self.id}-{incarnation}"),
            tick_seconds=cfg.tick_seconds,
            snapshot_every=cfg.snapshot_every,
            snapshot_keep_entries=cfg.snapshot_keep_entries,
            snapshot_log_ratio=cfg.snapshot_log_ratio,
            inbound_capacity=cfg.inbound_capacity,
            trace=lambda kind, fields: cluster._on_node_trace(self.id, incarnation, kind, fields),
        )
        self.raft = node
        self.paused = False
        self._scope = trio.CancelScope()
        cluster.network.attach(self.id, node.deliver)
        cluster._nursery.start_soon(self._run, node, self._scope, incarnation)
        cluster.log(f"n{self.id} start incarnation={incarnation} last_index={storage.last_index()}")

    def _make_state_machine(self) -> Any:
        """The state machine of a new incarnation: the register here; the cell
        simulation (sim/cell) substitutes the Chubby cell's."""
        return kv.KVStateMachine()

    async def _run(self, node: RaftNode, scope: trio.CancelScope, incarnation: int) -> None:
        with scope:
            try:
                await node.run()
            except Exception as exc:  # noqa: BLE001 - a replica that dies is a finding, not a harness crash
                self.cluster.violations.append(f"node {self.id} died: {type(exc).__name__}: {exc}")
                self.cluster.log(f"n{self.id} died: {type(exc).__name__}: {exc}")
                if self.incarnation == incarnation and self.raft is node:
                    # Like a process crash, minus the disk damage: the
                    # liveness phase restarts it from its disk.
                    self.cluster.network.detach(self.id)
                    self.raft = None
                    self.paused = False

    def crash(self) -> None:
        """Power loss: the process dies now and the disk keeps only what its
        crash model says survives (un-synced data lost, last write torn)."""
        if self.raft is None:
            return
        self.cluster.log(f"n{self.id} crash")
        assert self._scope is not None
        # Its tasks die at their next checkpoint; one already woken (by a
        # resume in the same instant) must not run its synchronous Raft
        # step first against the crashed disk, so freeze it too.
        self.raft.pause()
        self._scope.cancel()
        self.cluster.network.detach(self.id)
        self.raft = None
        self.paused = False
        self.crashes += 1
        self.fs.crash(self.cluster.rng.stream(f"disk-{self.id}"))

    def restart(self) -> None:
        if self.raft is not None:
            return
        self._start(bootstrap_voters=None)

    def pause(self) -> None:
        """Freeze the replica (SIGSTOP): no ticks, no message handling; peers,
        clients and the network carry on. Inbound messages queue (bounded)."""
        if self.raft is not None and not self.paused:
            self.cluster.log(f"n{self.id} pause")
            self.raft.pause()
            self.paused = True

    def resume(self) -> None:
        if self.raft is not None and self.paused:
            self.cluster.log(f"n{self.id} resume")
            self.raft.resume()
            self.paused = False

    def status(self) -> dict[str, Any] | None:
        return None if self.raft is None else self.raft.status()


class SimClient:
    """A register client: put / get / cas against whoever it thinks leads."""

    def __init__(self, cluster: SimCluster, client_id: int) -> None:
        self.cluster = cluster
        self.id = client_id
        self.process = cluster.history.new_process()
        self.leader_guess = cluster.node_ids[client_id % len(cluster.node_ids)]
        self._writes = 0
        self.last_seen: dict[str, bytes | None] = {}

    def next_value(self) -> bytes:
        self._writes += 1
        return f"c{self.id}-{self._writes}".encode()

    async def put(self, key: str, value: bytes) -> str:
        return await self._write("put", key, value, kv.encode_put(key, value))

    async def cas(self, key: str, expected: bytes | None, new: bytes) -> str:
        return await self._write("cas", key, (expected, new), kv.encode_cas(key, expected, new))

    async def get(self, key: str) -> tuple[str, bytes | None]:
        """Returns ("ok", value) or ("fail", None)."""
        try:
            return await self._get(key)
        except trio.Cancelled:
            self._abandon("fail")
            raise

    async def _write(self, f: str, key: str, args: Any, command: bytes) -> str:
        try:
            return await self._write_once(f, key, args, command)
        except trio.Cancelled:
            self._abandon("info")
            raise

    def _abandon(self, type_: str) -> None:
        """The caller was cancelled mid-operation (end of a scenario)."""
        if self.cluster.history.has_pending(self.process):
            self.cluster.history.complete(self.process, type_, "cancelled", trio.current_time())
            if type_ == "info":
                self.process = self.cluster.history.new_process()

    async def _get(self, key: str) -> tuple[str, bytes | None]:
        cluster = self.cluster
        history = cluster.history
        history.invoke(self.process, "get", key, None, trio.current_time())
        deadline = trio.current_time() + cluster.config.request_timeout_seconds
        with trio.move_on_at(deadline):
            while True:
                node = self._target()
                if node is None:
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                try:
                    if cluster.config.unsafe_local_reads:
                        result = self._unsafe_local_read(key)
                    else:
                        result = await node.read(("get", key))
                except NotLeaderError as exc:
                    self._redirect(exc)
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                except NodeStoppedError:
                    self._redirect(None)
                    continue
                value = result["value"]
                history.ok(self.process, value, trio.current_time())
                self.last_seen[key] = value
                return "ok", value
        # A read has no effect, so one that did not answer certainly "did
        # not happen" as far as linearizability is concerned.
        history.fail(self.process, "timeout", trio.current_time())
        return "fail", None

    def _unsafe_local_read(self, key: str) -> Any:
        """The "serve reads without ReadIndex or lease" bug: answer from
        whichever up replica the dice pick, however stale."""
        rng = self.cluster.rng.stream(f"client-{self.id}")
        up = [n for n in self.cluster.nodes.values() if n.raft is not None]
        return up[rng.randrange(len(up))].raft.state_machine.query(("get", key))

    async def _write_once(self, f: str, key: str, args: Any, command: bytes) -> str:
        """Returns "ok", "fail" (certainly not applied) or "info" (unknown)."""
        cluster = self.cluster
        history = cluster.history
        history.invoke(self.process, f, key, args, trio.current_time())
        deadline = trio.current_time() + cluster.config.request_timeout_seconds
        outcome = "info"
        detail: Any = "timeout"
        with trio.move_on_at(deadline):
            while True:
                node = self._target()
                if node is None:
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                try:
                    result = await node.propose(command)
                except NotLeaderError as exc:
                    # Raised before anything was appended: safe to try elsewhere.
                    self._redirect(exc)
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                except ProposalDroppedError:
                    # Refused before appending (e.g. a leadership transfer is
                    # under way): certainly not applied, so retry shortly.
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                except ProposalLostError:
                    # Another leader's entry took its place: certainly not
                    # applied, so retry like a refusal.
                    self._redirect(None)
                    await trio.sleep(cluster.config.tick_seconds)
                    continue
                except ProposalOutcomeUnknownError as exc:  # includes NodeStoppedError
                    self._redirect(None)
                    detail = type(exc).__name__
                    break
                if f == "put":
                    outcome, detail = "ok", None
                else:
                    outcome, detail = "ok", bool(result.get("ok"))
                if result.get("ok"):
                    cluster.acked_writes.append(
                        AckedWrite(result["version"], command, f"{f} {key}={args!r} by p{self.process}")
                    )
                    if f == "put" or detail:
                        self.last_seen[key] = args if f == "put" else args[1]
                break
        now = trio.current_time()
        if outcome == "ok":
            history.ok(self.process, detail, now)
        else:
            history.info(self.process, detail, now)
            # Knossos: a process with an indeterminate op is crashed for good.
            self.process = history.new_process()
        return outcome

    def _target(self) -> RaftNode | None:
        node = self.cluster.nodes[self.leader_guess]
        if node.raft is None:
            self._redirect(None)
            return None
        return node.raft

    def _redirect(self, exc: NotLeaderError | None) -> None:
        hint = getattr(exc, "leader", 0) if exc is not None else 0
        ids = self.cluster.node_ids
        if hint in self.cluster.nodes and hint != self.leader_guess:
            self.leader_guess = hint
        else:
            rng = self.cluster.rng.stream(f"client-{self.id}")
            self.leader_guess = ids[rng.randrange(len(ids))]

    async def run_workload(self, stop: trio.Event) -> None:
        rng = self.cluster.rng.stream(f"workload-{self.id}")
        keys = self.cluster.config.keys
        think = self.cluster.config.client_think_seconds
        while not stop.is_set():
            key = keys[rng.randrange(len(keys))]
            roll = rng.random()
            if roll < 0.4:
                await self.get(key)
            elif roll < 0.8:
                await self.put(key, self.next_value())
            else:
                expected = self.last_seen.get(key)
                await self.cas(key, expected, self.next_value())
            if think:
                await trio.sleep(rng.expovariate(1.0 / think))


class SimCluster:
    def __init__(self, config: SimConfig, seed: int, *, trace_sink: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.seed = seed
        self.rng = SimRandom(seed)
        self.node_ids = list(range(1, config.node_count + 1))
        self.history = HistoryRecorder()
        self.checker = RaftInvariantChecker()
        self.acked_writes: list[AckedWrite] = []
        self.violations: list[str] = []
        self._hasher = hashlib.sha256()
        self._trace_sink = trace_sink
        self.trace_tail: list[str] = []
        self.network = SimNetwork(config.network, self.rng.stream("network"), on_deliver=self._on_deliver)
        self.nodes: dict[int, SimNode] = {i: SimNode(self, i) for i in self.node_ids}
        self.clients: list[SimClient] = []
        # Synchronous observers of replica trace events, for scripted
        # scenarios that must react at an exact point (e.g. "the moment n5
        # becomes leader"). Called inside the replica's Ready handling.
        self.trace_hooks: list[Callable[[int, str, dict], None]] = []
        self._nursery: trio.Nursery

    # ---- scenario API ------------------------------------------------------------

    def node(self, node_id: int) -> SimNode:
        return self.nodes[node_id]

    def client(self, index: int) -> SimClient:
        return self.clients[index]

    def partition(self, *groups: set[int]) -> None:
        self.log(f"partition {[sorted(g) for g in groups]}")
        self.network.partition(*groups, nodes=self.node_ids)

    def heal(self) -> None:
        self.log("heal")
        self.network.heal()

    def leader(self) -> int | None:
        """The up, unpaused node that leads in the highest term, if any."""
        best: tuple[int, int] | None = None
        for node in self.nodes.values():
            st = node.status()
            if st is not None and not node.paused and st["role"] == "leader":
                if best is None or st["term"] > best[0]:
                    best = (st["term"], node.id)
        return None if best is None else best[1]

    async def wait_for_leader(self, timeout_seconds: float) -> int | None:
        with trio.move_on_after(timeout_seconds):
            while (leader := self.leader()) is None:
                await trio.sleep(self.config.tick_seconds)
            return leader
        return None

    # ---- tracing -----------------------------------------------------------------

    def log(self, line: str) -> None:
        stamped = f"{trio.current_time():10.4f} {line}"
        self._hasher.update(stamped.encode())
        self.trace_tail.append(stamped)
        if len(self.trace_tail) > 400:
            del self.trace_tail[:200]
        if self._trace_sink is not None:
            self._trace_sink(stamped)

    def _on_node_trace(self, node_id: int, incarnation: int, kind: str, fields: dict) -> None:
        self.checker.on_event(node_id, incarnation, kind, fields)
        for hook in self.trace_hooks:
            hook(node_id, kind, fields)
        if kind == "apply":
            text = f"index={fields['index']} term={fields['term']} data={fields['data'][:40]!r}"
        else:
            text = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        self.log(f"n{node_id}.{incarnation} {kind} {text}")

    def _on_deliver(self, now: float, frm: int, to: int, msg: Message) -> None:
        # Every delivery goes into the digest (cheaply); only --trace prints it.
        line = f"{now:.6f} {frm}>{to} {msg.type.name} t={msg.term} i={msg.index} n={len(msg.entries)} c={msg.commit}"
        self._hasher.update(line.encode())
        if self._trace_sink is not None:
            self._trace_sink(f"{now:10.4f}   msg {line[line.index(' ') + 1:]}")

    def digest(self) -> str:
        return self._hasher.copy().hexdigest()[:16]

    # ---- checks --------------------------------------------------------------------

    def _storages(self) -> dict[int, tuple[int, Any]]:
        return {n.id: (n.incarnation, n.raft.storage) for n in self.nodes.values() if n.raft is not None}

    async def _sweep_invariants(self) -> None:
        while True:
            await trio.sleep(self.config.tick_seconds * 2)
            self.checker.check_leader_logs(self._storages())

    async def _message_watchdog(self, body_scope: trio.CancelScope) -> None:
        """Stop the scenario body on a livelock: a sustained message storm
        (a burst such as a follower catching up is fine) or too many in all."""
        window_seconds = 0.1
        hot_windows = 0
        stats = self.network.stats
        while True:
            before = stats["delivered"]
            await trio.sleep(window_seconds)
            rate = (stats["delivered"] - before) / window_seconds
            hot_windows = hot_windows + 1 if rate > self.config.storm_messages_per_second else 0
            if hot_windows >= 5 or stats["delivered"] > self.config.max_messages_total:
                break
        self.violations.append(
            f"liveness: message storm ({rate:.0f} messages/s, {stats['delivered']} delivered in all); run stopped"
        )
        self.log("message storm: run stopped")
        body_scope.cancel()

    async def liveness_phase(self) -> None:
        """Heal everything and require recovery within config.liveness_seconds:
        a leader, a successful read of every key by every client, and every
        replica caught up with the leader's commit index."""
        self.heal()
        for node in self.nodes.values():
            node.resume()
            node.restart()
        deadline = trio.current_time() + self.config.liveness_seconds
        leader = await self.wait_for_leader(self.config.liveness_seconds)
        if leader is None:
            self.violations.append("liveness: no leader after healing")
            return
        # Re-add replicas a membership fault left out, so all of them converge.
        from .nemesis import membership_change

        for node_id in self.node_ids:
            while trio.current_time() < deadline:
                leader = self.leader()
                st = None if leader is None else self.nodes[leader].status()
                if st is not None and node_id in st["voters"]:
                    break
                if st is not None and await membership_change(self, "add_voter", node_id):
                    break
                await trio.sleep(self.config.tick_seconds * 5)
        for client in self.clients:
            for key in self.config.keys:
                while True:
                    if trio.current_time() >= deadline:
                        self.violations.append(f"liveness: client {client.id} could not read {key!r} after healing")
                        return
                    status, _ = await client.get(key)
                    if status == "ok":
                        break
                    await trio.sleep(self.config.tick_seconds)
        with trio.move_on_at(deadline):
            while True:
                leader = self.leader()
                if leader is not None:
                    commit = self.nodes[leader].status()["commit"]
                    voters = self._voters()
                    if all(self.nodes[v].up and self.nodes[v].raft.applied >= commit for v in voters):
                        return
                await trio.sleep(self.config.tick_seconds)
        lagging = {n.id: n.status()["applied"] for n in self.nodes.values() if n.raft is not None}
        self.violations.append(f"liveness: replicas did not converge after healing: applied={lagging}")

    def _voters(self) -> list[int]:
        """Voters per the current leader's membership (every node if none)."""
        leader = self.leader()
        if leader is None:
            return list(self.node_ids)
        return [v for v in self.nodes[leader].status()["voters"] if v in self.nodes]

    def check(self) -> list[str]:
        """Run every end-of-run checker; returns (and keeps) all violations."""
        problems = list(self.violations)
        storages = {n.id: (n.raft.storage, n.raft.commit) for n in self.nodes.values() if n.raft is not None}
        self.checker.check_leader_logs(self._storages())
        self.checker.check_logs(storages)
        problems += self.checker.violations
        replicas = [
            ReplicaView(n.id, n.raft.applied, n.raft.storage)
            for n in (self.nodes[v] for v in self._voters())
            if n.raft is not None
        ]
        problems += check_durability(self.acked_writes, self.checker.applied, replicas)
        report = check_operations(RegisterModel(), self.history.operations(), max_steps=self.config.wgl_max_steps)
        if report.result is CheckResult.ILLEGAL:
            key = report.bad_partition[0].input[1] if report.bad_partition else "?"
            problems.append(f"linearizability: history of key {key!r} is not linearizable")
        elif report.result is CheckResult.UNKNOWN:
            problems.append("linearizability: checker budget exhausted (UNKNOWN counts as failure)")
        self.violations = problems
        return problems


@asynccontextmanager
async def open_cluster(
    config: SimConfig, seed: int, *, trace_sink: Callable[[str], None] | None = None
) -> AsyncIterator[SimCluster]:
    """Start the network, the replicas and the invariant sweep; cancel all on exit."""
    cluster = SimCluster(config, seed, trace_sink=trace_sink)
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery
        await nursery.start(cluster.network.run)
        for node in cluster.nodes.values():
            node._start(bootstrap_voters=cluster.node_ids)
        cluster.clients = [SimClient(cluster, i) for i in range(config.client_count)]
        nursery.start_soon(cluster._sweep_invariants)
        body_scope = trio.CancelScope()
        nursery.start_soon(cluster._message_watchdog, body_scope)
        try:
            with body_scope:
                yield cluster
        finally:
            nursery.cancel_scope.cancel()
