"""Request numbers in the state machine: a numbered request is applied at
most once; a duplicate is answered with the recorded result (refusals
included), forgotten once its client says it has had the answer, refused
below that mark; the table survives snapshot and restore and ends with the
session. CreateSession with a nonce is idempotent."""

from __future__ import annotations

import msgpack
import pytest

from chubbyfs.cell.commands import (
    Acquire, Close, CreateMode, CreateSession, EndSession, ErrorCode, ExtendLeases, LockResult,
    Open, Release, Rename, Result, SetACL, SetContents, TryAcquire, decode_command, encode_command,
)
from chubbyfs.cell.session_requests import RequestTable
from chubbyfs.cell.state_machine import CellStateMachine, InvariantViolation, SnapshotError
from chubbyfs.locks import LockMode

from .harness import Harness, p

X = LockMode.EXCLUSIVE


def _file(h: Harness, sid: int, name: str = "f"):
    return h.open(sid, p(name), create=CreateMode.FILE).handle


def _write(h: Harness, sid: int, ref, contents: bytes, n: int, below: int | None = None, **extra):
    return h.call(SetContents, sid, ref, contents=contents, request_no=n,
                  answered_below=n if below is None else below, **extra)


def test_a_duplicate_is_answered_with_the_first_result_and_applied_once() -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    first = h.apply(_write(h, sid, ref, b"v1", 1))
    assert first.result.ok and first.invalidated_paths
    again = h.apply(_write(h, sid, ref, b"v1", 1))
    assert again.result == first.result  # the same stat: the same content generation
    assert again.events == () and again.invalidated_paths == ()
    assert h.sm.stat(p("f")).content_generation == first.result.value.content_generation


@pytest.mark.parametrize("acknowledged", [True, False])
def test_a_late_duplicate_cannot_overwrite_the_clients_later_write(acknowledged: bool) -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    h.ok(_write(h, sid, ref, b"v1", 1))  # the retry of call 1 went through
    # The client moved on; call 2 says it has had 1's answer, or (another
    # call still in flight) does not.
    h.ok(_write(h, sid, ref, b"v2", 2, below=2 if acknowledged else 1))
    late = h.apply(_write(h, sid, ref, b"v1", 1, below=1))  # call 1's first attempt, held till now
    assert late.result.code == (ErrorCode.STALE_REQUEST if acknowledged else ErrorCode.OK)
    assert h.sm.nodes[h.sm.by_path[p("f")]].contents == b"v2"


def test_a_refusal_is_recorded_so_a_late_duplicate_cannot_succeed() -> None:
    h = Harness()
    a, b = h.session(), h.session()
    ra, rb = _file(h, a, "lock"), h.open(b, p("lock")).handle
    h.ok(h.call(TryAcquire, a, ra, mode=X))
    refused = h.apply(h.call(TryAcquire, b, rb, mode=X, request_no=1, answered_below=1))
    assert refused.result.code == ErrorCode.LOCK_HELD
    h.ok(h.call(Release, a, ra))
    # The lock is free now, but b was told "held" and went on without it.
    late = h.apply(h.call(TryAcquire, b, rb, mode=X, request_no=1, answered_below=1))
    assert late.result == refused.result
    assert not h.sm.nodes[h.sm.by_path[p("lock")]].lock.holders


def test_results_are_forgotten_once_answered_and_late_duplicates_refused() -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    h.ok(_write(h, sid, ref, b"v1", 1))
    assert set(h.sm.sessions[sid].requests.results) == {1}
    h.ok(_write(h, sid, ref, b"v2", 2))  # answered_below 2: the client has had 1's answer
    assert set(h.sm.sessions[sid].requests.results) == {2}
    stale = h.err(_write(h, sid, ref, b"v1", 1, below=1), ErrorCode.STALE_REQUEST)
    assert "late duplicate" in stale.result.message
    assert h.sm.nodes[h.sm.by_path[p("f")]].contents == b"v2"


def test_answered_below_cannot_exceed_the_requests_own_number() -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    h.err(_write(h, sid, ref, b"v1", 3, below=4), ErrorCode.INVALID_ARGUMENT)


