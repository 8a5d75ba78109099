"""The client library's cache, events and jeopardy behaviour against the
real master in-process (MockClock; see incell.py)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.client.cache_core import ABSENT
from chubbyfs.client.connection import CellError
from chubbyfs.client.events import ContentsModified, EventKind, MasterFailover
from chubbyfs.client.session import Session, SessionExpiredError, SessionState
from tests.client.incell import ROOT, InProcessCell, in_process_cell

LEASE_MS = 2_000


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


@asynccontextmanager
async def sessions(cell: InProcessCell, n: int, *, grace_ms: int = 3_000) -> AsyncIterator[list[Session]]:
    async with trio.open_nursery() as nursery:
        made = []
        for _ in range(n):
            conn = cell.connection()
            sent = trio.current_time()
            value = (await conn.call("create_session"))["value"]
            session = Session(conn, value["session_id"], value["lease_ms"], lease_start=sent,  # type: ignore[arg-type]
                              grace_ms=grace_ms, epoch=value["epoch"])
            nursery.start_soon(session.keep_alive_forever)
            made.append(session)
        yield made
        nursery.cancel_scope.cancel()


async def test_reads_are_cached_and_never_older_than_an_acknowledged_write(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 2) as (a, b):
        ha = await a.open(f"{ROOT}/f", create="file", contents=b"v0")
        hb = await b.open(f"{ROOT}/f", write=True)
        assert (await ha.get_contents_and_stat())[0] == b"v0"
        calls = len(a.conn.calls)
        for _ in range(3):
            assert (await ha.get_contents_and_stat())[0] == b"v0"
        assert len(a.conn.calls) == calls and a.cache.hits == 3  # served locally
        for i in range(1, 6):
            await hb.set_contents(b"v%d" % i)
            # The write was acknowledged: a's cache no longer has the old value.
            assert (await ha.get_contents_and_stat())[0] == b"v%d" % i
        a.cache.assert_invariants()


async def test_stat_and_listing_and_negative_entries(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 2) as (a, b):
        root = await a.open(ROOT)
        names = [e.name for e in await root.read_dir()]
        assert names == ["acl"]
        assert a.lookup_cached(f"{ROOT}/missing") is ABSENT
        with pytest.raises(CellError) as info:
            await a.open(f"{ROOT}/missing")
        assert info.value.code == "not_found"
        await b.open(f"{ROOT}/missing", create="file")
        # The create was acknowledged only after a dropped its listing.
        assert a.lookup_cached(f"{ROOT}/missing") is None
        assert [e.name for e in await root.read_dir()] == ["acl", "missing"]
        h = await a.open(f"{ROOT}/missing")
        first = await h.get_stat()
        assert await h.get_stat() == first and a.lookup_cached(f"{ROOT}/missing") == first


async def test_events_reach_the_handle_once_in_order(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 2) as (a, b):
        ha = await a.open(f"{ROOT}/f", create="file", events=EventKind.CONTENTS_MODIFIED)
        everything = a.events()
        hb = await b.open(f"{ROOT}/f", write=True)
        # Lose one KeepAlive reply on the way back: its items are re-sent,
        # and the client must not deliver them twice.
        a.conn.drop_replies.add("keep_alive")
        for i in range(4):
            await hb.set_contents(b"%d" % i)
        got = []
        with trio.fail_after(5):
            async for event in ha.events():
                got.append(event)
                if len(got) == 4:
                    break
        assert all(isinstance(e, ContentsModified) and e.path == f"{ROOT}/f" for e in got)
        seqs = [e.seq for e in got]
        assert seqs == sorted(set(seqs))
        assert len(everything) == 4
        await trio.sleep(3)
        assert len(everything) == 4, "no duplicates later"


async def test_hook_runs_before_the_ack(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 2) as (a, b):
        seen: list[str] = []
        write_done = trio.Event()

        async def hook(path: str) -> None:
            await trio.sleep(0.3)
            assert not write_done.is_set(), "the write must wait for the hook"
            seen.append(path)

        a.on_invalidate = hook
        ha = await a.open(f"{ROOT}/f", create="file")
        await ha.get_stat()
        hb = await b.open(f"{ROOT}/f", write=True)
        await hb.set_contents(b"x")
        write_done.set()
        assert seen == [f"{ROOT}/f"]


async def test_jeopardy_empties_the_cache_and_calls_wait(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 1) as (a,):
        h = await a.open(f"{ROOT}/f", create="file")
        await h.get_stat()
        assert a.cache.stats
        changes = []

        async def follow() -> None:
            async for change in a.state_changes():
                changes.append(change.state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            cell.node.pause()  # the master stops answering (as if SIGSTOPped)
            with trio.fail_after(10):
                while a.state != SessionState.JEOPARDY:
                    await trio.sleep(0.05)
            assert not a.cache.stats and a.lookup_cached(f"{ROOT}/f") is None
            pending = trio.Event()

            async def call_in_jeopardy() -> None:
                await h.get_stat()
                pending.set()

            nursery.start_soon(call_in_jeopardy)
            await trio.sleep(0.3)
            assert not pending.is_set(), "calls wait while in jeopardy"
            cell.node.resume()
            with trio.fail_after(10):
                await pending.wait()
            assert a.state == SessionState.SAFE
            nursery.cancel_scope.cancel()
        assert changes[:2] == [SessionState.JEOPARDY, SessionState.SAFE]
        assert a.conn.links_dropped >= 1, "a silent master's connection is abandoned"


async def test_expiry_after_the_grace_period_fails_calls_and_ends_iterators(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 1, grace_ms=1_000) as (a,):
        h = await a.open(f"{ROOT}/f", create="file", events=EventKind.CONTENTS_MODIFIED)
        cell.node.pause()
        with trio.fail_after(20):
            async for _ in h.events():
                pass  # ends when the session expires
        assert a.expired
        with pytest.raises(SessionExpiredError):
            await h.get_stat()
        cell.node.resume()


async def test_failover_is_hidden_and_announced(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 2) as (a, b):
        ha = await a.open(f"{ROOT}/f", create="file", contents=b"v0")
        lock = await a.open(f"{ROOT}/lock", create="file", lock=True)
        await lock.acquire()
        await ha.get_contents_and_stat()
        cell.service._step_down()  # a fresh master's memory: nothing known about caches
        with trio.fail_after(5):
            async for event in ha.events():
                assert isinstance(event, MasterFailover)
                break
        assert not a.cache.contents, "the cache is flushed on fail-over"
        hb = await b.open(f"{ROOT}/f", write=True)
        await hb.set_contents(b"v1")
        assert (await ha.get_contents_and_stat())[0] == b"v1"
        assert (await lock.get_sequencer()).startswith("chubbyseq1:")  # the lock survived
        assert a.state == SessionState.SAFE


async def test_poison_fails_calls_without_closing(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell, sessions(cell, 1) as (a,):
        h = await a.open(f"{ROOT}/f", create="file")
        h.poison()
        with pytest.raises(CellError) as info:
            await h.get_stat()
        assert info.value.code == "cancelled" and not h.closed
        await h.close()
        assert h.closed
