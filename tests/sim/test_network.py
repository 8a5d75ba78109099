"""SimNetwork: delays, loss, duplication, capacity, partitions and clogs."""

from __future__ import annotations

import random

import pytest
import trio

from chubbyfs.raft.types import Message, MessageType
from chubbyfs.sim.determinism import run_deterministic
from chubbyfs.sim.network import NetworkConfig, SimNetwork


def msg(frm: int, to: int, index: int = 0) -> Message:
    return Message(MessageType.APPEND, to=to, frm=frm, index=index)


async def _exchange(config: NetworkConfig, setup, count: int = 50, settle_seconds: float = 5.0):
    net = SimNetwork(config, random.Random(1))
    got: dict[int, list[tuple[float, int]]] = {1: [], 2: [], 3: []}
    for n in got:
        net.attach(n, lambda m, n=n: got[n].append((trio.current_time(), m.index)))
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        setup(net)
        for i in range(count):
            net.transport(1).send(msg(1, 2, i))
            net.transport(1).send(msg(1, 3, i))
        await trio.sleep(settle_seconds)
        nursery.cancel_scope.cancel()
    return net, got


def run(config: NetworkConfig, setup=lambda net: None):
    return run_deterministic(_exchange, config, setup, seed=0, timeout_seconds=60)


def test_delivers_everything_with_floor_delay_and_reorders() -> None:
    net, got = run(NetworkConfig(delay_floor_seconds=0.01, delay_mean_seconds=0.05))
    assert sorted(i for _, i in got[2]) == list(range(50))
    assert all(t >= 0.01 for t, _ in got[2])
    assert [i for _, i in got[2]] != list(range(50))  # independent delays reorder
    assert net.stats["delivered"] == 100


def test_loss_and_duplication() -> None:
    net, got = run(NetworkConfig(loss_probability=0.5))
    assert 0 < len(got[2]) < 50 and net.stats["dropped_loss"] > 0
    net, got = run(NetworkConfig(duplicate_probability=1.0))
    assert len(got[2]) == 100 and net.stats["duplicated"] == 100


def test_path_capacity_bounds_in_flight_messages() -> None:
    net, got = run(NetworkConfig(delay_floor_seconds=1.0, path_capacity=10))
    assert len(got[2]) == 10 and net.stats["dropped_capacity"] == 80


def test_symmetric_partition_and_heal() -> None:
    net, got = run(NetworkConfig(), lambda net: net.partition({1, 3}, {2}, nodes=[1, 2, 3]))
    assert got[2] == [] and len(got[3]) == 50
    assert not net.can_reach(2, 1) and net.can_reach(3, 1)
    net.heal()
    assert net.can_reach(2, 1)


def test_unlisted_nodes_are_isolated_alone() -> None:
    net, got = run(NetworkConfig(), lambda net: net.partition({1, 2}, nodes=[1, 2, 3]))
    assert got[3] == [] and len(got[2]) == 50


def test_one_way_block() -> None:
    net, got = run(NetworkConfig(), lambda net: net.block(1, 2))
    assert got[2] == [] and len(got[3]) == 50
    assert net.can_reach(2, 1)


def test_partition_drops_messages_already_in_flight() -> None:
    async def scenario():
        net = SimNetwork(NetworkConfig(delay_floor_seconds=1.0, delay_mean_seconds=0), random.Random(0))
        got = []
        net.attach(2, got.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            net.transport(1).send(msg(1, 2))
            await trio.sleep(0.5)
            net.partition({1}, {2}, nodes=[1, 2])
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        return got, net.stats

    got, stats = run_deterministic(scenario, seed=0)
    assert got == [] and stats["dropped_partition"] == 1


def test_clog_holds_messages_until_it_ends() -> None:
    net, got = run(NetworkConfig(delay_floor_seconds=0.001, delay_mean_seconds=0), lambda net: net.clog(1, 2, 3.0))
    assert len(got[2]) == 50 and min(t for t, _ in got[2]) >= 3.0
    assert max(t for t, _ in got[3]) < 1.0


def test_detached_node_loses_messages() -> None:
    net, got = run(NetworkConfig(), lambda net: net.detach(2))
    assert got[2] == [] and net.stats["dropped_down"] == 50


def test_partition_rejects_overlapping_groups() -> None:
    net = SimNetwork(NetworkConfig(), random.Random(0))
    with pytest.raises(ValueError, match="two partition groups"):
        net.partition({1, 2}, {2, 3}, nodes=[1, 2, 3])


@pytest.mark.parametrize(
    "kwargs",
    [{"loss_probability": 1.5}, {"delay_floor_seconds": -1}, {"path_capacity": 0}],
)
def test_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        NetworkConfig(**kwargs)


def test_same_seed_same_delivery_schedule() -> None:
    cfg = NetworkConfig(delay_mean_seconds=0.05, loss_probability=0.2, duplicate_probability=0.2)
    assert run(cfg)[1] == run(cfg)[1]
