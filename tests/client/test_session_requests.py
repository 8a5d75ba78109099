"""The client library's request numbers, against the real master in-process
(MockClock): one number per call, the same on every attempt; the next call
says the earlier ones were answered; so an attempt held at the master while
the call's retry went through is refused when it finally comes, and the
session's later lock and write stand (finding 5 of the cell simulation)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio.testing import MockClock

from chubbyfs.cell import commands as c
from chubbyfs.client.connection import CellError
from chubbyfs.client.session import Session
from chubbyfs.client.session_core import RequestNumbers
from tests.cell.test_master_requests import hold_first_proposal
from tests.client.incell import ROOT, FakeConnection, InProcessCell, in_process_cell

ATTEMPT_S = 0.3


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0)


class AbandoningConnection(FakeConnection):
    """The first attempt of an op in `abandon` gets no answer in time: the
    connection gives up on it after ATTEMPT_S and, as the real one does for a
    call it may retry, sends it again. The abandoned attempt goes on at the
    master; its late answer lands in `late`."""

    def __init__(self, cell: InProcessCell, nursery: trio.Nursery, abandon: set[str]) -> None:
        super().__init__(cell, "root")
        self.nursery = nursery
        self.abandon = abandon
        self.late: list[dict] = []

    async def call(self, op: str, *, idempotent: bool = True, timeout_s: float | None = None,
                   **args: Any) -> dict:
        if op in self.abandon:
            self.abandon.discard(op)
            self.calls.append((op, args))
            self.nursery.start_soon(self._abandoned, op, args)
            await trio.sleep(ATTEMPT_S)
            if not idempotent:
                raise CellError("unknown_outcome", f"{op}: no answer in time")
        return await super().call(op, idempotent=idempotent, timeout_s=timeout_s, **args)

    async def _abandoned(self, op: str, args: dict) -> None:
        self.late.append(await self.cell.request(op, self.principal, **args))


async def _session(conn: FakeConnection) -> Session:
    value = (await conn.call("create_session"))["value"]
    return Session(conn, value["session_id"], value["lease_ms"],  # type: ignore[arg-type]
                   lease_start=trio.current_time(), epoch=value["epoch"])


def _numbers(conn: FakeConnection, op: str) -> list[tuple[int, int]]:
    return [(args["request_no"], args["answered_below"]) for name, args in conn.calls if name == op]


async def test_a_release_held_at_the_master_never_releases_the_next_grant(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell, trio.open_nursery() as nursery:
        conn = AbandoningConnection(cell, nursery, {"release"})
        session = await _session(conn)
        h = await session.open(f"{ROOT}/lock", create="file", write=True, lock=True)
        await h.acquire()
        gate, _ = hold_first_proposal(cell.service, c.Release)
        await h.release()  # the first attempt is held; the retry is answered
        sequencer = await h.acquire()
        gate.set()
        with trio.fail_after(5):
            while not conn.late:
                await trio.sleep(0.01)
        assert conn.late[0]["error"] == "stale_request"
        assert await h.get_sequencer() == sequencer  # still held
        [(release_no, _), retry] = _numbers(conn, "release")
        assert retry == (release_no, release_no)  # the retry reused the number
        assert _numbers(conn, "acquire")[-1] == (release_no + 1, release_no + 1)


async def test_a_write_held_at_the_master_never_overwrites_a_later_one(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell, trio.open_nursery() as nursery:
        conn = AbandoningConnection(cell, nursery, {"set_contents"})
        session = await _session(conn)
        h = await session.open(f"{ROOT}/f", create="file", write=True)
        gate, _ = hold_first_proposal(cell.service, c.SetContents)
        # A compare-and-swap is retried too: its number makes it safe.
        await h.set_contents(b"v1", expected_generation=h.stat.content_generation)
        await h.set_contents(b"v2")
        gate.set()
        with trio.fail_after(5):
            while not conn.late:
                await trio.sleep(0.01)
        assert conn.late[0]["error"] == "stale_request"
        assert (await h.get_contents_and_stat())[0] == b"v2"


async def test_calls_in_flight_hold_the_answered_mark_back(mock_clock: MockClock) -> None:
    async with in_process_cell() as cell:
        conn = cell.connection()
        session = await _session(conn)
        a = await session.open(f"{ROOT}/a", create="file", write=True, lock=True)
        b = await session.open(f"{ROOT}/b", create="file", write=True, lock=True)
        other = await _session(cell.connection())
        held = await other.open(f"{ROOT}/a", write=True, lock=True)
        await held.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.acquire)  # blocks: the lock is held
            await trio.sleep(0.1)
            await b.set_contents(b"x")  # says nothing about the Acquire still in flight
            await held.release()
        [(acquire_no, _)] = _numbers(conn, "acquire")
        assert _numbers(conn, "set_contents") == [(acquire_no + 1, acquire_no)]
        await b.set_contents(b"y")
        assert _numbers(conn, "set_contents")[-1] == (acquire_no + 2, acquire_no + 2)
        # Reads and KeepAlives are not numbered.
        await b.get_stat()
        assert all("request_no" not in args for name, args in conn.calls if name == "get_stat")


def test_request_numbers_core() -> None:
    numbers = RequestNumbers()
    assert numbers.begin() == (1, 1)
    assert numbers.begin() == (2, 1)  # 1 is still in flight
    numbers.end(1)
    assert numbers.begin() == (3, 2)
    numbers.end(2)
    numbers.end(3)
    numbers.end(3)  # ending twice is harmless
    assert numbers.begin() == (4, 4)
