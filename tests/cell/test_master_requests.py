"""Finding 5 of the cell simulation (docs/simulation.md): the master holds
requests (for cachers' acknowledgements, a fail-over acknowledgement,
mastership) and a client whose attempt timed out retries, gets its answer and
goes on while the first attempt is still held. Driven against the real master
in-process (MockClock), with the first attempt held just before it is
proposed. With request numbers the late attempt is refused; the same
schedule without them shows the hazard."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.cell import commands as c
from chubbyfs.cell.master import CellService
from tests.cell.test_master_inline import _Answer, _inline
from tests.client.incell import ROOT, InProcessCell, in_process_cell

READ, WRITE, LOCK = 1, 2, 4


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


def hold_first_proposal(service: CellService, cls: type) -> tuple[trio.Event, list]:
    """The first proposal of a `cls` command waits for the returned event
    (held at the master, as while it waits for an acknowledgement); the list
    gets the command once it is held."""
    gate, held = trio.Event(), []
    propose = service._propose

    async def holding(cmd: Any, **options: Any) -> Any:
        if isinstance(cmd, cls) and not held:
            held.append(cmd)
            await gate.wait()
        return await propose(cmd, **options)

    service._propose = holding  # type: ignore[method-assign]
    return gate, held


def numbering(numbered: bool) -> Callable[..., dict]:
    """Fields of one call: numbered 1, 2, ... with every earlier one answered
    (calls here go one at a time), or unnumbered as before the fix."""
    numbers = itertools.count(1)

    def fields(**call: Any) -> dict:
        if not numbered:
            return call
        n = next(numbers)
        return {**call, "request_no": n, "answered_below": n}
    return fields


async def late_first_attempt(cell: InProcessCell, cls: type, op: str, request: dict,
                             then: Callable[[], Any]) -> dict:
    """Send `request`; its first attempt is held, the retry answered; run
    `then` (the client going on); then let the first attempt go on and
    return its answer."""
    gate, held = hold_first_proposal(cell.service, cls)
    answers: list[dict] = []
    async with trio.open_nursery() as nursery:

        async def first_attempt() -> None:
            answers.append(await cell.request(op, **request))

        nursery.start_soon(first_attempt)
        with trio.fail_after(5):
            while not held:
                await trio.sleep(0.01)
        retry = await cell.request(op, **request)
        assert retry.get("ok"), retry
        await then()
        assert not answers
        gate.set()
    return answers[0]


async def opened(cell: InProcessCell, numbered: bool, name: str, intent: int) -> tuple[int, Callable, list]:
    """A session, its call numbering and a handle on a file it created."""
    sid = await cell.session()
    call = numbering(numbered)
    reply = await cell.ok("open", **call(session_id=sid, path=f"{ROOT}/{name}", intent=intent, create=1))
    return sid, call, reply["handle"]


@pytest.mark.parametrize("numbered", [True, False])
async def test_a_held_release_is_not_applied_after_the_client_acquired_again(
        mock_clock: MockClock, numbered: bool) -> None:
    async with in_process_cell() as cell:
        sid, call, handle = await opened(cell, numbered, "lock", READ | WRITE | LOCK)
        assert (await cell.ok("acquire", **call(session_id=sid, handle=handle, mode="exclusive")))["granted"]
        again: list[dict] = []

        async def acquire_again() -> None:
            again.append(await cell.ok("acquire", **call(session_id=sid, handle=handle, mode="exclusive")))

        late = await late_first_attempt(cell, c.Release, "release", call(session_id=sid, handle=handle),
                                        acquire_again)
        holders = cell.service.sm.nodes[cell.service.sm.by_path[f"{ROOT}/lock"]].lock.holders
        if numbered:
            assert late["error"] == "stale_request" and "late duplicate" in late["message"]
            assert set(holders) == {handle[0]}
            sequencer = await cell.ok("get_sequencer", session_id=sid, handle=handle)
            assert sequencer["sequencer"] == again[0]["sequencer"]
        else:  # the hazard: the new grant is released under its holder
            assert late.get("ok") and not holders


@pytest.mark.parametrize("numbered", [True, False])
async def test_a_held_write_does_not_overwrite_the_clients_later_write(
        mock_clock: MockClock, numbered: bool) -> None:
    async with in_process_cell() as cell:
        sid, call, handle = await opened(cell, numbered, "f", READ | WRITE)

        async def write_again() -> None:
            await cell.ok("set_contents", **call(session_id=sid, handle=handle, contents=b"v2"))

        late = await late_first_attempt(cell, c.SetContents, "set_contents",
                                        call(session_id=sid, handle=handle, contents=b"v1"), write_again)
        contents = (await cell.ok("get_contents_and_stat", session_id=sid, handle=handle))["contents"]
        if numbered:
            assert late["error"] == "stale_request" and contents == b"v2"
        else:  # the hazard: the client's own later write is overwritten
            assert late.get("ok") and contents == b"v1"


async def test_a_retried_create_session_gets_the_session_its_first_attempt_made(
        mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        first = await cell.ok("create_session", nonce=12345)
        retry = await cell.ok("create_session", nonce=12345)
        other = await cell.ok("create_session", nonce=777)
        assert retry["session_id"] == first["session_id"] != other["session_id"]
        assert sorted(cell.service.sm.sessions) == sorted({first["session_id"], other["session_id"]})


async def test_malformed_request_numbers_are_refused(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        sid = await cell.session()
        path = f"{ROOT}/f"
        for bad in ({"request_no": "1"}, {"request_no": -1}, {"request_no": 1, "answered_below": True}):
            reply = await cell.request("open", session_id=sid, path=path, intent=READ, create=1, **bad)
            assert reply["error"] == "bad_request", reply
        reply = await cell.request("open", session_id=sid, path=path, intent=READ, create=1,
                                   request_no=2, answered_below=3)
        assert reply["error"] == "invalid_argument" and "cannot have been answered" in reply["message"]
        assert (await cell.request("create_session", nonce="x"))["error"] == "bad_request"
        assert cell.service.sm.stat(path) is None


async def test_the_inline_path_replays_and_refuses_by_number(mock_clock: MockClock) -> None:
    """handle_nowait (the replica's path for calls with nothing to wait for)
    carries the numbers too: a duplicate gets the first answer, a late one
    below the mark is refused, and a retried queued Acquire is answered by
    the grant."""
    async with in_process_cell() as cell:
        b, call, h = await opened(cell, True, "f", READ | WRITE | LOCK)
        a = await cell.session()
        ha = (await cell.ok("open", session_id=a, path=f"{ROOT}/f", intent=READ | WRITE | LOCK))["handle"]
        write = call(session_id=b, handle=h, contents=b"v1")
        first = await _taken(cell, "set_contents", **write).get()
        again = await _taken(cell, "set_contents", **write).get()
        assert again == first and first["ok"]
        await _taken(cell, "set_contents", **call(session_id=b, handle=h, contents=b"v2")).get()
        late = await _taken(cell, "set_contents", **write).get()
        assert late["error"] == "stale_request"
        assert (await cell.ok("acquire", session_id=a, handle=ha, mode="exclusive"))["granted"]
        acquire = call(session_id=b, handle=h, mode="exclusive")
        queued, retry = _taken(cell, "acquire", **acquire), _taken(cell, "acquire", **acquire)
        await trio.sleep(0.1)
        assert not retry.replies and cell.service.sm.nodes[
            cell.service.sm.by_path[f"{ROOT}/f"]].lock.waiters == deque([(h[0], 1)])
        await cell.ok("release", session_id=a, handle=ha)
        granted = await retry.get()
        assert granted["ok"] and granted["value"]["granted"]
        # The retry took the first attempt's place; the first is told to retry.
        assert [r.get("error") for r in queued.replies] == ["retry"]


def _taken(cell: InProcessCell, op: str, **fields: Any) -> _Answer:
    answer = _inline(cell, op, **fields)
    assert answer is not None, f"{op} was left to the general path"
    return answer
