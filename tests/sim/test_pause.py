"""A leader frozen (GC pause, SIGSTOP) past its lease must not wake up and
serve a lease read from stale state: its notion of time has to catch up
with the real time that passed before it trusts its lease (found by the
sweep: seed 11513)."""

import pytest
import trio

from chubbyfs.cell import kv

from chubbyfs.raft.node import NotLeaderError
from chubbyfs.sim.cluster import SimConfig, open_cluster
from chubbyfs.sim.determinism import run_deterministic


async def _paused_leader_reads(seed: int) -> object:
    async with open_cluster(SimConfig(node_count=3, client_count=1), seed=seed) as cluster:
        old = await cluster.wait_for_leader(3.0)
        assert old is not None
        assert await cluster.client(0).put("a", b"old") == "ok"
        cluster.node(old).pause()
        new = None
        with trio.fail_after(10):
            while new in (None, old):
                await trio.sleep(0.05)
                new = cluster.leader()
        # Acknowledged by the new leader while the old one is frozen.
        assert (await cluster.node(new).raft.propose(kv.encode_put("a", b"new")))["ok"]
        cluster.node(old).resume()
        # Straight after waking, before its loop has run again.
        try:
            answer = await cluster.node(old).raft.read(("get", "a"))
        except NotLeaderError:
            answer = "refused"
    # (No history check here: the write above bypasses the recorded clients.)
    return answer


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_paused_leader_never_serves_a_stale_lease_read(seed: int) -> None:
    answer = run_deterministic(_paused_leader_reads, seed, seed=seed, timeout_seconds=60)
    assert answer == "refused" or answer["value"] == b"new", answer
