"""Deterministic trio runs: seeded scheduling under a virtual clock.

Three things make a trio run repeatable (see docs/simulation.md):

1. `MockClock(autojump_threshold=0)`: time jumps to the next deadline as soon
   as every task is blocked, so simulated seconds cost no wall time. This is
   only sound because the simulation does no real I/O and uses no threads.
2. trio's private `_ALLOW_DETERMINISTIC_SCHEDULING` flag: each batch of
   runnable tasks is sorted by task creation order before being shuffled, so
   `id()`-based tie-breaks (the deadline heap is keyed by id of the cancel
   scope) cannot leak into the schedule.
3. trio's private scheduler RNG `trio._core._run._r`, seeded per run.

Both private hooks are saved and restored around every run, because importing
Hypothesis flips the flag for the whole process and other tests must not see
our seed. `self_test()` proves the hooks still work after a trio upgrade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio._core._run as _trio_run
from trio.testing import MockClock

T = TypeVar("T")


class SimHangError(AssertionError):
    """The simulation did not finish within its virtual-time budget."""


def _require_hooks() -> None:
    # Fail loudly if a trio upgrade removed the private hooks we depend on.
    if not hasattr(_trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING") or not hasattr(_trio_run, "_r"):
        raise RuntimeError(
            f"trio {trio.__version__} lacks the deterministic-scheduling hooks "
            "(_ALLOW_DETERMINISTIC_SCHEDULING, _r); the simulator cannot run"
        )


def run_deterministic(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    seed: int,
    timeout_seconds: float | None = None,
) -> T:
    """`trio.run(async_fn, *args)` with seeded scheduling and a MockClock.

    `timeout_seconds` is virtual time: a deadlock autojumps straight to it,
    so a hang becomes a fast, deterministic `SimHangError`.
    """
    _require_hooks()

    async def main() -> T:
        if timeout_seconds is None:
            return await async_fn(*args)
        try:
            with trio.fail_after(timeout_seconds):
                return await async_fn(*args)
        except trio.TooSlowError as exc:
            raise SimHangError(
                f"simulation still running after {timeout_seconds} virtual seconds (seed {seed})"
            ) from exc

    saved_flag = _trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = _trio_run._r.getstate()
    try:
        _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True
        _trio_run._r.seed(seed)
        return trio.run(main, clock=MockClock(autojump_threshold=0))
    finally:
        _trio_run._r.setstate(saved_state)
        _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag


async def _checkpoint_trace_workload(task_count: int, rounds: int) -> list[str]:
    trace: list[str] = []

    async def worker(name: str) -> None:
        for step in range(rounds):
            trace.append(f"{name}:{step}@{trio.current_time():.3f}")
            if step % 3 == 2:
                await trio.sleep(0.001 * (1 + step % 2))
            else:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for i in range(task_count):
            nursery.start_soon(worker, f"t{i}")
    return trace


def scheduling_trace(seed: int, task_count: int = 5, rounds: int = 12) -> list[str]:
    """The interleaving of a few tasks that only checkpoint; depends on `seed`."""
    return run_deterministic(_checkpoint_trace_workload, task_count, rounds, seed=seed)


def self_test(seed: int = 12345) -> None:
    """Raise unless the same seed gives the same interleaving twice.

    Also checks that different seeds give different interleavings, otherwise
    the "determinism" might just be a fixed order that seeds cannot explore.
    """
    first = scheduling_trace(seed)
    second = scheduling_trace(seed)
    if first != second:
        raise AssertionError("trio scheduling is not deterministic for a fixed seed")
    others = {tuple(scheduling_trace(seed + k)) for k in range(1, 6)}
    if others == {tuple(first)}:
        raise AssertionError("trio scheduling ignores the seed: every seed gave the same order")


def digest_lines(lines: list[str]) -> str:
    """A short stable digest of a trace, for comparing runs."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
