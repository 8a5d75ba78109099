"""How the master holds and renews KeepAlives at scale (real `CellService`
and `RaftNode` in-process, MockClock): one timer ends every held KeepAlive
within its session's window, a burst larger than the concurrency bound all
completes, lease extensions share log entries, the replica's inline path
(no task per KeepAlive) answers through its callback, and the serving
process's collector is tuned."""

from __future__ import annotations

import gc

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.cell import master
from chubbyfs.cell.config import load_cell_config, write_cell_config
from chubbyfs.cell.replica import SERVING_GC_THRESHOLDS, Replica, _ReplyOutbox
from chubbyfs.raft.rawnode import NotLeaderError
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

class _Link:
    closed = False


class _Replies:
    """A connection's view of inline KeepAlives: what `reply_to` received."""

    def __init__(self) -> None:
        self.got: list[tuple[dict | None, BaseException | None]] = []

    def __call__(self, reply: dict | None, error: BaseException | None) -> None:
        self.got.append((reply, error))

    async def first(self) -> tuple[object, BaseException | None]:
        with trio.fail_after(30):
            while not self.got:
                await trio.sleep(0.005)
        return self.got[0]


async def test_an_inline_keep_alive_is_held_then_answered_through_its_callback(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        flushes: list[int] = []
        cell.service.flush_replies = lambda: flushes.append(1)
        replies = _Replies()
        assert cell.service.keep_alive_nowait({"op": "keep_alive", "session_id": sid, "hold": True, "ack": 0},
                                              replies, _Link())
        assert replies.got == [] and cell.service.statistics()["held_keep_alives"] == 1
        reply, error = await replies.first()
        assert error is None and reply is not None and reply["ok"]
        value = reply["value"]
        assert value["lease_ms"] == LEASE_MS and value["items"] == []
        assert value["held_ms"] >= LEASE_MS - MARGIN_MS - MARGIN_MS // 3
        assert flushes, "the timer writes what it answered"


async def test_a_malformed_inline_keep_alive_is_refused_at_once(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        for bad in ({"session_id": "one"}, {"session_id": sid, "ack": True}, {"session_id": sid, "handles": "all"}):
            replies = _Replies()
            assert cell.service.keep_alive_nowait({"op": "keep_alive", **bad}, replies, _Link())
            [(reply, error)] = replies.got
            assert error is None and reply is not None and reply["error"] == "bad_request" and reply["message"]


async def test_an_unknown_session_takes_the_general_path(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        replies = _Replies()
        assert not cell.service.keep_alive_nowait({"op": "keep_alive", "session_id": 12345, "hold": True},
                                                  replies, _Link())
        assert replies.got == []
        reply = await cell.request("keep_alive", session_id=12345, hold=True)
        assert reply["error"] == "session_expired"


async def test_a_second_keep_alive_of_a_session_releases_the_first(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        first, second = _Replies(), _Replies()
        request = {"op": "keep_alive", "session_id": sid, "hold": True, "ack": 0}
        cell.service.keep_alive_nowait(request, first, _Link())
        cell.service.keep_alive_nowait(dict(request), second, _Link())
        # The first is answered at once, promising only the replicated lease.
        [(reply, error)] = first.got
        assert error is None and reply is not None and 0 < reply["value"]["lease_ms"] <= LEASE_MS
        assert second.got == [] and cell.service.statistics()["held_keep_alives"] == 1
        reply, error = await second.first()
        assert error is None and reply is not None and reply["value"]["lease_ms"] == LEASE_MS


async def test_stepping_down_sends_held_keep_alives_away(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sids = [await cell.session() for _ in range(3)]
        replies = [_Replies() for _ in sids]
        for sid, reply_to in zip(sids, replies):
            assert cell.service.keep_alive_nowait({"op": "keep_alive", "session_id": sid, "hold": True},
                                                  reply_to, _Link())
        cell.service._step_down()  # as when the Raft node stops leading
        for reply_to in replies:
            [(reply, error)] = reply_to.got
            assert reply is None and isinstance(error, NotLeaderError)
        assert cell.service.statistics()["held_keep_alives"] == 0


async def test_a_keep_alive_whose_client_went_away_extends_nothing(mock_clock: MockClock) -> None:
    """Its connection closed (or its call was cancelled) while it was held:
    the session's lease runs out as it would have, and the session ends."""
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        gone, stays = await cell.session(), await cell.session()
        lease_end = cell.service.sm.sessions[gone].lease_end_ms
        link, replies = _Link(), _Replies()
        assert cell.service.keep_alive_nowait({"op": "keep_alive", "session_id": gone, "hold": True, "ack": 0},
                                              replies, link)
        link.closed = True
        with trio.move_on_after(0.01):
            await cell.request("keep_alive", session_id=stays, hold=True, ack=0)  # cancelled while held
        with trio.fail_after(30):
            while gone in cell.service.sm.sessions or stays in cell.service.sm.sessions:
                await trio.sleep(0.05)
        assert cell.service.clock_ms() >= lease_end and replies.got == []


def test_a_closed_connection_takes_no_more_replies() -> None:
    unwritten: set = set()
    outbox = _ReplyOutbox(None, unwritten)  # type: ignore[arg-type]  # put() never writes
    outbox.put({"ok": True}, 1)
    assert unwritten == {outbox}
    unwritten.clear()
    outbox.closed = True
    outbox.put({"ok": True}, 2)
    assert unwritten == set()
