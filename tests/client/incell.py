"""An in-process cell for master- and library-level tests: one replica (a
single-voter Raft group on MemoryStorage, so it elects itself) running the
real `CellService`, on trio's clock (so MockClock tests run in virtual time).

`InProcessCell.connection()` gives an object with `CellConnection`'s `call`
signature that goes straight to `CellService.handle`, so `Session` can be
driven against the real master without sockets; `drop_replies` lets a test
lose replies on the way back.
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from chubbyfs.cell.master import CellService, ObservedStateMachine
from chubbyfs.cell.state_machine import CellStateMachine
from chubbyfs.client.connection import CellError
from chubbyfs.raft.core import Config
from chubbyfs.raft.memory_storage import MemoryStorage
from chubbyfs.raft.node import NotLeaderError, RaftNode, bootstrap_storage

CELL = "t"
ROOT = f"/ls/{CELL}"


class _NoPeers:
    def send(self, msg: Any) -> None:
        raise AssertionError(f"a single-voter cell sends no messages: {msg}")

    def flush(self) -> None:
        pass


class InProcessCell:
    def __init__(self, service: CellService, node: RaftNode) -> None:
        self.service = service
        self.node = node

    async def request(self, op: str, principal: str = "root", **fields: Any) -> dict:
        try:
            return await self.service.handle({"op": op, **fields}, principal)
        except NotLeaderError as exc:
            return {"error": "not_leader", "leader": exc.leader}

    async def ok(self, op: str, **fields: Any) -> Any:
        reply = await self.request(op, **fields)
        assert reply.get("ok"), reply
        return reply["value"]

    async def session(self) -> int:
        return (await self.ok("create_session"))["session_id"]

    def connection(self, principal: str = "root") -> FakeConnection:
        return FakeConnection(self, principal)


class FakeConnection:
    """`CellConnection.call` over direct calls; retries what the real one retries."""

    def __init__(self, cell: InProcessCell, principal: str) -> None:
        self.cell = cell
        self.principal = principal
        self.drop_replies: set[str] = set()  # ops whose next reply is lost
        self.calls: list[tuple[str, dict]] = []
        self.links_dropped = 0

    async def call(self, op: str, *, idempotent: bool = True, timeout_s: float | None = None,
                   **args: Any) -> dict:
        with trio.move_on_after(15.0 if timeout_s is None else timeout_s):
            while True:
                self.calls.append((op, args))
                reply = await self.cell.request(op, self.principal, **args)
                if op in self.drop_replies:
                    self.drop_replies.discard(op)
                    raise CellError("unavailable", f"reply to {op} lost")
                err = reply.get("error")
                if err is None:
                    return reply
                if err in ("retry", "not_leader", "lost"):
                    await trio.sleep(0.01)
                    continue
                raise CellError(err, reply.get("message", ""))
        raise CellError("unavailable", "no answer in time")

    async def reset(self) -> None:
        self.links_dropped += 1

    async def aclose(self) -> None:
        pass


@asynccontextmanager
async def in_process_cell(*, session_lease_ms: int = 2_000) -> AsyncIterator[InProcessCell]:
    storage = MemoryStorage()
    bootstrap_storage(storage, [1])
    observed = ObservedStateMachine(CellStateMachine())
    node = RaftNode(config=Config(id=1, election_tick=10, heartbeat_tick=1), storage=storage,
                    transport=_NoPeers(), state_machine=observed, rng=random.Random(1),
                    tick_seconds=0.01)
    service = CellService(node, observed, cell_name=CELL, admins=("root",),
                          session_lease_ms=session_lease_ms,
                          clock_ms=lambda: int(trio.current_time() * 1000) + 1_000_000,
                          secret_source=lambda n: bytes(range(n)))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(service.run)
        with trio.fail_after(30):
            while not service.epoch:
                await trio.sleep(0.01)
        try:
            yield InProcessCell(service, node)
        finally:
            nursery.cancel_scope.cancel()
