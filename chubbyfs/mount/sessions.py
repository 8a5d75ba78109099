"""One client session per (cell, user), opened lazily, and cached read handles.

The mount acts for the user of each request, so each (cell, principal) pair
gets its own `chubbyfs.client` session, created on first use and ended when
the mount ends (ending a session releases its locks at once instead of
after the lock-delay). A session that expired is replaced on the next use;
everything opened through it stays dead (ESTALE).

`ReadHandles` keeps read-only handles on the paths the kernel asks about
(lookups list the parent directory, getattr stats the node), so walking a
path costs reads served by the master, not Open/Close log writes. A cached
handle follows its node: if the node was renamed or deleted, the handle is
dropped and the path opened again. An invalidation of a path only makes its
handle suspect: before its next use one GetStat (a read) checks that it is
still open on the node at that path. Dropping it instead cost a Close and an
Open (two log writes) per invalidation, and a file written through the
mount invalidates its directory too: two of the five log writes of every
write+close. Read-only opens borrow these handles too
(an open of a cached file then costs no round trip); a borrowed handle is
closed only once its last borrower gives it back.

The pool wires each session to a `SessionListener` (the FUSE operations):
the library's invalidations and cache flushes, each handle's events, and
the session's state changes (jeopardy, expiry), so that the kernel's caches
follow the session's consistent cache and poll() sleepers wake.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import trio

from chubbyfs.client.connection import CellError
from chubbyfs.client.events import Event, EventKind
from chubbyfs.client.session import DirEntry, Handle, Session, SessionState, open_session
from chubbyfs.wire.cell_protocol import Stat

log = logging.getLogger("chubbyfs.mount")

_RETRY_CODES = {"stale_handle", "bad_handle"}
# What open files (and the read handles they borrow) subscribe to: poll()
# wakes on a change of contents or the node's deletion.
FILE_EVENTS = EventKind.CONTENTS_MODIFIED | EventKind.HANDLE_INVALID


class SessionListener(Protocol):
    async def on_invalidate(self, cell: str, path: str) -> None:
        """Awaited before the session acknowledges the invalidation."""

    async def on_flush(self, cell: str) -> None:
        """The session's whole cache was dropped (fail-over, jeopardy, expiry)."""

    def on_handle_event(self, handle: Handle, event: Event) -> None:
        """An event delivered to `handle` (a node it is open on changed)."""

    async def on_session_state(self, us: UserSession, state: SessionState) -> None:
        """The session went to `state` (after its cache was dropped)."""


