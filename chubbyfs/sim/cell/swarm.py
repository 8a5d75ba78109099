"""Swarm runs of the Chubby cell: per seed, the register simulator's draw
(cluster size, network, snapshot interval, enabled fault kinds and the
replica fault plan) plus the cell's own draw (client count, session lease,
lock-delay, clock offsets, client-link parameters and a client fault plan:
pausing a lock holder between its check and its write, pausing any client,
cutting one client from one replica). `run_cell_sim(seed)` is a pure
function of the seed and the code.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable

import trio

from ..determinism import SimHangError, run_deterministic
from ..nemesis import FaultStep, run_plan
from ..network import NetworkConfig
from ..rng import SimRandom
from ..swarm import FAULT_KINDS, SimResult, generate
from .cluster import CellSimCluster, CellSimConfig, open_cell_cluster

CLIENT_FAULT_OPS = ("pause_holder", "pause_client", "cut_client", "mend_client")


@dataclass(frozen=True)
class ClientFault:
    at_seconds: float
    op: str
    args: dict

    def __post_init__(self) -> None:
        if self.op not in CLIENT_FAULT_OPS:
            raise ValueError(f"unknown client fault {self.op!r}")
        if self.at_seconds < 0:
            raise ValueError("fault steps cannot happen before the run starts")

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"@{self.at_seconds:.3f} {self.op} {args}".rstrip()


@dataclass(frozen=True)
class CellScenario:
    seed: int
    config: CellSimConfig
    plan: tuple[Any, ...]  # FaultStep for replicas, then ClientFault, each sorted by time
    safety_seconds: float
    max_messages: int

    @property
    def replica_plan(self) -> list[FaultStep]:
        return [s for s in self.plan if isinstance(s, FaultStep)]

    @property
    def client_plan(self) -> list[ClientFault]:
        return [s for s in self.plan if isinstance(s, ClientFault)]

    def describe(self) -> str:
        c = self.config
        net, links = c.base.network, c.links
        return (f"seed={self.seed} cell nodes={c.base.node_count} clients={c.client_count} "
                f"lease={c.session_lease_ms}ms grace={c.grace_ms}ms lock_delay={c.lock_delay_ms}ms fencing={c.fencing} "
                f"{f'unsafe_cache={c.unsafe_cache} ' if c.unsafe_cache else ''}"
                f"safety={self.safety_seconds:.2f}s max_messages={self.max_messages} "
                f"delay={net.delay_floor_seconds:.4f}+exp({net.delay_mean_seconds:.4f}) loss={net.loss_probability} "
                f"dup={net.duplicate_probability} links={links.delay_floor_seconds:.4f}+"
                f"exp({links.delay_mean_seconds:.4f}) loss={links.loss_probability} faults={len(self.plan)}")


def generate_cell(seed: int, *, fencing: bool = True, kinds: tuple[str, ...] = FAULT_KINDS,
                  unsafe_cache: str = "") -> CellScenario:
    raft = generate(seed, base=replace(CellSimConfig().base), kinds=kinds)
    rng = SimRandom(seed).stream("cell-swarm")
    lease_ms = rng.choice([500, 800, 1200])
    lock_delay_ms = rng.choice([0, 150, 400])
    links = NetworkConfig(
        delay_floor_seconds=rng.choice([0.0005, 0.001, 0.002]),
        delay_mean_seconds=rng.choice([0.001, 0.003, 0.006]),
        loss_probability=rng.choice([0.0, 0.0, 0.01, 0.03]),
        path_capacity=256,
    )
    config = CellSimConfig(
        base=replace(raft.config, client_count=0),
        client_count=raft.config.client_count,
        session_lease_ms=lease_ms,
        lock_delay_ms=lock_delay_ms,
        clock_offset_max_ms=rng.choice([0, 10, 40]),
        links=links,
        fencing=fencing,
        # A separate stream, so the draws above stay what they were.
        grace_ms=SimRandom(seed).stream("cell-grace").choice([lease_ms, 2 * lease_ms, 4 * lease_ms]),
        unsafe_cache=unsafe_cache,
    )
    safety_seconds = raft.safety_seconds + 1.0
    clients = list(range(config.client_count))
    faults: list[ClientFault] = []
    # Holder pauses long enough for the lease and the lock-delay to run out
    # and another client to get in: the stale write fencing must stop.
    for _ in range(rng.choice([0, 1, 1, 2])):
        hold = (lease_ms + lock_delay_ms) / 1000 + rng.uniform(0.3, 1.0)
        faults.append(ClientFault(round(rng.uniform(0.2, safety_seconds * 0.6), 4), "pause_holder",
                                  {"seconds": round(hold, 4)}))
    for _ in range(rng.choice([0, 0, 1])):
        faults.append(ClientFault(round(rng.uniform(0.2, safety_seconds), 4), "pause_client",
                                  {"client": rng.choice(clients), "seconds": round(rng.uniform(0.1, 1.5), 4)}))
    for _ in range(rng.choice([0, 1, 2])):
        t = round(rng.uniform(0.2, safety_seconds), 4)
        args = {"client": rng.choice(clients), "node": rng.randint(1, raft.config.node_count)}
        faults.append(ClientFault(t, "cut_client", args))
        faults.append(ClientFault(round(t + rng.uniform(0.1, 1.0), 4), "mend_client", args))
    plan = tuple(sorted(raft.plan, key=lambda s: s.at_seconds)) + tuple(sorted(faults, key=lambda f: f.at_seconds))
    return CellScenario(seed, config, plan, safety_seconds, raft.max_messages)


async def run_client_plan(cluster: CellSimCluster, plan: list[ClientFault]) -> None:
    start = trio.current_time()
    for step in sorted(plan, key=lambda s: s.at_seconds):
        await trio.sleep_until(start + step.at_seconds)
        cluster.log(f"client nemesis {step}")
        clients = cluster.chubby_clients
        if step.op == "pause_holder":
            # Wait (briefly) for an exclusive holder, then pause it right
            # before its next write to the fenced resource.
            with trio.move_on_after(1.0):
                while True:
                    holders = [c for c in clients if c.holding is not None and c.holding.mode == "exclusive"]
                    if holders:
                        holders[0].pause_at_write_seconds = step.args["seconds"]
                        cluster.log(f"client nemesis: c{holders[0].index} will pause before its write")
                        break
                    await trio.sleep(0.01)
        elif step.op == "pause_client":
            clients[step.args["client"]].freeze(step.args["seconds"])
        elif step.op == "cut_client":
            cluster.links.cut(clients[step.args["client"]].endpoint, step.args["node"])
        elif step.op == "mend_client":
            cluster.links.mend(clients[step.args["client"]].endpoint, step.args["node"])


async def simulate_cell(scenario: CellScenario, trace_sink: Callable[[str], None] | None = None) -> SimResult:
    async with open_cell_cluster(scenario.config, scenario.seed, trace_sink=trace_sink) as cluster:
        cluster.log(scenario.describe())
        async with trio.open_nursery() as sessions:
            # KeepAlives and lease timers run through both phases.
            for client in cluster.chubby_clients:
                client.start_session_tasks(sessions)
            await _safety_phase(cluster, scenario)
            await cluster.liveness_phase()
            await cell_liveness(cluster)
            sessions.cancel_scope.cancel()
        cluster.log("liveness phase over")
    cluster.cell_history.close_pending(trio.current_time())
    violations = cluster.check()
    stats: dict[str, int] = dict(cluster.network.stats)
    stats.update({f"links_{k}": v for k, v in cluster.links.network.stats.items() if k in ("delivered", "sent")})
    client_stats: Counter[str] = Counter()
    for client in cluster.chubby_clients:
        client_stats.update(client.stats)
    stats.update(client_stats)
    stats.update(cluster.resource.statistics())
    checker = cluster.cache_checker
    stats.update(
        hits_checked=checker.hits_checked, acks_checked=checker.acks_checked,
        renewals_checked=checker.renewals_checked, events_checked=checker.events_checked,
        tail_checked=checker.tail_checked,
        ops=len(cluster.cell_history.events) // 2,
        elections=cluster.checker.elections,
        crashes=sum(n.crashes for n in cluster.nodes.values()),
        applied=len(cluster.checker.applied),
        applies_checked=cluster.lock_checker.applies_checked,
        lock_grants=sum(len(g) for g in cluster.lock_checker.grants.values()),
    )
    return SimResult(scenario.seed, cluster.digest(), violations, stats, cluster.trace_tail[-60:],
                     cluster.cell_history.format(last=30), scenario)  # type: ignore[arg-type]


async def _safety_phase(cluster: CellSimCluster, scenario: CellScenario) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        workload_scope = trio.CancelScope()
        nursery.start_soon(_run_clients, workload_scope, cluster, stop)
        plan_scope = trio.CancelScope()
        nursery.start_soon(_run_plans, plan_scope, cluster, scenario)
        deadline = trio.current_time() + scenario.safety_seconds
        while trio.current_time() < deadline and cluster.network.stats["delivered"] < scenario.max_messages:
            await trio.sleep(0.05)
        cluster.log("safety phase over")
        stop.set()
        plan_scope.cancel()
        # Let operations in flight finish (each is bounded); then stop the rest.
        with trio.move_on_after(3.0):
            while any(cluster.cell_history.has_pending(c.process) for c in cluster.chubby_clients):
                await trio.sleep(0.05)
        workload_scope.cancel()
    for client in cluster.chubby_clients:
        client.frozen_until = 0.0
        client.pause_at_write_seconds = 0.0


async def _run_clients(scope: trio.CancelScope, cluster: CellSimCluster, stop: trio.Event) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for client in cluster.chubby_clients:
                nursery.start_soon(client.run_workload, stop)


async def _run_plans(scope: trio.CancelScope, cluster: CellSimCluster, scenario: CellScenario) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_plan, cluster, scenario.replica_plan)
            nursery.start_soon(run_client_plan, cluster, scenario.client_plan)


async def cell_liveness(cluster: CellSimCluster) -> None:
    """After healing: every client gets a (new or kept) session that its
    KeepAlive loop renews within the bound."""
    deadline = trio.current_time() + cluster.cell_config.liveness_seconds
    cluster.links.heal()
    renewals = {c.session.id: c.session.renewals for c in cluster.chubby_clients if c.session is not None}
    for client in cluster.chubby_clients:
        while True:
            if trio.current_time() >= deadline:
                cluster.violations.append(f"liveness: client c{client.index} has no working session after healing")
                return
            if await client.ensure_session():
                session = client.session
                if (session is not None and session.renewals > renewals.get(session.id, 0)
                        and session.safe(trio.current_time())):
                    break
            await trio.sleep(0.05)


def run_cell_sim(seed: int, scenario: CellScenario | None = None, *, fencing: bool = True,
                 unsafe_cache: str = "",
                 trace_sink: Callable[[str], None] | None = None) -> SimResult:
    """Run one seed deterministically (its swarm scenario unless one is given)."""
    scenario = scenario or generate_cell(seed, fencing=fencing, unsafe_cache=unsafe_cache)
    budget = scenario.safety_seconds + scenario.config.base.liveness_seconds + scenario.config.liveness_seconds + 30.0
    try:
        return run_deterministic(simulate_cell, scenario, trace_sink, seed=seed, timeout_seconds=budget)
    except SimHangError as exc:
        return SimResult(seed, "hang", [f"hang: {exc}"], {}, scenario=scenario)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any escape from a replica or the harness fails the seed
        detail = "".join(traceback.format_exception(exc)[-8:])
        return SimResult(seed, "exception", [f"exception: {type(exc).__name__}: {exc}"], {},
                         trace_tail=detail.splitlines(), scenario=scenario)  # type: ignore[arg-type]


__all__ = ["CellScenario", "ClientFault", "generate_cell", "run_cell_sim", "simulate_cell"]
