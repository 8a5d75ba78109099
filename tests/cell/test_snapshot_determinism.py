"""Snapshot/restore round trips, and determinism: replicas fed the same log
agree on every result and on the snapshot bytes, also after a restore."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from chubbyfs.cell.commands import (
    Acquire, Close, CreateMode, CreateSession, Delete, EndSession, ExtendLeases,
    NUMBERED_TYPES, GetContentsAndStat, InitCell, Open, Release, Rename, SetACL, SetContents,
    SetSequencer, Tick, TryAcquire, encode_command,
)
from chubbyfs.cell.handles import ALL_INTENTS
from chubbyfs.cell.state_machine import CellStateMachine, SnapshotError
from chubbyfs.locks import LockMode

from .harness import CELL, SECRET, p

NAMES = ("a", "b", "c", "d", "d/x", "d/y")


def workload(seed: int, steps: int, sm: CellStateMachine):
    """Yield encoded commands; reads the results of `sm` (the leader) to pick
    handles, like a master would. Half the mutating calls are numbered, and
    now and then an earlier numbered entry comes again (a late duplicate)."""
    rng = random.Random(seed)
    numbers: dict[int, int] = {}  # session -> last request number
    numbered: list[bytes] = []
    now = 1_000
    yield encode_command(InitCell(now_ms=now, cell=CELL, admins=("root",), secret=SECRET,
                                  limits={}))
    next_sid = 1
    refs: list = []
    for _ in range(steps):
        now += rng.choice([0, 0, 10, 100, 1_000])
        roll = rng.random()
        live = sorted(sm.sessions)
        if roll < 0.08 or not live:
            cmd = CreateSession(now_ms=now, session_id=next_sid,
                                lease_end_ms=now + rng.choice([2_000, 5_000, 20_000]),
                                nonce=rng.choice([0, next_sid, 1]))
            next_sid += 1
        elif roll < 0.12:
            cmd = ExtendLeases(now_ms=now, leases={rng.choice(live): now + 3_000})
        elif roll < 0.14:
            cmd = EndSession(now_ms=now, session_id=rng.choice(live))
        elif roll < 0.18:
            cmd = Tick(now_ms=now)
        elif roll < 0.35 or not refs:
            name = rng.choice(NAMES)
            cmd = Open(now_ms=now, session_id=rng.choice(live), principal="root", epoch=1,
                       path=p(name), intent=int(ALL_INTENTS),
                       create=CreateMode.DIRECTORY if name == "d" else CreateMode.FILE,
                       ephemeral=rng.random() < 0.3 and name != "d",
                       events=rng.choice([0, 127]), lock_delay_ms=rng.choice([0, 1_000]))
        elif roll < 0.40:
            src, dst = rng.sample(["a", "b", "c"], 2)
            cmd = Rename(now_ms=now, session_id=rng.choice(live), principal="root",
                         src_path=p(src), dst_path=p(dst))
        else:
            live_refs = [(sid, ref) for sid, ref in refs if ref.handle_id in sm.handles]
            sid, ref = rng.choice(live_refs if live_refs and rng.random() < 0.85 else refs)
            base = dict(now_ms=now, session_id=sid, principal="root", handle=ref)
            kind = rng.randrange(9)
            if kind == 0:
                cmd = SetContents(**base, contents=rng.randbytes(rng.randrange(8)))
            elif kind == 1:
                cmd = GetContentsAndStat(**base)
            elif kind == 2:
                cmd = Acquire(**base, mode=rng.choice(list(LockMode)))
            elif kind == 3:
                cmd = TryAcquire(**base, mode=rng.choice(list(LockMode)))
            elif kind == 4:
                cmd = Release(**base)
            elif kind == 5:
                cmd = Close(**base)
            elif kind == 6:
                cmd = Delete(**base)
            elif kind == 7:
                cmd = SetACL(**base, read="admin", write=rng.choice(["admin", "w"]),
                             change_acl="admin")
            else:
                cmd = SetSequencer(**base, sequencer=f"chubbyseq1:{CELL}:X:1:1:{p('a')}")
        if type(cmd) in NUMBERED_TYPES and rng.random() < 0.5:
            n = numbers[cmd.session_id] = numbers.get(cmd.session_id, 0) + 1
            cmd = dataclasses.replace(cmd, request_no=n, answered_below=rng.randint(max(1, n - 4), n))
            numbered.append(encode_command(cmd))
        elif numbered and rng.random() < 0.1:
            cmd = None
        yield rng.choice(numbered) if cmd is None else encode_command(cmd)
        value = sm.last_result.result.value
        if hasattr(value, "handle"):
            refs.append((value.handle.session_id, value.handle))


class Leader(CellStateMachine):
    """Remembers each result so the workload can pick up new handles."""

    def apply(self, index, command):
        self.last_result = super().apply(index, command)
        return self.last_result


def run(seed: int, steps: int, followers: int = 1, restore_at: int | None = None):
    leader = Leader()
    replicas = [CellStateMachine() for _ in range(followers)]
    for index, data in enumerate(workload(seed, steps, leader), start=1):
        result = leader.apply(index, data)
        leader.assert_invariants()
        for replica in replicas:
            assert replica.apply(index, data) == result
        if restore_at is not None and index == restore_at:
            fresh = CellStateMachine()
            fresh.restore(replicas[0].snapshot())
            assert fresh.snapshot() == replicas[0].snapshot()
            replicas[0] = fresh
    return leader, replicas


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replicas_agree_on_results_and_snapshot_bytes(seed: int) -> None:
    leader, (follower,) = run(seed, 400)
    assert leader.snapshot() == follower.snapshot()
    follower.assert_invariants()


@pytest.mark.parametrize("seed", [4, 5])
def test_restored_replica_continues_identically(seed: int) -> None:
    leader, (follower,) = run(seed, 400, restore_at=200)
    assert leader.snapshot() == follower.snapshot()


def test_snapshot_round_trip_equals() -> None:
    leader, _ = run(6, 300, followers=0)
    data = leader.snapshot()
    copy = CellStateMachine()
    copy.restore(data)
    assert copy.snapshot() == data
    assert copy.applied_index == leader.applied_index
    copy.assert_invariants()


def test_empty_state_snapshot_round_trips() -> None:
    sm = CellStateMachine()
    copy = CellStateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([2]), msgpack.packb([1] + [0] * 14),
    msgpack.packb({"x": 1}),
])
def test_restore_rejects_malformed_snapshots(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        CellStateMachine().restore(data)


def test_restore_rejects_inconsistent_state() -> None:
    leader, _ = run(7, 200, followers=0)
    state = msgpack.unpackb(leader.snapshot(), raw=False)
    assert state[12], "the workload should leave live sessions"
    before = leader.snapshot()
    bad_leases = dict(state=[*state[:12], [[sid, 0, *rest] for sid, _, *rest in state[12]], *state[13:]])
    no_sessions = dict(state=[*state[:12], [], *state[13:]])
    for case in (bad_leases, no_sessions):
        with pytest.raises(SnapshotError):
            leader.restore(msgpack.packb(case["state"], use_bin_type=True))
    assert leader.snapshot() == before  # a failed restore changes nothing