class ReadHandles:
    def __init__(self, session: Session, nursery: trio.Nursery, capacity: int = 128, *,
                 events: int = 0, watch: Callable[[Handle], None] | None = None) -> None:
        self.session = session
        self._nursery = nursery
        self.capacity = capacity
        self._events = events
        self._watch = watch
        self._handles: OrderedDict[str, Handle] = OrderedDict()
        self._borrowers: dict[int, int] = {}  # handle id -> open files using it
        self._retired: set[int] = set()  # borrowed handles to close at their last give-back
        self._suspect: set[str] = set()  # paths invalidated since their handle was checked

    async def _get(self, path: str) -> Handle:
        handle = self._handles.get(path)
        while handle is not None and path in self._suspect:
            await self._check(path, handle)
            handle = self._handles.get(path)  # the same, or gone, or another task's
        if handle is not None:
            self._handles.move_to_end(path)
            return handle
        handle = await self.session.open(path, read=True, events=self._events)
        if path in self._handles:  # another task opened it meanwhile
            await self._close(handle)
            return await self._get(path)
        self._handles[path] = handle
        self._suspect.discard(path)
        if self._watch is not None:
            self._watch(handle)
        while len(self._handles) > self.capacity:
            old_path, old = self._handles.popitem(last=False)
            self._suspect.discard(old_path)
            self._retire(old)
        return handle

    def _retire(self, handle: Handle) -> None:
        """Close a handle no longer cached, once nobody borrows it."""
        if self._borrowers.get(handle.id):
            self._retired.add(handle.id)
        else:
            self._nursery.start_soon(self._close, handle)

    async def borrow(self, path: str) -> Handle:
        """A read handle on `path` for an open file; give it back at release."""
        return self._lend(await self._get(path))

    def borrow_cached(self, path: str) -> Handle | None:
        """`borrow`, if a handle on `path` is at hand (no waiting); else None."""
        handle = self._handles.get(path)
        if handle is None or path in self._suspect:
            return None
        self._handles.move_to_end(path)
        self._borrowers[handle.id] = self._borrowers.get(handle.id, 0) + 1  # _lend, inline: every cached open
        return handle

    def _lend(self, handle: Handle) -> Handle:
        self._borrowers[handle.id] = self._borrowers.get(handle.id, 0) + 1
        return handle

    def give_back(self, handle: Handle) -> None:
        left = self._borrowers.get(handle.id, 0) - 1
        if left > 0:
            self._borrowers[handle.id] = left
            return
        self._borrowers.pop(handle.id, None)
        if handle.id in self._retired:
            self._retired.discard(handle.id)
            self._nursery.start_soon(self._close, handle)
        elif handle.stat.ephemeral:
            self._forget(handle.path, handle)

    def assert_invariants(self) -> None:
        assert len(self._handles) <= self.capacity
        assert all(count > 0 for count in self._borrowers.values())
        assert self._retired <= set(self._borrowers), "a retired handle nobody borrows was not closed"
        assert all(h.path == path for path, h in self._handles.items())
        assert self._suspect <= set(self._handles), "a suspect path without a cached handle"

    async def _close(self, handle: Handle) -> None:
        with trio.CancelScope(shield=True):
            try:
                await handle.close()
            except CellError as exc:
                log.debug("closing cached handle on %s: %s", handle.path, exc)

    def drop(self, path: str, *, subtree: bool = False) -> None:
        """Forget cached handles on `path` (and below), closing them in the background."""
        doomed = [p for p in self._handles if p == path or (subtree and p.startswith(path + "/"))]
        for p in doomed:
            self._suspect.discard(p)
            self._retire(self._handles.pop(p))

    def suspect(self, path: str) -> None:
        """The master invalidated `path`: its node may be gone (deleted,
        renamed, replaced), so check the handle before its next use."""
        if path in self._handles:
            self._suspect.add(path)

    async def _check(self, path: str, handle: Handle) -> None:
        """Keep a suspect handle if it is still open on the node at `path`."""
        try:
            stat: Stat | None = await handle.get_stat()
        except CellError as exc:
            if exc.code not in _RETRY_CODES:
                raise
            stat = None
        if self._handles.get(path) is not handle:
            return  # replaced or dropped meanwhile
        if stat is None or stat.path != path:
            self._forget(path, handle)
        else:
            self._suspect.discard(path)

    async def _with_retry(self, path: str, op: Any) -> Any:
        for attempt in (0, 1):
            handle = await self._get(path)
            try:
                result = await op(handle)
            except CellError as exc:
                if exc.code in _RETRY_CODES and attempt == 0:
                    self._forget(path, handle)
                    continue
                raise
            if result is not None:
                return result
            # The handle's node moved away from `path`: reopen once.
            self._forget(path, handle)
        raise CellError("not_found", f"{path} keeps moving")

    def _forget(self, path: str, handle: Handle) -> None:
        if self._handles.get(path) is handle:
            del self._handles[path]
            self._suspect.discard(path)
        self._retire(handle)

    def _release_if_ephemeral(self, path: str, handle: Handle, stat: Stat) -> None:
        # An ephemeral node lives while some handle is open: a cached read
        # handle would keep it alive after its owner closed it.
        if stat.ephemeral:
            self._forget(path, handle)

    async def stat(self, path: str) -> Stat:
        async def op(h: Handle) -> Stat | None:
            stat = await h.get_stat()
            if stat.path != path:
                return None
            self._release_if_ephemeral(path, h, stat)
            return stat
        return await self._with_retry(path, op)

    async def contents(self, path: str) -> bytes:
        """A file's contents: a cacheable read, so they enter the session's
        consistent cache (the mount's ACL check reads ACL files so)."""
        async def op(h: Handle) -> bytes | None:
            contents, stat = await h.get_contents_and_stat()
            if stat.path != path:
                return None
            self._release_if_ephemeral(path, h, stat)
            return contents
        return await self._with_retry(path, op)

    async def list(self, path: str) -> list[DirEntry]:
        async def op(h: Handle) -> list[DirEntry] | None:
            entries = await h.read_dir()
            if entries and not entries[0].stat.path.startswith(path + "/"):
                return None
            stat = h.stat if entries else await h.get_stat()
            if stat.path != path:
                return None
            self._release_if_ephemeral(path, h, stat)
            return entries
        return await self._with_retry(path, op)


