"""Replication mechanics, snapshots, leadership transfer, membership, restart,
the Ready contract and error paths."""

from __future__ import annotations

import random

import pytest

from chubbyfs.raft import (
    Config,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    InvalidConfChangeError,
    MemoryStorage,
    Message,
    MessageType,
    NotLeaderError,
    ProgressState,
    ProposalDroppedError,
    RawNode,
    Ready,
    Role,
    SnapshotMeta,
    apply_change,
    decode_conf_change,
    encode_conf_change,
)

from .network import Network


def small(cfg: Config) -> None:
    cfg.max_size_per_msg = 1  # one entry per APPEND
    cfg.snapshot_chunk_bytes = 64


# -- replication -------------------------------------------------------------------


def test_proposals_between_readies_are_batched() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(10):
        net.propose(1, b"%d" % i)
    rd = net.raw(1).ready()
    assert len(rd.entries) == 10 and rd.must_sync
    appends = [m for m in rd.messages if m.type == MessageType.APPEND]
    assert sorted(m.to for m in appends) == [2, 3]
    assert all(len(m.entries) == 10 for m in appends)


def test_inflight_window_bounds_pipelined_appends() -> None:
    def configure(cfg: Config) -> None:
        small(cfg)
        cfg.max_inflight_msgs = 3

    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    for i in range(10):
        net.propose(1, b"%d" % i)
    net.process_ready(1)
    to2 = [m for m in net.msgs if m.to == 2 and m.type == MessageType.APPEND]
    assert len(to2) == 3 and all(len(m.entries) == 1 for m in to2)
    assert net.raw(1).status().progress[2].state == ProgressState.REPLICATE
    # Acks open the window again; everything arrives.
    net.stabilize()
    net.heartbeat(1)
    assert net.raw(2).status().commit == net.raw(1).status().last_index


def test_fast_backoff_skips_a_term_per_round_trip() -> None:
    """A follower with 100 divergent entries of an old term is repaired in one
    rejection, not 100."""
    voters = ConfState(voters=(1, 2, 3))
    stores = {i: MemoryStorage(voters) for i in (1, 2, 3)}
    # Node 2 has 100 entries of term 2 from a leader that never committed them;
    # nodes 1 and 3 have 100 entries of term 3 at the same indexes.
    stores[2].append([Entry(term=2, index=4 + i, data=b"old") for i in range(100)])
    stores[2].set_hard_state(HardState(term=2, vote=0, commit=3))
    for i in (1, 3):
        stores[i].append([Entry(term=3, index=4 + j, data=b"new") for j in range(100)])
        stores[i].set_hard_state(HardState(term=3, vote=0, commit=3))

    def configure(cfg: Config) -> None:
        cfg.check_quorum = False

    net = Network([1, 2, 3], configure=configure)
    for i in (1, 2, 3):
        net.nodes[i].storage = stores[i]
        net.restart(i)
    rejects: list[Message] = []

    def record(m: Message) -> bool:
        if m.type == MessageType.APPEND_RESP and m.reject:
            rejects.append(m)
        return True

    net.raw(1).campaign()
    net.stabilize(keep=record)
    assert net.leader() == 1
    assert len([m for m in rejects if m.frm == 2]) == 1
    assert [e.data for e in stores[2].all_entries()[3:103]] == [b"new"] * 100
    net.check()


