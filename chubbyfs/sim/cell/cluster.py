"""The Chubby cell in simulation: every replica is the real `RaftNode` plus
the real master (`CellService`) over the simulated disk and network, with
clients reaching the replicas through simulated links (`rpc.py`).

It reuses the register simulator by subclassing: `CellSimNode` swaps the
state machine for the cell's (wrapped so the lock checker sees every apply
and restore on every incarnation), runs the master service and the client
request server beside the Raft loop, and takes them down with it on crash.
`CellSimCluster` adds the client links, the fenced resource and the cell
checkers to `SimCluster`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ...cell.master import CellService, ObservedStateMachine, raft_error_reply
from ...cell.state_machine import CellStateMachine
from ...raft.node import RaftNode
from ...wire.cell_protocol import ITEM_INVALIDATE
from ..checkers.cache import CacheChecker
from ..checkers.cell_nodes import CellFileModel
from ..checkers.fencing import FencedResource
from ..checkers.locks import LockSafetyChecker
from ..checkers.wgl import CheckResult, check_operations
from ..cluster import SimCluster, SimConfig, SimNode
from ..history import HistoryRecorder
from ..network import NetworkConfig
from .rpc import CLIENT_ENDPOINT_BASE, ClientLinks, RpcPacket
from .session import UNSAFE_CACHE_MODES

CELL_NAME = "sim"
# KeepAlive reply fields only the simulation adds (see `_answer`).
SIM_LEASE_END = "sim_lease_end_ms"
SIM_BUILT_AT = "sim_built_at"
# Marks a P9 violation whose cause is the cache registry bug found by this
# simulation (finding 3): a change of a path does not wait for a cacher that
# has not yet acknowledged an earlier invalidation of it.
EARLIER_WAIT_FINDING = "the master still holds an unacknowledged invalidation for this cacher"
CELL_ROOT = f"/ls/{CELL_NAME}"
PRINCIPAL = "sim"


@dataclass(frozen=True)
class CellSimConfig:
    """The Raft cluster's SimConfig (`base`, whose own register clients are
    unused) plus what the cell workload needs. Times are virtual."""

    base: SimConfig = field(default_factory=lambda: SimConfig(client_count=0))
    client_count: int = 3
    session_lease_ms: int = 800
    lock_delay_ms: int = 300
    clock_offset_max_ms: int = 20  # each replica's clock is off by up to this much
    links: NetworkConfig = field(default_factory=NetworkConfig)
    attempt_timeout_seconds: float = 0.3  # one request to one replica
    request_timeout_seconds: float = 1.0  # one client operation, retries included
    acquire_attempt_seconds: float = 1.5  # a blocking Acquire waits this long per attempt
    think_seconds: float = 0.03
    fencing: bool = True  # False: the negative control (the resource accepts stale holders)
    grace_ms: int = 2_000  # the clients' grace period after their local lease runs out
    unsafe_cache: str = ""  # a negative control: see session.UNSAFE_CACHE_MODES
    data_paths: tuple[str, ...] = (f"{CELL_ROOT}/d0", f"{CELL_ROOT}/d1")
    lock_paths: tuple[str, ...] = (f"{CELL_ROOT}/l0", f"{CELL_ROOT}/l1")  # l1 is ephemeral
    ephemeral_paths: tuple[str, ...] = (f"{CELL_ROOT}/e0",)
    liveness_seconds: float = 6.0

    def __post_init__(self) -> None:
        if self.base.client_count:
            raise ValueError("the cell simulation has its own clients: base.client_count must be 0")
        if self.client_count < 1:
            raise ValueError("client_count must be at least 1")
        if self.session_lease_ms <= 0 or self.lock_delay_ms < 0 or self.grace_ms < 0:
            raise ValueError("session_lease_ms must be positive, lock_delay_ms and grace_ms non-negative")
        if self.unsafe_cache not in UNSAFE_CACHE_MODES:
            raise ValueError(f"unsafe_cache must be one of {UNSAFE_CACHE_MODES}, not {self.unsafe_cache!r}")


def _describe(exc: BaseException) -> str:
    """An exception (the leaves of an exception group) in one line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class CheckedStateMachine(ObservedStateMachine):
    """The master's observed state machine, reporting every apply and restore
    to the simulation's lock checker (white-box, on every replica)."""

    def __init__(self, sm: CellStateMachine, on_applied: Callable[[int, bytes, Any], None],
                 on_restored: Callable[[], None]) -> None:
        super().__init__(sm)
        self._on_applied = on_applied
        self._on_restored = on_restored

    def apply(self, index: int, command: bytes) -> Any:
        result = super().apply(index, command)
        self._on_applied(index, command, result)
        return result

    def restore(self, data: bytes) -> None:
        super().restore(data)
        self._on_restored()


