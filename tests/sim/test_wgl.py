"""The linearizability checker on hand-written histories, and against a naive twin."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chubbyfs.sim.checkers.wgl import (
    UNKNOWN_OUTPUT,
    CheckResult,
    Operation,
    RegisterModel,
    brute_force_linearizable,
    check_operations,
)

M = RegisterModel()


def op(client: int, f: str, key: str, args, call: float, output, ret: float) -> Operation:
    return Operation(client, (f, key, args), call, output, ret)


def check(ops: list[Operation]) -> CheckResult:
    return check_operations(M, ops).result


def test_empty_history_is_linearizable() -> None:
    assert check([]) is CheckResult.OK


def test_sequential_put_then_get() -> None:
    ops = [op(0, "put", "k", b"a", 0, None, 1), op(1, "get", "k", None, 2, b"a", 3)]
    assert check(ops) is CheckResult.OK


def test_stale_read_after_acknowledged_write_is_illegal() -> None:
    ops = [
        op(0, "put", "k", b"a", 0, None, 1),
        op(0, "put", "k", b"b", 2, None, 3),
        op(1, "get", "k", None, 4, b"a", 5),
    ]
    report = check_operations(M, ops)
    assert report.result is CheckResult.ILLEGAL
    assert len(report.bad_partition) == 3


def test_concurrent_write_may_be_seen_either_way() -> None:
    base = [op(0, "put", "k", b"a", 0, None, 1), op(1, "put", "k", b"b", 2, None, 6)]
    assert check(base + [op(2, "get", "k", None, 3, b"a", 4)]) is CheckResult.OK
    assert check(base + [op(2, "get", "k", None, 3, b"b", 4)]) is CheckResult.OK


def test_reads_cannot_flip_back() -> None:
    # Write of b is concurrent with two sequential reads: b then a is impossible.
    ops = [
        op(0, "put", "k", b"a", 0, None, 1),
        op(1, "put", "k", b"b", 2, None, 10),
        op(2, "get", "k", None, 3, b"b", 4),
        op(3, "get", "k", None, 5, b"a", 6),
    ]
    assert check(ops) is CheckResult.ILLEGAL


def test_read_of_never_written_value_is_illegal() -> None:
    assert check([op(0, "get", "k", None, 0, b"zzz", 1)]) is CheckResult.ILLEGAL


def test_initial_value_is_absent() -> None:
    assert check([op(0, "get", "k", None, 0, None, 1)]) is CheckResult.OK


def test_cas_outcomes_must_match_state() -> None:
    ok_hist = [
        op(0, "put", "k", b"a", 0, None, 1),
        op(1, "cas", "k", (b"a", b"b"), 2, True, 3),
        op(2, "cas", "k", (b"a", b"c"), 4, False, 5),
        op(3, "get", "k", None, 6, b"b", 7),
    ]
    assert check(ok_hist) is CheckResult.OK
    # Two sequential CAS from a both succeeding is a lost update.
    bad = [
        op(0, "put", "k", b"a", 0, None, 1),
        op(1, "cas", "k", (b"a", b"b"), 2, True, 3),
        op(2, "cas", "k", (b"a", b"c"), 4, True, 5),
    ]
    assert check(bad) is CheckResult.ILLEGAL


def test_info_op_may_take_effect_late_or_never() -> None:
    # An unknown put may be seen by a read long after its call...
    late = [
        op(0, "put", "k", b"x", 0, UNKNOWN_OUTPUT, 100),
        op(1, "get", "k", None, 5, None, 6),
        op(1, "get", "k", None, 7, b"x", 8),
    ]
    assert check(late) is CheckResult.OK
    # ...or never; but once seen it cannot un-happen.
    flip = [
        op(0, "put", "k", b"x", 0, UNKNOWN_OUTPUT, 100),
        op(1, "get", "k", None, 5, b"x", 6),
        op(1, "get", "k", None, 7, None, 8),
    ]
    assert check(flip) is CheckResult.ILLEGAL


def test_info_cas_follows_the_state() -> None:
    ops = [
        op(0, "put", "k", b"a", 0, None, 1),
        op(1, "cas", "k", (b"a", b"b"), 2, UNKNOWN_OUTPUT, 100),
        op(2, "get", "k", None, 3, b"b", 4),
    ]
    assert check(ops) is CheckResult.OK
    # An info CAS whose expectation never holds cannot explain a read of its value.
    ops[0] = op(0, "put", "k", b"z", 0, None, 1)
    assert check(ops) is CheckResult.ILLEGAL


def test_keys_are_independent_partitions() -> None:
    ops = [
        op(0, "put", "a", b"1", 0, None, 1),
        op(1, "put", "b", b"2", 2, None, 3),
        op(2, "get", "a", None, 4, b"1", 5),
        op(2, "get", "b", None, 6, b"2", 7),
    ]
    report = check_operations(M, ops)
    assert report.result is CheckResult.OK and report.partitions == 2
    ops.append(op(3, "get", "b", None, 8, b"1", 9))
    assert check(ops) is CheckResult.ILLEGAL


def test_budget_exhaustion_is_unknown() -> None:
    # Many concurrent writes and an impossible read: the search needs many steps.
    ops = [op(i, "put", "k", bytes([i]), 0, None, 100) for i in range(12)]
    ops.append(op(99, "get", "k", None, 1, b"nope", 2))
    report = check_operations(M, ops, max_steps=50)
    assert report.result is CheckResult.UNKNOWN
    assert check_operations(M, ops).result is CheckResult.ILLEGAL


def test_wall_clock_budget_uses_the_injected_clock() -> None:
    ticks = iter(range(0, 10_000_000, 1000))
    ops = [op(i, "put", "k", bytes([i]), 0, None, 100) for i in range(14)]
    ops.append(op(99, "get", "k", None, 1, b"nope", 2))
    report = check_operations(M, ops, max_steps=None, time_budget_seconds=5.0, clock=lambda: next(ticks))
    assert report.result is CheckResult.UNKNOWN


def test_operation_rejects_return_before_call() -> None:
    with pytest.raises(ValueError, match="returns"):
        Operation(0, ("get", "k", None), 5, None, 4)


def test_model_rejects_unknown_operation() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        check([op(0, "frob", "k", None, 0, None, 1)])


def test_unknown_output_survives_pickling() -> None:
    assert pickle.loads(pickle.dumps(UNKNOWN_OUTPUT)) is UNKNOWN_OUTPUT


# --- naive twin ---------------------------------------------------------------

VALUES = [None, b"a", b"b", b"c"]


@st.composite
def small_histories(draw) -> list[Operation]:
    """Up to 7 ops on one or two keys; outputs come from a real sequential
    execution at random linearization points, then are sometimes corrupted."""
    n = draw(st.integers(0, 7))
    state: dict[str, bytes | None] = {}
    ops: list[Operation] = []
    for i in range(n):
        key = draw(st.sampled_from(["x", "y"]))
        call = draw(st.integers(0, 20))
        duration = draw(st.integers(0, 8))
        f = draw(st.sampled_from(["put", "get", "cas"]))
        if f == "put":
            args = draw(st.sampled_from(VALUES[1:]))
        elif f == "get":
            args = None
        else:
            args = (draw(st.sampled_from(VALUES)), draw(st.sampled_from(VALUES[1:])))
        ops.append(Operation(i, (f, key, args), call, None, call + duration))
    # Execute in order of a random point inside each op's interval.
    points = [draw(st.floats(0, 1)) for _ in ops]
    order = sorted(range(n), key=lambda i: ops[i].call + points[i] * (ops[i].return_ - ops[i].call))
    outputs: dict[int, object] = {}
    for i in order:
        f, key, args = ops[i].input
        cur = state.get(key)
        if f == "put":
            state[key] = args
            outputs[i] = None
        elif f == "get":
            outputs[i] = cur
        else:
            outputs[i] = cur == args[0]
            if cur == args[0]:
                state[key] = args[1]
    result = []
    for i, o in enumerate(ops):
        out = outputs[i]
        corrupt = draw(st.integers(0, 9))
        if corrupt == 0 and o.input[0] == "get":
            out = draw(st.sampled_from(VALUES))
        elif corrupt == 1 and o.input[0] == "cas":
            out = not out
        ret = o.return_
        if corrupt == 2:
            out, ret = UNKNOWN_OUTPUT, 1000
        result.append(Operation(o.client_id, o.input, o.call, out, ret))
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_wgl_agrees_with_brute_force(ops: list[Operation]) -> None:
    expected = brute_force_linearizable(M, ops)
    got = check_operations(M, ops).result
    assert got is (CheckResult.OK if expected else CheckResult.ILLEGAL)
