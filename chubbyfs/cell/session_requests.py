"""Per-session request numbers: each numbered request is applied at most once.

A client numbers every mutating request of a session (1, 2, 3, ...; the
retries of one call reuse its number) and says with each which numbers it has
seen answered: all below `answered_below`. The state machine keeps, per
session, in a `RequestTable`, the result of every applied number at or above
that mark. An entry whose number was applied already is answered with the
recorded result and not applied again; one whose number is below the mark is
refused (STALE_REQUEST): its client has had that answer and moved on, so it
can only be a late duplicate, held at a master while a retry went through
(Raft thesis §6.3, "client sessions").

Numbers may be applied out of order (a session may have several calls in
flight), so the table keeps the applied numbers above the mark, not only the
highest one. It is bounded: beyond `limit` results the lowest are forgotten,
as if answered, so a retry of one is refused, never applied twice.

A blocking Acquire that queued is recorded as queued; when its wakeup comes
the record becomes the outcome (granted, cancelled, ...). So a retry while it
waits joins the same wait (the master waits for the same wakeup), and a retry
after it ended gets that ending.

Pure: no trio, no clock. The table lives in the session (and in the
snapshot) and dies with it.
"""

from __future__ import annotations

from typing import Any

from chubbyfs.cell.commands import ErrorCode, LockResult, NodeStat, OpenResult, Result
from chubbyfs.cell.handles import HandleRef

# Tags of recorded result values in the snapshot.
_NONE, _STAT, _OPEN, _LOCK = 0, 1, 2, 3


class RequestTable:
    __slots__ = ("answered_below", "results", "waiting")

    def __init__(self) -> None:
        self.answered_below = 0  # every number below it was answered to the client
        self.results: dict[int, Result] = {}  # applied number -> its result
        # A queued Acquire's handle -> the numbers answered "queued" for it.
        self.waiting: dict[int, list[int]] = {}

    def admit(self, request_no: int, answered_below: int) -> Result | None:
        """None if the request is to be applied, else the answer it gets
        instead: the recorded result of its first application, or a refusal."""
        if answered_below > request_no:
            return Result(ErrorCode.INVALID_ARGUMENT,
                          f"answered_below {answered_below} exceeds the request's own number "
                          f"{request_no}, which cannot have been answered yet")
        self.acknowledge(answered_below)
        if request_no < self.answered_below:
            return Result(ErrorCode.STALE_REQUEST,
                          f"request {request_no} of this session is below {self.answered_below}, "
                          "all of which its client has had answered: a late duplicate, not applied")
        return self.results.get(request_no)

    def record(self, request_no: int, result: Result, queued_handle: int | None, limit: int) -> None:
        self.results[request_no] = result
        if queued_handle is not None:
            self.waiting.setdefault(queued_handle, []).append(request_no)
        if len(self.results) > limit:
            self.acknowledge(min(self.results) + 1)

    def acknowledge(self, answered_below: int) -> None:
        """Forget the results of numbers below `answered_below`."""
        if answered_below <= self.answered_below:
            return
        self.answered_below = answered_below
        self.results = {n: r for n, r in self.results.items() if n >= answered_below}
        if self.waiting:  # rarely: only while a numbered Acquire is queued
            waiting = {h: [n for n in ns if n >= answered_below] for h, ns in self.waiting.items()}
            self.waiting = {h: ns for h, ns in waiting.items() if ns}

    def woken(self, handle_id: int, outcome: Result) -> None:
        """The queued Acquire of `handle_id` ended: it answers with `outcome`."""
        for request_no in self.waiting.pop(handle_id, ()):
            self.results[request_no] = outcome

    # ---- snapshot -----------------------------------------------------------------

    def to_wire(self) -> list:
        return [self.answered_below,
                [[n, _result_to_wire(self.results[n])] for n in sorted(self.results)],
                [[h, list(self.waiting[h])] for h in sorted(self.waiting)]]

    @classmethod
    def from_wire(cls, wire: Any) -> RequestTable:
        answered_below, results, waiting = wire
        table = cls()
        table.answered_below = int(answered_below)
        table.results = {int(n): _result_from_wire(r) for n, r in results}
        table.waiting = {int(h): [int(n) for n in ns] for h, ns in waiting}
        return table

    def problems(self, limit: int) -> list[str]:
        """What is inconsistent in the table itself (for assert_invariants)."""
        found = []
        if any(n < max(1, self.answered_below) for n in self.results):
            found.append(f"a result is kept below answered_below {self.answered_below}")
        if len(self.results) > limit:
            found.append(f"{len(self.results)} results kept, more than {limit}")
        for handle_id, numbers in self.waiting.items():
            if not numbers or any(self.results.get(n) != _QUEUED for n in numbers):
                found.append(f"handle {handle_id} waits under numbers not recorded as queued")
        return found


_QUEUED = Result(ErrorCode.OK, value=LockResult(False))


def wakeup_outcome(code: ErrorCode, lock_generation: int, sequencer: str) -> Result:
    """What a queued Acquire answers once its wakeup came."""
    if code == ErrorCode.OK:
        return Result(ErrorCode.OK, value=LockResult(True, lock_generation, sequencer))
    return Result(code, f"the queued Acquire ended: {code.name.lower()}")


def _stat_to_wire(stat: NodeStat) -> list:
    return [stat.path, stat.instance, stat.is_directory, stat.ephemeral, stat.content_generation,
            stat.lock_generation, stat.acl_generation, stat.checksum, stat.size, stat.acl_read,
            stat.acl_write, stat.acl_change, stat.child_count]


def _result_to_wire(result: Result) -> list:
    value = result.value
    if value is None:
        encoded: list = [_NONE]
    elif isinstance(value, NodeStat):
        encoded = [_STAT, _stat_to_wire(value)]
    elif isinstance(value, OpenResult):
        encoded = [_OPEN, value.handle.to_wire(), value.created, _stat_to_wire(value.stat)]
    elif isinstance(value, LockResult):
        encoded = [_LOCK, value.granted, value.lock_generation, value.sequencer]
    else:
        raise TypeError(f"a numbered request cannot have recorded a {type(value).__name__}")
    return [int(result.code), result.message, encoded]


def _result_from_wire(wire: Any) -> Result:
    code, message, (tag, *fields) = wire
    if tag == _NONE and not fields:
        value: Any = None
    elif tag == _STAT:
        value = NodeStat(*fields[0])
    elif tag == _OPEN:
        ref, created, stat = fields
        value = OpenResult(HandleRef.from_wire(ref), bool(created), NodeStat(*stat))
    elif tag == _LOCK:
        value = LockResult(*fields)
    else:
        raise ValueError(f"unknown recorded result {tag!r}")
    return Result(ErrorCode(code), str(message), value)
