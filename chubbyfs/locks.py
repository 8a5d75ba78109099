"""Lock semantics in one place: modes, lock-delay bounds, sequencers, and the
per-node lock state used by the cell's state machine.

Shared by the cell (which decides grants) and the client library (which only
needs `LockMode`, the lock-delay bounds and `Sequencer`). Pure: no clock is
read here; every time is a stamped `now_ms` passed in by the caller.

Semantics (Chubby paper section 2.4, with this project's choices):

- A lock is held exclusively by one handle or shared by any number of handles.
- Grants are FIFO: while anyone waits, a new request queues behind them even
  if it would be compatible with the current holders, so a stream of shared
  requests cannot starve an exclusive waiter.
- An explicit release frees the lock at once. A holder whose session ends
  leaves the lock unavailable (to every mode) until `now_ms + lock_delay_ms`.
- The lock generation goes up each time the lock goes from free to held. The
  cell draws generations from one cell-wide counter, so they also keep rising
  across delete-and-recreate of the same name (a fencing server that only
  remembers "highest generation seen for this name" stays correct).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

DEFAULT_LOCK_DELAY_MS = 15_000
# The paper's bound: a faulty client cannot make a lock unavailable for longer.
MAX_LOCK_DELAY_MS = 60_000

_SEQUENCER_TAG = "chubbyseq1"


class LockMode(enum.IntEnum):
    EXCLUSIVE = 1
    SHARED = 2


class SequencerError(ValueError):
    """A sequencer string that is not well formed."""


class LockInvariantError(AssertionError):
    pass


@dataclass(frozen=True, slots=True)
class Sequencer:
    """The state of a lock right after a grant; opaque to its holder.

    Encoded as one printable line: ``chubbyseq1:<cell>:<X|S>:<instance>:<generation>:<path>``.
    The path goes last because it is the only field that may contain ':'.
    """

    cell: str
    path: str
    instance: int
    mode: LockMode
    lock_generation: int

    def encode(self) -> str:
        mode_letter = "X" if self.mode == LockMode.EXCLUSIVE else "S"
        return (f"{_SEQUENCER_TAG}:{self.cell}:{mode_letter}:{self.instance}:"
                f"{self.lock_generation}:{self.path}")

    @classmethod
    def decode(cls, text: str) -> Sequencer:
        if not isinstance(text, str):
            raise SequencerError(f"sequencer must be a string, not {type(text).__name__}")
        if not text.isprintable():
            raise SequencerError("sequencer contains non-printable characters")
        parts = text.split(":", 5)
        if len(parts) != 6 or parts[0] != _SEQUENCER_TAG:
            raise SequencerError(f"not a sequencer: {text[:80]!r}")
        _, cell, mode_letter, instance_text, generation_text, path = parts
        if mode_letter not in ("X", "S"):
            raise SequencerError(f"sequencer mode must be X or S, got {mode_letter!r}")
        if not (instance_text.isdigit() and generation_text.isdigit()):
            raise SequencerError("sequencer instance and generation must be decimal numbers")
        if not cell or not path.startswith(f"/ls/{cell}/"):
            raise SequencerError(f"sequencer path {path!r} is not inside cell {cell!r}")
        mode = LockMode.EXCLUSIVE if mode_letter == "X" else LockMode.SHARED
        return cls(cell, path, int(instance_text), mode, int(generation_text))


def check_lock_delay_ms(lock_delay_ms: int) -> None:
    """Raise ValueError unless 0 <= lock_delay_ms <= MAX_LOCK_DELAY_MS."""
    if isinstance(lock_delay_ms, bool) or not isinstance(lock_delay_ms, int):
        raise ValueError("lock_delay_ms must be an int")
    if not 0 <= lock_delay_ms <= MAX_LOCK_DELAY_MS:
        raise ValueError(f"lock_delay_ms must be within 0..{MAX_LOCK_DELAY_MS}, got {lock_delay_ms}")


class LockState:
    """The lock of one node instance: holders, FIFO waiters, lock-delay.

    Holders and waiters are handle ids. The caller keeps handles and sessions;
    this class only keeps the lock's own rules.
    """

    __slots__ = ("generation", "holders", "waiters", "delay_until_ms")

    def __init__(self) -> None:
        self.generation = 0
        self.holders: dict[int, LockMode] = {}
        self.waiters: deque[tuple[int, LockMode]] = deque()
        # Unavailable to everyone while now_ms < delay_until_ms (0: no delay).
        self.delay_until_ms = 0

    # -- queries ---------------------------------------------------------
    def is_free(self) -> bool:
        return not self.holders

    def held_mode(self) -> LockMode | None:
        if not self.holders:
            return None
        return next(iter(self.holders.values()))

    def in_delay(self, now_ms: int) -> bool:
        return now_ms < self.delay_until_ms

    def is_waiting(self, handle_id: int) -> bool:
        return any(h == handle_id for h, _ in self.waiters)

    def compatible(self, mode: LockMode) -> bool:
        if not self.holders:
            return True
        return mode == LockMode.SHARED and self.held_mode() == LockMode.SHARED

    def can_grant_now(self, mode: LockMode, now_ms: int) -> bool:
        """True if a new request (not yet queued) would be granted at once."""
        return not self.waiters and not self.in_delay(now_ms) and self.compatible(mode)

    def is_idle(self) -> bool:
        """No holders, no waiters, no pending delay: the state can be dropped."""
        return not self.holders and not self.waiters and self.delay_until_ms == 0

    # -- changes ---------------------------------------------------------
    def grant(self, handle_id: int, mode: LockMode, generation_if_free: int) -> int:
        """Make handle_id a holder; returns the lock generation it holds.

        `generation_if_free` is used only when the lock goes from free to held,
        and must then exceed the current generation.
        """
        if handle_id in self.holders:
            raise LockInvariantError(f"handle {handle_id} already holds the lock")
        if not self.compatible(mode):
            raise LockInvariantError(f"grant of {mode.name} conflicts with holders")
        if not self.holders:
            if generation_if_free <= self.generation:
                raise LockInvariantError(
                    f"lock generation must grow: {generation_if_free} <= {self.generation}")
            self.generation = generation_if_free
        self.holders[handle_id] = mode
        return self.generation

    def enqueue(self, handle_id: int, mode: LockMode) -> None:
        if handle_id in self.holders or self.is_waiting(handle_id):
            raise LockInvariantError(f"handle {handle_id} already holds or waits")
        self.waiters.append((handle_id, mode))

    def remove_waiter(self, handle_id: int) -> bool:
        for i, (h, _) in enumerate(self.waiters):
            if h == handle_id:
                del self.waiters[i]
                return True
        return False

    def release(self, handle_id: int, now_ms: int, lock_delay_ms: int = 0) -> None:
        """Drop a holder. A nonzero lock_delay_ms (holder failed) blocks every
        grant until now_ms + lock_delay_ms; the longest pending delay wins."""
        if handle_id not in self.holders:
            raise LockInvariantError(f"handle {handle_id} does not hold the lock")
        del self.holders[handle_id]
        if lock_delay_ms > 0:
            self.delay_until_ms = max(self.delay_until_ms, now_ms + lock_delay_ms)

    def expire_delay(self, now_ms: int) -> None:
        if self.delay_until_ms and now_ms >= self.delay_until_ms:
            self.delay_until_ms = 0

    def pop_grantable(self, now_ms: int) -> list[tuple[int, LockMode]]:
        """Remove and return the waiters at the head of the queue that can be
        granted now, in FIFO order (several only if they are all shared).
        The caller must then `grant` each of them, in order."""
        self.expire_delay(now_ms)
        if self.in_delay(now_ms):
            return []
        granted: list[tuple[int, LockMode]] = []
        held = self.held_mode()
        while self.waiters:
            handle_id, mode = self.waiters[0]
            current = held if held is not None else (granted[0][1] if granted else None)
            if current is not None and not (current == LockMode.SHARED and mode == LockMode.SHARED):
                break
            granted.append(self.waiters.popleft())
        return granted

    def assert_invariants(self) -> None:
        modes = set(self.holders.values())
        if len(modes) > 1:
            raise LockInvariantError("exclusive and shared holders at once")
        if LockMode.EXCLUSIVE in modes and len(self.holders) != 1:
            raise LockInvariantError(f"{len(self.holders)} exclusive holders")
        if self.holders and self.generation <= 0:
            raise LockInvariantError("held lock with generation 0")
        waiting = [h for h, _ in self.waiters]
        if len(set(waiting)) != len(waiting):
            raise LockInvariantError("a handle waits twice")
        if set(waiting) & set(self.holders):
            raise LockInvariantError("a handle both holds and waits")
        if self.delay_until_ms < 0:
            raise LockInvariantError("negative delay_until_ms")
