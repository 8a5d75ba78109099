"""Regressions found by the end-to-end tests, pinned at the core level."""

from chubbyfs.raft.memory_storage import MemoryStorage
from chubbyfs.raft.types import ConfChange, ConfChangeType, MessageType

from .network import Network


def test_rejoining_empty_replica_catches_up_when_first_probe_is_lost():
    """A wiped replica re-added as a voter: the leader's first APPEND to it is
    lost (its link was still down). Heartbeat responses must trigger a new
    probe even though the probe carries no entries, or the replica never
    catches up."""
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(20):
        net.propose(1, b"x%d" % i)
    net.stabilize()
    net.crash(3)
    net.raw(1).propose_conf_change(ConfChange(ConfChangeType.REMOVE_VOTER, 3))
    net.stabilize()
    for i in range(20):
        net.propose(1, b"y%d" % i)
    net.stabilize()
    net.heartbeat(1)
    net.compact(1, 30)
    net.compact(2, 30)
    net.add_node(3, MemoryStorage())
    net.raw(1).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 3))
    # Deliver everything except APPENDs to 3: its first probe is lost.
    net.stabilize(keep=lambda m: not (m.to == 3 and m.type == MessageType.APPEND))
    net.tick_all(3)
    net.heartbeat(1)
    last = net.raw(1).status().last_index
    assert net.raw(3).status().last_index == last
    assert net.raw(3).status().commit == net.raw(1).status().commit