def test_numbers_may_be_applied_out_of_order() -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    # Calls 1 and 2 in flight together; 2 is applied first.
    h.ok(_write(h, sid, ref, b"two", 2, below=1))
    one = h.ok(_write(h, sid, ref, b"one", 1, below=1))
    assert h.sm.stat(p("f")).content_generation == one.content_generation
    assert set(h.sm.sessions[sid].requests.results) == {1, 2}


def test_every_numbered_command_replays() -> None:
    h = Harness()
    sid = h.session()
    opened = h.apply(Open(now_ms=h.now_ms, session_id=sid, principal="root", epoch=1, path=p("d"),
                          intent=15, create=CreateMode.FILE, request_no=1, answered_below=1))
    ref = opened.result.value.handle
    commands = [
        h.call(SetACL, sid, ref, read="admin", write="admin", change_acl="admin", request_no=2,
               answered_below=2),
        h.call(Acquire, sid, ref, mode=X, request_no=3, answered_below=3),
        h.call(Release, sid, ref, request_no=4, answered_below=4),
        Rename(now_ms=h.now_ms, session_id=sid, principal="root", src_path=p("d"), dst_path=p("e"),
               request_no=5, answered_below=5),
        h.call(Close, sid, ref, request_no=6, answered_below=6),
    ]
    for cmd in commands:
        first = h.apply(cmd)
        assert first.result.ok, first.result
        assert h.apply(cmd).result == first.result
    # Close said it had every earlier answer: they are forgotten, their
    # late duplicates refused.
    assert h.apply(Open(now_ms=h.now_ms, session_id=sid, principal="root", epoch=1, path=p("d"),
                        intent=15, create=CreateMode.FILE, request_no=1,
                        answered_below=1)).result.code == ErrorCode.STALE_REQUEST
    assert h.sm.session_handle_ids(sid) == ()


def _queued(request_no: int = 1, answered_below: int = 1):
    """Session a holds the lock; session b's numbered Acquire is queued."""
    h = Harness()
    a, b = h.session(), h.session()
    ra, rb = _file(h, a, "lock"), h.open(b, p("lock")).handle
    h.ok(h.call(Acquire, a, ra, mode=X))
    acquire = h.call(Acquire, b, rb, mode=X, request_no=request_no, answered_below=answered_below)
    assert h.ok(acquire) == LockResult(False)
    return h, (a, b), (ra, rb), acquire


def test_a_retried_blocking_acquire_joins_the_wait_then_gets_its_outcome() -> None:
    h, (a, b), (ra, rb), acquire = _queued()
    assert h.ok(acquire) == LockResult(False)  # the retry waits for the same wakeup
    lock = h.sm.nodes[h.sm.by_path[p("lock")]].lock
    assert list(lock.waiters) == [(rb.handle_id, X)]
    [grant] = h.apply(h.call(Release, a, ra)).wakeups
    granted = h.ok(acquire)  # a retry after the grant is answered with it
    assert granted == LockResult(True, grant.lock_generation, grant.sequencer)
    assert h.sm.sessions[b].requests.waiting == {}


def test_a_retried_acquire_whose_wait_was_cancelled_hears_so() -> None:
    h, (a, b), (ra, rb), acquire = _queued()
    h.ok(h.call(Release, b, rb, request_no=2, answered_below=1))  # cancels the queued Acquire
    late = h.apply(acquire)
    assert late.result.code == ErrorCode.CANCELLED and late.wakeups == ()
    h.ok(h.call(Release, a, ra))
    assert not h.sm.nodes[h.sm.by_path[p("lock")]].lock.holders  # b never got it


def test_the_table_is_bounded() -> None:
    h = Harness(limits={"max_unanswered_requests": 3})
    sid = h.session()
    ref = _file(h, sid)
    for n in range(1, 6):  # a client that never says what it has had answered
        h.ok(_write(h, sid, ref, b"%d" % n, n, below=1))
    table = h.sm.sessions[sid].requests
    assert set(table.results) == {3, 4, 5} and table.answered_below == 3
    h.err(_write(h, sid, ref, b"1", 1, below=1), ErrorCode.STALE_REQUEST)


