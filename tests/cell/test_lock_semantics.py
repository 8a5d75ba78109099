"""Locks through the state machine: modes, FIFO waiters, lock-delay,
sequencers, session end."""

from __future__ import annotations

from chubbyfs.cell.commands import (
    Acquire, CheckSequencer, Close, CreateMode, Delete, EndSession, ErrorCode, EventKind,
    GetSequencer, GetStat, LockResult, Release, SetContents, SetSequencer, Tick, TryAcquire,
)
from chubbyfs.cell.handles import Intent
from chubbyfs.locks import DEFAULT_LOCK_DELAY_MS, LockMode, Sequencer

from .harness import Harness, p

X, S = LockMode.EXCLUSIVE, LockMode.SHARED


def setup(n_sessions: int = 3, **open_options):
    h = Harness()
    sids = [h.session() for _ in range(n_sessions)]
    h.open(sids[0], p("lock"), create=CreateMode.FILE)
    refs = [h.open(sid, p("lock"), **open_options).handle for sid in sids]
    return h, sids, refs


def test_try_acquire_exclusive_and_shared() -> None:
    h, (a, b, c), (ra, rb, rc) = setup()
    first = h.ok(h.call(TryAcquire, a, ra, mode=X))
    assert isinstance(first, LockResult) and first.granted
    assert Sequencer.decode(first.sequencer).lock_generation == first.lock_generation
    result = h.err(h.call(TryAcquire, b, rb, mode=S), ErrorCode.LOCK_HELD)
    assert "held exclusive" in result.result.message
    # A retried request in the held mode answers as the first did (a client
    # whose master failed mid-call retries); another mode is refused.
    assert h.ok(h.call(TryAcquire, a, ra, mode=X)) == first
    h.err(h.call(TryAcquire, a, ra, mode=S), ErrorCode.LOCK_HELD)
    h.ok(h.call(Release, a, ra))
    s1 = h.ok(h.call(TryAcquire, b, rb, mode=S))
    s2 = h.ok(h.call(TryAcquire, c, rc, mode=S))
    assert s1.lock_generation == s2.lock_generation > first.lock_generation
    h.err(h.call(TryAcquire, a, ra, mode=X), ErrorCode.LOCK_HELD)
    assert h.sm.stat(p("lock")).lock_generation == s1.lock_generation


def test_blocking_acquire_is_fifo_and_answered_by_wakeups() -> None:
    h, (a, b, c), (ra, rb, rc) = setup()
    h.ok(h.call(Acquire, a, ra, mode=X))
    assert h.ok(h.call(Acquire, b, rb, mode=X)) == LockResult(False)
    assert h.ok(h.call(Acquire, c, rc, mode=S)) == LockResult(False)
    # Retries re-attach rather than queue twice; other modes are refused.
    assert h.ok(h.call(Acquire, b, rb, mode=X)) == LockResult(False)
    h.err(h.call(Acquire, b, rb, mode=S), ErrorCode.INVALID_ARGUMENT)
    h.err(h.call(TryAcquire, b, rb, mode=X), ErrorCode.INVALID_ARGUMENT)
    assert h.ok(h.call(Acquire, a, ra, mode=X)).granted
    h.err(h.call(Acquire, a, ra, mode=S), ErrorCode.LOCK_HELD)
    result = h.apply(h.call(Release, a, ra))
    assert [(w.session_id, w.handle_id, w.code) for w in result.wakeups] == [
        (b, rb.handle_id, ErrorCode.OK)]
    grant = result.wakeups[0]
    assert Sequencer.decode(grant.sequencer).lock_generation == grant.lock_generation
    assert p("lock") in result.invalidated_paths
    result = h.apply(h.call(Release, b, rb))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rc.handle_id, ErrorCode.OK)]
    assert result.wakeups[0].lock_generation > grant.lock_generation
    h.err(h.call(Release, a, ra), ErrorCode.LOCK_NOT_HELD)


def test_new_requests_do_not_jump_the_queue() -> None:
    h, (a, b, c), (ra, rb, rc) = setup()
    h.ok(h.call(Acquire, a, ra, mode=S))
    assert not h.ok(h.call(Acquire, b, rb, mode=X)).granted
    # Shared would be compatible with the holder, but an exclusive waiter is first.
    result = h.err(h.call(TryAcquire, c, rc, mode=S), ErrorCode.LOCK_HELD)
    assert "held shared" in result.result.message
    assert not h.ok(h.call(Acquire, c, rc, mode=S)).granted


