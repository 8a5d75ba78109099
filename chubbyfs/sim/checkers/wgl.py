"""Linearizability checking: the Wing & Gong search with Lowe's memoisation,
in the shape of porcupine (model interface, per-key partitioning, budget).

An `Operation` is one call/return pair. `call` and `return_` are positions
in a single real-time order (the history's event sequence numbers); an op
whose outcome is unknown (`info`) gets `output=UNKNOWN_OUTPUT` and a return
after every other event, so it may be linearized anywhere after its call.

The search walks a doubly linked list of call/return entries. At a call it
tries to apply the op to the model; if that succeeds and the pair
(set of linearized ops, new state) is new, the op is "lifted" out of the list
and the walk restarts from the head. Reaching a return entry means a pending
op should have been linearized earlier: backtrack. The seen-set of
(bitset, state) pairs is what keeps this tractable.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol


class _Unknown:
    """Output of an operation whose result was never observed (info)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN_OUTPUT"

    def __reduce__(self) -> str:
        return "UNKNOWN_OUTPUT"


UNKNOWN_OUTPUT = _Unknown()


@dataclass(frozen=True, slots=True)
class Operation:
    client_id: int
    input: Any
    call: float
    output: Any
    return_: float

    def __post_init__(self) -> None:
        if self.return_ < self.call:
            raise ValueError(f"operation returns ({self.return_}) before its call ({self.call})")


class CheckResult(enum.Enum):
    OK = "ok"
    ILLEGAL = "illegal"
    UNKNOWN = "unknown"  # budget exhausted; counts as a failure in CI


class Model(Protocol):
    def init(self) -> Hashable: ...

    def step(self, state: Hashable, input: Any, output: Any) -> tuple[bool, Hashable]:
        """Pure: may `input` with observed `output` happen in `state`? And the next state."""
        ...

    def partition(self, ops: list[Operation]) -> list[list[Operation]]:
        """Independent sub-histories (linearizability is compositional per object)."""
        ...


class RegisterModel:
    """A map of independent registers with put / get / cas, partitioned by key.

    Inputs are `(f, key, args)`: `("put", k, value)`, `("get", k, None)`,
    `("cas", k, (expected, new))`. Outputs: put -> anything, get -> the value
    (None if absent), cas -> bool. State is the register's value (None: absent).
    """

    def init(self) -> Hashable:
        return None

    def step(self, state: Hashable, input: Any, output: Any) -> tuple[bool, Hashable]:
        f, _key, args = input
        if f == "put":
            return True, args
        if f == "get":
            return output is UNKNOWN_OUTPUT or output == state, state
        if f == "cas":
            expected, new = args
            # Given the state, a CAS's outcome is determined, so an unknown
            # output needs no nondeterminism: it did whatever the state implies.
            succeeds = state == expected
            if output is not UNKNOWN_OUTPUT and bool(output) != succeeds:
                return False, state
            return True, (new if succeeds else state)
        raise ValueError(f"RegisterModel: unknown operation {f!r}")

    def partition(self, ops: list[Operation]) -> list[list[Operation]]:
        by_key: dict[Any, list[Operation]] = defaultdict(list)
        for op in ops:
            by_key[op.input[1]].append(op)
        return [by_key[k] for k in sorted(by_key, key=repr)]


@dataclass(frozen=True)
class CheckReport:
    result: CheckResult
    partitions: int
    steps: int
    # For ILLEGAL/UNKNOWN: the ops of the first offending partition and the
    # longest linearized prefix found for it (op indices into that list).
    bad_partition: tuple[Operation, ...] = ()
    longest_prefix: tuple[int, ...] = ()


class _Budget:
    def __init__(self, max_steps: int | None, time_budget_seconds: float | None,
                 clock: Callable[[], float]) -> None:
        self.max_steps = max_steps
        self.clock = clock
        self.deadline = None if time_budget_seconds is None else clock() + time_budget_seconds
        self.steps = 0

    def exhausted(self) -> bool:
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            return True
        # Reading the clock costs; do it every 1024 steps.
        return self.deadline is not None and self.steps % 1024 == 0 and self.clock() > self.deadline


_CALL = 0
_RETURN = 1


