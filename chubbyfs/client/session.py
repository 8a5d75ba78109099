"""Sessions and handles: the trio client API of a Chubby cell.

    async with open_session("local") as session:
        async with await session.open("/ls/local/svc/leader", write=True, lock=True,
                                      create="file") as h:
            seq = await h.acquire()
            await h.set_contents(b"me")

A session is created at the master and kept alive by a background task
(one long-poll KeepAlive always outstanding); a `Handle` names one open node.

KeepAlive replies carry the master's invalidations and events, numbered per
session; the session processes them (drops cache entries, awaits the
`on_invalidate` hook, queues events) before its next KeepAlive acknowledges
them. Reads through a handle are served from the session's consistent cache
when it holds the node and the local lease is valid (see `cache_core.py`);
in jeopardy the cache is emptied and calls wait for the session to be safe
again or expire. A master fail-over is hidden: the session, its handles and
locks continue; the cache is emptied and a `MasterFailover` event warns
that events may have been lost.

Every request names the master epoch the session last heard of. A new
master refuses one naming an older epoch (`stale_epoch`) until the session
has heard of the fail-over; the call then waits for the KeepAlive that
brings it and is sent again. The KeepAlive that acknowledges a fail-over
lists the handles the session holds, which re-creates them at the new
master; a closed handle is never listed, so it never comes back.

Every mutating call carries a request number, the same on every attempt,
and the cell applies each number at most once (`session_requests.py`). So
every call is retried after an ambiguous outcome (a timeout, a lost
connection), writes and lock calls included: a retry is answered with the
first attempt's result if that was applied, and an attempt held somewhere
can never be applied after the session has moved on. `create_session`
carries a nonce for the same reason.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import trio

from chubbyfs.cell.config import load_cells_file
from chubbyfs.wire.cell_protocol import ITEM_INVALIDATE, NUMBERED_OPS, STALE_EPOCH, Stat

from chubbyfs._trio_util import single_errors

from .cache_core import ABSENT, ClientCache, DirEntry
from .connection import CellConnection, CellError
from .events import Event, EventKind, EventQueue, MasterFailover, make_event
from .session_core import DEFAULT_GRACE_MS, RequestNumbers, SessionLeaseCore, SessionState, StateChange

__all__ = ["ABSENT", "DirEntry", "Event", "EventKind", "Handle", "Session", "SessionExpiredError",
           "SessionState", "StateChange", "open_session"]

log = logging.getLogger(__name__)

INTENT_READ, INTENT_WRITE, INTENT_LOCK, INTENT_CHANGE_ACL = 1, 2, 4, 8
_CREATE = {None: 0, "file": 1, "directory": 2}


class SessionExpiredError(CellError):
    """The session ended (lease ran out or it was closed); its handles are gone."""


def cell_of(path: str) -> str:
    """The cell named by a `/ls/<cell>/...` path."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "ls" or not parts[2]:
        raise ValueError(f"{path!r} is not a chubbyfs path: expected /ls/<cell>/...")
    return parts[2]


InvalidateHook = Callable[[str], "Awaitable[None] | None"]