class UserSession:
    """A session and its read handles, for one principal in one cell."""

    def __init__(self, cell: str, principal: str, session: Session, nursery: trio.Nursery,
                 listener: SessionListener | None = None) -> None:
        self.cell = cell
        self.principal = principal
        self.session = session
        self.listener = listener
        self._nursery = nursery
        self.reads = ReadHandles(session, nursery, events=FILE_EVENTS, watch=self.watch)
        self.stop = trio.Event()
        self.done = trio.Event()

    def watch(self, handle: Handle) -> None:
        """Hand `handle`'s events to the listener until the handle closes."""
        if self.listener is not None:
            self._nursery.start_soon(self._follow, handle)

    async def _follow(self, handle: Handle) -> None:
        assert self.listener is not None
        async for event in handle.events():
            self.listener.on_handle_event(handle, event)

    @property
    def expired(self) -> bool:
        return self.session.expired

    def master_address(self) -> str | None:
        return self.session.conn.master_address


class SessionPool:
    def __init__(self, nursery: trio.Nursery, cells: dict[str, list[str]], *,
                 call_timeout_s: float = 15.0) -> None:
        self._nursery = nursery
        self.cells = cells
        self.call_timeout_s = call_timeout_s
        self._sessions: dict[tuple[str, str], UserSession] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._closing = False
        self.listener: SessionListener | None = None  # set by the operations

    def peek(self, cell: str, principal: str) -> UserSession | None:
        return self._sessions.get((cell, principal))

    def all(self) -> list[UserSession]:
        return list(self._sessions.values())

    async def get(self, cell: str, principal: str) -> UserSession:
        key = (cell, principal)
        us = self._sessions.get(key)
        if us is not None and not us.expired:
            return us
        if self._closing:
            raise CellError("session_expired", "the mount is shutting down")
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            us = self._sessions.get(key)
            if us is not None and not us.expired:
                return us
            if us is not None:
                log.warning("session %d of %s in cell %s expired; opening a new one",
                            us.session.id, principal, cell)
                us.stop.set()
            us = await self._nursery.start(self._run, cell, principal)
            self._sessions[key] = us
            return us

    async def _run(self, cell: str, principal: str, *,
                   task_status: trio.TaskStatus[UserSession] = trio.TASK_STATUS_IGNORED) -> None:
        us: UserSession | None = None
        try:
            async with open_session(cell, addresses=self.cells[cell], principal=principal,
                                    call_timeout_s=self.call_timeout_s) as session:
                async with trio.open_nursery() as handles_nursery:
                    us = UserSession(cell, principal, session, handles_nursery, self.listener)
                    if self.listener is not None:
                        session.on_invalidate = functools.partial(self.listener.on_invalidate, cell)
                        session.on_flush = functools.partial(self.listener.on_flush, cell)
                        # In the pool's nursery: it must see the expiry that
                        # ends this block.
                        self._nursery.start_soon(self._follow_state, us, self.listener)
                    log.info("session %d for %s in cell %s", session.id, principal, cell)
                    task_status.started(us)
                    while not session.expired:
                        with trio.move_on_after(0.25):
                            await us.stop.wait()
                        if us.stop.is_set():
                            break
                    if session.expired:
                        log.warning("session %d of %s in cell %s has expired", session.id, principal, cell)
                    handles_nursery.cancel_scope.cancel()
        finally:
            if us is not None:
                us.done.set()

    async def _follow_state(self, us: UserSession, listener: SessionListener) -> None:
        async for change in us.session.state_changes():
            await listener.on_session_state(us, change.state)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """End every session (their locks are released at once); give up
        waiting for the cell after `timeout_s` (the leases then run out)."""
        self._closing = True
        for us in self._sessions.values():
            us.stop.set()
        with trio.move_on_after(timeout_s):
            for us in self._sessions.values():
                await us.done.wait()
