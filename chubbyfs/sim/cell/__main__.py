"""`python -m chubbyfs.sim.cell run|replay|sweep`: the Chubby cell workload.

    python -m chubbyfs.sim.cell run --seed 42 [--trace] [--no-fencing]
    python -m chubbyfs.sim.cell replay --seed 42 --trace
    python -m chubbyfs.sim.cell sweep --seeds 1000 [--start 5000] [--jobs 2] [--no-fencing]
        [--unsafe-cache skip_invalidations|jeopardy_reads]

Like `python -m chubbyfs.sim`, every command re-executes itself with
PYTHONHASHSEED=0 unless it is already pinned. `--no-fencing` runs the
negative control: the fenced resource accepts stale holders, so seeds with a
holder paused past its lease report lost updates.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..cli import Workload, main
from ..swarm import SimResult
from .session import UNSAFE_CACHE_MODES
from .swarm import run_cell_sim


def _run(seed: int, args: argparse.Namespace, trace_sink: Callable[[str], None] | None) -> SimResult:
    return run_cell_sim(seed, fencing=not args.no_fencing, unsafe_cache=args.unsafe_cache,
                        trace_sink=trace_sink)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-fencing", action="store_true", help="negative control: no fencing at the resource")
    parser.add_argument("--unsafe-cache", choices=[m for m in UNSAFE_CACHE_MODES if m], default="",
                        help="negative control: clients that skip invalidations or read from cache in jeopardy")


def _option_words(args: argparse.Namespace) -> list[str]:
    words = ["--no-fencing"] if args.no_fencing else []
    if args.unsafe_cache:
        words += ["--unsafe-cache", args.unsafe_cache]
    return words


WORKLOAD = Workload(module="chubbyfs.sim.cell", label="cell sweep", run=_run, add_options=_add_options,
                    option_words=_option_words)

if __name__ == "__main__":
    sys.exit(main(WORKLOAD, __doc__))
