"""`python -m chubbyfs.sim run|replay|sweep`: the replicated-register workload.

    python -m chubbyfs.sim run --seed 42 [--trace]
    python -m chubbyfs.sim replay --seed 42          # same, PYTHONHASHSEED pinned
    python -m chubbyfs.sim sweep --seeds 1000 [--start 5000] [--jobs 2]

Every command re-executes itself with PYTHONHASHSEED=0 when it is not
already pinned (see `chubbyfs/sim/cli.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .cli import Workload, main
from .swarm import SimResult, run_sim


def _run(seed: int, args: argparse.Namespace, trace_sink: Callable[[str], None] | None) -> SimResult:
    return run_sim(seed, trace_sink=trace_sink)


WORKLOAD = Workload(module="chubbyfs.sim", label="sweep", run=_run)

if __name__ == "__main__":
    sys.exit(main(WORKLOAD, __doc__))
