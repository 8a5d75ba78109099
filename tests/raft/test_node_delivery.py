"""RaftNode.deliver_now: messages a transport read together are handled in
the reading task, at once; a paused node leaves them for the loop; a failure
surfaces in the loop, not in the transport's task."""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing

from chubbyfs.raft import Config, Entry, MemoryStorage, Message, MessageType
from chubbyfs.raft.node import RaftNode, bootstrap_storage


class _Outbox:
    def __init__(self) -> None:
        self.queued: list[Message] = []
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.queued.append(msg)

    def flush(self) -> None:
        self.sent += self.queued
        self.queued = []


class _Applied:
    def __init__(self) -> None:
        self.commands: list[bytes] = []

    def apply(self, index: int, command: bytes) -> None:
        self.commands.append(command)

    def query(self, query: object) -> None:
        return None

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: bytes) -> None:
        self.commands = []


def _follower(storage: MemoryStorage | None = None) -> tuple[RaftNode, _Outbox, _Applied]:
    storage = storage or MemoryStorage()
    bootstrap_storage(storage, [1, 2, 3])
    outbox, applied = _Outbox(), _Applied()
    node = RaftNode(config=Config(id=2), storage=storage, transport=outbox, state_machine=applied,
                    rng=random.Random(2))
    return node, outbox, applied


def _append_from_leader(node: RaftNode, data: bytes, *, commit: int) -> Message:
    last = node.raw.status().last_index
    return Message(type=MessageType.APPEND, to=2, frm=1, term=2, log_term=1, index=last,
                   entries=(Entry(term=2, index=last + 1, data=data),), commit=commit)


async def test_messages_are_handled_in_the_delivering_task() -> None:
    node, outbox, applied = _follower()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        last = node.raw.status().last_index
        node.deliver_now([_append_from_leader(node, b"a", commit=last + 1)])
        # No checkpoint since: the entry is stored, answered and applied.
        assert node.raw.status().last_index == last + 1
        assert [m.type for m in outbox.sent] == [MessageType.APPEND_RESP] and outbox.sent[0].index == last + 1
        assert applied.commands == [b"a"]
        nursery.cancel_scope.cancel()


async def test_a_paused_node_leaves_them_to_the_loop() -> None:
    node, outbox, applied = _follower()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        last = node.raw.status().last_index
        node.pause()
        node.deliver_now([_append_from_leader(node, b"a", commit=last + 1)])
        assert node.raw.status().last_index == last and not outbox.sent
        node.resume()
        with trio.fail_after(5):
            while not applied.commands:
                await trio.sleep(0.001)
        assert applied.commands == [b"a"] and outbox.sent[0].index == last + 1
        nursery.cancel_scope.cancel()


class _FailingDisk(MemoryStorage):
    failing = False

    def append(self, entries: list[Entry]) -> None:
        if self.failing:
            raise OSError(5, "the disk failed")
        super().append(entries)


