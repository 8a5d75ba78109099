"""One test per claim of the Raft paper (Ongaro & Ousterhout, 2014).

Each docstring names the section. Nodes 1..N are founding members: their
logs start with N committed bootstrap entries in term 1, so the first
election is for term 2 and the first new entry has index N + 1.
"""

from __future__ import annotations

import random

import pytest

from chubbyfs.raft import (
    Config,
    ConfState,
    Entry,
    MemoryStorage,
    Message,
    MessageType,
    RawNode,
    Role,
)

from .network import Network, SafetyViolation


def no_prevote(cfg: Config) -> None:
    cfg.pre_vote = False
    cfg.check_quorum = False


def single(node_id: int = 1, voters=(1, 2, 3), **kw) -> tuple[RawNode, MemoryStorage]:
    storage = MemoryStorage(ConfState(voters=voters))
    cfg = Config(id=node_id, **kw)
    return RawNode(cfg, storage, random.Random(node_id)), storage


def drain(raw: RawNode, storage: MemoryStorage) -> list[Message]:
    """Handle every Ready the way a shell does; return the messages."""
    out: list[Message] = []
    while raw.has_ready():
        rd = raw.ready()
        if rd.entries:
            storage.append(rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
        out.extend(rd.messages)
        raw.advance(rd)
    return out


def campaign_until_leader(net: Network, node_id: int, attempts: int = 3, keep=None) -> None:
    for _ in range(attempts):
        net.raw(node_id).campaign()
        net.stabilize(keep=keep)
        if net.raw(node_id).status().role == Role.LEADER:
            return
    raise AssertionError(f"node {node_id} did not win: {net.raw(node_id).status()}")


# -- §5.1 terms -------------------------------------------------------------------


def test_update_term_from_higher_term_message() -> None:
    """§5.1: a server seeing a larger term updates its term and reverts to follower."""
    for role_setup in ("follower", "candidate", "leader"):
        net = Network([1, 2, 3], configure=no_prevote)
        if role_setup == "leader":
            net.elect(1)
        elif role_setup == "candidate":
            net.raw(1).campaign()
        raw = net.raw(1)
        term = raw.status().term
        raw.step(Message(type=MessageType.APPEND, to=1, frm=2, term=term + 5, index=0, log_term=0))
        st = raw.status()
        assert st.term == term + 5 and st.role == Role.FOLLOWER and st.leader == 2


def test_stale_term_messages_are_rejected() -> None:
    """§5.1: a request with a stale term is rejected (the sender learns the new term)."""
    net = Network([1, 2, 3])
    net.elect(1)
    raw = net.raw(2)
    before = raw.status()
    raw.step(Message(type=MessageType.APPEND, to=2, frm=3, term=1, index=3, log_term=1,
                     entries=(Entry(term=1, index=4, data=b"stale"),)))
    rd = raw.ready()
    assert [m.type for m in rd.messages] == [MessageType.APPEND_RESP]
    assert rd.messages[0].term == before.term and rd.messages[0].to == 3
    assert not rd.entries
    raw.advance(rd)
    assert raw.status().last_index == before.last_index


# -- §5.2 leader election -------------------------------------------------------------


def test_servers_start_as_followers() -> None:
    """§5.2: when servers start up, they begin as followers."""
    raw, _ = single()
    st = raw.status()
    assert st.role == Role.FOLLOWER and st.leader == 0 and st.term == 1


def test_leader_sends_heartbeats() -> None:
    """§5.2: leaders send periodic heartbeats to all followers to maintain authority."""
    net = Network([1, 2, 3])
    net.elect(1)
    net.tick(1)
    net.process_ready(1)
    beats = sorted(m.to for m in net.msgs if m.type == MessageType.HEARTBEAT)
    assert beats == [2, 3]


def test_follower_times_out_and_starts_election() -> None:
    """§5.2: a follower that hears nothing for an election timeout becomes a
    candidate: increments its term, votes for itself, requests votes."""
    raw, storage = single(pre_vote=False, check_quorum=False)
    for _ in range(2 * 10):
        raw.tick()
        if raw.status().role != Role.FOLLOWER:
            break
    st = raw.status()
    assert st.role == Role.CANDIDATE and st.term == 2 and st.vote == 1
    msgs = drain(raw, storage)
    assert sorted(m.to for m in msgs if m.type == MessageType.VOTE) == [2, 3]
    assert storage.hard_state().vote == 1 and storage.hard_state().term == 2


def test_election_timeout_is_randomized_within_bounds() -> None:
    """§5.2: election timeouts are chosen randomly from [T, 2T)."""
    seen = set()
    for seed in range(40):
        storage = MemoryStorage(ConfState(voters=(1, 2, 3)))
        raw = RawNode(Config(id=1, pre_vote=False, check_quorum=False), storage, random.Random(seed))
        ticks = 0
        while raw.status().role == Role.FOLLOWER:
            raw.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) > 3


