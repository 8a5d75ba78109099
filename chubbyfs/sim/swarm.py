"""Swarm testing: each seed draws its own cluster shape, network parameters,
fault mix and fault plan (TigerBeetle's VOPR "swarm" mode), then runs a
safety phase (faults on, invariants checked as it goes) and a liveness phase
(heal everything; recovery must happen within a bound). `run_sim(seed)` is a
pure function of the seed (and the code).
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

import trio

from .cluster import SimConfig, open_cluster
from .determinism import SimHangError, run_deterministic
from .nemesis import FaultStep, run_plan
from .network import NetworkConfig
from .rng import SimRandom

FAULT_KINDS = ("partition", "partition_ring", "one_way", "isolate_leader", "clog", "crash", "crash_leader",
               "pause", "pause_leader", "transfer", "membership")


@dataclass(frozen=True)
class Scenario:
    seed: int
    config: SimConfig
    plan: tuple[FaultStep, ...]
    safety_seconds: float
    max_messages: int  # the safety phase also ends when this many were delivered

    def describe(self) -> str:
        net = self.config.network
        return (
            f"seed={self.seed} nodes={self.config.node_count} clients={self.config.client_count} "
            f"safety={self.safety_seconds:.2f}s max_messages={self.max_messages} "
            f"delay={net.delay_floor_seconds:.4f}+exp({net.delay_mean_seconds:.4f}) loss={net.loss_probability} "
            f"dup={net.duplicate_probability} capacity={net.path_capacity} faults={len(self.plan)}"
        )


@dataclass
class SimResult:
    seed: int
    digest: str
    violations: list[str]
    stats: dict[str, int]
    trace_tail: list[str] = field(default_factory=list)
    history_tail: list[str] = field(default_factory=list)
    scenario: Scenario | None = None

    @property
    def ok(self) -> bool:
        return not self.violations


def _one_fault(rng: random.Random, kind: str, t: float, ids: list[int], hold: float) -> list[FaultStep]:
    majority = len(ids) // 2 + 1
    if kind == "partition":
        shuffled = ids[:]
        rng.shuffle(shuffled)
        cut = rng.randint(1, len(ids) - 1)
        return [FaultStep(t, "partition", {"groups": [sorted(shuffled[:cut]), sorted(shuffled[cut:])]}),
                FaultStep(t + hold, "heal")]
    if kind == "partition_ring":
        return [FaultStep(t, "partition_ring"), FaultStep(t + hold, "heal")]
    if kind == "one_way":
        a, b = rng.sample(ids, 2)
        pairs = [[a, b]] + ([[a, c] for c in ids if c not in (a, b)] if rng.random() < 0.5 else [])
        return [FaultStep(t, "partition_one_way", {"pairs": pairs}), FaultStep(t + hold, "heal")]
    if kind == "isolate_leader":
        return [FaultStep(t, "isolate_leader"), FaultStep(t + hold, "heal")]
    if kind == "clog":
        a, b = rng.sample(ids, 2)
        return [FaultStep(t, "clog", {"frm": a, "to": b, "seconds": round(hold, 3)})]
    if kind == "crash":
        # Sometimes a majority goes down at once: still safe with honest disks.
        victims = rng.sample(ids, rng.choice([1, 1, majority]))
        steps = [FaultStep(t + 0.001 * i, "crash", {"node": v}) for i, v in enumerate(victims)]
        return steps + [FaultStep(t + hold + 0.05 * i, "restart", {"node": v}) for i, v in enumerate(victims)]
    if kind == "crash_leader":
        return [FaultStep(t, "crash_leader"), FaultStep(t + hold, "restart_all")]
    if kind == "pause":
        v = rng.choice(ids)
        return [FaultStep(t, "pause", {"node": v}), FaultStep(t + hold, "resume", {"node": v})]
    if kind == "pause_leader":
        return [FaultStep(t, "pause_leader"), FaultStep(t + hold, "resume_all")]
    if kind == "transfer":
        return [FaultStep(t, "transfer_leader", {"target": rng.choice(ids)})]
    if kind == "membership":
        v = rng.choice(ids)
        return [FaultStep(t, "remove_voter", {"node": v}), FaultStep(t + hold, "add_voter", {"node": v})]
    raise ValueError(f"unknown fault kind {kind!r}")


def generate(seed: int, *, base: SimConfig | None = None, kinds: tuple[str, ...] = FAULT_KINDS) -> Scenario:
    """Draw a scenario from the seed: parameters first, then the plan."""
    rng = SimRandom(seed).stream("swarm")
    node_count = rng.choice([3, 3, 5])
    network = NetworkConfig(
        delay_floor_seconds=rng.choice([0.0005, 0.001, 0.002]),
        delay_mean_seconds=rng.choice([0.001, 0.003, 0.008]),
        loss_probability=rng.choice([0.0, 0.0, 0.01, 0.05]),
        duplicate_probability=rng.choice([0.0, 0.0, 0.01, 0.05]),
        path_capacity=rng.choice([32, 128, 512]),
    )
    config = replace(
        base or SimConfig(),
        node_count=node_count,
        client_count=rng.randint(2, 4),
        network=network,
        snapshot_every=rng.choice([20, 50, 200]),
        max_size_per_msg=rng.choice([1, 1 << 20, 1 << 20]),
    )
    # Swarm: each seed enables its own subset of fault kinds, so rare
    # combinations get runs where they are not drowned out by the rest.
    enabled = [k for k in kinds if rng.random() < 0.6] or [rng.choice(kinds)]
    safety_seconds = rng.uniform(2.0, 4.0)
    ids = list(range(1, node_count + 1))
    plan: list[FaultStep] = []
    t = rng.uniform(0.1, 0.4)
    while t < safety_seconds:
        hold = rng.uniform(0.05, 0.8)
        plan += _one_fault(rng, rng.choice(enabled), round(t, 4), ids, round(hold, 4))
        t += rng.expovariate(1 / 0.35)
    max_messages = node_count * 6_000
    # A run delivering several times its safety budget has livelocked.
    config = replace(config, max_messages_total=max_messages * 3)
    return Scenario(seed, config, tuple(sorted(plan, key=lambda s: s.at_seconds)), safety_seconds, max_messages)


async def simulate(scenario: Scenario, trace_sink: Callable[[str], None] | None = None) -> SimResult:
    config = scenario.config
    async with open_cluster(config, scenario.seed, trace_sink=trace_sink) as cluster:
        cluster.log(scenario.describe())
        await _safety_phase(cluster, scenario)
        await cluster.liveness_phase()
        cluster.log("liveness phase over")
    cluster.history.close_pending(trio.current_time())
    violations = cluster.check()
    stats = dict(cluster.network.stats)
    stats.update(
        ops=len(cluster.history.events) // 2,
        elections=cluster.checker.elections,
        crashes=sum(n.crashes for n in cluster.nodes.values()),
        applied=len(cluster.checker.applied),
        acked_writes=len(cluster.acked_writes),
    )
    return SimResult(scenario.seed, cluster.digest(), violations, stats, cluster.trace_tail[-60:],
                     cluster.history.format(last=30), scenario)


async def _safety_phase(cluster, scenario: Scenario) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as clients:
        for client in cluster.clients:
            clients.start_soon(client.run_workload, stop)
        plan_scope = trio.CancelScope()
        clients.start_soon(_run_plan_in, plan_scope, cluster, list(scenario.plan))
        deadline = trio.current_time() + scenario.safety_seconds
        while trio.current_time() < deadline and cluster.network.stats["delivered"] < scenario.max_messages:
            await trio.sleep(0.05)
        cluster.log("safety phase over")
        stop.set()
        plan_scope.cancel()


async def _run_plan_in(scope: trio.CancelScope, cluster, plan: list[FaultStep]) -> None:
    with scope:
        await run_plan(cluster, plan)


def run_sim(seed: int, scenario: Scenario | None = None, *, trace_sink: Callable[[str], None] | None = None) -> SimResult:
    """Run one seed deterministically (its swarm scenario unless one is given)."""
    scenario = scenario or generate(seed)
    budget = scenario.safety_seconds + scenario.config.liveness_seconds + 30.0
    try:
        return run_deterministic(simulate, scenario, trace_sink, seed=seed, timeout_seconds=budget)
    except SimHangError as exc:
        return SimResult(seed, "hang", [f"hang: {exc}"], {}, scenario=scenario)
    except Exception as exc:  # noqa: BLE001 - any escape from a replica or the harness fails the seed
        detail = "".join(traceback.format_exception(exc)[-6:])
        return SimResult(seed, "exception", [f"exception: {type(exc).__name__}: {exc}"], {},
                         trace_tail=detail.splitlines(), scenario=scenario)