class CellSimNode(SimNode):
    cluster: CellSimCluster

    def __init__(self, cluster: CellSimCluster, node_id: int) -> None:
        super().__init__(cluster, node_id)
        offset_max = cluster.cell_config.clock_offset_max_ms
        self.clock_offset_ms = cluster.rng.stream(f"clock-{node_id}").randint(-offset_max, offset_max)
        self.service: CellService | None = None
        self._service_scope: trio.CancelScope | None = None
        self._running = trio.Event()
        self._running.set()

    def clock_ms(self) -> int:
        return int(trio.current_time() * 1000) + self.clock_offset_ms

    def _make_state_machine(self) -> Any:
        incarnation = self.incarnation
        checker = self.cluster.lock_checker
        sm = CellStateMachine()

        def applied(index: int, command: bytes, result: Any) -> None:
            checker.on_apply(self.id, incarnation, index, command, result, sm)
            cache_checker = self.cluster.cache_checker
            cache_checker.on_apply(index, result.events)
            service = self.service
            if service is not None and service.epoch and result.events:
                # The master has just queued these events as items (in _on_apply).
                cache_checker.on_master_queued(service.epoch, index, result.events, service.cache.pending,
                                               trio.current_time())

        return CheckedStateMachine(sm, applied, lambda: checker.on_restore(self.id, incarnation, sm))

    async def _run(self, node: RaftNode, scope: trio.CancelScope, incarnation: int) -> None:
        cluster = self.cluster
        cfg = cluster.cell_config
        service = CellService(
            node, node.state_machine, cell_name=CELL_NAME, admins=(PRINCIPAL,),
            session_lease_ms=cfg.session_lease_ms, clock_ms=self.clock_ms,
            secret_source=cluster.rng.fresh(f"secret-{self.id}-{incarnation}").randbytes,
        )
        self.service = service
        async with trio.open_nursery() as nursery:
            self._service_scope = nursery.cancel_scope
            nursery.start_soon(self._run_service, service)
            cluster.links.attach_server(
                self.id, lambda packet: nursery.start_soon(self._answer, service, node, incarnation, packet))
            await super()._run(node, scope, incarnation)
            if self.incarnation == incarnation:
                cluster.links.detach_server(self.id)
            nursery.cancel_scope.cancel()

    async def _run_service(self, service: CellService) -> None:
        try:
            await service.run()
        except Exception as exc:  # noqa: BLE001 - a master that dies is a finding
            text = _describe(exc)
            self.cluster.violations.append(f"master service on n{self.id} died: {text}")
            self.cluster.log(f"n{self.id} master service died: {text}")

    async def _answer(self, service: CellService, node: RaftNode, incarnation: int, packet: RpcPacket) -> None:
        # A paused replica reads no requests and sends no replies.
        await self._running.wait()
        reply = await self._handle(service, packet.body)
        built_at = trio.current_time()
        await self._running.wait()
        if self.incarnation == incarnation and self.raft is node:
            op = packet.body.get("op")
            if op in ("set_contents", "delete") and "error" not in reply:
                self.cluster.check_write_ack(self, packet.body, reply)
            elif op == "keep_alive" and "error" not in reply:
                session_id = packet.body["session_id"]
                self.cluster.check_renewal(self, packet.frm - CLIENT_ENDPOINT_BASE, session_id)
                # White-box, for the write-acknowledgement check: the lease end
                # this reply grants, in the master's stamped time.
                session = node.state_machine.sm.sessions.get(session_id)
                reply = {**reply, SIM_LEASE_END: 0 if session is None else session.lease_end_ms,
                         SIM_BUILT_AT: built_at}
            self.cluster.links.reply(self.id, packet, reply)

    async def _handle(self, service: CellService, request: dict) -> dict:
        """What a replica's connection handler answers (as in cell/replica.py):
        through the master's inline path when it takes the call, else its
        general path."""
        answered = trio.Event()
        inline: dict = {}

        def reply_to(reply: dict | None, error: BaseException | None) -> None:
            inline["reply"] = reply if error is None else self._error_reply(error, request)
            answered.set()

        try:
            if service.handle_nowait(request, PRINCIPAL, reply_to):
                await answered.wait()
                return inline["reply"]
            return await service.handle(request, PRINCIPAL)
        except Exception as exc:  # noqa: BLE001 - the master must answer every request
            return self._error_reply(exc, request)

    def _error_reply(self, exc: BaseException, request: dict) -> dict:
        reply = raft_error_reply(exc)  # the replica's answer (no addresses here)
        if reply is not None:
            return reply
        self.cluster.violations.append(
            f"master on n{self.id} raised {type(exc).__name__} for {request.get('op')}: {exc}")
        return {"error": "internal", "message": f"{type(exc).__name__}: {exc}"}

    def crash(self) -> None:
        if self.raft is not None:
            self.cluster.links.detach_server(self.id)
            if self._service_scope is not None:
                self._service_scope.cancel()
            self._running.set()
        super().crash()

    def pause(self) -> None:
        if self.raft is not None and not self.paused:
            self._running = trio.Event()
        super().pause()

    def resume(self) -> None:
        super().resume()
        self._running.set()