def test_release_or_close_cancels_a_queued_acquire() -> None:
    h, (a, b, c), (ra, rb, rc) = setup()
    h.ok(h.call(Acquire, a, ra, mode=X))
    h.ok(h.call(Acquire, b, rb, mode=S))
    h.ok(h.call(Acquire, c, rc, mode=S))
    result = h.apply(h.call(Release, b, rb))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rb.handle_id, ErrorCode.CANCELLED)]
    result = h.apply(h.call(Close, c, rc))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rc.handle_id, ErrorCode.CANCELLED)]
    assert not h.sm.nodes[h.sm.by_path[p("lock")]].lock.waiters


def test_close_of_holder_frees_at_once() -> None:
    h, (a, b, _), (ra, rb, _) = setup()
    h.ok(h.call(Acquire, a, ra, mode=X))
    h.ok(h.call(Acquire, b, rb, mode=X))
    result = h.apply(h.call(Close, a, ra))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rb.handle_id, ErrorCode.OK)]


def test_session_end_keeps_lock_unavailable_for_its_lock_delay() -> None:
    h = Harness()
    a, b, c = h.session(lease_ms=1_000), h.session(lease_ms=10**6), h.session(lease_ms=10**6)
    h.open(b, p("lock"), create=CreateMode.FILE)
    ra = h.open(a, p("lock"), lock_delay_ms=5_000).handle
    rb = h.open(b, p("lock")).handle
    rc = h.open(c, p("lock")).handle
    h.ok(h.call(Acquire, a, ra, mode=X))
    h.ok(h.call(Acquire, b, rb, mode=X))
    expire_at = h.now_ms + 1_000
    result = h.apply(Tick(now_ms=expire_at))
    assert result.ended_sessions == (a,) and result.wakeups == ()
    h.now_ms = expire_at + 4_999
    msg = h.err(h.call(TryAcquire, c, rc, mode=S), ErrorCode.LOCK_HELD).result.message
    assert "lock-delay" in msg
    result = h.apply(Tick(now_ms=expire_at + 5_000))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rb.handle_id, ErrorCode.OK)]


def test_delay_ends_on_any_later_command_and_zero_delay_is_immediate() -> None:
    h = Harness()
    a, b = h.session(lease_ms=1_000), h.session(lease_ms=10**6)
    h.open(b, p("l1"), create=CreateMode.FILE)
    h.open(b, p("l2"), create=CreateMode.FILE)
    slow = h.open(a, p("l1")).handle  # default lock-delay
    fast = h.open(a, p("l2"), lock_delay_ms=0).handle
    h.ok(h.call(Acquire, a, slow, mode=X))
    h.ok(h.call(Acquire, a, fast, mode=X))
    w1 = h.open(b, p("l1")).handle
    w2 = h.open(b, p("l2")).handle
    h.ok(h.call(Acquire, b, w1, mode=X))
    h.ok(h.call(Acquire, b, w2, mode=X))
    h.now_ms += 1_000
    result = h.apply(h.call(GetStat, b, w1))  # any command's stamped time ends the session
    assert result.ended_sessions == (a,)
    assert [w.handle_id for w in result.wakeups] == [w2.handle_id]
    h.now_ms += DEFAULT_LOCK_DELAY_MS
    result = h.apply(h.call(GetStat, b, w1))
    assert [w.handle_id for w in result.wakeups] == [w1.handle_id]


def test_session_end_is_atomic() -> None:
    h = Harness()
    a, b = h.session(), h.session()
    h.open(b, p("lock"), create=CreateMode.FILE)
    held = h.open(a, p("lock"), lock_delay_ms=0).handle
    h.ok(h.call(Acquire, a, held, mode=X))
    other_lock = h.open(b, p("other"), create=CreateMode.FILE).handle
    h.ok(h.call(Acquire, b, other_lock, mode=X))
    waiting = h.open(a, p("other")).handle
    h.ok(h.call(Acquire, a, waiting, mode=S))
    h.open(a, p("eph"), create=CreateMode.FILE, ephemeral=True)
    rb = h.open(b, p("lock")).handle
    h.ok(h.call(Acquire, b, rb, mode=X))
    result = h.apply(EndSession(now_ms=h.now_ms, session_id=a))
    assert result.ended_sessions == (a,)
    assert [(w.session_id, w.code) for w in result.wakeups] == [
        (a, ErrorCode.SESSION_EXPIRED), (b, ErrorCode.OK)]
    assert h.sm.stat(p("eph")) is None
    assert not any(handle.session_id == a for handle in h.sm.handles.values())
    h.err(h.call(GetStat, a, held), ErrorCode.SESSION_EXPIRED)