def test_candidate_with_majority_becomes_leader() -> None:
    """§5.2: a candidate wins with votes from a majority of the full cluster."""
    for size, grants, wins in [(3, 1, True), (3, 0, False), (5, 2, True), (5, 1, False)]:
        voters = tuple(range(1, size + 1))
        raw, storage = single(voters=voters, pre_vote=False, check_quorum=False)
        raw.campaign()
        drain(raw, storage)
        for peer in voters[1 : 1 + grants]:
            raw.step(Message(type=MessageType.VOTE_RESP, to=1, frm=peer, term=2))
        for peer in voters[1 + grants :]:
            raw.step(Message(type=MessageType.VOTE_RESP, to=1, frm=peer, term=2, reject=True))
        role = raw.status().role
        assert (role == Role.LEADER) == wins, (size, grants, role)
        if not wins:
            assert role == Role.FOLLOWER


def test_each_server_votes_once_per_term() -> None:
    """§5.2: each server votes for at most one candidate in a given term."""
    raw, storage = single(node_id=3, check_quorum=False)
    vote = dict(type=MessageType.VOTE, to=3, term=2, index=3, log_term=1)
    raw.step(Message(frm=1, **vote))
    raw.step(Message(frm=2, **vote))
    raw.step(Message(frm=1, **vote))  # a retransmission gets the same answer
    msgs = drain(raw, storage)
    assert [(m.to, m.reject) for m in msgs] == [(1, False), (2, True), (1, False)]
    assert storage.hard_state().vote == 1


def test_vote_survives_restart() -> None:
    """§5.2/Figure 2: votedFor is persistent, so a restart cannot vote twice."""
    raw, storage = single(node_id=3, check_quorum=False)
    raw.step(Message(type=MessageType.VOTE, to=3, frm=1, term=2, index=3, log_term=1))
    drain(raw, storage)
    raw = RawNode(Config(id=3, check_quorum=False), storage, random.Random(0))
    raw.step(Message(type=MessageType.VOTE, to=3, frm=2, term=2, index=3, log_term=1))
    rd = raw.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(2, True)]


def test_split_vote_then_progress() -> None:
    """§5.2: split votes end with a new randomized timeout; a leader emerges."""
    net = Network([1, 2, 3, 4], configure=no_prevote)
    net.cut(1, 4)
    net.cut(2, 3)
    net.raw(1).campaign()
    net.raw(2).campaign()
    net.stabilize()
    assert net.leader() == 0  # 2 votes each: nobody has a majority of 4
    net.recover()
    for _ in range(60):
        net.tick_all(1)
        if net.leader():
            break
    assert net.leader() != 0


def test_candidate_steps_down_for_leader_of_same_term() -> None:
    """§5.2: a candidate receiving AppendEntries from a leader of its term steps down."""
    raw, _ = single(node_id=2, pre_vote=False, check_quorum=False)
    raw.campaign()
    raw.step(Message(type=MessageType.APPEND, to=2, frm=3, term=2, index=3, log_term=1))
    st = raw.status()
    assert st.role == Role.FOLLOWER and st.leader == 3 and st.term == 2


# -- §5.3 log replication ---------------------------------------------------------


def test_leader_commits_after_majority_and_followers_learn_it() -> None:
    """§5.3: an entry is committed once the leader replicated it on a majority;
    followers learn the commit index from later AppendEntries."""
    net = Network([1, 2, 3, 4, 5])
    net.elect(1)
    # Only nodes 2 and 3 are reachable: 3 of 5 hold the entry.
    net.cut(1, 4)
    net.cut(1, 5)
    index, _ = net.propose(1, b"v")
    net.stabilize()
    assert net.raw(1).status().commit == index
    net.heartbeat(1)
    assert net.raw(2).status().commit == index and net.raw(3).status().commit == index
    net.cut(1, 3)
    index2, _ = net.propose(1, b"w")
    net.stabilize()
    assert net.raw(1).status().commit == index  # 2 of 5: not committed
    net.recover()
    net.tick(1)
    net.stabilize()
    net.heartbeat(1)
    assert all(net.raw(i).status().commit == index2 for i in net.nodes)