def test_the_table_survives_snapshot_and_restore() -> None:
    h, (a, b), (ra, rb), acquire = _queued(request_no=7, answered_below=5)
    write = _write(h, a, _file(h, a, "f"), b"v", 3, below=2)
    written = h.ok(write)
    copy = CellStateMachine()
    copy.restore(h.sm.snapshot())
    assert copy.snapshot() == h.sm.snapshot()
    table = copy.sessions[b].requests
    assert (table.answered_below, table.waiting) == (5, {rb.handle_id: [7]})
    h.sm = copy  # go on with the restored replica
    assert h.ok(write) == written
    [grant] = h.apply(h.call(Release, a, ra)).wakeups
    assert h.ok(acquire).sequencer == grant.sequencer


def test_the_table_ends_with_the_session() -> None:
    h = Harness()
    sid = h.session()
    ref = _file(h, sid)
    write = _write(h, sid, ref, b"v", 1)
    h.ok(write)
    h.ok(EndSession(now_ms=h.now_ms, session_id=sid))
    h.err(write, ErrorCode.SESSION_EXPIRED)
    assert sid not in h.sm.sessions


def test_create_session_with_a_nonce_is_idempotent() -> None:
    h = Harness()
    first = h.ok(CreateSession(now_ms=h.now_ms, session_id=10, lease_end_ms=h.now_ms + 5_000, nonce=77))
    h.ok(ExtendLeases(now_ms=h.now_ms, leases={10: h.now_ms + 9_000}))
    # The retry, with a later id from the master: the same session, its lease now.
    retry = h.ok(CreateSession(now_ms=h.now_ms, session_id=11, lease_end_ms=h.now_ms + 5_000, nonce=77))
    assert (retry.session_id, retry.lease_end_ms) == (first.session_id, h.now_ms + 9_000)
    assert sorted(h.sm.sessions) == [10] and h.sm.last_session_id == 10
    other = h.ok(CreateSession(now_ms=h.now_ms, session_id=12, lease_end_ms=h.now_ms + 5_000, nonce=78))
    assert other.session_id == 12
    copy = CellStateMachine()
    copy.restore(h.sm.snapshot())
    assert copy.session_nonces == {77: 10, 78: 12}
    h.ok(EndSession(now_ms=h.now_ms, session_id=10))
    assert h.sm.session_nonces == {78: 12}


def test_numbered_commands_round_trip_and_older_entries_still_decode() -> None:
    h = Harness()
    ref = _file(h, h.session())
    cmd = SetContents(now_ms=5, session_id=2, principal="u", handle=ref, contents=b"c",
                      request_no=9, answered_below=8)
    assert decode_command(encode_command(cmd)) == cmd
    _, tag, fields = msgpack.unpackb(encode_command(cmd), raw=False)
    old = msgpack.packb([1, tag, fields[:-2]], use_bin_type=True)
    assert decode_command(old) == SetContents(now_ms=5, session_id=2, principal="u", handle=cmd.handle,
                                              contents=b"c")
    old_create = msgpack.packb([1, CreateSession.TAG, [5, 3, 9]], use_bin_type=True)
    assert decode_command(old_create) == CreateSession(now_ms=5, session_id=3, lease_end_ms=9)


def test_inconsistent_tables_are_caught() -> None:
    h = Harness()
    sid = h.session()
    _file(h, sid)
    table = h.sm.sessions[sid].requests
    table.waiting[424242] = [1]  # a queued Acquire recorded for a handle that does not wait
    with pytest.raises(InvariantViolation):
        h.sm.assert_invariants()
    state = msgpack.unpackb(h.sm.snapshot(), raw=False, strict_map_key=False)
    with pytest.raises(SnapshotError):
        CellStateMachine().restore(msgpack.packb(state, use_bin_type=True))
    table.waiting.clear()
    h.sm.session_nonces[5] = sid
    with pytest.raises(InvariantViolation):
        h.sm.assert_invariants()


def test_request_table_problems() -> None:
    table = RequestTable()
    table.record(1, Result(ErrorCode.OK), None, 10)
    assert table.problems(10) == []
    assert table.problems(0) == ["1 results kept, more than 0"]
    table.answered_below = 5
    assert table.problems(10) == ["a result is kept below answered_below 5"]