def test_session_end_never_grants_to_itself() -> None:
    h = Harness()
    a, b = h.session(), h.session()
    h.open(b, p("l"), create=CreateMode.FILE)
    holder = h.open(a, p("l"), lock_delay_ms=0).handle
    own_waiter = h.open(a, p("l")).handle
    other_waiter = h.open(b, p("l")).handle
    h.ok(h.call(Acquire, a, holder, mode=X))
    h.ok(h.call(Acquire, a, own_waiter, mode=X))
    h.ok(h.call(Acquire, b, other_waiter, mode=X))
    result = h.apply(EndSession(now_ms=h.now_ms, session_id=a))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [
        (own_waiter.handle_id, ErrorCode.SESSION_EXPIRED), (other_waiter.handle_id, ErrorCode.OK)]


def test_waiter_limit() -> None:
    h = Harness(limits={"max_waiters_per_lock": 1})
    sids = [h.session() for _ in range(3)]
    h.open(sids[0], p("l"), create=CreateMode.FILE)
    refs = [h.open(sid, p("l")).handle for sid in sids]
    h.ok(h.call(Acquire, sids[0], refs[0], mode=X))
    h.ok(h.call(Acquire, sids[1], refs[1], mode=X))
    h.err(h.call(Acquire, sids[2], refs[2], mode=X), ErrorCode.LIMIT_EXCEEDED)


def test_locking_needs_lock_intent_and_write_acl() -> None:
    h = Harness()
    admin = h.session()
    h.open(admin, p("acl/readers"), create=CreateMode.FILE, contents=b"bob\n")
    h.open(admin, p("acl/lockers"), create=CreateMode.FILE, contents=b"bob\n")
    h.open(admin, p("l"), create=CreateMode.FILE, acl=("readers", "lockers", "admin"))
    sid = h.session()
    ref = h.open(sid, p("l"), "bob", int(Intent.READ | Intent.LOCK)).handle
    h.ok(h.call(Acquire, sid, ref, "bob", mode=X))
    # Revoke write: acquiring is refused, releasing still works.
    lockers = h.open(admin, p("acl/lockers")).handle
    h.ok(h.call(SetContents, admin, lockers, contents=b""))
    h.ok(h.call(Release, sid, ref, "bob"))
    h.err(h.call(Acquire, sid, ref, "bob", mode=X), ErrorCode.PERMISSION_DENIED)


def test_lock_events() -> None:
    h = Harness()
    a, b = h.session(), h.session()
    h.open(a, p("l"), create=CreateMode.FILE)
    mask = int(EventKind.LOCK_ACQUIRED | EventKind.CONFLICTING_LOCK)
    ra = h.open(a, p("l"), events=mask).handle
    watcher = h.open(b, p("l"), events=int(EventKind.LOCK_ACQUIRED)).handle
    rb = h.open(b, p("l")).handle
    result = h.apply(h.call(Acquire, a, ra, mode=X))
    assert [(e.kind, e.handle_id) for e in result.events] == [
        (EventKind.LOCK_ACQUIRED, ra.handle_id), (EventKind.LOCK_ACQUIRED, watcher.handle_id)]
    result = h.apply(h.call(Acquire, b, rb, mode=X))
    assert [(e.kind, e.session_id, e.handle_id) for e in result.events] == [
        (EventKind.CONFLICTING_LOCK, a, ra.handle_id)]


