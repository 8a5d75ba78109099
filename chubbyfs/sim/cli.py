"""The `run | replay | sweep` command line shared by every simulation
workload (`python -m chubbyfs.sim`, `python -m chubbyfs.sim.cell`).

Every command re-executes itself with PYTHONHASHSEED=0 when it is not
already pinned, so str/bytes hashing (and any set iteration order that leaks
into behaviour) is the same in every run and every sweep worker.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .swarm import SimResult

PINNED_HASH_SEED = "0"

# run(seed, options, trace_sink) -> SimResult
RunFn = Callable[[int, argparse.Namespace, Callable[[str], None] | None], SimResult]


@dataclass(frozen=True)
class Workload:
    module: str  # what `python -m` runs, for re-execution and replay commands
    label: str  # names the workload in a sweep summary
    run: RunFn  # a module-level function: sweep workers receive it by pickling
    add_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    # The options a replay needs to reproduce a run, as command-line words.
    option_words: Callable[[argparse.Namespace], list[str]] = lambda args: []


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def replay_command(workload: Workload, seed: int, args: argparse.Namespace) -> str:
    return " ".join(["python -m", workload.module, "replay --seed", str(seed), "--trace",
                     *workload.option_words(args)])


def print_failure(workload: Workload, result: SimResult, args: argparse.Namespace) -> None:
    print(f"FAIL seed={result.seed} commit={commit()} PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED')}")
    if result.scenario is not None:
        print(f"  scenario: {result.scenario.describe()}")
        for step in result.scenario.plan:
            print(f"  plan: {step}")
    for v in result.violations:
        print(f"  violation: {v}")
    for line in result.trace_tail[-30:]:
        print(f"  trace: {line}")
    for line in result.history_tail[-15:]:
        print(f"  history: {line}")
    print(f"  replay: {replay_command(workload, result.seed, args)}")


def cmd_run(workload: Workload, args: argparse.Namespace) -> int:
    started = time.monotonic()
    result = workload.run(args.seed, args, print if args.trace else None)
    wall = time.monotonic() - started
    stats = " ".join(f"{k}={v}" for k, v in sorted(result.stats.items()))
    print(f"seed={args.seed} digest={result.digest} wall={wall:.2f}s {stats}")
    if not result.ok:
        print_failure(workload, result, args)
        return 1
    print("OK")
    return 0


def _sweep_one(run: RunFn, args: argparse.Namespace, seed: int) -> tuple[int, bool, list[str], str, float]:
    started = time.monotonic()
    result = run(seed, args, None)
    return seed, result.ok, result.violations, result.digest, time.monotonic() - started


def cmd_sweep(workload: Workload, args: argparse.Namespace) -> int:
    seeds = range(args.start, args.start + args.seeds)
    started = time.monotonic()
    failures: list[int] = []
    done = 0
    job = functools.partial(_sweep_one, workload.run, args)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for seed, ok, violations, digest, wall in pool.imap_unordered(job, seeds):
            done += 1
            if not ok:
                failures.append(seed)
                print(f"FAIL seed={seed} ({wall:.1f}s): {violations[0]}", flush=True)
                print(f"  replay: {replay_command(workload, seed, args)}", flush=True)
            elif args.verbose:
                print(f"ok seed={seed} digest={digest} ({wall:.1f}s)", flush=True)
    wall = time.monotonic() - started
    options = " ".join(workload.option_words(args))
    print(f"{workload.label} seeds {seeds.start}..{seeds.stop - 1}{' (' + options + ')' if options else ''}: "
          f"{done} run, {len(failures)} failed, wall {wall:.1f}s, commit {commit()}; "
          f"resume with --start {seeds.stop}")
    if failures:
        print("failing seeds: " + " ".join(str(s) for s in sorted(failures)))
    return 1 if failures else 0


def main(workload: Workload, description: str | None, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m {workload.module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "replay"):
        p = sub.add_parser(name, help="run one seed" if name == "run" else "run one seed with PYTHONHASHSEED pinned")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--trace", action="store_true", help="print every event and message")
        workload.add_options(p)
    p = sub.add_parser("sweep", help="run many seeds in parallel")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="first seed (resume a sweep from here)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    workload.add_options(p)
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != PINNED_HASH_SEED:
        env = dict(os.environ, PYTHONHASHSEED=PINNED_HASH_SEED)
        os.execve(sys.executable, [sys.executable, "-m", workload.module, *argv], env)
    if args.command in ("run", "replay"):
        return cmd_run(workload, args)
    return cmd_sweep(workload, args)
