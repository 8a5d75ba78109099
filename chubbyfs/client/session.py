"""Sessions and handles: the trio client API of a Chubby cell.

    async with open_session("local") as session:
        async with await session.open("/ls/local/svc/leader", write=True, lock=True,
                                      create="file") as h:
            seq = await h.acquire()
            await h.set_contents(b"me")

A session is created at the master and kept alive by a background task; a
`Handle` names one open node. This is the base that the full session
protocol (long-poll KeepAlive, cache, events, failover) extends.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import trio

from chubbyfs.cell.config import load_cells_file
from chubbyfs.wire.cell_protocol import Stat

from chubbyfs._trio_util import single_errors

from .connection import CellConnection, CellError
from .session_core import DEFAULT_GRACE_MS, SessionLeaseCore, SessionState, StateChange

INTENT_READ, INTENT_WRITE, INTENT_LOCK, INTENT_CHANGE_ACL = 1, 2, 4, 8
_CREATE = {None: 0, "file": 1, "directory": 2}


class SessionExpiredError(CellError):
    """The session ended (lease ran out or it was closed); its handles are gone."""


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    stat: Stat


def cell_of(path: str) -> str:
    """The cell named by a `/ls/<cell>/...` path."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "ls" or not parts[2]:
        raise ValueError(f"{path!r} is not a chubbyfs path: expected /ls/<cell>/...")
    return parts[2]


