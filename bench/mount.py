"""Benchmark of the mount: cached reads against tmpfs, flock hand-offs between
two mounts against ZooKeeper's lock recipe, and small-file writes.

    .venv/bin/python bench/mount.py [--duration 5] [--points read,handoff,write] [--skip-zk]
                                    [--json [FILE]] [--py-spy DIR]

Needs root (mount(2)) and /dev/fuse. A 3-replica chubbyfs cell (fsync on)
and two mount daemons (two "machines", each its own sessions) run in a
temporary directory and are stopped by PID (and unmounted) at the end.

- read: one client process loops `os.stat` + `os.open` + `os.read(4096)` +
  `os.close` on a cached 100-byte file through mount 1, and on the same file
  in tmpfs (/dev/shm), alternating between the two every 100 iterations
  (both see the same moments of a drifting VM); unpinned, and with the
  client and the daemon pinned to one CPU (the way the FUSE feasibility
  probe was measured).
- hand-off: two contender processes, one per mount, loop `flock(LOCK_EX)` ->
  `flock(LOCK_UN)` on one file (each hand-off is a Release and an Acquire
  through the cell's log). Beside it, in the same run: the same two
  contenders through the client library directly (bench/locks.py's worker:
  what the cell gives without the mount) and kazoo's Lock recipe on a
  3-server ZooKeeper ensemble (bench/_zk.py).
- write: N client processes loop open(O_WRONLY|O_TRUNC) + write(100 bytes)
  + close, each on its own file (Open, SetContents and Close through the log).

A script, not a test: progress on stderr, the table on stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root, for `chubbyfs`

import locks  # noqa: E402
from _workers import Window, percentile, run_workers  # noqa: E402
from raft import json_header, top_functions  # noqa: E402

VALUE = b"v" * 100
CELL = "bench"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- worker process: one client ----------------------------------------------------------------
#
# The protocol of bench/locks.py: a spec line on stdin, "ready", a window line
# {t0, t1}, then one JSON line of results on stdout.

READ_GROUP = 1000  # iterations per timed group of the read loop


def _read_loop(paths: list[str], t0: float, t1: float) -> dict:
    """Groups of READ_GROUP iterations on each path in turn, each timed: the
    paths share every moment of the window, so the VM's drift (a bare
    syscall loop here moves between 180,000 and 330,000/s from one quarter
    second to the next) falls on both alike. Returns the groups done and,
    per path, the seconds they took, in all and per second of the window."""
    time.sleep(max(0.0, t0 - time.monotonic()))
    groups = 0
    per_second: dict[int, list[float]] = {}  # second -> [groups, seconds on path 0, on path 1, ...]
    while (now := time.monotonic()) < t1:
        took = per_second.setdefault(int(now - t0), [0] + [0.0] * len(paths))
        took[0] += 1
        for i, path in enumerate(paths, 1):
            start = time.perf_counter()
            for _ in range(READ_GROUP):
                os.stat(path)
                fd = os.open(path, os.O_RDONLY)
                os.read(fd, 4096)
                os.close(fd)
            took[i] += time.perf_counter() - start
        groups += 1
    return {"iterations_each": groups * READ_GROUP,
            "seconds": [sum(t[i] for t in per_second.values()) for i in range(1, len(paths) + 1)],
            "per_second": [t for _, t in sorted(per_second.items())]}


def _write_loop(path: str, t0: float, t1: float) -> dict:
    time.sleep(max(0.0, t0 - time.monotonic()))
    latencies = []
    while (asked := time.monotonic()) < t1:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, VALUE)
        os.close(fd)  # the commit: its errors come back here
        latencies.append(time.monotonic() - asked)
    return {"latencies_s": latencies}


def worker_main() -> None:
    spec = locks._read_line()
    if spec.get("cpu") is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    if spec["workload"] == "write":
        fd = os.open(spec["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, VALUE)
        os.close(fd)
    locks._ready()
    window = locks._read_line()
    if spec["workload"] == "read":
        locks._report(_read_loop(spec["paths"], window["t0"], window["t1"]))
    elif spec["workload"] == "write":
        locks._report(_write_loop(spec["path"], window["t0"], window["t1"]))
    else:  # a flock hand-off contender, measured as bench/locks.py measures its clients
        fd = os.open(spec["path"], os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # warm-up: the lock handle exists before the window
        fcntl.flock(fd, fcntl.LOCK_UN)
        rec = locks._sync_loop(dict(spec, workload="handoff"), window,
                               lambda: fcntl.flock(fd, fcntl.LOCK_EX), lambda: fcntl.flock(fd, fcntl.LOCK_UN),
                               lambda: False)
        locks._report(rec.as_dict())


# ---- driver ------------------------------------------------------------------------------------

@dataclass
class Row:
    section: str  # "read", "handoff", "write"
    name: str
    clients: int
    ops_per_s: float
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    gap_p50_ms: float = float("nan")
    daemon_cpu_ms_per_op: float = float("nan")  # both mount daemons
    cell_cpu_ms_per_op: float = float("nan")  # the three replicas
    exclusion_violations: int = 0
    tmpfs_per_mount: float = float("nan")  # read rows: mount time per iteration / tmpfs's
    note: str = ""


def measure(specs: list[dict], duration_s: float, daemons: list[int], cell: list[int]) -> tuple[list[dict], Window]:
    """Run one point (bench/_workers.py); hand-off cycles are tagged with
    their worker's index."""
    results, window = run_workers(__file__, specs, duration_s, {"daemons": daemons, "cell": cell})
    for i, out in enumerate(results):
        for c in out.get("cycles", ()):
            c.append(i)
    return results, window


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (the daemon's notification threads too)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # a thread that ended meanwhile


def start_mount(mnt: Path, cells: Path, logfile: Path, extra: list[str] | None = None) -> subprocess.Popen:
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "chubbyfs", "mount", str(mnt), "--cells", str(cells),
                             *(extra or [])],
                            cwd=HERE.parent, stdin=subprocess.DEVNULL, stdout=open(logfile, "ab"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "mounted" not in logfile.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mount(proc, mnt)
            raise SystemExit(f"the mount daemon did not come up:\n{logfile.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def stop_mount(proc: subprocess.Popen, mnt: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    subprocess.run(["umount", "-l", str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_rows(args: argparse.Namespace, cached: Path, tmpfs_file: Path, daemon: subprocess.Popen,
              cell_pids: list[int]) -> list[Row]:
    """One client alternates the loop on tmpfs and through the mount (see
    _read_loop); unpinned, then pinned with the daemon to one CPU."""
    rows = []
    all_cpus = os.sched_getaffinity(0)
    for pinned in (False, True):
        cpu = min(all_cpus) if pinned else None
        label = "one CPU" if pinned else "unpinned"
        if pinned:
            pin(daemon.pid, {cpu})
        profile = None
        if args.py_spy:
            profile = locks.start_profiler(args, daemon.pid, f"mount-read-{label.replace(' ', '-')}-daemon")
        try:
            results, cpu_used = measure([{"workload": "read", "paths": [str(tmpfs_file), str(cached)],
                                          "cpu": cpu}], args.duration, [daemon.pid], cell_pids)
        finally:
            pin(daemon.pid, all_cpus)
            if profile is not None:
                profile()
        out = results[0]
        n = out["iterations_each"]
        tmpfs_s, mount_s = out["seconds"]
        # Whole seconds only: the last, partial one is noise.
        seconds = out["per_second"][:-1]
        by_second = sorted(m / t for _, t, m in seconds if t and m) or [mount_s / tmpfs_s]
        rows.append(Row("read", f"tmpfs, {label}", 1, n / tmpfs_s))
        rows.append(Row("read", f"chubbyfs mount, {label}", 1, n / mount_s,
                        daemon_cpu_ms_per_op=cpu_used.cpu_s["daemons"] / n * 1e3,
                        tmpfs_per_mount=mount_s / tmpfs_s,
                        note=f"by second 1/{by_second[0]:.1f} to 1/{by_second[-1]:.1f}"))
        log(f"read  {label:<8}: tmpfs {n / tmpfs_s:9.0f} it/s, mount {n / mount_s:7.0f} it/s "
            f"(1/{mount_s / tmpfs_s:.1f}); by second: "
            + ", ".join(f"{g * READ_GROUP / t:.0f}/{g * READ_GROUP / m:.0f}" for g, t, m in seconds))
    return rows


def handoff_rows(args: argparse.Namespace, lock_paths: list[Path], daemons: list[int], cell_pids: list[int],
                 master_pid: int, addresses: list[str]) -> list[Row]:
    rows = []
    profile = None
    if args.py_spy:
        profile = locks.start_profiler(args, master_pid, "mount-handoff-master")
    specs = [{"workload": "flock", "path": str(p), "cpu": None} for p in lock_paths]
    results, cpu_used = measure(specs, args.duration, daemons, cell_pids)
    if profile is not None:
        profile()
    cycles = [c for r in results for c in r["cycles"]]
    latencies, gaps, violations, _ = locks.handoff_stats(cycles, cpu_used.t0, cpu_used.t1)
    latencies.sort()
    gaps.sort()
    n = len(latencies)
    errors = sum(r["errors"] for r in results)
    rows.append(Row("handoff", "chubbyfs, flock through two mounts", 2, n / args.duration,
                    percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3,
                    percentile(gaps, 0.5) * 1e3, cpu_used.cpu_s["daemons"] / n * 1e3 if n else math.nan,
                    cpu_used.cpu_s["cell"] / n * 1e3 if n else math.nan, violations,
                    f"{errors} errors" if errors else ""))
    log(f"hand-off through two mounts: {n / args.duration:.0f}/s (violations {violations}, errors {errors})")
    # The same two contenders through the client library: the cell's own rate.
    point = locks.run_point("chubbyfs", "handoff", {"cell": CELL, "addresses": addresses}, cell_pids, 2,
                            args.duration)
    rows.append(Row("handoff", "chubbyfs, client library (no mount)", 2, point.ops_per_s, point.p50_ms,
                    point.p99_ms, point.gap_p50_ms, math.nan, point.server_cpu_ms_per_op,
                    point.exclusion_violations, f"{point.errors} errors" if point.errors else ""))
    log(f"hand-off through the library: {point.ops_per_s:.0f}/s")
    return rows


def write_rows(args: argparse.Namespace, directory: Path, daemons: list[int], cell_pids: list[int]) -> list[Row]:
    rows = []
    for n in args.writers:
        specs = [{"workload": "write", "path": str(directory / f"w{i}"), "cpu": None} for i in range(n)]
        results, cpu_used = measure(specs, args.duration, daemons, cell_pids)
        latencies = sorted(x for r in results for x in r["latencies_s"])
        done = len(latencies)
        rows.append(Row("write", f"{n} writer{'s' if n > 1 else ''}, own files", n, done / args.duration,
                        percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3,
                        daemon_cpu_ms_per_op=cpu_used.cpu_s["daemons"] / done * 1e3 if done else math.nan,
                        cell_cpu_ms_per_op=cpu_used.cpu_s["cell"] / done * 1e3 if done else math.nan))
        log(f"write {n} writer(s): {done / args.duration:.0f} files/s")
    return rows


def bench_chubbyfs(args: argparse.Namespace, workdir: Path) -> list[Row]:
    import trio

    from chubbyfs.client.connection import open_cell_connection
    from chubbyfs.testing.localcell import LocalCell

    (workdir / "cell").mkdir()
    cell = LocalCell(workdir / "cell", 3, name=CELL, state_machine="chubby")
    cell.start_all()
    mounts: list[tuple[subprocess.Popen, Path]] = []
    tmpfs = Path(tempfile.mkdtemp(prefix="chubbyfs-bench-", dir="/dev/shm"))
    try:
        async def leader_now() -> int:
            async with open_cell_connection(list(cell.addresses.values()), cell=CELL) as conn:
                return await cell.wait_for_leader(conn, timeout_s=60)

        leader = trio.run(leader_now)
        addresses = [cell.addresses[leader]] + [a for rid, a in cell.addresses.items() if rid != leader]
        log(f"chubbyfs: 3 replicas up, master {leader}")
        for name in ("m1", "m2"):
            mnt = workdir / name
            extra = [] if args.busy_poll_us is None else ["--busy-poll-us", str(args.busy_poll_us)]
            mounts.append((start_mount(mnt, cell.cells_path, workdir / f"{name}.log", extra), mnt))
        daemons = [proc.pid for proc, _ in mounts]
        cell_pids = [p.pid for p in cell.procs.values()]
        root1, root2 = mounts[0][1] / CELL, mounts[1][1] / CELL
        (root1 / "bench").mkdir()
        cached = root1 / "bench" / "cached"
        cached.write_bytes(VALUE)
        (tmpfs / "cached").write_bytes(VALUE)
        for _ in range(3):  # the session caches it, the kernel keeps its attributes and pages
            os.stat(cached)
            cached.read_bytes()
        (root1 / "bench" / "lock").write_bytes(b"")
        rows = []
        if "read" in args.points:
            rows += read_rows(args, cached, tmpfs / "cached", mounts[0][0], cell_pids)
        if "handoff" in args.points:
            rows += handoff_rows(args, [root1 / "bench" / "lock", root2 / "bench" / "lock"], daemons,
                                 cell_pids, cell.procs[leader].pid, addresses)
        if "write" in args.points:
            rows += write_rows(args, root1 / "bench", daemons, cell_pids)
    finally:
        for proc, mnt in mounts:
            stop_mount(proc, mnt)
        cell.stop_all()
        for f in tmpfs.iterdir():
            f.unlink()
        tmpfs.rmdir()
    return rows


def bench_zookeeper(args: argparse.Namespace, workdir: Path) -> tuple[Row, str]:
    zk_args = argparse.Namespace(contenders=[2], writers=[], duration=args.duration, py_spy=None, profiles=[],
                                 rounds=1)
    result = locks.bench_zookeeper(zk_args, workdir)
    p = result["points"][0]
    row = Row("handoff", f"zookeeper {result['version']}, kazoo Lock recipe", 2, p.ops_per_s, p.p50_ms,
              p.p99_ms, p.gap_p50_ms, math.nan, p.server_cpu_ms_per_op, p.exclusion_violations,
              f"{p.errors} errors" if p.errors else "")
    return row, result["client"]


# ---- output ------------------------------------------------------------------------------------

def _num(x: float, digits: int = 0) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:,.{digits}f}"


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [f"The mount: 3 replicas on 127.0.0.1 (fsync on), two mount daemons, {args.duration:g} s per point, "
             f"{os.cpu_count()} cores, load average at the end {load[0]:.1f}", ""]
    sections = {r.section for r in rows}
    head = f"{'stat+open+read+close, cached file':<40} | {'it/s':>9} {'vs tmpfs':>9} {'daemon cpu us/it':>16}"
    lines += [head, "-" * len(head)] if "read" in sections else []
    for r in rows:
        if r.section == "read":
            ratio = "" if math.isnan(r.tmpfs_per_mount) else f"1/{r.tmpfs_per_mount:.1f}"
            lines.append(f"{r.name:<40} | {_num(r.ops_per_s):>9} {ratio:>9} "
                         f"{_num(r.daemon_cpu_ms_per_op * 1e3, 1):>16}" + (f"  {r.note}" if r.note else ""))
    zk = next((r for r in rows if r.name.startswith("zookeeper")), None)
    head = (f"{'flock hand-off, 2 contenders':<40} | {'hand-offs/s':>11} {'acq p50':>8} {'gap p50':>8} "
            f"{'mount cpu ms':>12} {'cell cpu ms':>11} {'viol':>4} | {'x zk':>5}")
    lines += ["", head, "-" * len(head)] if "handoff" in sections else []
    for r in rows:
        if r.section == "handoff":
            ratio = f"{r.ops_per_s / zk.ops_per_s:.2f}" if zk and zk.ops_per_s else "-"
            lines.append(f"{r.name:<40} | {_num(r.ops_per_s):>11} {_num(r.p50_ms, 2):>8} "
                         f"{_num(r.gap_p50_ms, 2):>8} {_num(r.daemon_cpu_ms_per_op, 2):>12} "
                         f"{_num(r.cell_cpu_ms_per_op, 2):>11} {r.exclusion_violations:>4} | {ratio:>5}"
                         + (f"  {r.note}" if r.note else ""))
    head = (f"{'small-file write+close (100 B, O_TRUNC)':<40} | {'files/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'mount cpu ms':>12} {'cell cpu ms':>11}")
    lines += ["", head, "-" * len(head)] if "write" in sections else []
    for r in rows:
        if r.section == "write":
            lines.append(f"{r.name:<40} | {_num(r.ops_per_s):>9} {_num(r.p50_ms, 2):>8} {_num(r.p99_ms, 2):>8} "
                         f"{_num(r.daemon_cpu_ms_per_op, 2):>12} {_num(r.cell_cpu_ms_per_op, 2):>11}")
    lines += ["", "cpu columns: CPU time per operation of both mount daemons / of the three replicas."]
    for out in args.profiles:
        what = "mount daemon 1 during the cached read" if "daemon" in out else "master during the mount hand-off"
        lines += ["", f"py-spy of the {what} ({out}), top functions (self %, incl %):"]
        lines += [f"  {s:5.1f} {i:5.1f}  {f}" for f, s, i in top_functions(Path(out), 12)]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per point (default 5)")
    ap.add_argument("--writers", default="1,4", help="writer counts for the write point (default 1,4)")
    ap.add_argument("--points", default="read,handoff,write",
                    help="which points to run (default read,handoff,write; ZooKeeper only with handoff)")
    ap.add_argument("--skip-zk", action="store_true", help="no ZooKeeper comparison")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="also write JSON (stdout if no FILE)")
    ap.add_argument("--py-spy", metavar="DIR",
                    help="profile the master during the hand-off point and daemon 1 during the read points")
    ap.add_argument("--busy-poll-us", type=int, metavar="US",
                    help="the mount daemons' --busy-poll-us (default: theirs)")
    args = ap.parse_args(argv)
    args.writers = [int(x) for x in args.writers.split(",") if x]
    args.points = {x for x in args.points.split(",") if x}
    if not args.points or args.points - {"read", "handoff", "write"}:
        ap.error(f"--points takes read, handoff and write, not {sorted(args.points)}")
    args.rounds = 1
    args.profiles = []
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        worker_main()
        return 0
    args = parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("bench/mount.py needs root and /dev/fuse (it mounts with mount(2))")
    with tempfile.TemporaryDirectory(prefix="chubbyfs-bench-mount-") as tmp:
        workdir = Path(tmp)
        rows = bench_chubbyfs(args, workdir)
        client = ""
        if not args.skip_zk and "handoff" in args.points:
            zk_row, client = bench_zookeeper(args, workdir)
            rows.append(zk_row)
    print(format_table(rows, args))
    if args.json:
        out: dict[str, Any] = json_header(args)
        out["rows"] = [locks._no_nan(asdict(r)) for r in rows]
        if client:
            out["zookeeper_client"] = client
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
