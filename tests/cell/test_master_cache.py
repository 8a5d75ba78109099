"""The master's consistent-cache and event protocol, driven against the real
`CellService` and `RaftNode` in-process, in virtual time (MockClock)."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from tests.client.incell import ROOT, InProcessCell, in_process_cell

READ, WRITE = 1, 2
LEASE_MS = 2_000


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


async def _file(cell: InProcessCell, sid: int, name: str = "f", events: int = 0) -> list:
    return (await cell.ok("open", session_id=sid, path=f"{ROOT}/{name}", intent=READ | WRITE, create=1,
                          events=events))["handle"]


async def test_write_waits_until_the_cacher_acks(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        ha, hb = await _file(cell, a), await _file(cell, b)
        read = await cell.request("get_contents_and_stat", session_id=a, handle=ha, cache=True)
        assert read["cacheable"] is True and read["cache_path"] == f"{ROOT}/f"
        done = trio.Event()

        async def write() -> None:
            assert (await cell.request("set_contents", session_id=b, handle=hb, contents=b"v2"))["ok"]
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            ka = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
            [item] = ka["items"]
            assert item[1] == 0 and item[3] == f"{ROOT}/f"  # an invalidation
            # While the invalidation is outstanding, reads are not cacheable
            # and the write has not been applied.
            again = await cell.request("get_contents_and_stat", session_id=b, handle=hb, cache=True)
            assert again["cacheable"] is False and again["value"]["contents"] == b""
            await trio.sleep(0.5)
            assert not done.is_set()
            await cell.ok("keep_alive", session_id=a, hold=False, ack=item[0])
            with trio.fail_after(1):
                await done.wait()
        after = await cell.request("get_contents_and_stat", session_id=b, handle=hb, cache=True)
        assert after["value"]["contents"] == b"v2" and after["cacheable"] is True
        cell.service.cache.assert_invariants()


async def test_write_proceeds_when_the_silent_cacher_lease_ends(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        ha, hb = await _file(cell, a), await _file(cell, b)
        await cell.ok("keep_alive", session_id=b, hold=False, ack=0)
        assert (await cell.request("get_stat", session_id=a, handle=ha, cache=True))["cacheable"]
        lease_end_ms = cell.service.sm.sessions[a].lease_end_ms
        assert (await cell.request("set_contents", session_id=b, handle=hb, contents=b"x"))["ok"]
        # The write went ahead only once a's lease (which it never renewed) ran out.
        assert cell.service.clock_ms() >= lease_end_ms


async def test_no_cachers_means_no_wait(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        b = await cell.session()
        hb = await _file(cell, b)
        start = trio.current_time()
        for i in range(5):
            assert (await cell.request("set_contents", session_id=b, handle=hb, contents=bytes([i])))["ok"]
        assert trio.current_time() - start < 0.2


async def test_uncached_reads_say_nothing_about_caching(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a = await cell.session()
        ha = await _file(cell, a)
        plain = await cell.request("get_stat", session_id=a, handle=ha)
        assert "cacheable" not in plain
        assert cell.service.cache.statistics()["cached_paths"] == 0


async def test_parent_listing_is_invalidated_by_a_create(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        root = (await cell.ok("open", session_id=a, path=ROOT, intent=READ))["handle"]
        assert (await cell.request("read_dir", session_id=a, handle=root, cache=True))["cacheable"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_file, cell, b, "new")
            ka = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
            assert [(i[1], i[3]) for i in ka["items"]] == [(0, ROOT)]
            await cell.ok("keep_alive", session_id=a, hold=False, ack=ka["items"][-1][0])


async def test_events_in_order_without_duplicates_across_a_lost_reply(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        await _file(cell, a, events=1)  # CONTENTS_MODIFIED
        hb = await _file(cell, b)
        for i in range(3):
            await cell.ok("set_contents", session_id=b, handle=hb, contents=bytes([i]))
        lost = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)  # "lost": never acked
        assert [i[0] for i in lost["items"]] == [1, 2, 3]
        await cell.ok("set_contents", session_id=b, handle=hb, contents=b"last")
        resent = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
        assert [i[0] for i in resent["items"]] == [1, 2, 3, 4]
        assert all(i[1] == 1 for i in resent["items"])
        acked = await cell.ok("keep_alive", session_id=a, hold=False, ack=4)
        assert acked["items"] == []


async def test_a_client_without_ack_acks_on_delivery(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        await _file(cell, a, events=1)
        hb = await _file(cell, b)
        await cell.ok("set_contents", session_id=b, handle=hb, contents=b"1")
        assert len((await cell.ok("keep_alive", session_id=a, hold=False))["items"]) == 1
        assert (await cell.ok("keep_alive", session_id=a, hold=False))["items"] == []


async def test_early_reply_extends_nothing_and_promises_only_what_is_replicated(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        await _file(cell, a, events=1)
        hb = await _file(cell, b)
        promised = cell.service.sm.sessions[a].lease_end_ms
        async with trio.open_nursery() as nursery:
            async def write_soon() -> None:
                await trio.sleep(0.1)
                await cell.ok("set_contents", session_id=b, handle=hb, contents=b"1")
            nursery.start_soon(write_soon)
            sent = cell.service.clock_ms()
            ka = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
        assert ka["items"]
        assert sent + ka["held_ms"] + ka["lease_ms"] <= promised
        assert cell.service.sm.sessions[a].lease_end_ms == promised


async def test_a_new_master_sends_failover_and_writes_wait_for_its_ack(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        hb = await _file(cell, b)
        old_epoch = cell.service.epoch
        cell.service._step_down()  # mastership lost and regained: a fresh master's memory
        with trio.fail_after(5):
            while not cell.service.epoch:
                await trio.sleep(0.01)
        assert cell.service.statistics()["failover_pending"] == 2
        kb = await cell.ok("keep_alive", session_id=b, hold=True, ack=0, ack_epoch=old_epoch)
        assert [i[1] for i in kb["items"]] == [128] and kb["epoch"] == old_epoch
        await cell.ok("keep_alive", session_id=b, hold=False, ack=kb["items"][0][0], ack_epoch=kb["epoch"])
        done = trio.Event()

        async def write() -> None:
            await cell.ok("set_contents", session_id=b, handle=hb, contents=b"after")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.sleep(0.2)
            assert not done.is_set(), "a has not heard of the fail-over: it may cache anything"
            ka = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
            await cell.ok("keep_alive", session_id=a, hold=False, ack=ka["items"][-1][0])
            with trio.fail_after(1):
                await done.wait()
        # The handle made before the fail-over still works.
        assert (await cell.request("get_stat", session_id=b, handle=hb))["ok"]


async def test_failover_extends_every_lease(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a = await cell.session()
        await trio.sleep(1.5)  # most of the lease gone, not renewed
        cell.service._step_down()
        with trio.fail_after(5):
            while not cell.service.epoch:
                await trio.sleep(0.01)
        assert cell.service.sm.sessions[a].lease_end_ms >= cell.service.clock_ms() + LEASE_MS - 100


async def test_session_end_invalidates_listings_of_its_ephemerals_first(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        a, b = await cell.session(), await cell.session()
        await cell.ok("open", session_id=b, path=f"{ROOT}/eph", intent=READ, create=1, ephemeral=True)
        root = (await cell.ok("open", session_id=a, path=ROOT, intent=READ))["handle"]
        assert (await cell.request("read_dir", session_id=a, handle=root, cache=True))["cacheable"]
        done = trio.Event()

        async def end_b() -> None:
            await cell.ok("end_session", session_id=b)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_b)
            ka = await cell.ok("keep_alive", session_id=a, hold=True, ack=0)
            assert ROOT in [i[3] for i in ka["items"] if i[1] == 0]
            await trio.sleep(0.2)
            assert not done.is_set() and cell.service.sm.stat(f"{ROOT}/eph") is not None
            await cell.ok("keep_alive", session_id=a, hold=False, ack=ka["items"][-1][0])
            with trio.fail_after(1):
                await done.wait()
        assert cell.service.sm.stat(f"{ROOT}/eph") is None
