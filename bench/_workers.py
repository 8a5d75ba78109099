"""What every benchmark script does around its client worker processes, and
the /proc readings it measures with.

A point runs one worker process per spec (`SCRIPT --worker`, the spec as one
JSON line on stdin). Each says "ready" once connected; then all get the same
window (t0, t1) so that they start together, and each answers with one JSON
line of results. Meanwhile the CPU time of named groups of processes (the
servers, the mount daemons, ...) and of the workers is read at both ends of
the window.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU
    (/proc/<pid>/task/*/schedstat, second field): how much other load on the
    machine delayed it."""
    total_ns = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue  # the thread ended, or no schedstats in this kernel
    return total_ns / 1e9


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy (not idle or iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user/nice; only the first 8 fields count
    return (sum(fields[:8]) - idle) / CLK_TCK


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class Window:
    """One point's common measuring window and what was used in it."""

    t0: float
    t1: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per group, plus "workers"
    runq_wait_s: dict[str, float] = field(default_factory=dict)  # per group
    machine_busy_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.t1 - self.t0

    def other_cpu_s(self) -> float:
        """CPU the machine spent on neither the measured groups nor the workers."""
        return max(0.0, self.machine_busy_s - sum(self.cpu_s.values()))


def _sample(groups: dict[str, list[int]], workers: list[subprocess.Popen]) -> tuple[dict, dict, float]:
    cpu = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
    cpu["workers"] = sum(cpu_seconds(p.pid) for p in workers)
    wait = {name: sum(runqueue_wait_seconds(pid) for pid in pids) for name, pids in groups.items()}
    return cpu, wait, machine_busy_seconds()


def run_workers(script: str | Path, specs: list[dict], duration_s: float, groups: dict[str, list[int]], *,
                start_delay_s: float = 0.3, during: Callable[[], Callable[[], Any] | None] | None = None,
                what: str = "client") -> tuple[list[dict], Window]:
    """Run one point: a worker per spec over one common window; returns the
    workers' results (in spec order) and the window. `during` is started once
    the workers have their window (a profiler, say) and what it returns is
    called after the results are in."""
    workers: list[subprocess.Popen] = []
    try:
        for spec in specs:
            p = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--worker"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdin is not None
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
            workers.append(p)
        for p in workers:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a {what} worker failed to start (said {line!r}; its error is above)")
        t0 = time.monotonic() + start_delay_s
        t1 = t0 + duration_s
        for p in workers:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"t0": t0, "t1": t1}) + "\n")
            p.stdin.flush()
        finish = during() if during is not None else None
        time.sleep(max(0.0, t0 - time.monotonic()))
        cpu0, wait0, busy0 = _sample(groups, workers)
        time.sleep(max(0.0, t1 - time.monotonic()))
        cpu1, wait1, busy1 = _sample(groups, workers)
        results = []
        for p in workers:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a {what} worker exited without results (its error is above)")
            results.append(json.loads(line))
            p.wait(timeout=60)
        if finish is not None:
            finish()
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    window = Window(t0=t0, t1=t1, cpu_s={k: cpu1[k] - cpu0[k] for k in cpu1},
                    runq_wait_s={k: wait1[k] - wait0[k] for k in wait1}, machine_busy_s=busy1 - busy0)
    return results, window
