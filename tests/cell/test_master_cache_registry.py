"""The master's cache/event bookkeeping core (`cell/cache_registry.py`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chubbyfs.cell.cache_registry import CacheRegistry
from chubbyfs.wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_INVALIDATE, ITEM_MASTER_FAILOVER

LEASES = {1: 10_000, 2: 20_000, 3: 30_000}


def lease_end_of(sid: int) -> int | None:
    return LEASES.get(sid)


def test_read_registers_and_write_invalidates_and_waits_for_ack() -> None:
    r = CacheRegistry()
    assert r.may_cache(1, "/ls/c/f") and r.may_cache(2, "/ls/c/f")
    mod, woken = r.begin(["/ls/c/f", "/ls/c"], lease_end_of)
    assert woken == {1, 2}
    assert not r.is_done(mod) and r.waiting_on(mod) == (1, 2)
    assert not r.may_cache(3, "/ls/c/f"), "uncachable while being modified"
    assert [i.kind for i in r.pending(1)] == [ITEM_INVALIDATE]
    assert r.ack(1, r.pending(1)[-1].seq) == set()
    assert r.ack(2, r.pending(2)[-1].seq) == {mod}
    assert r.is_done(mod) and not r.has_pending(1)
    r.finish(mod)
    assert r.may_cache(3, "/ls/c/f")
    r.assert_invariants()


def test_no_cachers_is_done_at_once() -> None:
    r = CacheRegistry()
    mod, woken = r.begin(["/ls/c/x"], lease_end_of)
    assert woken == set() and r.is_done(mod)
    r.finish(mod)
    r.assert_invariants()


def test_stale_ack_does_not_settle_and_lease_end_does() -> None:
    r = CacheRegistry()
    r.may_cache(1, "/p")
    mod, _ = r.begin(["/p"], lease_end_of)
    assert r.ack(1, 0) == set()
    assert r.next_deadline_ms() == 10_000
    assert r.expire(9_999) == set()
    assert r.expire(10_000) == {mod}
    r.finish(mod)
    r.assert_invariants()


def test_session_end_settles_its_waits_and_forgets_it() -> None:
    r = CacheRegistry()
    r.may_cache(1, "/p")
    mod, _ = r.begin(["/p"], lease_end_of)
    assert r.session_ended(1) == {mod}
    assert r.pending(1) == () and r.last_seq(1) == 0
    r.finish(mod)
    r.assert_invariants()


def test_gone_session_is_not_waited_for() -> None:
    r = CacheRegistry()
    r.may_cache(9, "/p")  # no lease: ended meanwhile
    mod, woken = r.begin(["/p"], lease_end_of)
    assert woken == {9} and r.is_done(mod)


def test_events_and_invalidations_share_one_sequence() -> None:
    r = CacheRegistry()
    r.may_cache(1, "/p")
    r.queue_events([(1, 1, 7, "/p", "")])
    r.invalidate_now(["/p"])
    r.queue_events([(1, 2, 7, "/d", "x")])
    items = r.pending(1)
    assert [i.seq for i in items] == [1, 2, 3]
    assert [i.kind for i in items] == [1, ITEM_INVALIDATE, 2]
    r.ack(1, 2)
    assert [i.seq for i in r.pending(1)] == [3]
    assert r.last_seq(1) == 3
    r.assert_invariants()


def test_directory_rename_prefix() -> None:
    r = CacheRegistry()
    r.may_cache(1, "/d/a")
    r.may_cache(1, "/da")  # not under /d/
    mod, woken = r.begin(["/d", "/e"], lease_end_of, prefixes=["/d"])
    assert woken == {1}
    assert [i.path for i in r.pending(1)] == ["/d/a"]
    assert not r.may_cache(2, "/d/b") and r.may_cache(2, "/da")
    r.finish(mod)
    assert r.may_cache(2, "/d/b")
    r.assert_invariants()


def test_failover_makes_every_session_a_cacher_until_acked() -> None:
    r = CacheRegistry()
    r.fail_over({1: 10_000, 2: 20_000})
    assert r.failover_pending(1)
    assert [i.kind for i in r.pending(1)] == [ITEM_MASTER_FAILOVER]
    mod, _ = r.begin(["/anything"], lease_end_of)
    assert r.waiting_on(mod) == (1, 2)
    r.ack(1, 1)
    assert not r.failover_pending(1) and r.waiting_on(mod) == (2,)
    assert r.expire(20_000) == {mod} and not r.failover_pending(2)
    r.finish(mod)
    r.assert_invariants()


def test_overflow_folds_backlog_and_keeps_waits_honest() -> None:
    r = CacheRegistry(max_outbox=4)
    r.may_cache(1, "/p")
    mod, _ = r.begin(["/p"], lease_end_of)
    r.queue_events([(1, 1, 1, "/q", "")] * 5)
    items = r.pending(1)
    assert len(items) <= 4 and items[0].kind == ITEM_EVENTS_LOST
    # The invalidation was folded into the marker: acking it settles the wait.
    assert r.ack(1, items[0].seq) == {mod}
    r.finish(mod)
    r.assert_invariants()


def test_reset_forgets_everything() -> None:
    r = CacheRegistry()
    r.may_cache(1, "/p")
    mod, _ = r.begin(["/p"], lease_end_of)
    assert r.reset() == {mod}
    assert r.statistics() == {"cached_paths": 0, "modifications": 0, "queued_items": 0,
                              "failover_pending": 0}


def test_bad_outbox_bound() -> None:
    with pytest.raises(ValueError):
        CacheRegistry(max_outbox=1)


ops = st.one_of(
    st.tuples(st.just("read"), st.sampled_from([1, 2, 3]), st.sampled_from(["/a", "/b", "/a/x"])),
    st.tuples(st.just("begin"), st.lists(st.sampled_from(["/a", "/b", "/a/x"]), min_size=1, max_size=2)),
    st.tuples(st.just("finish"), st.integers(0, 5)),
    st.tuples(st.just("ack"), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("event"), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("expire"), st.integers(0, 40_000)),
    st.tuples(st.just("end"), st.sampled_from([1, 2, 3])),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, max_size=40))
def test_random_operations_keep_the_promise(script: list) -> None:
    """Whatever happens: invariants hold, and a session recorded as caching
    a path never coexists with a finished-waiting modification of it unless
    it acked, expired or ended (checked via the model below)."""
    r = CacheRegistry(max_outbox=5)
    open_mods: list[int] = []
    acked_all: dict[int, int] = {}
    for op in script:
        if op[0] == "read":
            ok = r.may_cache(op[1], op[2])
            if ok:
                assert r.is_caching(op[1], op[2])
        elif op[0] == "begin":
            mod, _ = r.begin(op[1], lease_end_of)
            for path in op[1]:
                for sid in (1, 2, 3):
                    assert not r.is_caching(sid, path)
            open_mods.append(mod)
        elif op[0] == "finish" and open_mods:
            r.finish(open_mods.pop(op[1] % len(open_mods)))
        elif op[0] == "ack":
            items = r.pending(op[1])
            if items:
                r.ack(op[1], items[-1].seq)
                acked_all[op[1]] = items[-1].seq
            assert not r.has_pending(op[1])
        elif op[0] == "event":
            r.queue_events([(op[1], 1, 1, "/a", "")])
        elif op[0] == "expire":
            r.expire(op[1])
        elif op[0] == "end":
            r.session_ended(op[1])
        r.assert_invariants()
    for mod in open_mods:
        for sid in r.waiting_on(mod):
            assert r.has_pending(sid) or r.failover_pending(sid), "a wait with nothing to ack"
