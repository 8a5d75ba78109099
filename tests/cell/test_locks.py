"""chubbyfs.locks: sequencers and the per-node lock rules."""

from __future__ import annotations

import pytest

from chubbyfs.locks import (
    MAX_LOCK_DELAY_MS, LockInvariantError, LockMode, LockState, Sequencer, SequencerError,
    check_lock_delay_ms,
)


def test_sequencer_round_trip_and_printable() -> None:
    seq = Sequencer("c1", "/ls/c1/dir/with:colon", 7, LockMode.SHARED, 42)
    text = seq.encode()
    assert text.isprintable()
    assert text == "chubbyseq1:c1:S:7:42:/ls/c1/dir/with:colon"
    assert Sequencer.decode(text) == seq
    exclusive = Sequencer("c1", "/ls/c1/x", 1, LockMode.EXCLUSIVE, 2)
    assert Sequencer.decode(exclusive.encode()) == exclusive


@pytest.mark.parametrize("text", [
    "",
    "garbage",
    "chubbyseq2:c1:X:1:2:/ls/c1/x",
    "chubbyseq1:c1:Q:1:2:/ls/c1/x",
    "chubbyseq1:c1:X:one:2:/ls/c1/x",
    "chubbyseq1:c1:X:1:-2:/ls/c1/x",
    "chubbyseq1:c1:X:1:2:/ls/other/x",
    "chubbyseq1::X:1:2:/ls//x",
    "chubbyseq1:c1:X:1:2:/ls/c1/x\n",
])
def test_sequencer_decode_rejects_malformed(text: str) -> None:
    with pytest.raises(SequencerError):
        Sequencer.decode(text)


def test_sequencer_decode_rejects_non_string() -> None:
    with pytest.raises(SequencerError):
        Sequencer.decode(b"chubbyseq1:c1:X:1:2:/ls/c1/x")  # type: ignore[arg-type]


def test_lock_delay_bounds() -> None:
    check_lock_delay_ms(0)
    check_lock_delay_ms(MAX_LOCK_DELAY_MS)
    for bad in (-1, MAX_LOCK_DELAY_MS + 1, True, 1.5):
        with pytest.raises(ValueError):
            check_lock_delay_ms(bad)  # type: ignore[arg-type]


def test_exclusive_excludes_everyone() -> None:
    lock = LockState()
    assert lock.can_grant_now(LockMode.EXCLUSIVE, 0)
    assert lock.grant(1, LockMode.EXCLUSIVE, 10) == 10
    assert not lock.can_grant_now(LockMode.SHARED, 0)
    assert not lock.can_grant_now(LockMode.EXCLUSIVE, 0)
    with pytest.raises(LockInvariantError):
        lock.grant(2, LockMode.SHARED, 11)
    with pytest.raises(LockInvariantError):
        lock.grant(1, LockMode.EXCLUSIVE, 11)
    lock.assert_invariants()


def test_shared_holders_share_one_generation() -> None:
    lock = LockState()
    assert lock.grant(1, LockMode.SHARED, 5) == 5
    assert lock.can_grant_now(LockMode.SHARED, 0)
    assert lock.grant(2, LockMode.SHARED, 0) == 5
    assert not lock.can_grant_now(LockMode.EXCLUSIVE, 0)
    lock.release(1, 0)
    lock.release(2, 0)
    assert lock.is_free() and lock.is_idle()
    with pytest.raises(LockInvariantError):
        lock.grant(3, LockMode.SHARED, 5)  # generation must grow on free -> held
    with pytest.raises(LockInvariantError):
        lock.release(3, 0)


def test_fifo_queue_grants_shared_run_then_stops_at_exclusive() -> None:
    lock = LockState()
    lock.grant(1, LockMode.EXCLUSIVE, 1)
    lock.enqueue(2, LockMode.SHARED)
    lock.enqueue(3, LockMode.SHARED)
    lock.enqueue(4, LockMode.EXCLUSIVE)
    lock.enqueue(5, LockMode.SHARED)
    with pytest.raises(LockInvariantError):
        lock.enqueue(3, LockMode.SHARED)
    # A new compatible request may not jump the queue.
    assert not lock.can_grant_now(LockMode.SHARED, 0)
    assert lock.pop_grantable(0) == []
    lock.release(1, 0)
    assert lock.pop_grantable(0) == [(2, LockMode.SHARED), (3, LockMode.SHARED)]
    lock.grant(2, LockMode.SHARED, 2)
    lock.grant(3, LockMode.SHARED, 0)
    assert lock.pop_grantable(0) == []
    lock.release(2, 0)
    lock.release(3, 0)
    assert lock.pop_grantable(0) == [(4, LockMode.EXCLUSIVE)]
    assert lock.remove_waiter(5) and not lock.remove_waiter(5)
    lock.assert_invariants()


def test_lock_delay_blocks_every_grant_until_it_ends() -> None:
    lock = LockState()
    lock.grant(1, LockMode.EXCLUSIVE, 1)
    lock.enqueue(2, LockMode.SHARED)
    lock.release(1, now_ms=1_000, lock_delay_ms=500)
    assert lock.in_delay(1_499) and not lock.in_delay(1_500)
    assert lock.pop_grantable(1_499) == []
    assert not lock.can_grant_now(LockMode.SHARED, 1_499)
    assert lock.pop_grantable(1_500) == [(2, LockMode.SHARED)]
    assert lock.delay_until_ms == 0


def test_longest_pending_delay_wins() -> None:
    lock = LockState()
    lock.grant(1, LockMode.SHARED, 1)
    lock.grant(2, LockMode.SHARED, 0)
    lock.release(1, now_ms=0, lock_delay_ms=10_000)
    lock.release(2, now_ms=100, lock_delay_ms=1_000)
    assert lock.delay_until_ms == 10_000


def test_invariant_checker_catches_bad_states() -> None:
    lock = LockState()
    lock.holders = {1: LockMode.EXCLUSIVE, 2: LockMode.EXCLUSIVE}
    lock.generation = 1
    with pytest.raises(LockInvariantError):
        lock.assert_invariants()
    lock.holders = {1: LockMode.EXCLUSIVE, 2: LockMode.SHARED}
    with pytest.raises(LockInvariantError):
        lock.assert_invariants()
    lock.holders = {1: LockMode.SHARED}
    lock.generation = 0
    with pytest.raises(LockInvariantError):
        lock.assert_invariants()
    lock.generation = 3
    lock.waiters.append((1, LockMode.SHARED))
    with pytest.raises(LockInvariantError):
        lock.assert_invariants()