class Session:
    """A Chubby session. Its state (safe / jeopardy / expired) follows the
    local lease; `state_changes()` lets the application hear it, e.g. to
    stop acting as primary before its lease is gone.

    `on_invalidate(path)` (sync or async) runs for every invalidation before
    it is acknowledged, `on_flush()` when the whole cache is dropped (fail-over,
    jeopardy): the mount's hooks for the kernel's caches."""

    def __init__(self, conn: CellConnection, session_id: int, lease_ms: int, *, lease_start: float,
                 grace_ms: int = DEFAULT_GRACE_MS, epoch: int = 0, cache: bool = True) -> None:
        self.conn = conn
        self.id = session_id
        self.lease_ms = lease_ms
        self.core = SessionLeaseCore(now_ms=lease_start * 1000, lease_ms=lease_ms, grace_ms=grace_ms)
        # trio.current_time()'s clock, asked directly where every cached read
        # asks it (the mount's cached opens): two calls fewer each time.
        self._clock = trio.lowlevel.current_clock()
        self._changed = trio.Event()
        self._history: list[StateChange] = []
        self.caching = cache
        self.cache = ClientCache()
        self.cache.start_epoch(epoch)
        self.on_invalidate: InvalidateHook | None = None
        self.on_flush: Callable[[], "Awaitable[None] | None"] | None = None
        self._handles: dict[int, Handle] = {}
        self._subscribers: list[EventQueue] = []
        self._epoch_changed = trio.Event()
        self._declare_handles = False  # a fail-over was processed: the next KeepAlive lists our handles
        self.requests = RequestNumbers()

    @property
    def epoch(self) -> int:
        """The master epoch this session last heard of (0: none yet)."""
        return self.cache.epoch

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
            if self.state != SessionState.SAFE:
                self.cache.clear()  # jeopardy: nothing may be served from cache
            if self.expired:
                for queue in [*self._subscribers, *(h._events for h in self._handles.values())]:
                    queue.close()
            self._history.extend(changes)
            self._changed.set()
            self._changed = trio.Event()
            if self.expired:
                self._epoch_changed.set()  # calls waiting for a new epoch fail now

    def events(self) -> EventQueue:
        """Every event of every handle of this session, and fail-overs, from
        now on (`async for event in session.events()`); ends on expiry."""
        queue = EventQueue()
        if self.expired:
            queue.close()
        self._subscribers.append(queue)
        return queue

    def lookup_cached(self, path: str) -> Stat | object | None:
        """From the cache only: the node's Stat, `ABSENT` if the name is known
        not to exist (its directory's listing is cached), or None if unknown
        or the cache may not be used now."""
        if not self._cache_usable():
            return None
        return self.cache.lookup(path)

    def cached_contents(self, path: str) -> tuple[bytes, Stat] | None:
        """From the cache only: a file's contents and stat, or None."""
        if not self._cache_usable():
            return None
        return self.cache.get_contents(path)

    def _cache_usable(self) -> bool:
        return self.caching and self.core.cache_usable(self._clock.current_time() * 1000)

    def _install(self, reply: dict, install: Callable[[str, int, int], bool]) -> None:
        """Install a read reply if the master said cacheable and we still may."""
        if reply.get("cacheable") is True and self._cache_usable():
            install(reply["cache_path"], reply["epoch"], reply["seq"])

    async def _call(self, op: str, *, idempotent: bool, **args: Any) -> Any:
        return (await self._call_reply(op, idempotent=idempotent, **args))["value"]

    async def _call_reply(self, op: str, *, idempotent: bool, **args: Any) -> dict:
        if op not in NUMBERED_OPS:
            return await self._send(op, idempotent=idempotent, **args)
        request_no, answered_below = self.requests.begin()
        try:
            # Numbered: the cell applies it once however often it is sent.
            return await self._send(op, idempotent=True, request_no=request_no,
                                    answered_below=answered_below, **args)
        finally:
            self.requests.end(request_no)

    async def _send(self, op: str, *, idempotent: bool, **args: Any) -> dict:
        # In jeopardy calls wait: they go on once a master renews the lease,
        # or fail when the grace period ends (Chubby §2.8).
        while True:
            while self.state == SessionState.JEOPARDY and op != "keep_alive":
                await self._changed.wait()
            if self.expired:
                raise SessionExpiredError("session_expired", f"session {self.id} has ended")
            epoch = self.epoch
            if epoch and op != "keep_alive":
                args["epoch"] = epoch
            try:
                return await self.conn.call(op, idempotent=idempotent, session_id=self.id, **args)
            except CellError as exc:
                if exc.code == "session_expired":
                    self.core.master_says_expired(trio.current_time() * 1000)
                    self._publish()
                    raise SessionExpiredError(exc.code, exc.message) from None
                if exc.code != STALE_EPOCH:
                    raise
            # A newer master that we have not heard from yet refused the call
            # unexecuted: wait for our KeepAlive to bring its fail-over, then
            # send the call again.
            while self.epoch == epoch and not self.expired:
                await self._epoch_changed.wait()

    async def open(self, path: str, *, read: bool = True, write: bool = False, lock: bool = False,
                   change_acl: bool = False, create: Literal["file", "directory"] | None = None,
                   exclusive: bool = False, ephemeral: bool = False, contents: bytes = b"",
                   acl: tuple[str, str, str] | None = None, events: int | EventKind = 0,
                   lock_delay_ms: int | None = None) -> Handle:
        """Open (and with `create`, create) the node at `path`; `events` is the
        EventKind mask this handle's `events()` delivers. Opening a name the
        cache knows to be absent fails at once with `not_found`."""
        if create is None and self._cache_usable() and self.cache.lookup(path) is ABSENT:
            raise CellError("not_found", f"{path} does not exist (cached)")
        intent = ((INTENT_READ if read else 0) | (INTENT_WRITE if write else 0)
                  | (INTENT_LOCK if lock else 0) | (INTENT_CHANGE_ACL if change_acl else 0))
        args: dict[str, Any] = {"path": path, "intent": intent, "create": _CREATE[create],
                                "exclusive": exclusive, "ephemeral": ephemeral, "contents": contents,
                                "events": int(events) & ~int(EventKind.MASTER_FAILOVER)}
        if acl is not None:
            args["acl"] = list(acl)
        if lock_delay_ms is not None:
            args["lock_delay_ms"] = lock_delay_ms
        value = await self._call("open", idempotent=True, **args)
        handle = Handle(self, path, value["handle"], Stat.from_wire(value["stat"]), value["created"])
        self._handles[handle.id] = handle
        return handle

    async def rename(self, src_path: str, dst_path: str) -> Stat:
        return Stat.from_wire(await self._call("rename", idempotent=True, src_path=src_path, dst_path=dst_path))

    async def check_sequencer(self, sequencer: str) -> tuple[bool, str]:
        value = (await self.conn.call("check_sequencer", sequencer=sequencer))["value"]
        return value["valid"], value["reason"]

    async def keep_alive_forever(self) -> None:
        """One KeepAlive always outstanding (the master holds it until shortly
        before the lease ends, or until it has something for us), and a timer
        that moves the session into jeopardy and expiry when the local lease
        and grace period run out. Each KeepAlive acknowledges every item
        processed so far."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lease_timer)
            while not self.expired:
                sent_at = trio.current_time()
                safe = self.state == SessionState.SAFE
                # A reply later than the local lease is no use; a master that
                # stopped answering (SIGSTOP, a partition) must not keep us
                # waiting on its connection while another master takes over.
                if safe:
                    attempt_s = max(0.2, self.core.local_lease_end_ms / 1000 - sent_at)
                else:
                    attempt_s = max(0.2, self.lease_ms / 4000)
                declare = self._declare_handles
                extra: dict[str, Any] = {"handles": sorted(self._handles)} if declare else {}
                try:
                    reply = await self._call_reply("keep_alive", idempotent=True, hold=safe,
                                                   ack=self.cache.last_seq, ack_epoch=self.cache.epoch,
                                                   timeout_s=attempt_s, **extra)
                except SessionExpiredError:
                    break
                except CellError as exc:
                    if exc.code in ("unavailable", "timeout"):
                        await self.conn.reset()
                    await trio.sleep(0.05)  # no master yet; the timer decides our fate
                    continue
                value = reply["value"]
                if value.get("epoch", 0) < self.cache.epoch:
                    # A deposed master's late reply: its items are an older
                    # epoch's, already superseded. Ask again (elsewhere).
                    continue
                if declare and value.get("epoch") == self.cache.epoch:
                    self._declare_handles = False
                await self._process_items(value.get("epoch", 0), value.get("items", ()))
                self.core.keep_alive_succeeded(sent_at_ms=sent_at * 1000,
                                               lease_ms=value["held_ms"] + value["lease_ms"],
                                               now_ms=trio.current_time() * 1000)
                self._publish()
            nursery.cancel_scope.cancel()

    async def _process_items(self, epoch: int, items: Any) -> None:
        """Apply a KeepAlive reply's items, in order, each once; what they
        drop from the cache is dropped (and the hooks have run) before the
        next KeepAlive acknowledges them."""
        if self.cache.start_epoch(epoch):
            await self._run_hook(self.on_flush)
            self._epoch_changed.set()
            self._epoch_changed = trio.Event()
        for seq, kind, handle_id, path, name in items:
            if not self.cache.is_new(seq):
                continue  # a reply re-sent after a lost one
            self.cache.apply_item(seq, kind, path)
            if kind == ITEM_INVALIDATE:
                await self._run_hook(self.on_invalidate, path)
                continue
            event = make_event(seq, kind, handle_id, path, name)
            if isinstance(event, MasterFailover):
                await self._run_hook(self.on_flush)
                self._declare_handles = True
                targets = list(self._handles.values())
            else:
                handle = self._handles.get(handle_id)
                targets = [] if handle is None else [handle]
            for handle in targets:
                handle._events.put(event)
            for queue in self._subscribers:
                queue.put(event)
        self._subscribers = [q for q in self._subscribers if not q.closed]

    async def _run_hook(self, hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - a faulty hook must not stop the session
            log.exception("cache hook %r failed", hook)

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
            # Once EndSession is on its way the master stops counting us as
            # a cacher (writes go on without our ack): serve nothing more.
            self.caching = False
            self.cache.clear()
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
        self.id: int = ref[0]
        self.instance: int = ref[2]
        self._node_path = stat.path  # where the node is now (a rename moves it)
        self._events = EventQueue()
        self._poisoned = False

    def events(self) -> EventQueue:
        """This handle's events (the kinds it subscribed to at open, plus
        fail-overs), in order, once each: `async for event in h.events()`."""
        return self._events

    def poison(self) -> None:
        """Outstanding and future calls on the handle fail; it stays open."""
        self._poisoned = True

    async def _call(self, op: str, **args: Any) -> Any:
        return (await self._call_reply(op, **args))["value"]

    async def _call_reply(self, op: str, **args: Any) -> dict:
        """Every handle call may be retried: reads change nothing, and the
        others are numbered (applied once however often they are sent)."""
        if self.closed:
            raise CellError("bad_handle", f"handle on {self.path} is closed")
        if self._poisoned and op != "close":
            raise CellError("cancelled", f"handle on {self.path} is poisoned")
        reply = await self.session._call_reply(op, idempotent=True, handle=self.ref, **args)
        if self._poisoned and op != "close":
            raise CellError("cancelled", f"handle on {self.path} is poisoned")
        return reply

    def _cached(self, lookup: Callable[[ClientCache], Any]) -> Any:
        if self.closed or self._poisoned or not self.session._cache_usable():
            return None
        return lookup(self.session.cache)

    async def get_contents_and_stat(self) -> tuple[bytes, Stat]:
        hit = self._cached(lambda cache: cache.get_contents(self._node_path, self.instance))
        if hit is not None:
            self.stat = hit[1]
            return hit
        reply = await self._call_reply("get_contents_and_stat", cache=self.session.caching)
        value = reply["value"]
        contents, stat = value["contents"], Stat.from_wire(value["stat"])
        self.session._install(reply, lambda path, epoch, seq: self.session.cache.put_contents(
            path, contents, stat, epoch=epoch, seq=seq))
        self.stat, self._node_path = stat, stat.path
        return contents, stat

    async def get_stat(self) -> Stat:
        hit = self._cached(lambda cache: cache.get_stat(self._node_path, self.instance))
        if hit is not None:
            self.stat = hit
            return hit
        reply = await self._call_reply("get_stat", cache=self.session.caching)
        stat = Stat.from_wire(reply["value"])
        self.session._install(reply, lambda path, epoch, seq: self.session.cache.put_stat(
            path, stat, epoch=epoch, seq=seq))
        self.stat, self._node_path = stat, stat.path
        return stat

    async def read_dir(self) -> list[DirEntry]:
        hit = self._cached(lambda cache: cache.get_listing(self._node_path, self.instance))
        if hit is not None:
            return list(hit)
        reply = await self._call_reply("read_dir", cache=self.session.caching)
        entries = tuple(DirEntry(e["name"], Stat.from_wire(e["stat"])) for e in reply["value"]["entries"])
        self.session._install(reply, lambda path, epoch, seq: self.session.cache.put_listing(
            path, self.instance, entries, epoch=epoch, seq=seq))
        if reply.get("cache_path"):
            self._node_path = reply["cache_path"]
        return list(entries)

    async def set_contents(self, contents: bytes, *, expected_generation: int | None = None) -> Stat:
        args: dict[str, Any] = {"contents": contents}
        if expected_generation is not None:
            args["expected_generation"] = expected_generation
        self.stat = Stat.from_wire(await self._call("set_contents", **args))
        return self.stat

    async def set_acl(self, read: str, write: str, change_acl: str) -> Stat:
        self.stat = Stat.from_wire(await self._call("set_acl", read=read, write=write,
                                                    change_acl=change_acl))
        return self.stat

    async def delete(self) -> None:
        await self._call("delete")

    async def acquire(self, mode: str = "exclusive") -> str:
        """Block until the lock is held; return its sequencer."""
        return (await self._call("acquire", mode=mode))["sequencer"]

    async def try_acquire(self, mode: str = "exclusive") -> str | None:
        """The sequencer if the lock was free, else None."""
        try:
            return (await self._call("try_acquire", mode=mode))["sequencer"]
        except CellError as exc:
            if exc.code == "lock_held":
                return None
            raise

    async def release(self) -> None:
        await self._call("release")

    async def get_sequencer(self) -> str:
        return (await self._call("get_sequencer"))["sequencer"]

    async def set_sequencer(self, sequencer: str) -> None:
        await self._call("set_sequencer", sequencer=sequencer)

    async def close(self) -> None:
        if not self.closed and not self.session.expired:
            await self._call("close")
        self.closed = True
        self._events.close()
        self.session._handles.pop(self.id, None)

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
                       principal: str | None = None, call_timeout_s: float = 15.0,
                       cache: bool = True) -> AsyncIterator[Session]:
    """Connect to `cell`, create a session, keep it alive until the block ends.
    With `cache=False` reads always go to the master."""
    addresses = addresses or resolve_cell(cell, cells_file)
    with single_errors():
        async with trio.open_nursery() as nursery:
            conn = CellConnection(addresses, nursery, cell=cell, principal=principal,
                                  call_timeout_s=call_timeout_s)
            try:
                sent_at = trio.current_time()
                # The same nonce on every attempt: a retry finds the session
                # its first attempt created instead of making another.
                nonce = secrets.randbits(64) or 1
                value = (await conn.call("create_session", idempotent=True, nonce=nonce))["value"]
                session = Session(conn, value["session_id"], value["lease_ms"], lease_start=sent_at,
                                  epoch=value.get("epoch", 0), cache=cache)
                nursery.start_soon(session.keep_alive_forever)
                try:
                    yield session
                finally:
                    with trio.CancelScope(shield=True):
                        await session.close()
            finally:
                await conn.aclose()
                nursery.cancel_scope.cancel()
