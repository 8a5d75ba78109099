"""Which requests are in flight, and which interrupts are waiting for them.

The session registers every request it dispatches here, with an opaque
handle (its cancel scope). An INTERRUPT either names a request in flight
(return its handle so the session can cancel it) or one we have not seen:
that cannot happen with our single reader, but may after a reply raced the
interrupt, so we remember it for a short while instead of answering EAGAIN
at once (the kernel would re-send it within microseconds, a busy loop). A
request arriving while its interrupt is remembered is cancelled at once;
when the memory expires the session answers EAGAIN, which the kernel either
re-queues (request still pending) or rejects with ENOENT (already answered).

Pure: time comes in as `now_s` arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

H = TypeVar("H")

INTERRUPT_BIT = 1  # an INTERRUPT's own unique is its target's with bit 0 set


@dataclass(frozen=True, slots=True)
class InflightStats:
    in_flight: int
    remembered_interrupts: int
    interrupts_delivered: int
    interrupts_expired: int


class InflightTable(Generic[H]):
    def __init__(self, memory_s: float, max_remembered: int = 1024) -> None:
        if memory_s <= 0 or max_remembered <= 0:
            raise ValueError("memory_s and max_remembered must be positive")
        self._memory_s = memory_s
        self._max_remembered = max_remembered
        self._running: dict[int, H] = {}
        # target unique -> expiry time, oldest first
        self._early: OrderedDict[int, float] = OrderedDict()
        self._delivered = 0
        self._expired = 0

    def begin(self, unique: int, handle: H) -> bool:
        """Register a request. True if an interrupt for it was already waiting:
        the caller must cancel it straight away."""
        if unique & INTERRUPT_BIT:
            raise ValueError(f"request uniques are even, got {unique}")
        if unique in self._running:
            raise ValueError(f"request {unique} is already in flight")
        self._running[unique] = handle
        if self._early.pop(unique, None) is not None:
            self._delivered += 1
            return True
        return False

    def end(self, unique: int) -> None:
        if self._running.pop(unique, None) is None:
            raise ValueError(f"request {unique} is not in flight")

    def interrupt(self, target: int, now_s: float) -> H | None:
        """The handle to cancel, or None if the target is unknown (remembered)."""
        handle = self._running.get(target)
        if handle is not None:
            self._delivered += 1
            return handle
        self._early.pop(target, None)
        self._early[target] = now_s + self._memory_s
        while len(self._early) > self._max_remembered:
            self._early.popitem(last=False)
            self._expired += 1
        return None

    def expire(self, now_s: float) -> list[int]:
        """Forget interrupts older than the memory; returns their own uniques
        (target | 1), which the session answers with EAGAIN."""
        gone = [t for t, deadline in self._early.items() if deadline <= now_s]
        for target in gone:
            del self._early[target]
        self._expired += len(gone)
        return [t | INTERRUPT_BIT for t in gone]

    def next_expiry_s(self) -> float | None:
        return min(self._early.values(), default=None)

    def is_running(self, unique: int) -> bool:
        return unique in self._running

    def __len__(self) -> int:
        return len(self._running)

    def statistics(self) -> InflightStats:
        return InflightStats(len(self._running), len(self._early), self._delivered,
                             self._expired)

    def assert_invariants(self) -> None:
        assert not (self._running.keys() & self._early.keys()), "interrupt kept for a running request"
        assert len(self._early) <= self._max_remembered
        assert all(u & INTERRUPT_BIT == 0 for u in self._running), "odd unique registered"
