"""End-to-end: the consistent cache, events and master fail-over with real
replica processes (3 replicas, a short session lease)."""

from __future__ import annotations

import signal

import pytest
import trio

from chubbyfs.client.connection import CellError, open_cell_connection
from chubbyfs.client.events import ContentsModified, EventKind, MasterFailover
from chubbyfs.client.session import SessionState, open_session

pytestmark = pytest.mark.e2e

LEASE_MS = 1_500


@pytest.fixture
def chubby_cell(make_cell):
    cell = make_cell(3, state_machine="chubby", name="t", session_lease_ms=LEASE_MS)
    cell.start_all()
    return cell


async def _master(cell, exclude: int | None = None) -> int:
    async with open_cell_connection(list(cell.addresses.values()), cell="t") as conn:
        return await cell.wait_for_leader(conn, exclude=exclude)


async def test_sessions_opened_all_at_once_are_all_created(chubby_cell):
    # The master numbers sessions in increasing order and the cell refuses an
    # id below one it has seen: the CreateSessions must reach the log in the
    # order their ids were given (RaftNode.propose appends before it yields).
    await _master(chubby_cell)
    addresses = list(chubby_cell.addresses.values())
    ids: list[int] = []

    async def one() -> None:
        async with open_session("t", addresses=addresses) as s:
            ids.append(s.id)

    for _ in range(3):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
    assert len(ids) == len(set(ids)) == 120


async def test_a_cached_read_is_never_older_than_an_acknowledged_write(chubby_cell):
    addresses = list(chubby_cell.addresses.values())
    async with open_session("t", addresses=addresses, call_timeout_s=30) as a, \
            open_session("t", addresses=addresses, call_timeout_s=30) as b:
        ha = await a.open("/ls/t/f", create="file", contents=b"0", events=EventKind.CONTENTS_MODIFIED)
        hb = await b.open("/ls/t/f", write=True)
        stale: list[tuple[bytes, bytes]] = []
        for i in range(1, 16):
            await ha.get_contents_and_stat()  # cached (again) before the write
            await hb.set_contents(b"%d" % i)
            got, _ = await ha.get_contents_and_stat()
            if got != b"%d" % i:
                stale.append((got, b"%d" % i))
        assert not stale, f"a read older than an acknowledged write: {stale}"
        assert a.cache.hits > 0
        kinds = []
        with trio.fail_after(10):
            async for event in ha.events():
                kinds.append(event)
                if len(kinds) == 15:
                    break
        assert all(isinstance(e, ContentsModified) for e in kinds)
        assert [e.seq for e in kinds] == sorted({e.seq for e in kinds})


async def test_sessions_locks_and_caches_survive_kill9_of_the_master(chubby_cell):
    cell = chubby_cell
    addresses = list(cell.addresses.values())
    async with open_session("t", addresses=addresses, call_timeout_s=30) as a, \
            open_session("t", addresses=addresses, call_timeout_s=30) as b:
        lock = await a.open("/ls/t/lock", create="file", lock=True)
        sequencer = await lock.acquire()
        ha = await a.open("/ls/t/f", create="file", contents=b"before", events=EventKind.CONTENTS_MODIFIED)
        assert (await ha.get_contents_and_stat())[0] == b"before"
        master = await _master(cell)
        cell.kill(master)
        await _master(cell, exclude=master)
        with trio.fail_after(20):
            async for event in ha.events():
                if isinstance(event, MasterFailover):
                    break
        hb = await b.open("/ls/t/f", write=True)
        await hb.set_contents(b"after")
        assert (await ha.get_contents_and_stat())[0] == b"after"
        assert await a.check_sequencer(sequencer) == (True, "")
        assert a.state == SessionState.SAFE and b.state == SessionState.SAFE
        cell.start(master)


async def test_sigstop_of_the_master_beyond_the_lease_means_jeopardy_then_safe(chubby_cell):
    cell = chubby_cell
    addresses = list(cell.addresses.values())
    async with open_session("t", addresses=addresses, call_timeout_s=30) as a:
        h = await a.open("/ls/t/f", create="file", contents=b"x")
        await h.get_contents_and_stat()
        lock = await a.open("/ls/t/lock", create="file", lock=True)
        sequencer = await lock.acquire()
        states: list[SessionState] = []

        async def follow() -> None:
            async for change in a.state_changes():
                states.append(change.state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            master = await _master(cell)
            cell.kill(master, signal.SIGSTOP)
            try:
                with trio.fail_after(20):
                    while SessionState.JEOPARDY not in states:
                        await trio.sleep(0.05)
                assert not a.cache.contents, "jeopardy empties the cache"
                with trio.fail_after(30):
                    while states[-1] != SessionState.SAFE:
                        await trio.sleep(0.05)
            finally:
                cell.kill(master, signal.SIGCONT)
            nursery.cancel_scope.cancel()
        assert states[:2] == [SessionState.JEOPARDY, SessionState.SAFE]
        assert (await h.get_contents_and_stat())[0] == b"x"
        assert await a.check_sequencer(sequencer) == (True, "")


async def test_after_kill9_in_flight_calls_and_old_handles_continue_and_unheld_ephemerals_go(chubby_cell):
    """A new epoch: the session's calls in flight at the kill complete at the
    new master (refused for their old epoch until the session hears of it,
    then sent again); handles made before keep working, and the ephemeral
    node whose handle the session holds outlives the post-fail-over sweep
    (5 leases) while one whose handle it lost does not."""
    cell = chubby_cell
    addresses = list(cell.addresses.values())
    async with open_session("t", addresses=addresses, call_timeout_s=30) as a, \
            open_session("t", addresses=addresses, call_timeout_s=30) as b:
        held = await a.open("/ls/t/eph", create="file", ephemeral=True, lock=True)
        sequencer = await held.acquire()
        leaked = await a.open("/ls/t/leaked", create="file", ephemeral=True)
        a._handles.pop(leaked.id)  # the library lost track of it (as after a lost Open reply)
        closed = await a.open("/ls/t/closed", create="file")
        await closed.close()
        counter = await a.open("/ls/t/n", create="file", write=True)
        old_epoch = a.epoch
        written: list[int] = []

        async def writer() -> None:
            for i in range(1_000_000):
                await counter.set_contents(b"%d" % i)
                written.append(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(10):
                while len(written) < 5:
                    await trio.sleep(0.01)
            master = await _master(cell)
            cell.kill(master)
            before = len(written)
            await _master(cell, exclude=master)
            with trio.fail_after(20):
                while len(written) < before + 5:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert a.epoch > old_epoch and a.state == SessionState.SAFE
        assert written == list(range(len(written))), "every write completed, in order"
        await trio.sleep(5 * LEASE_MS / 1000 + 2 * LEASE_MS / 1000)
        with pytest.raises(CellError) as info:
            await b.open("/ls/t/leaked")
        assert info.value.code == "not_found"
        assert (await b.open("/ls/t/eph")).stat.ephemeral
        assert await a.check_sequencer(sequencer) == (True, "")
        assert (await held.get_stat()).path == "/ls/t/eph"
        with pytest.raises(CellError) as info:
            await closed.get_stat()
        assert info.value.code == "bad_handle"
        cell.start(master)
