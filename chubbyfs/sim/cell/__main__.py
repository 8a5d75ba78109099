"""`python -m chubbyfs.sim.cell run|replay|sweep`: the Chubby cell workload.

    python -m chubbyfs.sim.cell run --seed 42 [--trace] [--no-fencing]
    python -m chubbyfs.sim.cell replay --seed 42 --trace
    python -m chubbyfs.sim.cell sweep --seeds 1000 [--start 5000] [--jobs 2] [--no-fencing]

Like `python -m chubbyfs.sim`, every command re-executes itself with
PYTHONHASHSEED=0 unless it is already pinned. `--no-fencing` runs the
negative control: the fenced resource accepts stale holders, so seeds with a
holder paused past its lease report lost updates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

from ..__main__ import PINNED_HASH_SEED, _commit
from ..swarm import SimResult
from .swarm import run_cell_sim


def _pin_hash_seed(argv: list[str]) -> None:
    if os.environ.get("PYTHONHASHSEED") != PINNED_HASH_SEED:
        env = dict(os.environ, PYTHONHASHSEED=PINNED_HASH_SEED)
        os.execve(sys.executable, [sys.executable, "-m", "chubbyfs.sim.cell", *argv], env)


def replay_command(seed: int, fencing: bool) -> str:
    return f"python -m chubbyfs.sim.cell replay --seed {seed} --trace" + ("" if fencing else " --no-fencing")


def print_failure(result: SimResult, fencing: bool) -> None:
    print(f"FAIL seed={result.seed} commit={_commit()} PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED')}")
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
    print(f"  replay: {replay_command(result.seed, fencing)}")


def cmd_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    result = run_cell_sim(args.seed, fencing=not args.no_fencing, trace_sink=print if args.trace else None)
    wall = time.monotonic() - started
    stats = " ".join(f"{k}={v}" for k, v in sorted(result.stats.items()))
    print(f"seed={args.seed} digest={result.digest} wall={wall:.2f}s {stats}")
    if not result.ok:
        print_failure(result, not args.no_fencing)
        return 1
    print("OK")
    return 0


def _sweep_one(job: tuple[int, bool]) -> tuple[int, bool, list[str], str, float]:
    seed, fencing = job
    started = time.monotonic()
    result = run_cell_sim(seed, fencing=fencing)
    return seed, result.ok, result.violations, result.digest, time.monotonic() - started


def cmd_sweep(args: argparse.Namespace) -> int:
    seeds = range(args.start, args.start + args.seeds)
    fencing = not args.no_fencing
    started = time.monotonic()
    failures: list[int] = []
    done = 0
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for seed, ok, violations, digest, wall in pool.imap_unordered(_sweep_one, [(s, fencing) for s in seeds]):
            done += 1
            if not ok:
                failures.append(seed)
                print(f"FAIL seed={seed} ({wall:.1f}s): {violations[0]}", flush=True)
                print(f"  replay: {replay_command(seed, fencing)}", flush=True)
            elif args.verbose:
                print(f"ok seed={seed} digest={digest} ({wall:.1f}s)", flush=True)
    wall = time.monotonic() - started
    print(f"cell sweep seeds {seeds.start}..{seeds.stop - 1} (fencing={'on' if fencing else 'off'}): {done} run, "
          f"{len(failures)} failed, wall {wall:.1f}s, commit {_commit()}; resume with --start {seeds.stop}")
    if failures:
        print("failing seeds: " + " ".join(str(s) for s in sorted(failures)))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m chubbyfs.sim.cell", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "replay"):
        p = sub.add_parser(name, help="run one seed" if name == "run" else "run one seed with PYTHONHASHSEED pinned")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--trace", action="store_true", help="print every event, message and client request")
        p.add_argument("--no-fencing", action="store_true", help="negative control: no fencing at the resource")
    p = sub.add_parser("sweep", help="run many seeds in parallel")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="first seed (resume a sweep from here)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-fencing", action="store_true", help="negative control: no fencing at the resource")
    args = parser.parse_args(argv)
    _pin_hash_seed(argv)
    if args.command in ("run", "replay"):
        return cmd_run(args)
    return cmd_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
