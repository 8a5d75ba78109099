"""Pre-vote, check-quorum, the leader lease and ReadIndex."""

from __future__ import annotations

import pytest

from chubbyfs.raft import Config, Message, MessageType, NotLeaderError, ProposalDroppedError, Role

from .network import Network


def elect_without_commit(net: Network, node_id: int) -> None:
    """Run the election until `node_id` wins, stopping before its no-op commits."""
    net.raw(node_id).campaign()
    for _ in range(100):
        for i in sorted(net.nodes):
            net.process_ready(i)
        while net.msgs:
            net.deliver(net.msgs.pop(0))
            if net.raw(node_id).status().role == Role.LEADER:
                net.msgs.clear()
                return
    raise AssertionError("no leader")


def test_prevote_partitioned_node_does_not_inflate_term_or_disrupt() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    term = net.raw(1).status().term
    net.isolate(3)
    for _ in range(100):
        net.tick_all(1)
    assert net.raw(3).status().term == term  # pre-votes never won: no term bump
    assert net.raw(3).status().role == Role.PRE_CANDIDATE
    net.recover()
    net.tick_all(5)
    assert net.leader() == 1 and net.raw(1).status().term == term
    assert net.raw(3).status().role == Role.FOLLOWER and net.raw(3).status().leader == 1


def test_without_prevote_rejoining_node_disrupts_the_leader() -> None:
    """The contrast that motivates pre-vote (Raft thesis §9.6)."""

    def configure(cfg: Config) -> None:
        cfg.pre_vote = False
        cfg.check_quorum = False

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    term = net.raw(1).status().term
    net.isolate(3)
    for _ in range(100):
        net.tick_all(1)
    assert net.raw(3).status().term > term + 2
    net.recover()
    net.tick_all(3)
    assert net.raw(1).status().term > term  # the leader was deposed


def test_check_quorum_leader_steps_down_when_isolated() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(1)
    for i in range(1, 11):
        net.tick(1)
        if i < 10:
            assert net.raw(1).status().role == Role.LEADER, i
    assert net.raw(1).status().role == Role.FOLLOWER


def test_follower_with_live_leader_ignores_votes() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    term = net.raw(2).status().term
    for kind in (MessageType.VOTE, MessageType.PRE_VOTE):
        net.raw(2).step(Message(type=kind, to=2, frm=3, term=term + 1, index=100, log_term=term))
        assert not net.raw(2).has_ready() or not net.raw(2).ready().messages
        net.nodes[2].raw._outstanding = None  # nothing was handed out but an empty Ready
        assert net.raw(2).status().term == term
    # Once an election timeout passed without the leader, it votes.
    net.isolate(1)
    for _ in range(10):
        net.tick(2)
    net.raw(2).step(Message(type=MessageType.VOTE, to=2, frm=3, term=term + 1, index=100, log_term=term))
    rd = net.raw(2).ready()
    assert [(m.type, m.reject) for m in rd.messages] == [(MessageType.VOTE_RESP, False)]


def test_explicit_campaign_is_ignored_while_leader_is_alive() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.raw(2).campaign()
    net.stabilize()
    assert net.leader() == 1 and net.raw(2).status().role == Role.FOLLOWER


def test_lease_valid_with_quorum_acks_and_held_by_heartbeats() -> None:
    net = Network([1, 2, 3])
    # Elected, but its no-op is not committed yet: no lease.
    elect_without_commit(net, 1)
    assert not net.raw(1).lease_valid()
    net.stabilize()
    assert net.raw(1).lease_valid()
    for _ in range(50):
        net.tick_all(1)
        assert net.raw(1).lease_valid()
    # One follower suffices for a majority of 3.
    net.isolate(3)
    net.cut(1, 3)
    for _ in range(50):
        net.tick_all(1)
        assert net.raw(1).lease_valid()


def test_lease_lost_after_partition_before_check_quorum_step_down() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.tick_all(1)
    assert net.raw(1).lease_valid()
    net.isolate(1)
    valid = []
    for _ in range(12):
        net.tick(1)
        valid.append(net.raw(1).lease_valid())
    lease_ticks = 10 - 2
    # Last acked heartbeat was sent one tick before the partition.
    assert valid[: lease_ticks - 1] == [True] * (lease_ticks - 1)
    assert not any(valid[lease_ticks - 1 :])


@pytest.mark.parametrize("seed", range(8))
def test_lease_never_overlaps_a_new_leaders_term(seed: int) -> None:
    """Drive by ticks: once isolated, the old leader's lease ends before any
    node of a newer term can serve (commit an entry of its term)."""
    net = Network([1, 2, 3, 4, 5], seed=seed)
    net.elect(1)
    net.tick_all(3)
    net.isolate(1)
    old_term = net.raw(1).status().term
    lease_end = None
    new_leader_serving_at = None
    for t in range(60):
        net.tick_all(1)
        if net.raw(1).lease_valid():
            lease_end = t
        for i in (2, 3, 4, 5):
            st = net.raw(i).status()
            if st.role == Role.LEADER and st.term > old_term and new_leader_serving_at is None:
                if net.raw(i).lease_valid() or st.commit > 0:
                    new_leader_serving_at = t
        if new_leader_serving_at is not None:
            break
    assert new_leader_serving_at is not None
    assert lease_end is None or lease_end < new_leader_serving_at


