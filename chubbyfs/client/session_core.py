"""The client's session lease as a pure state table (no trio, no clock).

Chubby's client keeps a *local* lease that is never longer than the master's:
it counts from the moment the KeepAlive was *sent* (the reply may have been
delayed arbitrarily) and shortens it by the assumed clock-drift bound. While
the local lease holds the session is SAFE. When it runs out the session is in
JEOPARDY: the cache is emptied and disabled, calls wait, and a grace period
starts. A successful KeepAlive within the grace period makes it SAFE again
(the master, perhaps a new one, still has the session); otherwise, or as
soon as any master says the session is gone, it is EXPIRED for good.

The shell (`session.py`) feeds in times and replies and acts on what comes
out: state changes to announce, and when to send the next KeepAlive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_GRACE_MS = 45_000
# Local clocks may run this much faster than the master's over one lease:
# shrink the local lease by it so that it never outlives the master's.
DEFAULT_DRIFT_FRACTION = 0.01


class SessionState(enum.Enum):
    SAFE = "safe"
    JEOPARDY = "jeopardy"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class StateChange:
    state: SessionState
    at_ms: float
    reason: str


class SessionLeaseCore:
    def __init__(self, *, now_ms: float, lease_ms: int, grace_ms: int = DEFAULT_GRACE_MS,
                 drift_fraction: float = DEFAULT_DRIFT_FRACTION) -> None:
        if lease_ms <= 0 or grace_ms < 0:
            raise ValueError("lease_ms must be positive and grace_ms non-negative")
        self.grace_ms = grace_ms
        self.drift_fraction = drift_fraction
        self.state = SessionState.SAFE
        self.local_lease_end_ms = self._local_end(now_ms, lease_ms)
        self.grace_end_ms: float | None = None
        self._changes: list[StateChange] = []

    def _local_end(self, sent_at_ms: float, lease_ms: int) -> float:
        return sent_at_ms + lease_ms * (1 - self.drift_fraction)

    # ---- inputs --------------------------------------------------------------------

    def tick(self, now_ms: float) -> None:
        """Time passed; enter jeopardy or expire as the deadlines say."""
        if self.state == SessionState.SAFE and now_ms >= self.local_lease_end_ms:
            self.state = SessionState.JEOPARDY
            self.grace_end_ms = self.local_lease_end_ms + self.grace_ms
            self._changes.append(StateChange(SessionState.JEOPARDY, now_ms, "local lease ran out"))
        if self.state == SessionState.JEOPARDY and self.grace_end_ms is not None and now_ms >= self.grace_end_ms:
            self._expire(now_ms, "no master reached within the grace period")

    def keep_alive_succeeded(self, *, sent_at_ms: float, lease_ms: int, now_ms: float) -> None:
        """A master extended the lease by `lease_ms`, counted from our send time."""
        self.tick(now_ms)
        if self.state == SessionState.EXPIRED:
            return  # too late: the session may already be gone at the master
        new_end = self._local_end(sent_at_ms, lease_ms)
        if new_end > self.local_lease_end_ms:
            self.local_lease_end_ms = new_end
        if self.state == SessionState.JEOPARDY and now_ms < self.local_lease_end_ms:
            self.state = SessionState.SAFE
            self.grace_end_ms = None
            self._changes.append(StateChange(SessionState.SAFE, now_ms, "a master renewed the lease"))

    def master_says_expired(self, now_ms: float) -> None:
        self._expire(now_ms, "the master has no such session")

    def _expire(self, now_ms: float, reason: str) -> None:
        if self.state != SessionState.EXPIRED:
            self.state = SessionState.EXPIRED
            self.grace_end_ms = None
            self._changes.append(StateChange(SessionState.EXPIRED, now_ms, reason))

    # ---- outputs ---------------------------------------------------------------------

    def take_changes(self) -> list[StateChange]:
        changes, self._changes = self._changes, []
        return changes

    def cache_usable(self, now_ms: float) -> bool:
        """Only a SAFE session within its local lease may answer from cache."""
        return self.state == SessionState.SAFE and now_ms < self.local_lease_end_ms

    def next_deadline_ms(self) -> float | None:
        """When `tick` must next be called for a state change to be on time."""
        if self.state == SessionState.SAFE:
            return self.local_lease_end_ms
        if self.state == SessionState.JEOPARDY:
            return self.grace_end_ms
        return None

    def assert_invariants(self) -> None:
        assert (self.grace_end_ms is not None) == (self.state == SessionState.JEOPARDY)
        if self.grace_end_ms is not None:
            assert self.grace_end_ms >= self.local_lease_end_ms


class RequestNumbers:
    """A session's request numbers (`wire/cell_protocol.py`): one per call,
    the same for every attempt of it, so the cell applies a call at most once
    however often it is retried. `answered_below` is the lowest number still
    in flight: the cell may forget the results below it, and refuses any late
    attempt below it. A call that ends, even without a known outcome, stops
    holding the mark back: once the next call is applied, no attempt of it
    left behind at a master can be applied any more."""

    def __init__(self) -> None:
        self._next = 1
        self._in_flight: set[int] = set()

    def begin(self) -> tuple[int, int]:
        """(request_no, answered_below) for a new call."""
        number = self._next
        self._next += 1
        self._in_flight.add(number)
        return number, min(self._in_flight)

    def end(self, number: int) -> None:
        self._in_flight.discard(number)
