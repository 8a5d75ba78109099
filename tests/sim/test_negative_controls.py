"""Negative controls: deliberately broken builds must be caught by the checkers.

If one of these stops failing, the harness has gone blind (etcd robustness's
rule: re-run the known-bug reproducers after changing the harness).
"""

from __future__ import annotations

from dataclasses import replace

import trio

from chubbyfs.raft.types import MessageType
from chubbyfs.sim.cluster import SimCluster, SimConfig, open_cluster
from chubbyfs.sim.determinism import run_deterministic
from chubbyfs.sim.swarm import generate, run_sim

# Violations that come from a checker (not a replica dying or a livelock).
CHECKER_MARKERS = (
    "state machine safety",
    "leader completeness",
    "election safety",
    "voted for",
    "persisted term",
    "log matching",
    "linearizability",
    "acked",
    "lost acked",
)


def checker_violations(violations: list[str]) -> list[str]:
    return [v for v in violations if any(m in v for m in CHECKER_MARKERS)]


LYING_FSYNC_SEEDS = list(range(0, 6))


def test_lying_fsync_is_caught() -> None:
    """Crashes (often of a majority) with a disk that acknowledges fsync
    without persisting: lost hard states and entries must be detected."""
    caught = {}
    for seed in LYING_FSYNC_SEEDS:
        scenario = generate(seed, kinds=("crash", "crash_leader"))
        scenario = replace(scenario, config=replace(scenario.config, lying_fsync=True))
        found = checker_violations(run_sim(seed, scenario).violations)
        if found:
            caught[seed] = found
    assert len(caught) >= len(LYING_FSYNC_SEEDS) // 2, caught


def test_honest_disk_same_schedules_pass() -> None:
    """The same crash schedules with an honest disk are clean: the controls
    above fail because of the bug, not because of the schedule."""
    for seed in LYING_FSYNC_SEEDS[:3]:
        result = run_sim(seed, generate(seed, kinds=("crash", "crash_leader")))
        assert checker_violations(result.violations) == [], (seed, result.violations)


async def _figure8(cluster: SimCluster) -> None:
    """Raft paper Figure 8 on five replicas, scripted with partitions and a
    drop filter. An old-term entry e reaches a majority without the new
    leader's own entry; a replica holding a higher-term entry at e's index
    then wins and overwrites e. Correct Raft never commits e in between; the
    unsafe build does, so a replica applies e and the checkers see it
    replaced."""
    leader = await cluster.wait_for_leader(3.0)
    assert leader is not None
    if leader != 1:
        await cluster.nodes[leader].raft.transfer_leadership(1)
        while cluster.leader() != 1:
            await trio.sleep(0.01)
    client = cluster.client(0)
    assert await client.put("k", b"base") == "ok"
    # (a) 1 and 2 alone: e = a put accepted by 1, replicated to 2 only.
    cluster.partition({1, 2}, {3, 4, 5})
    isolated: list[int] = []

    def isolate_new_leader(node_id: int, kind: str, fields: dict) -> None:
        # (b) The moment one of 3..5 wins, cut it off before its no-op
        # (a higher-term entry at e's index) reaches anyone.
        if kind == "role" and fields["role"] == "leader" and node_id in (3, 4, 5) and not isolated:
            isolated.append(node_id)
            others = [n for n in (3, 4, 5) if n != node_id]
            cluster.partition({1, 2}, set(others), {node_id})

    cluster.trace_hooks.append(isolate_new_leader)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.put, "k", b"e")
        while not isolated:
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        cluster.trace_hooks.remove(isolate_new_leader)
        lone = isolated[0]
        catchers = [n for n in (3, 4, 5) if n != lone]
        old_term = cluster.nodes[lone].status()["term"]
        e_index = cluster.nodes[1].status()["last_index"]

        def holds_e(node_id: int) -> bool:
            raft = cluster.nodes[node_id].raft
            return raft is not None and raft.storage.last_index() >= e_index

        # (c) 1, 2 and the other two together; the two get e (the leader's
        # probe still gets through, so they can ask for it) but nothing of
        # the new leader's term once they hold e.
        remove_filter = cluster.network.add_drop_filter(
            lambda frm, to, msg: to in catchers
            and msg.type == MessageType.APPEND
            and holds_e(to)
            and any(e.term > old_term for e in msg.entries)
        )
        cluster.partition({1, 2, *catchers}, {lone})
        await trio.sleep(1.0)
        # (d) The old majority goes away; the lone node (higher last term) wins.
        remove_filter()
        cluster.partition({1, 2}, {lone, *catchers})
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    await cluster.liveness_phase()


def _run_figure8(unsafe: bool, seed: int) -> list[str]:
    config = SimConfig(node_count=5, client_count=1, max_size_per_msg=1, unsafe_commit_previous_term=unsafe,
                       request_timeout_seconds=5.0)

    async def main() -> list[str]:
        async with open_cluster(config, seed) as cluster:
            await _figure8(cluster)
        cluster.history.close_pending()
        return cluster.check()

    return run_deterministic(main, seed=seed, timeout_seconds=120)


FIGURE8_SEEDS = [1, 2, 3]


def test_commit_previous_term_bug_is_caught() -> None:
    tried = {}
    for seed in FIGURE8_SEEDS:
        tried[seed] = _run_figure8(True, seed)
        if checker_violations(tried[seed]):
            return
    raise AssertionError(f"the Figure 8 bug went unnoticed: {tried}")


def test_figure8_schedule_is_clean_with_correct_raft() -> None:
    for seed in FIGURE8_SEEDS:
        assert _run_figure8(False, seed) == []


def test_stale_reads_are_caught_by_linearizability() -> None:
    """Reads served by any replica without ReadIndex or a lease (the etcd
    0.4 bug) must make some key's history non-linearizable."""
    for seed in range(3):
        scenario = generate(seed, kinds=("partition", "isolate_leader", "pause_leader"))
        scenario = replace(scenario, config=replace(scenario.config, unsafe_local_reads=True))
        violations = run_sim(seed, scenario).violations
        assert any("linearizability" in v for v in violations), (seed, violations)