class Session:
    """A Chubby session. Its state (safe / jeopardy / expired) follows the
    local lease; `state_changes()` lets the application hear it, e.g. to
    stop acting as primary before its lease is gone."""

    def __init__(self, conn: CellConnection, session_id: int, lease_ms: int, *, lease_start: float,
                 grace_ms: int = DEFAULT_GRACE_MS) -> None:
        self.conn = conn
        self.id = session_id
        self.lease_ms = lease_ms
        self.core = SessionLeaseCore(now_ms=lease_start * 1000, lease_ms=lease_ms, grace_ms=grace_ms)
        self._changed = trio.Event()
        self._history: list[StateChange] = []

    @property
    def state(self) -> SessionState:
        return self.core.state

    @property
    def expired(self) -> bool:
        return self.core.state == SessionState.EXPIRED

    async def state_changes(self) -> AsyncIterator[StateChange]:
        """Every state change from now on, in order, until the session expires."""
        seen = len(self._history)
        while True:
            while seen < len(self._history):
                change = self._history[seen]
                seen += 1
                yield change
                if change.state == SessionState.EXPIRED:
                    return
            if self.expired:
                return
            await self._changed.wait()

    def _publish(self) -> None:
        changes = self.core.take_changes()
        if changes:
            self._history.extend(changes)
            self._changed.set()
            self._changed = trio.Event()

    async def _call(self, op: str, *, idempotent: bool, **args: Any) -> Any:
        if self.expired:
            raise SessionExpiredError("session_expired", f"session {self.id} has ended")
        try:
            reply = await self.conn.call(op, idempotent=idempotent, session_id=self.id, **args)
        except CellError as exc:
            if exc.code == "session_expired":
                self.core.master_says_expired(trio.current_time() * 1000)
                self._publish()
                raise SessionExpiredError(exc.code, exc.message) from None
            raise
        return reply["value"]

    async def open(self, path: str, *, read: bool = True, write: bool = False, lock: bool = False,
                   change_acl: bool = False, create: Literal["file", "directory"] | None = None,
                   exclusive: bool = False, ephemeral: bool = False, contents: bytes = b"",
                   acl: tuple[str, str, str] | None = None, events: int = 0,
                   lock_delay_ms: int | None = None) -> Handle:
        """Open (and with `create`, create) the node at `path`."""
        intent = ((INTENT_READ if read else 0) | (INTENT_WRITE if write else 0)
                  | (INTENT_LOCK if lock else 0) | (INTENT_CHANGE_ACL if change_acl else 0))
        args: dict[str, Any] = {"path": path, "intent": intent, "create": _CREATE[create],
                                "exclusive": exclusive, "ephemeral": ephemeral, "contents": contents,
                                "events": events}
        if acl is not None:
            args["acl"] = list(acl)
        if lock_delay_ms is not None:
            args["lock_delay_ms"] = lock_delay_ms
        value = await self._call("open", idempotent=not create, **args)
        return Handle(self, path, value["handle"], Stat.from_wire(value["stat"]), value["created"])

    async def rename(self, src_path: str, dst_path: str) -> Stat:
        return Stat.from_wire(await self._call("rename", idempotent=False, src_path=src_path, dst_path=dst_path))

    async def check_sequencer(self, sequencer: str) -> tuple[bool, str]:
        value = (await self.conn.call("check_sequencer", sequencer=sequencer))["value"]
        return value["valid"], value["reason"]

    async def keep_alive_forever(self) -> None:
        """One KeepAlive always outstanding (the master holds it until shortly
        before the lease ends), and a timer that moves the session into
        jeopardy and expiry when the local lease and grace period run out."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lease_timer)
            while not self.expired:
                sent_at = trio.current_time()
                try:
                    value = await self._call("keep_alive", idempotent=True, hold=True,
                                             timeout_s=(self.lease_ms + self.core.grace_ms) / 1000)
                except SessionExpiredError:
                    break
                except CellError:
                    await trio.sleep(0.1)  # no master yet; the timer decides our fate
                    continue
                self.core.keep_alive_succeeded(sent_at_ms=sent_at * 1000,
                                               lease_ms=value["held_ms"] + value["lease_ms"],
                                               now_ms=trio.current_time() * 1000)
                self._publish()
            nursery.cancel_scope.cancel()

    async def _lease_timer(self) -> None:
        while not self.expired:
            deadline = self.core.next_deadline_ms()
            if deadline is None:
                return
            with trio.move_on_at(deadline / 1000):
                await self._changed.wait()
            self.core.tick(trio.current_time() * 1000)
            self._publish()

    async def close(self) -> None:
        if not self.expired:
            try:
                await self.conn.call("end_session", idempotent=True, session_id=self.id)
            except CellError:
                pass
            self.core.master_says_expired(trio.current_time() * 1000)
            self._publish()


class Handle:
    def __init__(self, session: Session, path: str, ref: list, stat: Stat, created: bool) -> None:
        self.session = session
        self.path = path
        self.ref = ref
        self.stat = stat
        self.created = created
        self.closed = False

    async def _call(self, op: str, *, idempotent: bool, **args: Any) -> Any:
        if self.closed:
            raise CellError("bad_handle", f"handle on {self.path} is closed")
        return await self.session._call(op, idempotent=idempotent, handle=self.ref, **args)

    async def get_contents_and_stat(self) -> tuple[bytes, Stat]:
        value = await self._call("get_contents_and_stat", idempotent=True)
        self.stat = Stat.from_wire(value["stat"])
        return value["contents"], self.stat

    async def get_stat(self) -> Stat:
        self.stat = Stat.from_wire(await self._call("get_stat", idempotent=True))
        return self.stat

    async def read_dir(self) -> list[DirEntry]:
        value = await self._call("read_dir", idempotent=True)
        return [DirEntry(e["name"], Stat.from_wire(e["stat"])) for e in value["entries"]]

    async def set_contents(self, contents: bytes, *, expected_generation: int | None = None) -> Stat:
        args: dict[str, Any] = {"contents": contents}
        if expected_generation is not None:
            args["expected_generation"] = expected_generation
        self.stat = Stat.from_wire(await self._call("set_contents", idempotent=expected_generation is None, **args))
        return self.stat

    async def set_acl(self, read: str, write: str, change_acl: str) -> Stat:
        self.stat = Stat.from_wire(await self._call("set_acl", idempotent=True, read=read, write=write,
                                                    change_acl=change_acl))
        return self.stat

    async def delete(self) -> None:
        await self._call("delete", idempotent=False)

    async def acquire(self, mode: str = "exclusive") -> str:
        """Block until the lock is held; return its sequencer."""
        return (await self._call("acquire", idempotent=True, mode=mode))["sequencer"]

    async def try_acquire(self, mode: str = "exclusive") -> str | None:
        """The sequencer if the lock was free, else None."""
        try:
            return (await self._call("try_acquire", idempotent=True, mode=mode))["sequencer"]
        except CellError as exc:
            if exc.code == "lock_held":
                return None
            raise

    async def release(self) -> None:
        await self._call("release", idempotent=False)

    async def get_sequencer(self) -> str:
        return (await self._call("get_sequencer", idempotent=True))["sequencer"]

    async def set_sequencer(self, sequencer: str) -> None:
        await self._call("set_sequencer", idempotent=True, sequencer=sequencer)

    async def close(self) -> None:
        if not self.closed and not self.session.expired:
            await self._call("close", idempotent=True)
        self.closed = True

    async def __aenter__(self) -> Handle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.close()


def resolve_cell(cell: str, cells_file: str | Path | None = None) -> list[str]:
    from chubbyfs.cli import default_cells_file

    cells = load_cells_file(cells_file or default_cells_file())
    if cell not in cells:
        raise CellError("not_found", f"no cell {cell!r} in the cells file (cells: {', '.join(sorted(cells))})")
    return cells[cell]


@asynccontextmanager
async def open_session(cell: str, *, cells_file: str | Path | None = None, addresses: list[str] | None = None,
                       principal: str | None = None, call_timeout_s: float = 15.0) -> AsyncIterator[Session]:
    """Connect to `cell`, create a session, keep it alive until the block ends."""
    addresses = addresses or resolve_cell(cell, cells_file)
    with single_errors():
        async with trio.open_nursery() as nursery:
            conn = CellConnection(addresses, nursery, cell=cell, principal=principal,
                                  call_timeout_s=call_timeout_s)
            try:
                sent_at = trio.current_time()
                value = (await conn.call("create_session", idempotent=False))["value"]
                session = Session(conn, value["session_id"], value["lease_ms"], lease_start=sent_at)
                nursery.start_soon(session.keep_alive_forever)
                try:
                    yield session
                finally:
                    with trio.CancelScope(shield=True):
                        await session.close()
            finally:
                await conn.aclose()
                nursery.cancel_scope.cancel()