def test_restarted_follower_refuses_votes_for_an_election_timeout() -> None:
    """A follower that may have acked the leader just before crashing must not
    help elect someone else while that ack can still back a lease."""
    net = Network([1, 2, 3])
    net.elect(1)
    net.tick_all(1)
    net.crash(2)
    net.restart(2)
    term = net.raw(2).status().term
    vote = Message(type=MessageType.VOTE, to=2, frm=3, term=term + 1, index=100, log_term=term)
    net.raw(2).step(vote)
    assert net.raw(2).status().term == term
    for _ in range(10):
        net.raw(2).tick()
    net.raw(2).step(vote)
    assert net.raw(2).status().vote == 3


def test_lease_requires_check_quorum() -> None:
    def configure(cfg: Config) -> None:
        cfg.check_quorum = False

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    assert not net.raw(1).lease_valid()


def test_read_index_served_at_once_under_lease() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    assert net.raw(1).lease_valid()
    net.raw(1).read_index(b"r1")
    rd = net.raw(1).ready()
    assert [(r.index, r.request_ctx) for r in rd.read_states] == [(net.raw(1).status().commit, b"r1")]
    assert not [m for m in rd.messages if m.type == MessageType.HEARTBEAT]
    net.raw(1).advance(rd)


def test_read_index_without_lease_needs_a_quorum_heartbeat_round() -> None:
    def configure(cfg: Config) -> None:
        cfg.check_quorum = False  # no lease

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    net.isolate(1)
    net.raw(1).read_index(b"a")
    net.raw(1).read_index(b"b")
    net.stabilize()
    assert net.nodes[1].read_states == []
    net.recover()
    net.tick(1)  # heartbeats carry the latest pending context
    net.stabilize()
    commit = net.raw(1).status().commit
    assert [(r.index, r.request_ctx) for r in net.nodes[1].read_states] == [(commit, b"a"), (commit, b"b")]


def test_read_index_waits_for_first_commit_of_term() -> None:
    net = Network([1, 2, 3])
    elect_without_commit(net, 1)
    net.raw(1).read_index(b"early")
    net.process_ready(1)
    assert net.nodes[1].read_states == []
    net.stabilize()
    assert [r.request_ctx for r in net.nodes[1].read_states] == [b"early"]
    assert net.nodes[1].read_states[0].index == net.raw(1).status().commit


def test_read_index_errors() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    with pytest.raises(NotLeaderError) as exc:
        net.raw(2).read_index(b"x")
    assert exc.value.leader == 1
    with pytest.raises(ValueError):
        net.raw(1).read_index(b"")

    def configure(cfg: Config) -> None:
        cfg.check_quorum = False
        cfg.max_pending_read_index = 2

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    net.isolate(1)
    net.raw(1).read_index(b"1")
    net.raw(1).read_index(b"2")
    with pytest.raises(ProposalDroppedError):
        net.raw(1).read_index(b"3")


def test_pending_reads_are_dropped_when_leadership_is_lost() -> None:
    def configure(cfg: Config) -> None:
        cfg.check_quorum = False

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    net.isolate(1)
    net.raw(1).read_index(b"lost")
    net.raw(1).step(Message(type=MessageType.APPEND, to=1, frm=2, term=10))
    assert net.raw(1).status().role == Role.FOLLOWER
    net.raw(1).assert_invariants()
    net.stabilize()
    assert net.nodes[1].read_states == []


# ---- how long a shell may sleep between ticks ---------------------------------------

def test_ticks_until_due_is_the_next_heartbeat_or_election() -> None:
    net = Network([1, 2, 3], seed=7)
    follower = net.raw(2)._raft
    assert follower.ticks_until_due() == follower.randomized_election_timeout - follower.election_elapsed
    net.elect(1)
    leader = net.raw(1)._raft
    beat = leader.cfg.heartbeat_tick
    assert leader.ticks_until_due() == beat - leader.heartbeat_elapsed
    # Sleeping that long and ticking in a burst sends the heartbeat on the last tick.
    for _ in range(leader.ticks_until_due() - 1):
        net.tick(1)
        net.process_ready(1)
        assert not any(m.type == MessageType.HEARTBEAT for m in net.msgs)
    net.tick(1)
    net.process_ready(1)
    assert any(m.type == MessageType.HEARTBEAT for m in net.msgs)
    assert leader.ticks_until_due() == beat
    # A leadership transfer that may time out sooner bounds it too.
    leader.lead_transferee, leader.transfer_elapsed = 2, leader.cfg.election_tick - 1
    assert leader.ticks_until_due() == 1
