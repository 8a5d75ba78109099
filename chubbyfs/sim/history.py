"""A Knossos-style operation history: invoke, then ok / fail / info.

- `ok`: the operation happened, with this result.
- `fail`: it certainly did not happen (e.g. NotLeaderError before proposing).
- `info`: unknown (timeout, lost proposal after a crash). It may take effect
  at any later time, so its process is considered crashed: the caller must use
  a fresh process id for its next operation (`HistoryRecorder.new_process`).

Events are stamped with a global sequence number in recording order. The
simulation runs in one thread, so this order is the true real-time order;
virtual timestamps would make causally ordered events look simultaneous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checkers.wgl import UNKNOWN_OUTPUT, Operation

INVOKE = "invoke"
OK = "ok"
FAIL = "fail"
INFO = "info"


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    process: int
    type: str  # invoke | ok | fail | info
    f: str  # put | get | cas
    key: str
    value: Any  # invoke: the arguments; completion: the result
    time_seconds: float  # virtual time, for humans only


class HistoryError(Exception):
    """The recorder was used against Knossos rules (e.g. two open ops per process)."""


class HistoryRecorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._open: dict[int, Event] = {}  # process -> its pending invoke
        self._crashed: set[int] = set()
        self._next_process = 0

    def new_process(self) -> int:
        process = self._next_process
        self._next_process += 1
        return process

    def invoke(self, process: int, f: str, key: str, args: Any, time_seconds: float = 0.0) -> None:
        if process in self._open:
            raise HistoryError(f"process {process} already has an operation in flight")
        if process in self._crashed:
            raise HistoryError(f"process {process} got an info result and may not issue more ops")
        event = Event(len(self.events), process, INVOKE, f, key, args, time_seconds)
        self.events.append(event)
        self._open[process] = event

    def complete(self, process: int, type_: str, value: Any = None, time_seconds: float = 0.0) -> None:
        if type_ not in (OK, FAIL, INFO):
            raise HistoryError(f"unknown completion type {type_!r}")
        invoke = self._open.pop(process, None)
        if invoke is None:
            raise HistoryError(f"process {process} has no operation in flight")
        if type_ == INFO:
            self._crashed.add(process)
        self.events.append(Event(len(self.events), process, type_, invoke.f, invoke.key, value, time_seconds))

    def ok(self, process: int, value: Any = None, time_seconds: float = 0.0) -> None:
        self.complete(process, OK, value, time_seconds)

    def fail(self, process: int, value: Any = None, time_seconds: float = 0.0) -> None:
        self.complete(process, FAIL, value, time_seconds)

    def info(self, process: int, value: Any = None, time_seconds: float = 0.0) -> None:
        self.complete(process, INFO, value, time_seconds)

    def has_pending(self, process: int) -> bool:
        return process in self._open

    def pending(self) -> list[Event]:
        return sorted(self._open.values(), key=lambda e: e.seq)

    def close_pending(self, time_seconds: float = 0.0) -> None:
        """Mark every still-open operation `info` (end of the run)."""
        for event in self.pending():
            self.info(event.process, "still pending at end of run", time_seconds)

    def operations(self) -> list[Operation]:
        """Pair events into WGL operations.

        `fail` ops are dropped (they did not happen). `info` and still-open ops
        get an unknown output and a return after everything else: they may
        have taken effect at any point after their call.
        """
        end = len(self.events) + 1
        ops: list[Operation] = []
        open_invokes: dict[int, Event] = {}
        for event in self.events:
            if event.type == INVOKE:
                open_invokes[event.process] = event
                continue
            invoke = open_invokes.pop(event.process)
            if event.type == FAIL:
                continue
            output = event.value if event.type == OK else UNKNOWN_OUTPUT
            ret = event.seq if event.type == OK else end
            ops.append(Operation(event.process, (invoke.f, invoke.key, invoke.value), invoke.seq, output, ret))
        for invoke in open_invokes.values():
            ops.append(Operation(invoke.process, (invoke.f, invoke.key, invoke.value), invoke.seq, UNKNOWN_OUTPUT, end))
        return ops

    def format(self, last: int | None = None) -> list[str]:
        events = self.events if last is None else self.events[-last:]
        return [
            f"{e.seq:6d} t={e.time_seconds:9.4f} p{e.process:<4d} {e.type:<6s} {e.f} {e.key} {e.value!r}"
            for e in events
        ]