def test_fast_backoff_round_trips_are_counted() -> None:
    voters = ConfState(voters=(1, 2))
    leader_store, follower_store = MemoryStorage(voters), MemoryStorage(voters)
    # Follower: terms 2,3,4 each 30 entries; leader: terms 2 (30) then 5 (90).
    idx = 3
    for term in (2, 3, 4):
        follower_store.append([Entry(term=term, index=idx + j) for j in range(30)])
        idx += 30
    follower_store.set_hard_state(HardState(term=4, commit=2))
    leader_store.append([Entry(term=2, index=3 + j) for j in range(30)])
    leader_store.append([Entry(term=5, index=33 + j) for j in range(90)])
    leader_store.set_hard_state(HardState(term=5, commit=2))
    leader = RawNode(Config(id=1, check_quorum=False, pre_vote=False), leader_store, random.Random(1))
    follower = RawNode(Config(id=2, check_quorum=False, pre_vote=False), follower_store, random.Random(2))
    stores = {1: leader_store, 2: follower_store}
    nodes = {1: leader, 2: follower}
    leader.campaign()
    rejections = 0
    pending: list[Message] = []
    for _ in range(50):
        for i, raw in nodes.items():
            while raw.has_ready():
                rd = raw.ready()
                stores[i].append(rd.entries)
                if rd.hard_state:
                    stores[i].set_hard_state(rd.hard_state)
                pending.extend(rd.messages)
                raw.advance(rd)
        if not pending:
            break
        for m in pending:
            if m.type == MessageType.APPEND_RESP and m.reject:
                rejections += 1
            nodes[m.to].step(m)
        pending = []
    assert follower.status().last_index == leader.status().last_index
    assert rejections <= 2, rejections


# -- snapshots ---------------------------------------------------------------------


def lagging_follower_with_compaction(configure=small) -> Network:
    net = Network([1, 2, 3], configure=configure)
    net.elect(1)
    net.isolate(3)
    for i in range(40):
        net.propose(1, b"entry-%02d" % i + b"x" * 20)
    net.stabilize()
    applied = net.nodes[1].applied_index
    net.compact(1, applied)
    assert net.nodes[1].storage.first_index() == applied + 1
    net.recover()
    return net


def test_snapshot_sent_in_chunks_to_follower_behind_compaction() -> None:
    net = lagging_follower_with_compaction()
    for _ in range(5):
        net.tick_all(1)
    chunks = net.sent_count.get(MessageType.SNAPSHOT, 0)
    assert chunks > 5  # 64-byte chunks
    assert net.nodes[3].storage.snapshot().meta.index == net.nodes[1].storage.snapshot().meta.index
    assert net.nodes[3].applied == net.nodes[1].applied
    net.propose(1, b"after")
    net.tick_all(2)
    assert net.nodes[3].applied[-1][2] == b"after"
    net.check()


def test_interrupted_snapshot_transfer_restarts_and_completes() -> None:
    net = lagging_follower_with_compaction()
    # Deliver three chunks, lose the rest, then crash the follower.
    delivered: list[Message] = []

    def three_chunks(m: Message) -> bool:
        if m.type == MessageType.SNAPSHOT:
            if len(delivered) >= 3:
                return False
            delivered.append(m)
        return True

    net.tick_all(1, stabilize=False)
    net.stabilize(keep=three_chunks)
    assert len(delivered) == 3
    assert net.nodes[3].storage.snapshot().is_empty()
    net.crash(3)
    net.restart(3)
    # The leader keeps sending the next chunk; the follower has none of the
    # earlier ones, asks to start over from 0, and the transfer completes.
    restarts: list[Message] = []
    offsets: list[int] = []

    def record(m: Message) -> bool:
        if m.type == MessageType.SNAPSHOT_RESP and m.reject:
            restarts.append(m)
        if m.type == MessageType.SNAPSHOT:
            offsets.append(m.snapshot_offset)
        return True

    for _ in range(5):
        net.tick_all(1, stabilize=False)
        net.stabilize(keep=record)
    assert restarts and restarts[0].index == 0
    assert offsets[0] > 0 and 0 in offsets[1:]
    assert net.nodes[3].applied == net.nodes[1].applied
    net.check()


def test_lost_snapshot_chunk_is_resent_after_heartbeat() -> None:
    net = lagging_follower_with_compaction()
    net.tick(1)
    dropped = []

    def drop_first_chunk(m: Message) -> bool:
        if m.type == MessageType.SNAPSHOT and not dropped and m.snapshot_offset > 0:
            dropped.append(m)
            return False
        return True

    net.stabilize(keep=drop_first_chunk)
    assert dropped
    for _ in range(3):
        net.tick_all(1)
    assert net.nodes[3].applied == net.nodes[1].applied


