"""The client's cache core and typed events (pure parts)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chubbyfs.cell.commands import ALL_EVENTS, EventKind as CellEventKind
from chubbyfs.client.cache_core import ABSENT, ClientCache, DirEntry
from chubbyfs.client.events import (ChildAdded, ContentsModified, EventKind, MasterFailover, make_event)
from chubbyfs.wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_INVALIDATE, ITEM_MASTER_FAILOVER, Stat


def stat(path: str, instance: int = 1, size: int = 0) -> Stat:
    return Stat(path, instance, False, False, 1, 0, 1, 0, size, "a", "a", "a", 0)


def cache_in_epoch(epoch: int = 3) -> ClientCache:
    cache = ClientCache()
    cache.start_epoch(epoch)
    return cache


def test_install_and_hit() -> None:
    cache = cache_in_epoch()
    assert cache.put_contents("/ls/c/f", b"ab", stat("/ls/c/f", size=2), epoch=3, seq=0)
    assert cache.get_contents("/ls/c/f", 1) == (b"ab", stat("/ls/c/f", size=2))
    assert cache.get_stat("/ls/c/f", 1) == stat("/ls/c/f", size=2)
    assert cache.get_contents("/ls/c/f", 2) is None, "another instance of the name"
    cache.assert_invariants()


def test_reply_older_than_a_processed_item_is_not_installed() -> None:
    cache = cache_in_epoch()
    cache.apply_item(1, ITEM_INVALIDATE, "/ls/c/f")
    assert not cache.put_contents("/ls/c/f", b"old", stat("/ls/c/f", size=3), epoch=3, seq=0)
    assert cache.put_contents("/ls/c/f", b"new", stat("/ls/c/f", size=3), epoch=3, seq=1)


def test_reply_from_another_epoch_is_not_installed() -> None:
    cache = cache_in_epoch(3)
    assert not cache.put_stat("/ls/c/f", stat("/ls/c/f"), epoch=4, seq=0)
    assert not ClientCache().put_stat("/ls/c/f", stat("/ls/c/f"), epoch=0, seq=0)


def test_invalidation_drops_everything_for_the_path() -> None:
    cache = cache_in_epoch()
    cache.put_contents("/ls/c/f", b"", stat("/ls/c/f"), epoch=3, seq=0)
    cache.put_listing("/ls/c/f", 1, (), epoch=3, seq=0)
    cache.apply_item(1, ITEM_INVALIDATE, "/ls/c/f")
    assert cache.lookup("/ls/c/f") is None and cache.get_listing("/ls/c/f") is None
    assert cache.last_seq == 1
    with pytest.raises(ValueError):
        cache.apply_item(1, ITEM_INVALIDATE, "/ls/c/f")


def test_negative_entries_come_from_cached_listings() -> None:
    cache = cache_in_epoch()
    entries = (DirEntry("a", stat("/ls/c/d/a")), DirEntry("b", stat("/ls/c/d/b", 2)))
    cache.put_listing("/ls/c/d", 9, entries, epoch=3, seq=0)
    assert cache.lookup("/ls/c/d/zz") is ABSENT
    assert cache.lookup("/ls/c/d/b") == stat("/ls/c/d/b", 2)
    assert cache.lookup("/ls/c/elsewhere/x") is None
    assert cache.get_listing("/ls/c/d", 9) == entries and cache.get_listing("/ls/c/d", 8) is None
    cache.apply_item(1, ITEM_INVALIDATE, "/ls/c/d")
    assert cache.lookup("/ls/c/d/zz") is None


def test_lookups_in_a_large_listing_and_after_it_is_replaced() -> None:
    cache = cache_in_epoch()
    names = [f"n{i:05}" for i in range(5_000)]
    cache.put_listing("/ls/c/big", 1, tuple(DirEntry(n, stat(f"/ls/c/big/{n}", i + 1))
                                            for i, n in enumerate(names)), epoch=3, seq=0)
    assert cache.lookup("/ls/c/big/n04999") == stat("/ls/c/big/n04999", 5_000)
    assert cache.lookup("/ls/c/big/n00000") == stat("/ls/c/big/n00000", 1)
    assert cache.lookup("/ls/c/big/n05000") is ABSENT
    cache.put_listing("/ls/c/big", 1, (DirEntry("other", stat("/ls/c/big/other", 7)),), epoch=3, seq=0)
    assert cache.lookup("/ls/c/big/n04999") is ABSENT, "a name from the replaced listing"
    assert cache.lookup("/ls/c/big/other") == stat("/ls/c/big/other", 7)
    cache.assert_invariants()
    cache.clear()
    assert cache.lookup("/ls/c/big/other") is None
    cache.assert_invariants()


@pytest.mark.parametrize("kind", [ITEM_MASTER_FAILOVER, ITEM_EVENTS_LOST])
def test_failover_and_lost_events_flush_everything(kind: int) -> None:
    cache = cache_in_epoch()
    cache.put_stat("/ls/c/f", stat("/ls/c/f"), epoch=3, seq=0)
    cache.apply_item(1, kind, "")
    assert cache.lookup("/ls/c/f") is None


def test_new_epoch_restarts_numbering_and_flushes() -> None:
    cache = cache_in_epoch(3)
    cache.put_stat("/ls/c/f", stat("/ls/c/f"), epoch=3, seq=0)
    cache.apply_item(5, 1, "/ls/c/f")
    assert cache.start_epoch(4) and cache.last_seq == 0 and cache.lookup("/ls/c/f") is None
    assert not cache.start_epoch(4)
    assert cache.is_new(1)


def test_event_kinds_match_the_cell() -> None:
    for kind in CellEventKind:
        assert EventKind[kind.name].value == kind.value
    assert not EventKind.MASTER_FAILOVER & ALL_EVENTS


def test_typed_events() -> None:
    assert isinstance(make_event(1, 1, 7, "/p", ""), ContentsModified)
    added = make_event(2, 2, 7, "/d", "x")
    assert isinstance(added, ChildAdded) and added.name == "x" and added.kind == EventKind.CHILD_ADDED
    lost = make_event(3, ITEM_EVENTS_LOST, 0, "", "")
    assert isinstance(lost, MasterFailover) and lost.kind == EventKind.MASTER_FAILOVER
    with pytest.raises(ValueError):
        make_event(4, 3, 0, "", "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        added.name = "y"  # type: ignore[misc]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["read", "inval", "flush"]), st.sampled_from(["/a", "/b"]),
                          st.integers(0, 3)), max_size=30))
def test_never_holds_a_value_older_than_a_processed_invalidation(script: list) -> None:
    """A read reply served at master sequence s (possibly overtaken by up to
    `lag` later items) must never sit in the cache once an invalidation of
    its path numbered after s has been processed."""
    cache = cache_in_epoch(1)
    master_seq = 0
    invalidations: list[tuple[int, str]] = []
    served_at: dict[str, int] = {}
    for op, path, lag in script:
        if op == "read":
            seen = max(0, master_seq - lag)
            if cache.put_stat(path, stat(path), epoch=1, seq=seen):
                served_at[path] = seen
        else:
            master_seq += 1
            if op == "inval":
                invalidations.append((master_seq, path))
                cache.apply_item(master_seq, ITEM_INVALIDATE, path)
            else:
                cache.apply_item(master_seq, ITEM_MASTER_FAILOVER, "")
        for cached_path in cache.stats:
            latest = max((s for s, p in invalidations if p == cached_path), default=0)
            assert served_at[cached_path] >= latest
        cache.assert_invariants()


def test_cores_are_pure() -> None:
    from pathlib import Path

    import chubbyfs
    from tests.purity import impure_imports

    package = Path(chubbyfs.__file__).parent
    for module in (package / "client" / "cache_core.py", package / "client" / "session_core.py"):
        assert not impure_imports(module), module
