"""Fault plans as data, and the task that replays them against a SimCluster.

A plan is a list of `FaultStep(at_seconds, op, args)`; `at_seconds` is
relative to the start of the safety phase. Plans are plain data so they can
be printed, stored with a failing seed, and shrunk by Hypothesis. Ops that
name "the leader" resolve it when they fire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..raft import ProposalDroppedError
from ..raft.node import NotLeaderError, ProposalLostError, ProposalOutcomeUnknownError

if TYPE_CHECKING:
    from .cluster import SimCluster

OPS = (
    "partition",  # args: groups (list of node lists); unlisted nodes are isolated
    "partition_one_way",  # args: pairs (list of [frm, to]) cut in one direction
    "partition_ring",  # each node reaches only its ring neighbours (overlapping majorities)
    "isolate",  # args: node
    "isolate_leader",
    "heal",
    "clog",  # args: frm, to, seconds
    "crash",  # args: node
    "crash_leader",
    "restart",  # args: node
    "restart_all",
    "pause",  # args: node
    "pause_leader",
    "resume",  # args: node
    "resume_all",
    "transfer_leader",  # args: target
    "remove_voter",  # args: node (skipped if it is the leader)
    "add_voter",  # args: node
)


@dataclass(frozen=True)
class FaultStep:
    at_seconds: float
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown nemesis op {self.op!r}")
        if self.at_seconds < 0:
            raise ValueError("fault steps cannot happen before the run starts")

    def to_json(self) -> list[Any]:
        return [self.at_seconds, self.op, self.args]

    @staticmethod
    def from_json(item: list[Any]) -> FaultStep:
        at, op, args = item
        return FaultStep(float(at), str(op), dict(args))

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"@{self.at_seconds:.3f} {self.op} {args}".rstrip()


def ring_blocked_pairs(node_ids: list[int]) -> set[tuple[int, int]]:
    """Jepsen's majorities-ring: each node reaches only its nearest ring
    neighbours, so it sees a bare majority, and no two nodes see the same
    majority. (With 3 nodes every node is a neighbour: nothing is cut.)"""
    n = len(node_ids)
    reach = (n // 2 + 1) // 2 if n > 3 else 1
    blocked = set()
    for i, a in enumerate(node_ids):
        for j, b in enumerate(node_ids):
            distance = min((i - j) % n, (j - i) % n)
            if a != b and distance > reach:
                blocked.add((a, b))
    return blocked


async def membership_change(cluster: SimCluster, op: str, node_id: int) -> bool:
    """Propose the change to the current leader; True once it committed."""
    leader = cluster.leader()
    if leader is None:
        cluster.log(f"nemesis {op} n{node_id}: no leader, skipped")
        return False
    if op == "remove_voter" and node_id == leader:
        cluster.log(f"nemesis remove_voter n{node_id}: is the leader, skipped")
        return False
    raft = cluster.nodes[leader].raft
    assert raft is not None
    with trio.move_on_after(cluster.config.request_timeout_seconds * 4):
        try:
            if op == "remove_voter":
                await raft.remove_voter(node_id)
            else:
                await raft.add_voter(node_id)
            cluster.log(f"nemesis {op} n{node_id}: committed")
            return True
        except (NotLeaderError, ProposalDroppedError, ProposalLostError, ProposalOutcomeUnknownError, ValueError,
                RuntimeError) as exc:
            # Membership changes are refused while another is pending, or
            # by a replica that lost leadership: both are normal under faults.
            cluster.log(f"nemesis {op} n{node_id}: {type(exc).__name__}: {exc}")
            return False
    cluster.log(f"nemesis {op} n{node_id}: timed out")
    return False


def apply_step(cluster: SimCluster, step: FaultStep) -> None:
    op, args = step.op, step.args
    cluster.log(f"nemesis {step}")
    ids = cluster.node_ids
    if op == "partition":
        cluster.partition(*[set(g) for g in args["groups"]])
    elif op == "partition_one_way":
        cluster.network.set_blocked((int(a), int(b)) for a, b in args["pairs"])
    elif op == "partition_ring":
        cluster.network.set_blocked(ring_blocked_pairs(ids))
    elif op in ("isolate", "isolate_leader"):
        target = args["node"] if op == "isolate" else cluster.leader()
        if target is not None:
            cluster.partition({target}, set(ids) - {target})
    elif op == "heal":
        cluster.heal()
    elif op == "clog":
        cluster.network.clog(args["frm"], args["to"], trio.current_time() + args["seconds"])
    elif op in ("crash", "crash_leader"):
        target = args["node"] if op == "crash" else cluster.leader()
        if target is not None:
            cluster.nodes[target].crash()
    elif op == "restart":
        cluster.nodes[args["node"]].restart()
    elif op == "restart_all":
        for node in cluster.nodes.values():
            node.restart()
    elif op in ("pause", "pause_leader"):
        target = args["node"] if op == "pause" else cluster.leader()
        if target is not None:
            cluster.nodes[target].pause()
    elif op == "resume":
        cluster.nodes[args["node"]].resume()
    elif op == "resume_all":
        for node in cluster.nodes.values():
            node.resume()
    elif op == "transfer_leader":
        leader = cluster.leader()
        target = args["target"]
        if leader is not None and leader != target:
            raft = cluster.nodes[leader].raft
            assert raft is not None
            cluster._nursery.start_soon(_transfer, cluster, raft, target)
    elif op in ("remove_voter", "add_voter"):
        cluster._nursery.start_soon(membership_change, cluster, op, args["node"])


async def _transfer(cluster: SimCluster, raft: Any, target: int) -> None:
    try:
        await raft.transfer_leadership(target)
    except (NotLeaderError, ProposalDroppedError, ValueError, RuntimeError) as exc:
        cluster.log(f"nemesis transfer_leader: {type(exc).__name__}: {exc}")


async def run_plan(cluster: SimCluster, plan: list[FaultStep]) -> None:
    """Fire each step at its time (relative to now)."""
    start = trio.current_time()
    for step in sorted(plan, key=lambda s: s.at_seconds):
        await trio.sleep_until(start + step.at_seconds)
        apply_step(cluster, step)