def test_follower_with_newer_commit_ignores_snapshot() -> None:
    raw = RawNode(Config(id=2), MemoryStorage(ConfState(voters=(1, 2, 3))), random.Random(0))
    meta_msg = Message(
        type=MessageType.SNAPSHOT, to=2, frm=1, term=2,
        snapshot_meta=SnapshotMeta(index=2, term=1, conf=ConfState(voters=(1, 2, 3))),
        snapshot_data=b"", snapshot_done=True,
    )
    raw.step(meta_msg)
    rd = raw.ready()
    assert rd.snapshot is None
    resp = [m for m in rd.messages if m.type == MessageType.SNAPSHOT_RESP]
    assert resp and resp[0].snapshot_done and resp[0].index == 3


# -- leadership transfer -----------------------------------------------------------


def test_transfer_to_up_to_date_follower() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    term = net.raw(1).status().term
    net.raw(1).transfer_leadership(2)
    assert not net.raw(1).lease_valid()  # revoked at once
    net.stabilize()
    assert net.leader() == 2 and net.raw(2).status().term == term + 1
    assert net.raw(1).status().role == Role.FOLLOWER


def test_transfer_catches_target_up_and_drops_proposals_meanwhile() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"%d" % i)
    net.stabilize()
    net.recover()
    # What the transport reports when a broken connection comes back: the
    # APPENDs it carried are gone.
    net.raw(1).report_unreachable(3)
    net.raw(1).transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        net.propose(1, b"refused")
    net.stabilize()
    assert net.leader() == 3
    assert [d for _, _, d in net.nodes[3].applied] == [b"%d" % i for i in range(5)]


def test_transfer_aborts_after_election_timeout() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(3)
    net.cut(1, 3)
    net.raw(1).transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        net.propose(1, b"x")
    for _ in range(10):
        net.tick_all(1)
    assert net.leader() == 1
    net.propose(1, b"accepted again")
    assert not net.raw(1).lease_valid()  # stays revoked for this term


def test_transfer_errors() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    with pytest.raises(NotLeaderError):
        net.raw(2).transfer_leadership(3)
    with pytest.raises(ValueError):
        net.raw(1).transfer_leadership(9)
    net.raw(1).transfer_leadership(1)  # to itself: nothing to do
    assert net.leader() == 1


def test_follower_forwards_transfer_request_to_leader() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    term = net.raw(2).status().term
    net.raw(2).step(Message(type=MessageType.TRANSFER_LEADER, to=2, frm=3, term=term))
    net.stabilize()
    assert net.leader() == 3


# -- membership --------------------------------------------------------------------


def test_add_voter_takes_effect_when_appended_and_new_node_catches_up() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.propose(1, b"before")
    net.stabilize()
    net.add_node(4)
    index, _ = net.raw(1).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4, b"addr4"))
    assert net.raw(1).status().conf.voters == (1, 2, 3, 4)  # before commit
    assert net.raw(1).status().commit < index
    with pytest.raises(ProposalDroppedError):
        net.raw(1).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 5))
    net.stabilize()
    for _ in range(3):
        net.tick_all(1)
    for i in (1, 2, 3, 4):
        assert net.raw(i).status().conf.voters == (1, 2, 3, 4)
    assert [d for _, _, d in net.nodes[4].applied] == [b"before"]
    # Now a commit needs 3 of 4.
    net.isolate(4)
    net.cut(1, 3)
    i2, _ = net.propose(1, b"needs three")
    net.stabilize()
    assert net.raw(1).status().commit < i2


def test_remove_follower() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.raw(1).propose_conf_change(ConfChange(ConfChangeType.REMOVE_VOTER, 3))
    net.stabilize()
    assert net.raw(1).status().conf.voters == (1, 2)
    net.crash(3)
    index, _ = net.propose(1, b"two is a quorum of two")
    net.stabilize()
    assert net.raw(1).status().commit >= index


