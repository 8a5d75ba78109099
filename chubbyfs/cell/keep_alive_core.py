"""The master's KeepAlive bookkeeping as pure data structures (no trio, no clock).

A KeepAlive is a long poll: the master holds it until shortly before the
session's lease ends (or until it has something for the session), then
replicates a lease extension and answers. With ten thousand sessions that is
over a thousand KeepAlives a second, so none of them gets a task, a cancel
scope or an event of its own: each is one `PendingKeepAlive` that moves
through two structures and is answered by calling its `reply_to`:

- `HeldKeepAlives`: parked until their time (a heap) or an earlier wakeup
  (at most one per session);
- `LeaseBatch`: lease extensions gathered for one ExtendLeases entry; the
  KeepAlives that wait for it are answered once it has been applied.

The master's trio shell (`master.py`) feeds in times and drives one timer
task; the replica hands in requests straight from a connection's read loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, Protocol

ReplyTo = Callable[[Any, BaseException | None], None]


class Link(Protocol):
    """Where a KeepAlive came from (a client connection): once `closed`,
    nobody waits for the answer."""

    closed: bool


class PendingKeepAlive:
    """One KeepAlive the master has not answered yet."""

    __slots__ = ("session_id", "hold", "acks", "received_ms", "lease_end_ms", "_reply_to", "_link")

    def __init__(self, session_id: int, *, hold: bool, acks: bool, received_ms: int, reply_to: ReplyTo,
                 link: Link | None = None) -> None:
        self.session_id = session_id
        self.hold = hold
        self.acks = acks  # the client acknowledges items (else delivering them counts as processed)
        self.received_ms = received_ms
        self.lease_end_ms = 0  # the extension it waits for, once in a LeaseBatch
        self._reply_to: ReplyTo | None = reply_to
        self._link = link

    @property
    def answered(self) -> bool:
        return self._reply_to is None

    @property
    def abandoned(self) -> bool:
        """Its client went away (the connection closed, the call was
        cancelled): it must not extend the lease any more."""
        return self._link is not None and self._link.closed

    def answer(self, value: Any, error: BaseException | None = None) -> bool:
        """Reply once; a later answer (the step-down one racing a batch's
        apply, say) is dropped. False if it had been answered already."""
        reply_to, self._reply_to = self._reply_to, None
        if reply_to is None:
            return False
        reply_to(value, error)
        return True


class HeldKeepAlives:
    """KeepAlives parked until `until_ms` or an earlier `wake`, one per session."""

    def __init__(self) -> None:
        # (until_ms, n, ka); entries whose ka was woken or displaced stay
        # behind and are skipped when they surface (no search on wake).
        self._heap: list[tuple[int, int, PendingKeepAlive]] = []
        self._by_session: dict[int, PendingKeepAlive] = {}
        self._n = 0

    def __len__(self) -> int:
        return len(self._by_session)

    def hold(self, ka: PendingKeepAlive, until_ms: int) -> PendingKeepAlive | None:
        """Park `ka`. Returns the session's KeepAlive parked before, if any:
        no longer held (the client has moved on to a new one), it is the
        caller's to answer now."""
        previous = self._by_session.get(ka.session_id)
        self._by_session[ka.session_id] = ka
        self._n += 1
        heapq.heappush(self._heap, (until_ms, self._n, ka))
        return previous

    def wake(self, session_id: int) -> PendingKeepAlive | None:
        """Take the session's parked KeepAlive out early (it has items to deliver)."""
        return self._by_session.pop(session_id, None)

    def due(self, now_ms: int, limit: int) -> list[PendingKeepAlive]:
        """Take out up to `limit` KeepAlives whose time has come, earliest first."""
        heap, parked, out = self._heap, self._by_session, []
        while heap and heap[0][0] <= now_ms and len(out) < limit:
            ka = heapq.heappop(heap)[2]
            if parked.get(ka.session_id) is ka:
                del parked[ka.session_id]
                out.append(ka)
        return out

    def next_deadline_ms(self) -> int | None:
        heap, parked = self._heap, self._by_session
        while heap and parked.get(heap[0][2].session_id) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def drain(self) -> list[PendingKeepAlive]:
        """Take out everything (the master stepped down)."""
        out = list(self._by_session.values())
        self._by_session.clear()
        self._heap.clear()
        return out


class LeaseBatch:
    """Lease extensions and handle re-creations for one ExtendLeases entry.

    A batch opens with its first addition and is due `window_ms` later, or
    at once when it holds `max_sessions` leases (so that applying it, and
    answering its KeepAlives, stays a short step even after a fail-over,
    when every session renews together)."""

    def __init__(self, window_ms: int, max_sessions: int) -> None:
        if window_ms < 0 or max_sessions < 1:
            raise ValueError("window_ms must be non-negative and max_sessions positive")
        self.window_ms = window_ms
        self.max_sessions = max_sessions
        self.leases: dict[int, int] = {}  # session_id -> lease end to replicate
        self.renew: dict[int, int] = {}  # handle_id -> session_id
        self.waiting: list[PendingKeepAlive] = []
        self.due_ms: int | None = None

    def add(self, ka: PendingKeepAlive, lease_end_ms: int, now_ms: int) -> None:
        ka.lease_end_ms = lease_end_ms
        sid = ka.session_id
        if lease_end_ms > self.leases.get(sid, 0):
            self.leases[sid] = lease_end_ms
        self.waiting.append(ka)
        self._open(now_ms)

    def add_renewals(self, renew: dict[int, int], now_ms: int) -> None:
        if renew:
            self.renew.update(renew)
            self._open(now_ms)

    def _open(self, now_ms: int) -> None:
        if self.due_ms is None:
            self.due_ms = now_ms + self.window_ms

    def next_deadline_ms(self) -> int | None:
        """When the batch must be proposed (now, if it is full)."""
        if self.due_ms is not None and len(self.leases) >= self.max_sessions:
            return 0
        return self.due_ms

    def ready(self, now_ms: int) -> bool:
        return self.due_ms is not None and (now_ms >= self.due_ms or len(self.leases) >= self.max_sessions)

    def take(self) -> tuple[dict[int, int], dict[int, int], list[PendingKeepAlive]]:
        """Everything gathered, and start afresh."""
        taken = self.leases, self.renew, self.waiting
        self.leases, self.renew, self.waiting, self.due_ms = {}, {}, [], None
        return taken
