"""The seeded scheduler, the virtual clock, and named RNG streams."""

from __future__ import annotations

import pytest
import trio
import trio._core._run as trio_run

from chubbyfs.sim import determinism
from chubbyfs.sim.determinism import SimHangError, digest_lines, run_deterministic, scheduling_trace
from chubbyfs.sim.rng import SimRandom, derive_seed


def test_self_test_passes() -> None:
    determinism.self_test()


def test_same_seed_same_trace_and_different_seeds_differ() -> None:
    assert scheduling_trace(7) == scheduling_trace(7)
    traces = {tuple(scheduling_trace(s)) for s in range(8)}
    assert len(traces) > 1


def test_hooks_are_restored_after_a_run() -> None:
    flag = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    state = trio_run._r.getstate()
    scheduling_trace(3)
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING == flag
    assert trio_run._r.getstate() == state


def test_hooks_are_restored_after_a_failing_run() -> None:
    state = trio_run._r.getstate()

    async def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_deterministic(boom, seed=1)
    assert trio_run._r.getstate() == state


def test_virtual_time_is_free_and_hangs_fail_fast() -> None:
    async def sleeper() -> float:
        await trio.sleep(3600)
        return trio.current_time()

    assert run_deterministic(sleeper, seed=0) >= 3600

    async def deadlock() -> None:
        await trio.Event().wait()

    with pytest.raises(SimHangError, match="10 virtual seconds"):
        run_deterministic(deadlock, seed=0, timeout_seconds=10)


def test_named_streams_are_independent_and_stable() -> None:
    a = SimRandom(42)
    first = [a.stream("network").random() for _ in range(3)]
    b = SimRandom(42)
    b.stream("disk").random()  # drawing from another stream shifts nothing
    assert [b.stream("network").random() for _ in range(3)] == first
    assert a.stream("network") is a.stream("network")
    assert derive_seed(1, "x") != derive_seed(1, "y") != derive_seed(2, "x")
    assert SimRandom(42).fresh("n").random() == SimRandom(42).fresh("n").random()


def test_digest_is_stable_and_sensitive() -> None:
    assert digest_lines(["a", "b"]) == digest_lines(["a", "b"])
    assert digest_lines(["a", "b"]) != digest_lines(["ab"])
