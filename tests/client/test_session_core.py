import pathlib

import pytest
from hypothesis import given, strategies as st

from chubbyfs.client import session_core
from chubbyfs.client.session_core import SessionLeaseCore, SessionState
from tests.purity import impure_imports


def make(now=0.0, lease=12_000, grace=45_000):
    core = SessionLeaseCore(now_ms=now, lease_ms=lease, grace_ms=grace, drift_fraction=0.01)
    core.assert_invariants()
    return core


def test_local_lease_is_shorter_than_the_masters_and_counts_from_send_time():
    core = make()
    core.keep_alive_succeeded(sent_at_ms=1_000, lease_ms=12_000, now_ms=5_000)  # reply delayed 4 s
    assert core.local_lease_end_ms == pytest.approx(1_000 + 12_000 * 0.99)
    assert core.cache_usable(12_000)
    assert not core.cache_usable(12_880)


def test_jeopardy_then_safe_when_a_master_answers_in_the_grace_period():
    core = make()
    core.tick(11_880)
    assert core.state == SessionState.JEOPARDY
    assert [c.state for c in core.take_changes()] == [SessionState.JEOPARDY]
    assert not core.cache_usable(11_900)
    core.keep_alive_succeeded(sent_at_ms=30_000, lease_ms=12_000, now_ms=30_010)
    assert core.state == SessionState.SAFE
    assert [c.state for c in core.take_changes()] == [SessionState.SAFE]
    core.assert_invariants()


def test_expired_after_grace_and_final():
    core = make()
    core.tick(11_880)
    core.tick(11_880 + 45_000)
    assert core.state == SessionState.EXPIRED
    # A late reply cannot revive it: the master may already have ended it.
    core.keep_alive_succeeded(sent_at_ms=50_000, lease_ms=12_000, now_ms=57_000)
    assert core.state == SessionState.EXPIRED
    assert [c.state for c in core.take_changes()] == [SessionState.JEOPARDY, SessionState.EXPIRED]
    assert core.next_deadline_ms() is None


def test_reply_that_arrives_after_its_own_lease_does_not_make_it_safe():
    core = make()
    core.tick(11_880)
    # sent at 0, so it only covers up to ~11.9 s: no help at 20 s.
    core.keep_alive_succeeded(sent_at_ms=0, lease_ms=12_000, now_ms=20_000)
    assert core.state == SessionState.JEOPARDY


def test_master_says_expired():
    core = make()
    core.master_says_expired(100)
    assert core.state == SessionState.EXPIRED and not core.cache_usable(101)


def test_bad_arguments():
    with pytest.raises(ValueError):
        SessionLeaseCore(now_ms=0, lease_ms=0)


@given(st.lists(st.tuples(st.sampled_from(["tick", "ok", "expired"]), st.integers(0, 5_000),
                          st.integers(0, 3_000)), max_size=60))
def test_cache_never_usable_beyond_any_lease_the_master_granted(steps):
    """Whatever the interleaving, the cache is only usable before the end of
    a lease the master granted (counted from send time) and never after
    expiry."""
    core = make(lease=2_000, grace=3_000)
    now = 0.0
    granted_until = 2_000.0
    for kind, advance, delay in steps:
        now += advance
        if kind == "tick":
            core.tick(now)
        elif kind == "ok":
            sent = max(0.0, now - delay)
            core.keep_alive_succeeded(sent_at_ms=sent, lease_ms=2_000, now_ms=now)
            if core.state != SessionState.EXPIRED:
                granted_until = max(granted_until, sent + 2_000)
        else:
            core.master_says_expired(now)
        core.assert_invariants()
        if core.cache_usable(now):
            assert now < granted_until
            assert core.state == SessionState.SAFE


def test_core_is_pure():
    assert not impure_imports(pathlib.Path(session_core.__file__))