def test_follower_rejects_append_with_mismatched_previous_entry() -> None:
    """§5.3: the consistency check: a follower refuses entries whose predecessor
    it does not have."""
    raw, storage = single(node_id=2)
    raw.step(Message(type=MessageType.APPEND, to=2, frm=1, term=2, index=7, log_term=2,
                     entries=(Entry(term=2, index=8),)))
    msgs = drain(raw, storage)
    assert msgs[0].reject and msgs[0].index == 7 and msgs[0].reject_hint == 3
    assert raw.status().last_index == 3


def test_follower_truncates_conflicting_suffix() -> None:
    """§5.3: a conflicting entry and all that follow it are deleted and replaced."""
    raw, storage = single(node_id=2)
    raw.step(Message(type=MessageType.APPEND, to=2, frm=1, term=2, index=3, log_term=1,
                     entries=tuple(Entry(term=2, index=i, data=b"old") for i in (4, 5, 6))))
    drain(raw, storage)
    raw.step(Message(type=MessageType.APPEND, to=2, frm=3, term=3, index=4, log_term=2,
                     entries=(Entry(term=3, index=5, data=b"new"),), commit=5))
    drain(raw, storage)
    assert [(e.index, e.term, e.data) for e in storage.all_entries()[3:]] == [
        (4, 2, b"old"), (5, 3, b"new")]
    assert raw.status().commit == 5


def test_leader_never_overwrites_its_log() -> None:
    """§5.3 Leader Append-Only: a leader only appends to its log."""
    net = Network([1, 2, 3])
    net.elect(1)
    before = [e for e in net.nodes[1].storage.all_entries()]
    for i in range(5):
        net.propose(1, b"%d" % i)
        # A follower with a conflicting (stale) claim changes nothing.
        net.raw(1).step(Message(type=MessageType.APPEND_RESP, to=1, frm=2,
                                term=net.raw(1).status().term, index=1, reject=True))
        net.stabilize()
    after = net.nodes[1].storage.all_entries()
    assert after[: len(before)] == before


def test_figure7_divergent_followers_converge() -> None:
    """§5.3 Figure 7: whatever the followers' logs, the leader forces them to match its own."""
    net = Network([1, 2, 3], configure=no_prevote)
    net.elect(1)
    for i in range(3):
        net.propose(1, b"a%d" % i)
    net.stabilize()
    # Node 3 misses entries of term 2; node 1 then appends entries nobody
    # else gets; node 3 runs a term of its own that goes nowhere.
    net.isolate(3)
    for i in range(4):
        net.propose(1, b"b%d" % i)
    net.stabilize()
    net.isolate(1)
    net.propose(1, b"only-on-1")
    net.stabilize()
    net.raw(3).campaign()
    net.stabilize()
    net.recover()
    for _ in range(100):
        net.tick_all(1)
        lead = net.leader()
        if lead and net.raw(lead).status().term > 3:
            break
    net.propose(net.leader(), b"final")
    net.tick_all(2)
    logs = [[(e.index, e.term, e.data) for e in net.nodes[i].storage.all_entries()] for i in (1, 2, 3)]
    assert logs[0] == logs[1] == logs[2]
    assert (b"final") in [d for _, _, d in logs[0]]
    net.check()


def test_log_matching_property_under_faults() -> None:
    """§5.3 Log Matching: same index and term imply identical prefixes (checked
    pairwise by the harness after partitions and leader changes)."""
    net = Network([1, 2, 3, 4, 5], configure=no_prevote)
    for leader in (1, 2, 3):
        campaign_until_leader(net, leader)
        net.isolate(leader)
        net.propose(leader, b"lost-%d" % leader)
        net.stabilize()
        net.recover()
        campaign_until_leader(net, leader % 5 + 1)
        net.propose(net.leader(), b"kept-%d" % leader)
        net.stabilize()
        net.check_log_matching()


# -- §5.4 safety ------------------------------------------------------------------


def test_voter_rejects_less_up_to_date_candidate() -> None:
    """§5.4.1: a vote is denied if the voter's log is more up-to-date."""
    raw, storage = single(node_id=2, check_quorum=False)
    raw.step(Message(type=MessageType.APPEND, to=2, frm=1, term=2, index=3, log_term=1,
                     entries=(Entry(term=2, index=4),)))
    drain(raw, storage)
    cases = [
        (3, 1, True),  # shorter log, older last term
        (4, 1, True),  # same length, older last term
        (3, 2, True),  # same last term, shorter
        (4, 2, False),  # identical
        (2, 3, False),  # newer last term wins even if shorter
    ]
    for i, (last_index, last_term, reject) in enumerate(cases):
        raw.step(Message(type=MessageType.VOTE, to=2, frm=3, term=10 + i, index=last_index,
                         log_term=last_term))
        msgs = drain(raw, storage)
        assert msgs[-1].reject == reject, (last_index, last_term)