def _check_single(model: Model, ops: list[Operation], budget: _Budget) -> tuple[CheckResult, tuple[int, ...]]:
    n = len(ops)
    if n == 0:
        return CheckResult.OK, ()
    # Entries sorted by time; at equal times calls come first (so touching
    # ops count as concurrent, the permissive choice).
    order = sorted(
        [(op.call, _CALL, i) for i, op in enumerate(ops)] + [(op.return_, _RETURN, i) for i, op in enumerate(ops)]
    )
    size = 2 * n + 1  # node 0 is the head sentinel
    kind = [0] * size
    op_of = [0] * size
    match = [0] * size  # call node -> its return node
    nxt = [0] * size
    prev = [0] * size
    call_node = [0] * n
    for pos, (_t, k, i) in enumerate(order, start=1):
        kind[pos] = k
        op_of[pos] = i
        if k == _CALL:
            call_node[i] = pos
        else:
            match[call_node[i]] = pos
    for pos in range(size):
        nxt[pos] = pos + 1 if pos + 1 < size else -1
        prev[pos] = pos - 1

    def lift(c: int) -> None:
        r = match[c]
        nxt[prev[c]] = nxt[c]
        if nxt[c] != -1:
            prev[nxt[c]] = prev[c]
        nxt[prev[r]] = nxt[r]
        if nxt[r] != -1:
            prev[nxt[r]] = prev[r]

    def unlift(c: int) -> None:
        # Reverse order of lift(): the return node first, then the call node.
        r = match[c]
        nxt[prev[r]] = r
        if nxt[r] != -1:
            prev[nxt[r]] = r
        nxt[prev[c]] = c
        if nxt[c] != -1:
            prev[nxt[c]] = c

    state = model.init()
    linearized = 0
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[int, Hashable]] = []
    longest: tuple[int, ...] = ()
    entry = nxt[0]
    while nxt[0] != -1:
        if budget.exhausted():
            return CheckResult.UNKNOWN, longest
        if kind[entry] == _CALL:
            i = op_of[entry]
            op = ops[i]
            ok, new_state = model.step(state, op.input, op.output)
            if ok:
                bits = linearized | (1 << i)
                key = (bits, new_state)
                if key not in seen:
                    seen.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = bits
                    lift(entry)
                    if len(stack) > len(longest):
                        longest = tuple(op_of[c] for c, _ in stack)
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
        else:
            if not stack:
                return CheckResult.ILLEGAL, longest
            top, state = stack.pop()
            linearized &= ~(1 << op_of[top])
            unlift(top)
            entry = nxt[top]
    return CheckResult.OK, longest


def check_operations(
    model: Model,
    ops: Iterable[Operation],
    *,
    max_steps: int | None = 2_000_000,
    time_budget_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CheckReport:
    """Check every partition of `ops`. ILLEGAL wins over UNKNOWN.

    `max_steps` is a deterministic budget (same answer on every machine);
    `time_budget_seconds` a wall-clock one. Either may be None.
    """
    budget = _Budget(max_steps, time_budget_seconds, clock)
    parts = model.partition(list(ops))
    unknown: CheckReport | None = None
    for part in parts:
        result, prefix = _check_single(model, part, budget)
        if result is CheckResult.ILLEGAL:
            return CheckReport(result, len(parts), budget.steps, tuple(part), prefix)
        if result is CheckResult.UNKNOWN and unknown is None:
            unknown = CheckReport(result, len(parts), budget.steps, tuple(part), prefix)
            # Keep a partial budget for the other partitions: an ILLEGAL in
            # a cheap partition is more useful than a second UNKNOWN.
            budget = _Budget(max_steps, time_budget_seconds, clock)
    if unknown is not None:
        return CheckReport(CheckResult.UNKNOWN, len(parts), budget.steps, unknown.bad_partition, unknown.longest_prefix)
    return CheckReport(CheckResult.OK, len(parts), budget.steps)


def brute_force_linearizable(model: Model, ops: list[Operation]) -> bool:
    """Naive twin for tests: per partition, try every order consistent with
    real time (op i may go next only if no other pending op returned before
    i was called). Exponential; use on a handful of ops only."""
    for part in model.partition(list(ops)):
        if not _brute_partition(model, part):
            return False
    return True


def _brute_partition(model: Model, part: list[Operation]) -> bool:
    n = len(part)

    def extend(done: int, state: Hashable) -> bool:
        if done == (1 << n) - 1:
            return True
        for i in range(n):
            if done & (1 << i):
                continue
            if any(not done & (1 << j) and part[j].return_ < part[i].call for j in range(n) if j != i):
                continue
            ok, new_state = model.step(state, part[i].input, part[i].output)
            if ok and extend(done | (1 << i), new_state):
                return True
        return False

    return extend(0, model.init())