def test_remove_leader_steps_down_after_commit_and_hands_over() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    index, _ = net.raw(1).propose_conf_change(ConfChange(ConfChangeType.REMOVE_VOTER, 1))
    with pytest.raises(ProposalDroppedError):
        net.propose(1, b"leader being removed")
    net.stabilize()
    assert net.raw(1).status().role == Role.FOLLOWER
    for _ in range(30):
        net.tick_all(1)
    lead = net.leader()
    assert lead in (2, 3)
    assert net.raw(1).status().role == Role.FOLLOWER  # never campaigns again
    net.propose(lead, b"ok")
    net.stabilize()


def test_truncated_conf_entry_reverts_membership() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    net.isolate(1)
    net.raw(1).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    assert net.raw(1).status().conf.voters == (1, 2, 3, 4)
    net.stabilize()
    for _ in range(40):
        net.tick_all(1)
        if net.leader() in (2, 3):
            break
    net.recover()
    net.tick_all(3)
    assert net.raw(1).status().conf.voters == (1, 2, 3)
    assert net.raw(1).status().role == Role.FOLLOWER
    net.check()


def test_conf_change_validation_and_codec() -> None:
    conf = ConfState(voters=(1, 2))
    with pytest.raises(InvalidConfChangeError):
        apply_change(conf, ConfChange(ConfChangeType.ADD_VOTER, 2))
    with pytest.raises(InvalidConfChangeError):
        apply_change(conf, ConfChange(ConfChangeType.REMOVE_VOTER, 3))
    with pytest.raises(InvalidConfChangeError):
        apply_change(ConfState(voters=(1,)), ConfChange(ConfChangeType.REMOVE_VOTER, 1))
    with pytest.raises(InvalidConfChangeError):
        apply_change(conf, ConfChange(ConfChangeType.ADD_VOTER, 0))
    cc = ConfChange(ConfChangeType.ADD_VOTER, 7, b"10.0.0.7:4000")
    assert decode_conf_change(encode_conf_change(cc)) == cc
    for bad in (b"", b"\xc1", b"\x93\x09\x01\xc4\x00", b"\x92\x00\x01"):
        with pytest.raises(InvalidConfChangeError):
            decode_conf_change(bad)
    net = Network([1, 2, 3])
    net.elect(1)
    with pytest.raises(InvalidConfChangeError):
        net.raw(1).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 2))
    with pytest.raises(NotLeaderError):
        net.raw(2).propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))


def test_node_outside_configuration_does_not_campaign() -> None:
    storage = MemoryStorage()
    raw = RawNode(Config(id=9), storage, random.Random(0))
    for _ in range(100):
        raw.tick()
    raw.campaign()
    assert raw.status().role == Role.FOLLOWER and raw.status().term == 0


# -- restart and the Ready contract ---------------------------------------------------


def test_restart_rebuilds_state_and_redelivers_after_applied() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    for i in range(6):
        net.propose(1, b"%d" % i)
    net.stabilize()
    net.heartbeat(1)
    storage = net.nodes[2].storage
    before = net.raw(2).status()
    raw = RawNode(Config(id=2, applied=6), storage, random.Random(0))
    st = raw.status()
    assert (st.term, st.vote, st.commit, st.last_index) == (before.term, before.vote, before.commit, before.last_index)
    rd = raw.ready()
    assert [e.index for e in rd.committed_entries] == list(range(7, before.commit + 1))
    with pytest.raises(ValueError):
        RawNode(Config(id=2, applied=before.commit + 1), storage, random.Random(0))


