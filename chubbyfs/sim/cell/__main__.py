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
import sys
from collections.abc import Callable

from ..cli import Workload, main
from ..swarm import SimResult
from .swarm import run_cell_sim


def _run(seed: int, args: argparse.Namespace, trace_sink: Callable[[str], None] | None) -> SimResult:
    return run_cell_sim(seed, fencing=not args.no_fencing, trace_sink=trace_sink)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-fencing", action="store_true", help="negative control: no fencing at the resource")


WORKLOAD = Workload(module="chubbyfs.sim.cell", label="cell sweep", run=_run, add_options=_add_options,
                    option_words=lambda args: ["--no-fencing"] if args.no_fencing else [])

if __name__ == "__main__":
    sys.exit(main(WORKLOAD, __doc__))