async def test_a_failure_surfaces_in_the_loop_not_in_the_caller() -> None:
    disk = _FailingDisk()
    node, outbox, _ = _follower(disk)
    disk.failing = True
    with pytest.raises(BaseExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            node.deliver_now([_append_from_leader(node, b"a", commit=0)])  # does not raise
            assert not outbox.sent
            await trio.sleep(5)  # the loop raises long before
    assert failure.group_contains(OSError, match="the disk failed", depth=None)
    # Later deliveries go to the (stopped) loop's queue, never processed.
    node.deliver_now([_append_from_leader(node, b"b", commit=0)])
    assert not outbox.sent


# ---- proposals: a lone one goes out from the proposer's task, a lazy one rides along ----

async def _leader(nursery: trio.Nursery, storage: MemoryStorage | None = None,
                  config: Config | None = None) -> tuple[RaftNode, _Outbox]:
    storage = storage or MemoryStorage()
    bootstrap_storage(storage, [1, 2, 3])
    outbox = _Outbox()
    node = RaftNode(config=config or Config(id=1, pre_vote=False), storage=storage, transport=outbox,
                    state_machine=_Applied(), rng=random.Random(1), tick_seconds=0.05)
    await nursery.start(node.run)
    node.raw.campaign()
    term = node.raw.status().term
    node.deliver_now([Message(type=MessageType.VOTE_RESP, to=1, frm=2, term=term)])
    assert node.role.name == "LEADER"
    # Let followers 2 and 3 catch up with the leader's no-op entry.
    last = node.raw.status().last_index
    node.deliver_now([Message(type=MessageType.APPEND_RESP, to=1, frm=peer, term=term, index=last)
                      for peer in (2, 3)])
    await trio.testing.wait_all_tasks_blocked()  # the loop has seen the new role
    outbox.sent.clear()
    return node, outbox


def _sent_entries(outbox: _Outbox) -> dict[int, list[bytes]]:
    """Per peer, the entry payloads of the APPENDs sent so far."""
    out: dict[int, list[bytes]] = {}
    for m in outbox.sent:
        if m.type == MessageType.APPEND:
            out.setdefault(m.to, []).extend(e.data for e in m.entries)
    return out


async def test_a_lone_proposal_goes_out_from_the_proposing_task() -> None:
    async with trio.open_nursery() as nursery:
        node, outbox = await _leader(nursery)
        node.propose_nowait(b"w", lambda result, error: None)
        # No checkpoint since: already appended and sent to both followers.
        assert _sent_entries(outbox) == {2: [b"w"], 3: [b"w"]}
        nursery.cancel_scope.cancel()


async def test_a_lazy_proposal_rides_with_the_next_one() -> None:
    async with trio.open_nursery() as nursery:
        node, outbox = await _leader(nursery)
        last = node.raw.status().last_index
        nursery.start_soon(functools.partial(node.propose, b"queued", lazy=True))
        await trio.testing.wait_all_tasks_blocked()
        assert node.raw.status().last_index == last + 1  # appended: it keeps its place in the log
        assert _sent_entries(outbox) == {}               # but not sent alone
        node.propose_nowait(b"release", lambda result, error: None)
        # One APPEND per follower carries both, in proposal order.
        assert _sent_entries(outbox) == {2: [b"queued", b"release"], 3: [b"queued", b"release"]}
        assert sum(m.type == MessageType.APPEND for m in outbox.sent) == 2
        nursery.cancel_scope.cancel()


async def test_a_lazy_proposal_alone_goes_out_by_the_next_tick() -> None:
    async with trio.open_nursery() as nursery:
        node, outbox = await _leader(nursery)
        nursery.start_soon(functools.partial(node.propose, b"queued", lazy=True))
        with trio.fail_after(5):
            while not _sent_entries(outbox):
                await trio.sleep(0.01)
        assert _sent_entries(outbox) == {2: [b"queued"], 3: [b"queued"]}
        nursery.cancel_scope.cancel()


async def test_a_lazy_proposal_behind_one_in_flight_is_not_held_back() -> None:
    async with trio.open_nursery() as nursery:
        node, outbox = await _leader(nursery)
        node.propose_nowait(b"release", lambda result, error: None)  # in flight, unacknowledged
        nursery.start_soon(functools.partial(node.propose, b"queued", lazy=True))
        await trio.testing.wait_all_tasks_blocked()
        # Pipelined behind the first at once (the loop's next round), not left for a tick.
        assert _sent_entries(outbox) == {2: [b"release", b"queued"], 3: [b"release", b"queued"]}
        nursery.cancel_scope.cancel()


class _SyncSpy(MemoryStorage):
    """Records, at each sync, which followers had been sent entries."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox = _Outbox()
        self.sent_at_sync: list[dict[int, list[bytes]]] = []

    def sync(self) -> None:
        self.sent_at_sync.append(_sent_entries(self.outbox))
        super().sync()


async def test_new_entries_reach_the_fastest_follower_before_the_leaders_fsync() -> None:
    async with trio.open_nursery() as nursery:
        spy = _SyncSpy()
        node, outbox = await _leader(nursery, spy)
        spy.outbox = outbox
        term = node.raw.status().term
        node.propose_nowait(b"a", lambda result, error: None)
        last = node.raw.status().last_index
        # Follower 3 answers first this time.
        node.deliver_now([Message(type=MessageType.APPEND_RESP, to=1, frm=peer, term=term, index=last)
                          for peer in (3, 2)])
        outbox.sent.clear()
        spy.sent_at_sync.clear()
        node.propose_nowait(b"b", lambda result, error: None)
        # One follower completes a majority: it gets the entry before our
        # fsync; the other right after, in the same step.
        assert spy.sent_at_sync == [{3: [b"b"]}]
        assert _sent_entries(outbox) == {3: [b"b"], 2: [b"b"]}
        nursery.cancel_scope.cancel()


async def test_an_idle_leader_wakes_for_heartbeats_not_for_every_tick() -> None:
    async with trio.open_nursery() as nursery:
        config = Config(id=1, pre_vote=False, heartbeat_tick=3, election_tick=10)
        node, outbox = await _leader(nursery, config=config)
        wakeups = 0
        process = node._process

        def counting() -> None:
            nonlocal wakeups
            wakeups += 1
            process()

        node._process = counting  # type: ignore[method-assign]
        await trio.sleep(0.4)  # 8 ticks of 50 ms: within the quorum's election timeout
        heartbeats = sum(m.type == MessageType.HEARTBEAT for m in outbox.sent) // 2
        assert node.role.name == "LEADER" and heartbeats >= 2
        assert wakeups <= heartbeats + 1  # one per heartbeat round, not one per tick
        nursery.cancel_scope.cancel()
