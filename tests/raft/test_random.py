"""Seeded random driver: 3-5 RawNodes under random delivery, loss,
duplication, reordering, partitions, crashes/restarts, compaction,
membership changes and leadership transfers. The Figure 3 properties are
checked after every step; at the end the network is healed and must
converge (liveness)."""

from __future__ import annotations

import random

import pytest

from chubbyfs.raft import (
    ConfChange,
    ConfChangeType,
    InvalidConfChangeError,
    NotLeaderError,
    ProposalDroppedError,
    Role,
)

from .network import Network


def _configure(rng: random.Random):
    def configure(cfg):
        cfg.election_tick = 10
        cfg.max_size_per_msg = rng.choice([64, 300, 1 << 20])
        cfg.max_inflight_msgs = rng.choice([1, 4, 256])
        cfg.snapshot_chunk_bytes = rng.choice([16, 100, 1 << 20])
        cfg.pre_vote = rng.random() < 0.8

    return configure


def run_random(seed: int, steps: int, check_every: int = 1) -> Network:
    rng = random.Random(seed)
    n = rng.choice([3, 3, 4, 5])
    ids = list(range(1, n + 1))
    net = Network(ids, seed=seed, configure=_configure(random.Random(seed + 1)))
    proposal = 0
    spare_id = n + 1
    for step in range(steps):
        r = rng.random()
        alive = [i for i, nd in net.nodes.items() if nd.alive]
        if r < 0.25 and alive:
            net.tick(rng.choice(alive))
        elif r < 0.55 and net.msgs:
            # Deliver a random in-flight message: reordering for free.
            m = net.msgs.pop(rng.randrange(len(net.msgs)))
            if rng.random() < 0.05:
                net.msgs.append(m)  # duplicate
            net.deliver(m)
        elif r < 0.60 and net.msgs:
            net.msgs.pop(rng.randrange(len(net.msgs)))  # loss
        elif r < 0.75 and alive:
            for i in alive:
                net.process_ready(i)
        elif r < 0.85:
            lead = net.leader()
            if lead and net.nodes[lead].alive:
                proposal += 1
                try:
                    net.propose(lead, b"p%d-" % proposal + b"x" * rng.randrange(50))
                except (NotLeaderError, ProposalDroppedError):
                    pass
        elif r < 0.87:
            a, b = rng.sample(ids, 2)
            net.cut(a, b)
        elif r < 0.89:
            net.recover()
        elif r < 0.905 and alive:
            victim = rng.choice(alive)
            net.crash(victim)
        elif r < 0.93:
            dead = [i for i, nd in net.nodes.items() if not nd.alive]
            if dead:
                net.restart(rng.choice(dead))
        elif r < 0.95 and alive:
            i = rng.choice(alive)
            node = net.nodes[i]
            snap_index = node.storage.snapshot().meta.index
            if node.applied_index > snap_index:
                net.compact(i, rng.randrange(snap_index + 1, node.applied_index + 1))
        elif r < 0.96:
            lead = net.leader()
            if lead and net.nodes[lead].alive:
                voters = net.raw(lead).status().conf.voters
                try:
                    if len(voters) > 3 and rng.random() < 0.5:
                        victim = rng.choice(voters)
                        net.raw(lead).propose_conf_change(
                            ConfChange(ConfChangeType.REMOVE_VOTER, victim)
                        )
                    elif len(voters) < 5:
                        net.add_node(spare_id)
                        net.raw(lead).propose_conf_change(
                            ConfChange(ConfChangeType.ADD_VOTER, spare_id)
                        )
                        ids.append(spare_id)
                        spare_id += 1
                except (ProposalDroppedError, NotLeaderError, InvalidConfChangeError):
                    pass
        elif r < 0.97:
            lead = net.leader()
            if lead and net.nodes[lead].alive:
                voters = [v for v in net.raw(lead).status().conf.voters if v != lead]
                if voters:
                    net.raw(lead).transfer_leadership(rng.choice(voters))
        else:
            lead = net.leader()
            if lead and net.nodes[lead].alive:
                try:
                    net.raw(lead).read_index(b"r%d" % step)
                except (NotLeaderError, ProposalDroppedError):
                    pass
        if step % check_every == 0:
            net.check()
    return net


def heal_and_converge(net: Network) -> None:
    net.recover()
    for i, nd in net.nodes.items():
        if not nd.alive:
            net.restart(i)
    for _ in range(200):
        net.tick_all(1)
        lead = net.leader()
        if lead:
            voters = net.raw(lead).status().conf.voters
            try:
                net.propose(lead, b"final")
            except (NotLeaderError, ProposalDroppedError):
                continue
            net.tick_all(3)
            commits = {net.raw(v).status().commit for v in voters if net.nodes[v].alive}
            if len(commits) == 1 and net.raw(lead).status().role == Role.LEADER:
                net.check()
                # Every voter applied the same entries.
                applied = {tuple(net.nodes[v].applied) for v in voters}
                assert len(applied) == 1
                return
    raise AssertionError("cluster did not converge after healing")


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_are_safe_and_converge(seed: int) -> None:
    net = run_random(seed, steps=1500)
    heal_and_converge(net)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1300))
def test_random_schedules_long_sweep(seed: int) -> None:
    """Not in the default suite (`-m slow`): longer schedules, more seeds."""
    net = run_random(seed, steps=3000, check_every=5)
    heal_and_converge(net)