class CellSimCluster(SimCluster):
    def __init__(self, config: CellSimConfig, seed: int, *,
                 trace_sink: Callable[[str], None] | None = None) -> None:
        self.cell_config = config
        self.lock_checker = LockSafetyChecker()
        self.cache_checker = CacheChecker()
        self.resource = FencedResource(fencing=config.fencing)
        super().__init__(config.base, seed, trace_sink=trace_sink)
        self.links = ClientLinks(config.links, self.rng.stream("client-links"), on_deliver=self._on_rpc)
        self.nodes = {i: CellSimNode(self, i) for i in self.node_ids}
        self.chubby_clients: list[Any] = []
        self.false_expiries: list[str] = []
        # Node operations (P8); the inherited `history` is the register's and stays empty.
        self.cell_history = HistoryRecorder()

    def _on_rpc(self, now: float, packet: RpcPacket) -> None:
        body = packet.body
        line = f"{now:.6f} {packet.frm}>{packet.to} #{packet.call_id} {body.get('op') or body.get('error') or 'ok'}"
        self._hasher.update(line.encode())
        if self._trace_sink is not None:
            self._trace_sink(f"{now:10.4f}   rpc {line[line.index(' ') + 1:]}")

    def heal(self) -> None:
        super().heal()
        self.links.heal()

    def session_ended_in_cell(self, session_id: int) -> bool:
        return self.lock_checker.session_ended(session_id)

    # ---- white-box cache and session checks (checkers/cache.py) ------------------------

    def check_write_ack(self, node: CellSimNode, request: dict, reply: dict) -> None:
        """`node` is about to acknowledge a write: nobody may still serve the
        node's old state from its cache unless it lost its lease."""
        assert node.raft is not None
        if request["op"] == "set_contents":
            instance, generation = reply["value"]["instance"], reply["value"]["content_generation"]
        else:
            instance, generation = request["handle"][2], None
        now = trio.current_time()
        cachers = [(f"c{client.index}", session.id, session.cached_entries(), session.cache_usable(now),
                    session.master_lease_end_ms)
                   for client in self.chubby_clients for session in (client.session,) if session is not None]
        before = len(self.cache_checker.violations)
        self.cache_checker.on_write_ack(f"n{node.id} at {now:.4f}s", instance, generation, node.clock_ms(),
                                        cachers)
        service = node.service
        if len(self.cache_checker.violations) > before and service is not None:
            # Diagnose the known registry bug (docs/simulation.md, finding 3):
            # the master moved on while this cacher's invalidation was unacknowledged.
            waited = {sid for mod in service.cache._mods.values() for sid in mod.waiting}
            waited |= {client.session.id for client in self.chubby_clients if client.session is not None
                       and any(item.kind == ITEM_INVALIDATE for item in service.cache.pending(client.session.id))}
            stale = self.cache_checker.violations[before:]
            self.cache_checker.violations[before:] = [
                v + f" [{EARLIER_WAIT_FINDING}]" if any(f"session {sid} " in v for sid in waited) else v
                for v in stale]

    def check_renewal(self, node: CellSimNode, client_index: int, session_id: int) -> None:
        """`node` is about to renew the session: the locks its client believes
        it holds are still its there."""
        assert node.raft is not None
        sm = node.raft.state_machine.sm
        client = self.chubby_clients[client_index]
        holding = client.holding
        if client.session_id != session_id or holding is None:
            return
        held = [(holding.path, holding.ref[0])]

        def holders_of(path: str) -> Any:
            lock_node = sm.nodes.get(sm.by_path.get(path, -1))
            return None if lock_node is None else lock_node.lock.holders.keys()

        self.cache_checker.on_renewed(f"c{client.index}", session_id, f"n{node.id} at {trio.current_time():.4f}s",
                                      held, holders_of)

    def check(self) -> list[str]:
        problems = super().check()
        problems += self.lock_checker.check_history()
        problems += self.resource.check(self.lock_checker.granted)
        problems += self.false_expiries
        for client in self.chubby_clients:
            for session in client.sessions:
                self.cache_checker.check_events(session.id, session.delivered, f"c{client.index}",
                                                session.last_reply_built)
        problems += self.cache_checker.violations
        report = check_operations(CellFileModel(), self.cell_history.operations(),
                                  max_steps=self.config.wgl_max_steps)
        if report.result is CheckResult.ILLEGAL:
            path = report.bad_partition[0].input[1] if report.bad_partition else "?"
            problems.append(f"P8 linearizability: operations on {path} are not linearizable")
        elif report.result is CheckResult.UNKNOWN:
            problems.append("P8 linearizability: checker budget exhausted (UNKNOWN counts as failure)")
        self.violations = problems
        return problems


@asynccontextmanager
async def open_cell_cluster(config: CellSimConfig, seed: int, *,
                            trace_sink: Callable[[str], None] | None = None) -> AsyncIterator[CellSimCluster]:
    """Start both networks, the replicas (each with its master service), the
    clients' endpoints and the invariant sweep; cancel everything on exit."""
    from .client import ChubbyClient

    cluster = CellSimCluster(config, seed, trace_sink=trace_sink)
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery
        await nursery.start(cluster.network.run)
        await nursery.start(cluster.links.run)
        for node in cluster.nodes.values():
            node._start(bootstrap_voters=cluster.node_ids)
        cluster.chubby_clients = [ChubbyClient(cluster, i) for i in range(config.client_count)]
        nursery.start_soon(cluster._sweep_invariants)
        body_scope = trio.CancelScope()
        nursery.start_soon(cluster._message_watchdog, body_scope)
        try:
            with body_scope:
                yield cluster
        finally:
            nursery.cancel_scope.cancel()
