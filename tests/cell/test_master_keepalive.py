"""How the master holds and renews KeepAlives at scale (real `CellService`
and `RaftNode` in-process, MockClock): one timer ends every held KeepAlive
within its session's window, a burst larger than the concurrency bound all
completes, lease extensions share log entries, and the serving process's
collector is tuned."""

from __future__ import annotations

import gc

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.cell import master
from chubbyfs.cell.config import load_cell_config, write_cell_config
from chubbyfs.cell.replica import SERVING_GC_THRESHOLDS, Replica
from chubbyfs.testing.localcell import free_ports
from tests.client.incell import in_process_cell

LEASE_MS = 2_000
MARGIN_MS = LEASE_MS // 4


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


async def test_a_held_keep_alive_returns_in_its_session_window_with_a_full_lease(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        for _ in range(5):
            sid = await cell.session()
            lease_end = cell.service.sm.sessions[sid].lease_end_ms
            reply = await cell.ok("keep_alive", session_id=sid, hold=True, ack=0)
            returned = cell.service.clock_ms()
            spread = cell.service._spread_ms(sid)
            assert 0 <= spread < MARGIN_MS // 3
            # Held until its window, then one lease batch (50 ms) to replicate the extension.
            assert lease_end - MARGIN_MS - spread <= returned <= lease_end - MARGIN_MS - spread + 100
            assert reply["lease_ms"] == LEASE_MS
            assert cell.service.sm.sessions[sid].lease_end_ms >= returned + LEASE_MS - 60


def test_spreads_cover_the_window() -> None:
    class _Service:
        keep_alive_margin_ms = 3_000

    spreads = {master.CellService._spread_ms(_Service(), (2 << 32) + i) for i in range(1_000)}  # type: ignore[arg-type]
    assert min(spreads) >= 0 and max(spreads) < 1_000 and len(spreads) > 500


async def test_a_burst_beyond_the_bound_completes_and_shares_log_entries(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sessions = [await cell.session() for _ in range(3 * master.KEEP_ALIVE_CONCURRENCY)]
        commit_before = cell.node.status()["commit"]
        done: list[int] = []

        async def renew(sid: int) -> None:
            reply = await cell.ok("keep_alive", session_id=sid, hold=False, ack=0)
            assert reply["lease_ms"] == LEASE_MS
            done.append(sid)

        async with trio.open_nursery() as nursery:
            for sid in sessions:
                nursery.start_soon(renew, sid)
        assert sorted(done) == sorted(sessions)
        # One ExtendLeases entry per 50 ms batch, not one per KeepAlive.
        assert cell.node.status()["commit"] - commit_before <= 4


async def test_a_replica_process_tunes_its_collector(tmp_path) -> None:
    """A real replica (one voter, the register, its disk under tmp_path):
    once serving, the collector runs young collections rarely and has frozen
    the startup heap."""
    config_path = tmp_path / "cell.toml"
    write_cell_config(config_path, "g", [(1, f"127.0.0.1:{free_ports(1)[0]}", str(tmp_path / "1"))])
    before = gc.get_threshold()
    try:
        replica = Replica(load_cell_config(config_path), 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            assert gc.get_threshold() == SERVING_GC_THRESHOLDS
            assert gc.get_freeze_count() > 0
            nursery.cancel_scope.cancel()
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()