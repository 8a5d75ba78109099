"""Master epochs at the master (real `CellService` and `RaftNode` in-process,
MockClock): requests naming an older epoch are refused with `stale_epoch`,
a new term is a new epoch, and after a fail-over the handles a session
re-creates keep their ephemeral nodes while the others go after the grace
interval."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.cell.commands import ExtendLeases
from tests.client.incell import ROOT, InProcessCell, in_process_cell

READ = 1
LEASE_MS = 2_000
GRACE_MS = 5 * LEASE_MS  # the default: five leases


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


async def new_term(cell: InProcessCell) -> int:
    """Depose the single replica into a higher term; it elects itself again
    and takes over as a new master (a real fail-over, new epoch)."""
    old = cell.service.epoch
    raft = cell.node.raw._raft
    raft.become_follower(raft.term + 1, 0)
    with trio.fail_after(10):
        while cell.service.epoch in (0, old) or not cell.service._ready.is_set():
            await trio.sleep(0.01)
    return cell.service.epoch


async def test_requests_naming_an_older_epoch_are_refused_and_say_the_current_one(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        epoch = cell.service.epoch
        sid = await cell.session()
        path = f"{ROOT}/f"
        stale = await cell.request("open", session_id=sid, path=path, intent=READ, create=1, epoch=epoch - 1)
        assert stale["error"] == "stale_epoch" and stale["epoch"] == epoch
        assert cell.service.sm.stat(path) is None, "a refused request is not executed"
        newer = await cell.request("open", session_id=sid, path=path, intent=READ, create=1, epoch=epoch + 1)
        assert newer["error"] == "not_leader"
        bad = await cell.request("open", session_id=sid, path=path, intent=READ, create=1, epoch="x")
        assert bad["error"] == "bad_request"
        handle = (await cell.ok("open", session_id=sid, path=path, intent=READ, create=1, epoch=epoch))["handle"]
        assert (await cell.request("get_stat", session_id=sid, handle=handle))["ok"]  # no epoch: not checked
        # KeepAlive (how a client hears of a new epoch) and EndSession are never refused for it.
        assert (await cell.request("keep_alive", session_id=sid, epoch=epoch - 1))["ok"]
        assert (await cell.request("end_session", session_id=sid, epoch=epoch - 1))["ok"]


async def test_a_new_term_is_a_new_epoch_and_old_handles_keep_working(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        old = cell.service.epoch
        handle = (await cell.ok("open", session_id=sid, path=f"{ROOT}/f", intent=READ, create=1))["handle"]
        epoch = await new_term(cell)
        assert epoch > old and cell.service.sm.epoch == epoch
        assert (await cell.request("get_stat", session_id=sid, handle=handle, epoch=old))["error"] == "stale_epoch"
        ka = await cell.ok("keep_alive", session_id=sid, hold=True, ack=0, ack_epoch=old)
        assert ka["epoch"] == epoch and [i[1] for i in ka["items"]] == [128]
        await cell.ok("keep_alive", session_id=sid, ack=ka["items"][0][0], ack_epoch=epoch)
        assert (await cell.request("get_stat", session_id=sid, handle=handle, epoch=epoch))["ok"]


async def _keep_alive(cell: InProcessCell, sid: int, **fields: object) -> None:
    """A client that acknowledges items, sending `fields` with the ack of a
    fail-over item, until cancelled."""
    last, epoch, declare = 0, 0, False
    while True:
        reply = await cell.request("keep_alive", session_id=sid, hold=not declare, ack=last, ack_epoch=epoch,
                                   **(fields if declare else {}))
        if not reply.get("ok"):
            await trio.sleep(0.05)
            continue
        value, declare = reply["value"], False
        if value["epoch"] != epoch:
            epoch, last = value["epoch"], 0
        for seq, kind, *_ in value["items"]:
            last = max(last, seq)
            declare = declare or kind == 128


async def _ephemeral(cell: InProcessCell, sid: int, name: str) -> list:
    return (await cell.ok("open", session_id=sid, path=f"{ROOT}/{name}", intent=READ, create=1,
                          ephemeral=True))["handle"]


async def test_after_a_failover_only_re_created_handles_keep_ephemeral_nodes(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        declares, forgets, silent = await cell.session(), await cell.session(), await cell.session()
        kept = await _ephemeral(cell, declares, "kept")
        leaked = await _ephemeral(cell, declares, "leaked")  # the client lost track of it
        await _ephemeral(cell, forgets, "forgotten")
        await _ephemeral(cell, silent, "silent")  # a client that sends no ack: all re-created
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _keep_alive(cell, declares, handles=[kept[0]]))
            nursery.start_soon(lambda: _keep_alive(cell, forgets, handles=[]))

            async def no_ack() -> None:
                while True:
                    if not (await cell.request("keep_alive", session_id=silent, hold=True)).get("ok"):
                        await trio.sleep(0.05)

            nursery.start_soon(no_ack)
            await trio.sleep(0.5)
            await new_term(cell)
            start_ms = cell.service.clock_ms()
            sm = cell.service.sm
            assert sm.sweep_at_ms >= start_ms + GRACE_MS - 100
            await trio.sleep(1.0)
            assert sm.unconfirmed == {leaked[0], (await _handle_of(cell, forgets))}
            await trio.sleep((GRACE_MS - 1_000) / 1000)
            assert sm.stat(f"{ROOT}/forgotten") is None and sm.stat(f"{ROOT}/leaked") is None
            assert sm.stat(f"{ROOT}/kept") is not None and sm.stat(f"{ROOT}/silent") is not None
            assert cell.service.clock_ms() >= start_ms + GRACE_MS - 200
            gone = await cell.request("get_stat", session_id=declares, handle=leaked)
            assert gone["error"] == "bad_handle", "a handle that was not re-created is closed for good"
            assert (await cell.request("get_stat", session_id=declares, handle=kept))["ok"]
            assert set(sm.sessions) == {declares, forgets, silent}
            nursery.cancel_scope.cancel()


async def _handle_of(cell: InProcessCell, sid: int) -> int:
    [handle_id] = cell.service.sm.session_handle_ids(sid)
    return handle_id


async def test_the_sweep_is_announced_to_cachers_before_it_is_applied(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        owner = await cell.session()
        await _ephemeral(cell, owner, "e")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _keep_alive(cell, owner, handles=[]))
            await new_term(cell)
            await trio.sleep(0.5)
            due = cell.service.sm.sweep_at_ms
            # A lease well past the sweep, so only the sweep deletes anything.
            await cell.service._propose(ExtendLeases(now_ms=cell.service.clock_ms(),
                                                     leases={owner: due + 10 * GRACE_MS}))
            assert cell.service.sm.ephemeral_sweep_paths(due - 1) == []
            assert cell.service._expiring_ephemeral_paths(due - 1) == []
            assert cell.service._expiring_ephemeral_paths(due) == [f"{ROOT}/e", ROOT]
            nursery.cancel_scope.cancel()


async def test_bad_handle_lists_are_refused(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        for bad in ("x", [1, "2"], [True]):
            reply = await cell.request("keep_alive", session_id=sid, ack=0, handles=bad)
            assert reply["error"] == "bad_request"