def test_sequencers() -> None:
    h, (a, b, _), (ra, rb, _) = setup()
    h.err(h.call(GetSequencer, a, ra), ErrorCode.LOCK_NOT_HELD)
    h.ok(h.call(Acquire, a, ra, mode=X))
    seq = h.ok(h.call(GetSequencer, a, ra)).sequencer
    check = CheckSequencer(now_ms=h.now_ms, sequencer=seq)
    assert h.ok(check).valid and h.sm.query(check).value.valid
    h.err(CheckSequencer(now_ms=h.now_ms, sequencer="junk"), ErrorCode.BAD_SEQUENCER)
    decoded = Sequencer.decode(seq)
    wrong_mode = Sequencer(decoded.cell, decoded.path, decoded.instance, S,
                           decoded.lock_generation).encode()
    assert not h.ok(CheckSequencer(now_ms=h.now_ms, sequencer=wrong_mode)).valid
    other_cell = Sequencer("elsewhere", "/ls/elsewhere/lock", 1, X, 1).encode()
    assert "cell" in h.ok(CheckSequencer(now_ms=h.now_ms, sequencer=other_cell)).reason
    # B ties the sequencer to its handle; once A lets go, B's calls fail.
    h.ok(h.call(SetSequencer, b, rb, sequencer=seq))
    h.ok(h.call(GetStat, b, rb))
    h.ok(h.call(Release, a, ra))
    result = h.ok(check)
    assert not result.valid and "no longer held" in result.reason
    h.err(h.call(GetStat, b, rb), ErrorCode.BAD_SEQUENCER)
    h.err(h.call(SetSequencer, b, rb, sequencer=seq), ErrorCode.BAD_SEQUENCER)
    h.err(h.call(SetSequencer, b, rb, sequencer="junk"), ErrorCode.BAD_SEQUENCER)
    # A later grant has a new generation: the old sequencer stays invalid.
    h.ok(h.call(Acquire, a, ra, mode=X))
    assert "generation" in h.ok(check).reason
    # Replacing it with a valid one revives the handle; Close always works.
    h.ok(h.call(SetSequencer, b, rb, sequencer=h.ok(h.call(GetSequencer, a, ra)).sequencer))
    h.ok(h.call(GetStat, b, rb))
    h.ok(h.call(Close, b, rb))


def test_sequencer_of_deleted_and_recreated_node_is_invalid() -> None:
    h, (a, _, _), (ra, _, _) = setup()
    seq = h.ok(h.call(Acquire, a, ra, mode=X)).sequencer
    h.ok(h.call(Delete, a, ra))
    assert "no longer exists" in h.ok(CheckSequencer(now_ms=h.now_ms, sequencer=seq)).reason
    again = h.open(a, p("lock"), create=CreateMode.FILE).handle
    new_seq = h.ok(h.call(Acquire, a, again, mode=X))
    assert "created again" in h.ok(CheckSequencer(now_ms=h.now_ms, sequencer=seq)).reason
    # Generations keep rising across re-creation (fencing stays correct).
    assert new_seq.lock_generation > Sequencer.decode(seq).lock_generation


def test_deleting_a_locked_node_fails_its_waiters() -> None:
    h, (a, b, _), (ra, rb, _) = setup()
    h.ok(h.call(Acquire, a, ra, mode=X))
    h.ok(h.call(Acquire, b, rb, mode=X))
    result = h.apply(h.call(Delete, a, ra))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [
        (rb.handle_id, ErrorCode.STALE_HANDLE)]
    h.err(h.call(Release, a, ra), ErrorCode.STALE_HANDLE)


def test_recreated_ephemeral_lock_file_inherits_lock_delay() -> None:
    h = Harness()
    a, b = h.session(lease_ms=1_000), h.session(lease_ms=10**6)
    ra = h.open(a, p("leader"), create=CreateMode.FILE, ephemeral=True,
                lock_delay_ms=10_000).handle
    h.ok(h.call(Acquire, a, ra, mode=X))
    expire_at = h.now_ms + 1_000
    h.apply(Tick(now_ms=expire_at))
    assert h.sm.stat(p("leader")) is None  # collected with its session
    h.now_ms = expire_at + 1
    rb = h.open(b, p("leader"), create=CreateMode.FILE, ephemeral=True).handle
    h.err(h.call(TryAcquire, b, rb, mode=X), ErrorCode.LOCK_HELD)
    assert not h.ok(h.call(Acquire, b, rb, mode=X)).granted
    result = h.apply(Tick(now_ms=expire_at + 10_000))
    assert [(w.handle_id, w.code) for w in result.wakeups] == [(rb.handle_id, ErrorCode.OK)]