def test_leader_completeness_after_failover() -> None:
    """§5.4 Leader Completeness: a committed entry is in every later leader's log."""
    net = Network([1, 2, 3, 4, 5], configure=no_prevote)
    net.elect(1)
    net.cut(1, 4)
    net.cut(1, 5)
    index, _ = net.propose(1, b"committed")
    net.stabilize()
    assert net.raw(1).status().commit == index
    net.crash(1)
    net.recover()
    # 4 and 5 lack the entry: they cannot win against 2 and 3.
    for candidate in (4, 5):
        net.raw(candidate).campaign()
        net.stabilize()
        assert net.raw(candidate).status().role != Role.LEADER
    campaign_until_leader(net, 2)
    assert any(e.data == b"committed" for e in net.nodes[2].storage.all_entries())
    net.check_leader_completeness()


def test_leader_appends_noop_on_election() -> None:
    """§8 / §5.4.2: a new leader appends an entry of its term (a no-op) at once."""
    net = Network([1, 2, 3])
    net.elect(1)
    last = net.nodes[1].storage.all_entries()[-1]
    assert last.term == net.raw(1).status().term and last.data == b""
    assert net.raw(1).status().commit == last.index


def figure8(unsafe: bool) -> Network:
    """§5.4.2 Figure 8 on 5 nodes (bootstrap occupies indexes 1-5)."""

    def configure(cfg: Config) -> None:
        no_prevote(cfg)
        cfg.max_size_per_msg = 1  # one entry per APPEND, so one can be held back
        cfg.unsafe_commit_previous_term = unsafe

    net = Network([1, 2, 3, 4, 5], configure=configure)
    # (a) S1 leads term 2, everyone has its no-op at 6; S1 replicates 7 to S2 only.
    net.elect(1)
    for peer in (3, 4, 5):
        net.cut(1, peer)
    net.propose(1, b"a")
    net.stabilize()
    # (b) S5 is elected in term 3 by S3, S4, S5 and appends its no-op at 7
    # locally only.
    net.recover()
    net.crash(1)
    campaign_until_leader(net, 5, keep=lambda m: not (m.frm == 5 and m.type == MessageType.APPEND))
    net.msgs.clear()
    assert net.raw(5).status().term == 3
    # (c) S1 is back (S5 is not) and leads term 4; it brings S3 up to date
    # with index 7 (term 2) but the term-4 no-op at 8 does not reach S3.
    net.crash(5)
    net.restart(1)
    net.cut(1, 4)

    def hold_back_index8_from_s3(m: Message) -> bool:
        # S3 must first reject index 8 (it lacks 7) and receive 7; after
        # that, index 8 never reaches it.
        return not (
            m.type == MessageType.APPEND
            and m.to == 3
            and any(e.index == 8 for e in m.entries)
            and net.nodes[3].storage.last_index() >= 7
        )

    campaign_until_leader(net, 1, keep=hold_back_index8_from_s3)
    assert net.raw(1).status().term == 4
    assert [e.term for e in net.nodes[3].storage.all_entries()][6] == 2
    # (d) S1 crashes; S5 is elected in term 5 by S3, S4 and overwrites 7.
    net.crash(1)
    net.recover()
    net.restart(5)
    campaign_until_leader(net, 5, attempts=4)
    net.propose(5, b"after")
    net.stabilize()
    return net


def test_figure8_commit_rule_keeps_previous_term_entry_uncommitted() -> None:
    """§5.4.2 Figure 8: entries of earlier terms are not committed by counting
    replicas, so S5 may safely overwrite index 7."""
    net = figure8(unsafe=False)
    assert net.nodes[1].applied_index == 6  # S1 never applied the term-2 entry
    assert net.applied_global[7] == (3, b"")
    net.check()


def test_figure8_bug_is_caught_with_unsafe_flag() -> None:
    """§5.4.2 negative control: with `unsafe_commit_previous_term`, S1 commits
    index 7 of term 2 by counting, and S5 later overwrites a committed entry."""
    with pytest.raises(SafetyViolation, match="state machine safety"):
        figure8(unsafe=True)


def test_committed_entries_are_applied_in_order_exactly_once() -> None:
    """§5.3/Figure 2: lastApplied advances one by one up to commitIndex."""
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(30):
        net.propose(1, b"%d" % i)
        if i % 7 == 0:
            net.stabilize()
    net.stabilize()
    net.heartbeat(1)
    for node in net.nodes.values():
        assert [d for _, _, d in node.applied] == [b"%d" % i for i in range(30)]
        assert node.applied_index == node.raw.status().commit
