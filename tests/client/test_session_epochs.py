"""The client library across master epochs, against the real master
in-process (MockClock): a call refused with `stale_epoch` waits for the
KeepAlive that brings the fail-over and is sent again; the session re-creates
the handles it holds, so its ephemeral nodes outlive the post-fail-over
sweep, while a handle it no longer holds (or closed) never comes back."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.client.connection import CellError
from chubbyfs.client.session import Session, SessionExpiredError
from tests.cell.test_master_epochs import GRACE_MS, LEASE_MS, new_term
from tests.client.incell import ROOT, InProcessCell, in_process_cell


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


async def _session(cell: InProcessCell, grace_ms: int = 3_000) -> Session:
    conn = cell.connection()
    sent = trio.current_time()
    value = (await conn.call("create_session"))["value"]
    return Session(conn, value["session_id"], value["lease_ms"], lease_start=sent,  # type: ignore[arg-type]
                   grace_ms=grace_ms, epoch=value["epoch"])


def _attempts(session: Session, op: str) -> list[int | None]:
    return [args.get("epoch") for name, args in session.conn.calls if name == op]  # type: ignore[attr-defined]


async def test_a_call_refused_for_its_epoch_is_sent_again_once_the_session_hears_of_it(
        mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        session = await _session(cell)
        old = session.epoch
        h = await session.open(f"{ROOT}/f", create="file", write=True, contents=b"v0")
        new = await new_term(cell)
        result: list[object] = []
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                result.append(await h.set_contents(b"v1"))

            nursery.start_soon(write)
            await trio.sleep(0.5)
            # Refused unexecuted; waiting for news of the new master.
            assert not result and _attempts(session, "set_contents") == [old]
            assert cell.service.sm.stat(f"{ROOT}/f").size == 2
            nursery.start_soon(session.keep_alive_forever)
            with trio.fail_after(5):
                while not result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert _attempts(session, "set_contents") == [old, new] and session.epoch == new
        assert (await h.get_contents_and_stat())[0] == b"v1"


async def test_a_call_waiting_for_an_epoch_fails_when_the_session_expires(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        session = await _session(cell, grace_ms=0)
        old = session.epoch
        h = await session.open(f"{ROOT}/f", create="file")
        await new_term(cell)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._lease_timer)  # no KeepAlives: the local lease runs out
            with pytest.raises(SessionExpiredError), trio.fail_after(10):
                await h.get_stat()
            assert _attempts(session, "get_stat") == [old]
            nursery.cancel_scope.cancel()


async def test_held_handles_are_re_created_and_keep_their_ephemeral_nodes(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        session = await _session(cell)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.keep_alive_forever)
            held = await session.open(f"{ROOT}/held", create="file", ephemeral=True, lock=True)
            sequencer = await held.acquire()
            leaked = await session.open(f"{ROOT}/leaked", create="file", ephemeral=True)
            session._handles.pop(leaked.id)  # as if its Open's reply had been lost
            closed = await session.open(f"{ROOT}/closed", create="file")
            await closed.close()
            await new_term(cell)
            await trio.sleep((GRACE_MS + 2 * LEASE_MS) / 1000)
            sm = cell.service.sm
            assert sm.stat(f"{ROOT}/held") is not None and sm.stat(f"{ROOT}/leaked") is None
            assert await session.check_sequencer(sequencer) == (True, "")
            assert (await held.get_stat()).path == f"{ROOT}/held"
            with pytest.raises(CellError) as info:
                await leaked.get_stat()
            assert info.value.code == "bad_handle"
            with pytest.raises(CellError) as info:
                await closed.get_stat()
            assert info.value.code == "bad_handle"
            reply = await cell.request("get_stat", session_id=session.id, handle=closed.ref)
            assert reply["error"] == "bad_handle", "a closed handle never comes back"
            nursery.cancel_scope.cancel()


class _ScriptedConnection:
    """Answers KeepAlives from a script, then never again."""

    def __init__(self, replies: list[dict]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, dict]] = []

    async def call(self, op: str, **args: object) -> dict:
        self.calls.append((op, args))
        await trio.lowlevel.checkpoint()
        if op == "keep_alive" and self.replies:
            return {"ok": True, "value": self.replies.pop(0)}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def reset(self) -> None:
        pass


async def test_a_late_reply_from_a_deposed_master_is_ignored(mock_clock: MockClock) -> None:
    """Finding 6 of the cell simulation: a KeepAlive answered by the master
    of an older epoch (paused, not yet aware it was deposed) must not take
    the session back to that epoch: no reset of its sequence, no event of
    the old epoch after the new one's."""
    def reply(epoch: int, items: list) -> dict:
        return {"session_id": 7, "lease_ms": LEASE_MS, "held_ms": 0, "epoch": epoch, "items": items}

    conn = _ScriptedConnection([reply(5, [[1, 128, 0, "", ""], [2, 1, 3, f"{ROOT}/f", ""]]),
                                reply(4, [[9, 1, 3, f"{ROOT}/f", ""]])])
    session = Session(conn, 7, LEASE_MS, lease_start=trio.current_time(), epoch=4)  # type: ignore[arg-type]
    events = session.events()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.keep_alive_forever)
        await trio.sleep(0.5)
        assert (session.epoch, session.cache.last_seq) == (5, 2)
        assert [e.seq for e in events._items] == [1, 2]  # the fail-over and epoch 5's event only
        assert len(conn.calls) == 3  # a new KeepAlive went out after the late reply
        assert conn.calls[-1][1]["ack_epoch"] == 5 and conn.calls[-1][1]["ack"] == 2
        nursery.cancel_scope.cancel()


async def test_a_deposed_master_does_not_answer_keep_alives(mock_clock: MockClock) -> None:
    async with in_process_cell(session_lease_ms=LEASE_MS) as cell:
        sid = await cell.session()
        raft = cell.node.raw._raft
        raft.become_follower(raft.term + 1, 0)  # deposed; the service has not noticed yet
        reply = await cell.request("keep_alive", session_id=sid, hold=False, ack=0)
        assert reply["error"] == "not_leader"