def test_committed_entries_only_after_persistence_and_leader_counts_own_copy_late() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    leader = net.raw(1)
    index, _ = leader.propose(b"v")
    rd = leader.ready()
    assert [e.index for e in rd.entries] == [index] and not rd.committed_entries
    net.nodes[1].storage.append(rd.entries)
    appends = [m for m in rd.messages if m.to == 2]
    # Follower 2 acks before the leader has advanced: 1 of 3 is not a majority.
    for m in appends:
        net.raw(2).step(m)
    rd2 = net.raw(2).ready()
    assert rd2.entries and rd2.must_sync
    net.nodes[2].storage.append(rd2.entries)
    net.raw(2).advance(rd2)
    for m in rd2.messages:
        leader.step(m)
    assert leader.status().commit < index
    leader.advance(rd)
    assert leader.status().commit == index
    rd3 = leader.ready()
    assert [e.index for e in rd3.committed_entries] == [index]
    assert rd3.hard_state is not None and rd3.hard_state.commit == index
    assert not rd3.must_sync  # commit-only change


def test_vote_response_and_its_hard_state_are_in_one_ready() -> None:
    raw = RawNode(Config(id=2), MemoryStorage(ConfState(voters=(1, 2, 3))), random.Random(0))
    raw.step(Message(type=MessageType.VOTE, to=2, frm=1, term=2, index=3, log_term=1))
    rd = raw.ready()
    assert rd.hard_state == HardState(term=2, vote=1, commit=3) and rd.must_sync
    assert [m.type for m in rd.messages] == [MessageType.VOTE_RESP]


def test_ready_protocol_misuse_raises() -> None:
    raw = RawNode(Config(id=1), MemoryStorage(ConfState(voters=(1,))), random.Random(0))
    raw.campaign()
    rd = raw.ready()
    assert not raw.has_ready()
    with pytest.raises(RuntimeError):
        raw.ready()
    with pytest.raises(RuntimeError):
        raw.advance(Ready())
    raw.advance(rd)


def test_single_node_cluster_commits_on_its_own() -> None:
    storage = MemoryStorage(ConfState(voters=(1,)))
    raw = RawNode(Config(id=1), storage, random.Random(0))
    raw.campaign()
    assert raw.status().role == Role.LEADER
    applied = []
    index, _ = raw.propose(b"solo")
    for _ in range(4):
        if raw.has_ready():
            rd = raw.ready()
            storage.append(rd.entries)
            if rd.hard_state:
                storage.set_hard_state(rd.hard_state)
            applied += [e.data for e in rd.committed_entries if e.type == EntryType.NORMAL]
            raw.advance(rd)
    assert b"solo" in applied and raw.lease_valid()
    raw.read_index(b"r")
    assert raw.ready().read_states[0].index == index


def test_errors_for_bad_requests_and_config() -> None:
    for bad in (
        dict(id=0),
        dict(id=1, heartbeat_tick=0),
        dict(id=1, election_tick=1, heartbeat_tick=1),
        dict(id=1, lease_drift_ticks=0),
        dict(id=1, lease_drift_ticks=10),
        dict(id=1, max_size_per_msg=0),
        dict(id=1, max_inflight_msgs=0),
        dict(id=1, snapshot_chunk_bytes=0),
        dict(id=1, applied=-1),
    ):
        with pytest.raises(ValueError):
            RawNode(Config(**bad), MemoryStorage(ConfState(voters=(1,))), random.Random(0))
    net = Network([1, 2, 3])
    net.elect(1)
    with pytest.raises(NotLeaderError) as exc:
        net.propose(2, b"x")
    assert exc.value.leader == 1
    # Misrouted and local-only messages from the network are ignored.
    raw = net.raw(2)
    before = raw.status()
    raw.step(Message(type=MessageType.HUP, to=2, frm=3, term=99))
    raw.step(Message(type=MessageType.APPEND, to=3, frm=1, term=99))
    raw.step(Message(type=MessageType.APPEND_RESP, to=2, frm=0, term=99))
    assert raw.status() == before


def test_report_unreachable_moves_follower_to_probe() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    assert net.raw(1).status().progress[2].state == ProgressState.REPLICATE
    net.raw(1).report_unreachable(2)
    assert net.raw(1).status().progress[2].state == ProgressState.PROBE
