"""Typed events as the application sees them, and the queue they wait in.

The master sends events on KeepAlive replies, each with the session's
sequence number; the session drops any it has seen (a re-sent reply), so an
application gets every event once, in the order the cell applied the changes,
and only after the change took place. `MasterFailover` (not subscribed to:
every handle and `Session.events()` get it) warns that events may have been
lost and that cached data was dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

from chubbyfs.wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_MASTER_FAILOVER, EventKind


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `path` is the node the handle is open on; `name` the child
    for the CHILD_* kinds; `handle_id` 0 for session-wide events."""

    kind: EventKind
    path: str = ""
    name: str = ""
    handle_id: int = 0
    seq: int = 0


class ContentsModified(Event):
    __slots__ = ()


class ChildAdded(Event):
    __slots__ = ()


class ChildRemoved(Event):
    __slots__ = ()


class ChildModified(Event):
    __slots__ = ()


class HandleInvalid(Event):
    __slots__ = ()


class LockAcquired(Event):
    __slots__ = ()


class ConflictingLock(Event):
    __slots__ = ()


class MasterFailover(Event):
    """A new master (or a backlog the master had to drop): events may have
    been lost and the cache was emptied; re-read what matters."""

    __slots__ = ()


_CLASSES: dict[int, type[Event]] = {
    EventKind.CONTENTS_MODIFIED: ContentsModified, EventKind.CHILD_ADDED: ChildAdded,
    EventKind.CHILD_REMOVED: ChildRemoved, EventKind.CHILD_MODIFIED: ChildModified,
    EventKind.HANDLE_INVALID: HandleInvalid, EventKind.LOCK_ACQUIRED: LockAcquired,
    EventKind.CONFLICTING_LOCK: ConflictingLock, ITEM_MASTER_FAILOVER: MasterFailover,
    ITEM_EVENTS_LOST: MasterFailover,
}


def make_event(seq: int, kind: int, handle_id: int, path: str, name: str) -> Event:
    """The typed event for one KeepAlive item (not an invalidation)."""
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind}")
    typed_kind = EventKind.MASTER_FAILOVER if kind == ITEM_EVENTS_LOST else EventKind(kind)
    return cls(typed_kind, path, name, handle_id, seq)


class EventQueue:
    """An unbounded FIFO one consumer drains with `async for`; closing it
    ends the iteration once the queued events are taken."""

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._changed = trio.Event()
        self.closed = False

    def put(self, event: Event) -> None:
        if not self.closed:
            self._items.append(event)
            self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def __len__(self) -> int:
        return len(self._items)

    def __aiter__(self) -> EventQueue:
        return self

    async def __anext__(self) -> Event:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._changed = trio.Event()
            await self._changed.wait()
        return self._items.popleft()
