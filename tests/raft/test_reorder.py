"""Links that reorder: a follower holds streamed APPENDs that overtook the
entries before them and applies them when the gap fills, instead of
rejecting each one (which made the leader resend its window for every
overtaking message: a message storm the simulator found, seeds 20174 and
21887 of the 20000 sweep). Probes are always answered at once."""

from __future__ import annotations

import dataclasses

from chubbyfs.raft import Config, Message, MessageType, ProgressState

from .network import Network


def _one_entry_per_append(cfg: Config) -> None:
    cfg.max_size_per_msg = 1


def _take_appends_to(net: Network, to: int) -> list[Message]:
    """Let the leader (1) send, and take its APPENDs to `to` off the wire."""
    net.process_ready(1)
    appends = [m for m in net.msgs if m.to == to and m.type == MessageType.APPEND]
    net.msgs = [m for m in net.msgs if not (m.to == to and m.type == MessageType.APPEND)]
    return appends


def _answers_from(net: Network, node: int) -> list[Message]:
    net.process_ready(node)
    return [m for m in net.msgs if m.frm == node and m.type == MessageType.APPEND_RESP]


def test_overtaking_appends_are_held_and_applied_when_the_gap_fills() -> None:
    net = Network([1, 2, 3], configure=_one_entry_per_append)
    net.elect(1)
    assert net.raw(1).status().progress[2].state == ProgressState.REPLICATE
    start = net.raw(2).status().last_index
    for i in range(5):
        net.propose(1, b"%d" % i)
    appends = _take_appends_to(net, 2)
    assert len(appends) == 5 and all(m.streamed and len(m.entries) == 1 for m in appends)
    for m in reversed(appends[1:]):  # all but the first, last one first
        net.deliver(m)
    assert net.raw(2).status().last_index == start  # held, not appended
    assert _answers_from(net, 2) == [], "held APPENDs are neither answered nor rejected"
    net.deliver(appends[0])
    assert net.raw(2).status().last_index == start + 5
    answers = _answers_from(net, 2)
    assert [m.index for m in answers] == [start + 1, start + 2, start + 3, start + 4, start + 5]
    assert not any(m.reject for m in answers)
    net.stabilize()
    assert net.raw(1).status().progress[2].match == start + 5


def test_a_probe_past_the_end_of_the_log_is_rejected_at_once() -> None:
    net = Network([1, 2, 3])
    net.elect(1)
    last = net.raw(2).status().last_index
    net.propose(1, b"x")
    (append,) = _take_appends_to(net, 2)
    probe = dataclasses.replace(append, index=last + 5, streamed=False)
    net.deliver(probe)
    (answer,) = _answers_from(net, 2)
    assert answer.reject and answer.reject_hint == last
    # The same message streamed would be held, not answered.
    net.msgs.clear()
    net.deliver(dataclasses.replace(probe, streamed=True))
    assert _answers_from(net, 2) == []


def test_held_appends_are_bounded_and_die_with_the_term() -> None:
    def tiny(cfg: Config) -> None:
        _one_entry_per_append(cfg)
        cfg.max_inflight_msgs = 3

    net = Network([1, 2, 3], configure=tiny)
    net.elect(1)
    start = net.raw(2).status().last_index
    for i in range(3):
        net.propose(1, b"%d" % i)
    first = _take_appends_to(net, 2)
    assert len(first) == 3
    # Further streamed APPENDs past a gap that never fills (the leader has
    # no such entries; they only occupy the buffer).
    beyond = [dataclasses.replace(first[-1], index=first[-1].index + k, log_term=first[-1].entries[0].term,
                                  entries=(dataclasses.replace(first[-1].entries[0], index=first[-1].index + k + 1),))
              for k in range(3, 7)]
    for m in first[1:] + beyond:
        net.deliver(m)
    answers = _answers_from(net, 2)
    # The buffer holds max_inflight_msgs APPENDs; past that, the rest are
    # rejected with where our log ends.
    assert answers and all(m.reject and m.reject_hint == start for m in answers)
    assert len(answers) == len(first[1:] + beyond) - 3
    net.raw(2).assert_invariants()
    # A new term (another leader) empties the buffer: the gap filling now
    # must not apply the old leader's held entries.
    net.msgs.clear()  # what was in flight is lost; heartbeats find out
    net.heartbeat(1)
    net.heartbeat(1)
    net.raw(1).transfer_leadership(3)
    net.stabilize()
    assert net.leader() == 3 and net.raw(2).status().term > first[0].term
    net.raw(2).assert_invariants()
    net.deliver(first[0])  # from the old term: refused
    net.stabilize()
    net.heartbeat(3)
    for node in (1, 2, 3):
        net.raw(node).assert_invariants()
    statuses = [net.raw(i).status() for i in (1, 2, 3)]
    assert len({(s.commit, s.last_index) for s in statuses}) == 1
