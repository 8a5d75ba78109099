"""`python -m chubbyfs.sim run|replay|sweep`: the simulator as a product.

    python -m chubbyfs.sim run --seed 42 [--trace]
    python -m chubbyfs.sim replay --seed 42          # same, PYTHONHASHSEED pinned
    python -m chubbyfs.sim sweep --seeds 1000 [--start 5000] [--jobs 2]

Every command re-executes itself with PYTHONHASHSEED=0 when it is not
already pinned, so str/bytes hashing (and any set iteration order that leaks
into behaviour) is the same in every run and every sweep worker.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

from .swarm import SimResult, run_sim

PINNED_HASH_SEED = "0"


def _pin_hash_seed(argv: list[str]) -> None:
    if os.environ.get("PYTHONHASHSEED") != PINNED_HASH_SEED:
        env = dict(os.environ, PYTHONHASHSEED=PINNED_HASH_SEED)
        os.execve(sys.executable, [sys.executable, "-m", "chubbyfs.sim", *argv], env)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def replay_command(seed: int) -> str:
    return f"python -m chubbyfs.sim replay --seed {seed} --trace"


def print_failure(result: SimResult) -> None:
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
    print(f"  replay: {replay_command(result.seed)}")


def cmd_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sink = print if args.trace else None
    result = run_sim(args.seed, trace_sink=sink)
    wall = time.monotonic() - started
    stats = " ".join(f"{k}={v}" for k, v in sorted(result.stats.items()))
    print(f"seed={args.seed} digest={result.digest} wall={wall:.2f}s {stats}")
    if not result.ok:
        print_failure(result)
        return 1
    print("OK")
    return 0


def _sweep_one(seed: int) -> tuple[int, bool, list[str], str, float]:
    started = time.monotonic()
    result = run_sim(seed)
    return seed, result.ok, result.violations, result.digest, time.monotonic() - started


def cmd_sweep(args: argparse.Namespace) -> int:
    seeds = range(args.start, args.start + args.seeds)
    started = time.monotonic()
    failures: list[int] = []
    done = 0
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for seed, ok, violations, digest, wall in pool.imap_unordered(_sweep_one, seeds):
            done += 1
            if not ok:
                failures.append(seed)
                print(f"FAIL seed={seed} ({wall:.1f}s): {violations[0]}", flush=True)
                print(f"  replay: {replay_command(seed)}", flush=True)
            elif args.verbose:
                print(f"ok seed={seed} digest={digest} ({wall:.1f}s)", flush=True)
    wall = time.monotonic() - started
    print(
        f"sweep seeds {seeds.start}..{seeds.stop - 1}: {done} run, {len(failures)} failed, "
        f"wall {wall:.1f}s, commit {_commit()}; resume with --start {seeds.stop}"
    )
    if failures:
        print("failing seeds: " + " ".join(str(s) for s in sorted(failures)))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m chubbyfs.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "replay"):
        p = sub.add_parser(name, help="run one seed" if name == "run" else "run one seed with PYTHONHASHSEED pinned")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--trace", action="store_true", help="print every event and message")
    p = sub.add_parser("sweep", help="run many seeds in parallel")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="first seed (resume a sweep from here)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    _pin_hash_seed(argv)
    if args.command in ("run", "replay"):
        return cmd_run(args)
    return cmd_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
