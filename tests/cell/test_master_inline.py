"""CellService.handle_nowait: calls on handles answered without a task of
their own, against the real CellService and RaftNode in-process (MockClock).
The answers must be what the general path (`handle`) gives."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from tests.client.incell import ROOT, InProcessCell, in_process_cell

READ, WRITE, LOCK = 1, 2, 4
EXCLUSIVE = 1


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


class _Answer:
    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.done = trio.Event()

    def __call__(self, reply: dict | None, error: BaseException | None) -> None:
        assert error is None, error
        assert reply is not None
        self.replies.append(reply)
        self.done.set()

    async def get(self) -> dict:
        with trio.fail_after(5):
            await self.done.wait()
        [reply] = self.replies
        return reply


def _inline(cell: InProcessCell, op: str, **fields: object) -> _Answer | None:
    answer = _Answer()
    taken = cell.service.handle_nowait({"op": op, **fields}, "root", answer)
    return answer if taken else None


async def _open(cell: InProcessCell, sid: int, name: str = "f") -> list:
    return (await cell.ok("open", session_id=sid, path=f"{ROOT}/{name}", intent=READ | WRITE | LOCK,
                          create=1))["handle"]


async def test_a_write_with_no_cachers_is_taken_and_answered_from_the_apply(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        sid = await cell.session()
        h = await _open(cell, sid)
        answer = _inline(cell, "set_contents", session_id=sid, handle=h, contents=b"v1")
        assert answer is not None
        reply = await answer.get()
        assert reply["ok"] and reply["value"]["content_generation"] >= 1
        got = await cell.ok("get_contents_and_stat", session_id=sid, handle=h)
        assert got["contents"] == b"v1"
        cell.service.cache.assert_invariants()


async def test_a_write_to_a_cached_path_is_left_to_the_general_path(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        a, b = await cell.session(), await cell.session()
        ha, hb = await _open(cell, a), await _open(cell, b)
        assert (await cell.request("get_stat", session_id=a, handle=ha, cache=True))["cacheable"]
        before = cell.service.cache.statistics()
        # b's write must wait for a's acknowledgement: not taken inline, and
        # nothing begun (no invalidation sent, nothing marked uncachable).
        assert _inline(cell, "set_contents", session_id=b, handle=hb, contents=b"x") is None
        assert cell.service.cache.statistics() == before
        assert cell.service.cache.may_cache(a, f"{ROOT}/f")


async def test_a_refusal_is_the_general_paths_refusal(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        sid = await cell.session()
        h = await _open(cell, sid)
        answer = _inline(cell, "release", session_id=sid, handle=h)
        assert answer is not None
        inline = await answer.get()
        general = await cell.request("release", session_id=sid, handle=h)
        assert inline["error"] == general["error"] == "lock_not_held"
        # A malformed handle or an unknown op is not taken: `handle` reports it.
        assert _inline(cell, "release", session_id=sid, handle=[1, 2]) is None
        assert _inline(cell, "open", session_id=sid, path=f"{ROOT}/g") is None


async def test_a_request_of_an_older_epoch_is_not_taken(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        sid = await cell.session()
        h = await _open(cell, sid)
        epoch = cell.service.epoch
        assert _inline(cell, "set_contents", session_id=sid, handle=h, contents=b"x", epoch=epoch - 1) is None
        assert (await cell.request("set_contents", session_id=sid, handle=h, contents=b"x",
                                   epoch=epoch - 1))["error"] == "stale_epoch"


async def test_a_blocked_acquire_is_granted_by_the_inline_release(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        a, b = await cell.session(), await cell.session()
        ha, hb = await _open(cell, a, "lock"), await _open(cell, b, "lock")
        first = _inline(cell, "acquire", session_id=a, handle=ha, mode=EXCLUSIVE)
        assert first is not None and (await first.get())["value"]["granted"]
        waiting = _inline(cell, "acquire", session_id=b, handle=hb, mode=EXCLUSIVE)
        assert waiting is not None
        await trio.sleep(1)  # applied and queued (lazy: it went out by the next tick)
        assert not waiting.replies
        release = _inline(cell, "release", session_id=a, handle=ha)
        assert release is not None and (await release.get())["ok"]
        granted = await waiting.get()
        assert granted["ok"] and granted["value"]["granted"] and granted["value"]["sequencer"]
        assert not cell.service._acquire_waiters


async def test_a_blocked_acquire_is_told_to_retry_when_mastership_ends(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        a, b = await cell.session(), await cell.session()
        ha, hb = await _open(cell, a, "lock"), await _open(cell, b, "lock")
        assert (await cell.request("acquire", session_id=a, handle=ha, mode=EXCLUSIVE))["ok"]
        waiting = _inline(cell, "acquire", session_id=b, handle=hb, mode=EXCLUSIVE)
        assert waiting is not None
        await trio.sleep(1)
        cell.service._step_down()
        assert (await waiting.get())["error"] == "retry"
