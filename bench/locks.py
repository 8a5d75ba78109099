"""Benchmark of locks and CAS writes: chubbyfs beside ZooKeeper and etcd, same workload, same run.

    .venv/bin/python bench/locks.py [--duration 10] [--contenders 2,8] [--writers 1,8]
                                    [--skip-zk] [--skip-etcd] [--skip-chubbyfs] [--rounds 1]
                                    [--json [FILE]] [--py-spy DIR]

Each system runs 3 replicas on 127.0.0.1 with fsync on, in a temporary
directory, stopped by PID at the end:
- chubbyfs: `LocalCell` with the Chubby state machine;
- ZooKeeper: Debian's `zookeeper` 3.8, a 3-server ensemble (bench/_zk.py);
- etcd: Debian's `etcd-server` 3.4, 3 members (bench/_etcd.py).

Workloads, `--duration` seconds each:
- hand-off: N contenders loop acquire -> release on one lock. chubbyfs:
  `Handle.acquire()`/`release()`; ZooKeeper: kazoo's `Lock` recipe; etcd: the
  v3lock API (`/v3/lock/lock`, `/v3/lock/unlock`) with a lease of its own
  per contender. Reported: hand-offs/s, acquire latency (call to grant,
  including the wait in the queue), and the hand-off gap (from the holder
  calling release to the next grant).
- CAS write: N writers loop read (content generation / version /
  mod_revision) -> conditional write, each on its own file, and for N > 1
  also all on one shared file, where conflicts are expected and counted.

Every contender and writer is a separate client process (this script with
`--worker`) with its own connection, as separate client machines would be;
kazoo is thread-based, and a process per client keeps its threads from
sharing one GIL with the other contenders. Clients talk to the leader (the
chubbyfs master, the ZooKeeper leader, the etcd leader). A script, not a
test: it prints numbers (progress on stderr, the table on stdout).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root, for `chubbyfs`

from _workers import percentile, run_workers  # noqa: E402
from raft import json_header, top_functions  # noqa: E402

SYSTEMS = ("chubbyfs", "zookeeper", "etcd")
VALUE = b"v" * 100
LOCK_NAME = "handoff"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- worker process: one client ----------------------------------------------------------------
#
# stdin: a spec line, then (after the worker printed "ready") a window line {t0, t1}.
# stdout: "ready", then one JSON line of results. Times are time.monotonic(), which
# is CLOCK_MONOTONIC, shared by every process on the machine.

def _file_name(spec: dict) -> str:
    return "cas-shared" if spec["shared"] else f"cas-{spec['index']}"


def _read_line() -> dict:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("worker: the driver closed stdin")
    return json.loads(line)


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _report(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


class Recorder:
    """What one client saw inside the window [t0, t1)."""

    def __init__(self, t1: float) -> None:
        self.t1 = t1
        self.cycles: list[list[float]] = []  # hand-off: [asked, acquired, release_asked, released]
        self.latencies_s: list[float] = []  # CAS: read + conditional write, successful ones
        self.conflicts = 0
        self.errors = 0
        self.first_error = ""

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"

    def as_dict(self) -> dict:
        return {"cycles": self.cycles, "latencies_s": self.latencies_s, "conflicts": self.conflicts,
                "errors": self.errors, "first_error": self.first_error}


def _sync_loop(spec: dict, window: dict, acquire: Callable[[], None], release: Callable[[], None],
               cas: Callable[[], bool]) -> Recorder:
    """The measured loop for a blocking client (kazoo)."""
    t0, t1 = window["t0"], window["t1"]
    rec = Recorder(t1)
    time.sleep(max(0.0, t0 - time.monotonic()))
    while (asked := time.monotonic()) < t1:
        try:
            if spec["workload"] == "handoff":
                acquire()
                acquired = time.monotonic()
                release()
                rec.cycles.append([asked, acquired, acquired, time.monotonic()])
            elif cas():
                if (done := time.monotonic()) <= t1:
                    rec.latencies_s.append(done - asked)
            else:
                rec.conflicts += 1
        except Exception as exc:  # counted, not fatal: a benchmark reports failures
            rec.error(exc)
            time.sleep(0.01)
    return rec


async def _async_loop(spec: dict, window: dict, acquire: Callable, release: Callable, cas: Callable) -> Recorder:
    """The measured loop for a trio client (chubbyfs, etcd)."""
    import trio

    t0, t1 = window["t0"], window["t1"]
    rec = Recorder(t1)
    await trio.sleep(max(0.0, t0 - time.monotonic()))
    while (asked := time.monotonic()) < t1:
        try:
            if spec["workload"] == "handoff":
                await acquire()
                acquired = time.monotonic()
                await release()
                rec.cycles.append([asked, acquired, acquired, time.monotonic()])
            elif await cas():
                if (done := time.monotonic()) <= t1:
                    rec.latencies_s.append(done - asked)
            else:
                rec.conflicts += 1
        except Exception as exc:  # counted, not fatal: a benchmark reports failures
            rec.error(exc)
            await trio.sleep(0.01)
    return rec


async def _chubbyfs_worker(spec: dict) -> None:
    import trio

    from chubbyfs.client.connection import CellError
    from chubbyfs.client.session import open_session

    cell = spec["cell"]
    async with AsyncExitStack() as stack:
        # A blocked Acquire is one call: give it longer than any queue wait.
        session = await stack.enter_async_context(
            open_session(cell, addresses=spec["addresses"], call_timeout_s=120.0))
        if spec["workload"] == "handoff":
            handle = await session.open(f"/ls/{cell}/{LOCK_NAME}", write=True, lock=True, create="file")
        else:
            handle = await session.open(f"/ls/{cell}/{_file_name(spec)}", write=True, create="file")

        async def cas() -> bool:
            _, stat = await handle.get_contents_and_stat()
            try:
                await handle.set_contents(VALUE, expected_generation=stat.content_generation)
                return True
            except CellError as exc:
                if exc.code == "cas_mismatch":
                    return False
                raise

        # Warm-up: one cycle, so that the measured window starts with a live link to the master.
        if spec["workload"] == "handoff":
            await handle.acquire()
            await handle.release()
        else:
            await cas()
        _ready()
        window = await trio.to_thread.run_sync(_read_line)
        rec = await _async_loop(spec, window, handle.acquire, handle.release, cas)
    _report(rec.as_dict())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _etcd_worker(spec: dict) -> None:
    import trio

    from _http import HttpConnection

    host, port = spec["address"]
    conn = HttpConnection(host, port)
    try:
        if spec["workload"] == "handoff":
            # One lease per contender, as etcdctl lock's session has; long
            # enough for the whole run, so that no keep-alive traffic competes.
            grant = await conn.post_json("/v3/lease/grant", {"TTL": int(spec["duration_s"]) + 120})
            lease = grant["ID"]
            lock_name = _b64(LOCK_NAME.encode())
            held: list[str] = []

            async def acquire() -> None:
                held.append((await conn.post_json("/v3/lock/lock", {"name": lock_name, "lease": lease}))["key"])

            async def release() -> None:
                await conn.post_json("/v3/lock/unlock", {"key": held.pop()})

            await acquire()
            await release()
            _ready()
            window = await trio.to_thread.run_sync(_read_line)
            rec = await _async_loop(spec, window, acquire, release, lambda: None)
            await conn.post_json("/v3/lease/revoke", {"ID": lease})
        else:
            key = _b64(_file_name(spec).encode())
            value = _b64(VALUE)

            async def cas() -> bool:
                got = await conn.post_json("/v3/kv/range", {"key": key})
                mod_revision = got["kvs"][0]["mod_revision"] if got.get("kvs") else "0"
                answer = await conn.post_json("/v3/kv/txn", {
                    "compare": [{"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision}],
                    "success": [{"request_put": {"key": key, "value": value}}]})
                return bool(answer.get("succeeded"))  # JSON leaves out a false field

            await cas()
            _ready()
            window = await trio.to_thread.run_sync(_read_line)
            rec = await _async_loop(spec, window, None, None, cas)
    finally:
        await conn.aclose()
    _report(rec.as_dict())


def _zookeeper_worker(spec: dict) -> None:
    from kazoo.client import KazooClient
    from kazoo.exceptions import BadVersionError, NodeExistsError

    client = KazooClient(hosts=spec["hosts"], timeout=30.0)
    client.start(timeout=30)
    try:
        lock = client.Lock(f"/bench/{LOCK_NAME}", identifier=str(spec["index"]))
        path = f"/bench/{_file_name(spec)}"

        def cas() -> bool:
            _, stat = client.get(path)
            try:
                client.set(path, VALUE, version=stat.version)
                return True
            except BadVersionError:
                return False

        if spec["workload"] == "handoff":
            lock.acquire()
            lock.release()
        else:
            try:
                client.create(path, b"", makepath=True)
            except NodeExistsError:
                pass  # the shared file: another writer made it first
            cas()
        _ready()
        rec = _sync_loop(spec, _read_line(), lock.acquire, lock.release, cas)
    finally:
        client.stop()
        client.close()
    _report(rec.as_dict())


def worker_main() -> None:
    spec = _read_line()
    if spec["system"] == "zookeeper":
        _zookeeper_worker(spec)
        return
    import trio

    trio.run(_chubbyfs_worker if spec["system"] == "chubbyfs" else _etcd_worker, spec)


# ---- driver ------------------------------------------------------------------------------------

@dataclass
class Point:
    system: str
    workload: str  # "handoff", "cas" (own files) or "cas-shared" (one file)
    clients: int
    duration_s: float
    ops: int  # hand-offs, or successful CAS writes, completed inside the window
    ops_per_s: float
    # hand-off: acquire call -> granted; CAS: read + conditional write
    p50_ms: float
    p99_ms: float
    # hand-off only: holder calls release -> the next grant (the lock changing hands, or lying free)
    gap_p50_ms: float
    gap_p99_ms: float
    # hand-off only: a holder granted the lock before the previous one asked to release it
    exclusion_violations: int
    # hand-off only: grants to the contender that held the lock just before
    # (with a FIFO queue and others waiting, none)
    same_holder_regrants: int
    conflicts: int
    conflicts_per_s: float
    server_cpu_ms_per_op: float
    client_cpu_percent: float
    other_cpu_percent: float  # machine CPU used by neither the servers nor our clients
    errors: int
    first_error: str
    # With --rounds: the rate of every round; the other fields are the median round's.
    rounds_ops_per_s: list[float] = field(default_factory=list)


def handoff_stats(cycles: list[list[float]], t0: float, t1: float) -> tuple[list[float], list[float], int, int]:
    """(acquire latencies, hand-off gaps, exclusion violations, re-grants to
    the same contender) of the cycles granted inside [t0, t1], from all
    contenders' records merged by grant time. Each cycle is
    [asked, acquired, release_asked, released, contender]. The gap runs from
    one holder asking to release to the next grant, whoever gets it: the time
    the lock spends changing hands (or lying free)."""
    ordered = sorted(cycles, key=lambda c: c[1])
    latencies, gaps, violations, regrants = [], [], 0, 0
    for prev, cur in zip([None] + ordered[:-1], ordered):
        if not t0 <= cur[1] <= t1:
            continue
        latencies.append(cur[1] - cur[0])
        if prev is None:
            continue
        if cur[1] < prev[2]:
            violations += 1  # granted while the previous holder had not yet let go
        else:
            gaps.append(cur[1] - prev[2])
        regrants += cur[4] == prev[4]
    return latencies, gaps, violations, regrants


def run_point(system: str, workload: str, connect: dict, server_pids: list[int], clients: int,
              duration_s: float, profile: Callable[[], Any] | None = None) -> Point:
    base = workload.removesuffix("-shared")
    specs = [dict(connect, system=system, workload=base, shared=workload.endswith("-shared"),
                  index=i, duration_s=duration_s) for i in range(clients)]
    results, window = run_workers(__file__, specs, duration_s, {"servers": server_pids}, during=profile,
                                  what=system + " client")
    t0, t1 = window.t0, window.t1
    for i, out in enumerate(results):
        for c in out["cycles"]:
            c.append(i)
    cycles = [c for r in results for c in r["cycles"]]
    gaps: list[float] = []
    violations = regrants = 0
    if base == "handoff":
        latencies, gaps, violations, regrants = handoff_stats(cycles, t0, t1)
    else:
        latencies = [x for r in results for x in r["latencies_s"]]
    latencies.sort()
    gaps.sort()
    ops = len(latencies)
    conflicts = sum(r["conflicts"] for r in results)
    errors = sum(r["errors"] for r in results)
    server_s = window.cpu_s["servers"]
    return Point(system=system, workload=workload, clients=clients, duration_s=duration_s, ops=ops,
                 ops_per_s=ops / duration_s,
                 p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
                 gap_p50_ms=percentile(gaps, 0.50) * 1e3, gap_p99_ms=percentile(gaps, 0.99) * 1e3,
                 exclusion_violations=violations, same_holder_regrants=regrants, conflicts=conflicts, conflicts_per_s=conflicts / duration_s,
                 server_cpu_ms_per_op=server_s / ops * 1e3 if ops else float("nan"),
                 client_cpu_percent=window.cpu_s["workers"] / duration_s * 100,
                 other_cpu_percent=window.other_cpu_s() / duration_s * 100,
                 errors=errors, first_error=next((r["first_error"] for r in results if r["first_error"]), ""))


def workload_plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    plan = [("handoff", n) for n in args.contenders]
    for n in args.writers:
        plan.append(("cas", n))
        if n > 1:
            plan.append(("cas-shared", n))
    return plan


def run_plan(system: str, args: argparse.Namespace, connect: dict, server_pids: list[int],
             profile_pid: int | None = None) -> list[Point]:
    points = []
    for workload, n in workload_plan(args):
        profile: Callable[[], Callable[[], None]] | None = None
        if profile_pid is not None and args.py_spy:
            def start(name: str = f"{system}-{workload}-{n}") -> Callable[[], None]:
                return start_profiler(args, profile_pid, f"{name}-{len(args.profiles)}")
            profile = start
        point = run_point(system, workload, connect, server_pids, n, args.duration, profile)
        extra = (f"gap p50 {point.gap_p50_ms:.2f} ms, exclusion violations {point.exclusion_violations}, "
                 f"same-holder re-grants {point.same_holder_regrants}"
                 if workload == "handoff" else f"conflicts {point.conflicts}")
        log(f"{system:<9} {workload:<10} {n:>2}: {point.ops_per_s:7.0f}/s  p50 {point.p50_ms:7.2f} ms  "
            f"p99 {point.p99_ms:7.2f} ms  {extra}, server cpu {point.server_cpu_ms_per_op:.2f} ms/op, "
            f"other load {point.other_cpu_percent:.0f}%, errors {point.errors}"
            + (f" (first: {point.first_error})" if point.errors else ""))
        points.append(point)
    return points


def bench_chubbyfs(args: argparse.Namespace, workdir: Path) -> dict:
    import trio

    from chubbyfs.client.connection import open_cell_connection
    from chubbyfs.testing.localcell import LocalCell

    directory = workdir / "chubbyfs"
    directory.mkdir()
    cell = LocalCell(directory, 3, name="bench", state_machine="chubby")
    addresses = list(cell.addresses.values())
    cell.start_all()
    try:
        async def leader_now() -> int:
            async with open_cell_connection(addresses, cell=cell.name) as conn:
                return await cell.wait_for_leader(conn, timeout_s=60)

        try:
            leader = trio.run(leader_now)
        except trio.TooSlowError:
            tails = "\n".join(f"--- replica {rid} log (tail):\n{cell.log_text(rid)[-3000:]}" for rid in cell.addresses)
            raise SystemExit(f"chubbyfs: no master within 60 s\n{tails}") from None
        log(f"chubbyfs: 3 replicas up, master {leader}")
        # The master first: clients find it at once, as they would after their first redirect.
        connect = {"cell": cell.name, "addresses": [cell.addresses[leader]]
                   + [a for rid, a in cell.addresses.items() if rid != leader]}
        pids = [p.pid for p in cell.procs.values()]
        points = run_plan("chubbyfs", args, connect, pids, profile_pid=cell.procs[leader].pid)
        if any(p.errors for p in points):
            # Failed calls: show whether mastership moved (each new master logs its epoch).
            for rid in cell.addresses:
                log(f"--- chubbyfs replica {rid} log (tail):\n{cell.log_text(rid)[-1500:]}")
    finally:
        cell.stop_all()
    return {"points": points, "version": "this tree"}


def bench_zookeeper(args: argparse.Namespace, workdir: Path) -> dict:
    from _zk import ZkEnsemble, ensure_kazoo, ensure_zookeeper_installed, zookeeper_version
    from chubbyfs.testing.localcell import free_ports

    java = ensure_zookeeper_installed()
    kazoo_version = ensure_kazoo()
    directory = workdir / "zookeeper"
    directory.mkdir()
    ports = free_ports(9)
    ensemble = ZkEnsemble(directory, java, ports[:3], ports[3:6], ports[6:])
    ensemble.start_all()
    try:
        leader = ensemble.wait_for_leader()
        version = zookeeper_version()
        log(f"zookeeper {version}: 3 servers up, leader {leader} (kazoo {kazoo_version})")
        connect = {"hosts": f"127.0.0.1:{ensemble.client_ports[leader]}"}
        pids = [ensemble.pid(s) for s in ensemble.servers]
        points = run_plan("zookeeper", args, connect, pids)
    finally:
        ensemble.stop_all()
    return {"points": points, "version": version, "client": f"kazoo {kazoo_version}"}


def bench_etcd(args: argparse.Namespace, workdir: Path) -> dict:
    import trio

    from _etcd import EtcdCluster, ensure_etcd_installed, etcd_version
    from chubbyfs.testing.localcell import free_ports

    binary = ensure_etcd_installed()
    directory = workdir / "etcd"
    directory.mkdir()
    ports = free_ports(6)
    cluster = EtcdCluster(directory, binary, ports[:3], ports[3:])
    cluster.start_all()
    try:
        leader = trio.run(cluster.wait_for_leader)
        version = etcd_version(binary)
        log(f"etcd {version}: 3 members up, leader m{leader}")
        connect = {"address": list(cluster.client_address(leader))}
        pids = [cluster.pid(m) for m in cluster.members]
        points = run_plan("etcd", args, connect, pids)
    finally:
        cluster.stop_all()
    return {"points": points, "version": version, "client": "v3 JSON gateway"}


def merge_rounds(rounds: list[dict]) -> dict:
    """Per point, the round with the median rate, so that its latency and CPU
    figures belong together; every round's rate is kept beside it."""
    merged = dict(rounds[-1])
    points = []
    for i in range(len(rounds[0]["points"])):
        candidates = sorted((r["points"][i] for r in rounds), key=lambda p: p.ops_per_s)
        median = candidates[(len(candidates) - 1) // 2]
        median.rounds_ops_per_s = [r["points"][i].ops_per_s for r in rounds]
        points.append(median)
    merged["points"] = points
    return merged


# ---- profiling (investigation only) ---------------------------------------------------------

def start_profiler(args: argparse.Namespace, pid: int, name: str) -> Callable[[], None]:
    """Sample the chubbyfs master with py-spy through one point, while it holds
    the GIL (its Python CPU time). Returns the call that waits for the file."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = Path(args.py_spy)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.txt"
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(math.ceil(args.duration)),
           "--rate", "250", "--format", "raw", "--nonblocking", "--gil", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish() -> None:
        proc.wait(timeout=60)
        args.profiles.append(str(out))
    return finish


# ---- output ------------------------------------------------------------------------------------

def _num(x: float, digits: int = 0) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def format_table(results: dict, args: argparse.Namespace) -> str:
    systems = [s for s in SYSTEMS if s in results]
    versions = ", ".join(f"{s} {results[s]['version']}" for s in systems)
    lines = [f"Locks and CAS writes, 3 replicas each on 127.0.0.1, fsync on, {args.duration:g} s per point, "
             f"{os.cpu_count()} cores, one client process per contender/writer ({versions})"
             + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""), ""]
    zk = {(p.workload, p.clients): p for p in results["zookeeper"]["points"]} if "zookeeper" in results else {}

    def ratio(p: Point) -> str:
        base = zk.get((p.workload, p.clients))
        return f"{p.ops_per_s / base.ops_per_s:.2f}" if base and base.ops_per_s else "-"

    head = (f"{'hand-off':<14} {'system':<9} | {'hand-offs/s':>11} {'acq p50':>8} {'acq p99':>8} "
            f"{'gap p50':>8} {'gap p99':>8} {'cpu ms/op':>9} {'viol':>4} {'err':>4} | {'x zk':>5}")
    lines += [head, "-" * len(head)]
    for workload, n in workload_plan(args):
        if workload != "handoff":
            continue
        for s in systems:
            p = next(q for q in results[s]["points"] if q.workload == workload and q.clients == n)
            lines.append(f"{f'{n} contenders':<14} {s:<9} | {p.ops_per_s:>11.0f} {_num(p.p50_ms, 2):>8} "
                         f"{_num(p.p99_ms, 2):>8} {_num(p.gap_p50_ms, 2):>8} {_num(p.gap_p99_ms, 2):>8} "
                         f"{_num(p.server_cpu_ms_per_op, 2):>9} {p.exclusion_violations:>4} {p.errors:>4} | "
                         f"{ratio(p):>5}")
    lines.append("")
    head = (f"{'CAS write':<14} {'system':<9} | {'writes/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'confl/s':>8} {'':>8} {'cpu ms/op':>9} {'':>4} {'err':>4} | {'x zk':>5}")
    lines += [head, "-" * len(head)]
    for workload, n in workload_plan(args):
        if workload == "handoff":
            continue
        label = f"{n} {'shared' if workload == 'cas-shared' else 'own'}"
        for s in systems:
            p = next(q for q in results[s]["points"] if q.workload == workload and q.clients == n)
            lines.append(f"{label:<14} {s:<9} | {p.ops_per_s:>11.0f} {_num(p.p50_ms, 2):>8} "
                         f"{_num(p.p99_ms, 2):>8} {p.conflicts_per_s:>8.0f} {'':>8} "
                         f"{_num(p.server_cpu_ms_per_op, 2):>9} {'':>4} {p.errors:>4} | {ratio(p):>5}")
    if args.rounds > 1:
        lines.append("")
        for s in systems:
            lines.append(f"{s} rate per round: " + "; ".join(
                f"{p.workload} {p.clients}: " + ", ".join(f"{x:.0f}" for x in p.rounds_ops_per_s)
                for p in results[s]["points"]))
    lines += [
        "",
        "acq: acquire call -> lock granted (includes waiting behind the other contenders); gap: holder calls "
        "release -> the next grant; viol: grants before the previous holder released (must be 0).",
        "CAS: read the version, then write conditioned on it; writes/s counts successful writes, confl/s the "
        "writes refused because another writer got there first; p50/p99 per read+write.",
        "cpu ms/op: the 3 servers' CPU time over the window / operations. x zk: rate / ZooKeeper's rate.",
        "other load (CPU used by neither the servers nor the clients, of "
        f"{os.cpu_count() * 100}%): " + "; ".join(
            f"{s} " + ", ".join(f"{_num(p.other_cpu_percent)}%" for p in results[s]["points"]) for s in systems),
    ]
    return "\n".join(lines)


def to_json(results: dict, args: argparse.Namespace) -> dict:
    out: dict[str, Any] = json_header(args)
    for s, r in results.items():
        out[s] = {"version": r["version"], "points": [asdict(p) for p in r["points"]]}
        if "client" in r:
            out[s]["client"] = r["client"]
    if args.profiles:
        out["profiles"] = args.profiles
    return _no_nan(out)


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: an undefined number (no operations) becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _counts(ap: argparse.ArgumentParser, text: str, option: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        ap.error(f"{option} takes a comma-separated list of integers, e.g. 2,8")
    if not counts or any(c <= 0 for c in counts):
        ap.error(f"{option} needs positive counts")
    return counts


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    ap.add_argument("--contenders", default="2,8", help="hand-off contender counts (default 2,8)")
    ap.add_argument("--writers", default="1,8", help="CAS writer counts (default 1,8); "
                    "counts above 1 also run on one shared file")
    ap.add_argument("--skip-zk", action="store_true", help="leave ZooKeeper out")
    ap.add_argument("--skip-etcd", action="store_true", help="leave etcd out")
    ap.add_argument("--skip-chubbyfs", action="store_true", help="leave chubbyfs out")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system N times, rotating which goes first, and report per point the "
                    "round with the median rate (default 1)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="print the results as JSON instead of the table; with FILE, write the JSON there "
                    "and print the table as well")
    ap.add_argument("--py-spy", metavar="DIR", help="sample the chubbyfs master with py-spy during each point "
                    "into DIR and print its top functions (investigation only)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.contenders = _counts(ap, args.contenders, "--contenders")
    args.writers = _counts(ap, args.writers, "--writers")
    if args.duration <= 0 or args.rounds <= 0:
        ap.error("--duration and --rounds must be positive")
    if args.skip_zk and args.skip_etcd and args.skip_chubbyfs:
        ap.error("nothing to run: every system skipped")
    args.profiles = []
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    runners = {"chubbyfs": bench_chubbyfs, "zookeeper": bench_zookeeper, "etcd": bench_etcd}
    skipped = {"chubbyfs": args.skip_chubbyfs, "zookeeper": args.skip_zk, "etcd": args.skip_etcd}
    systems = [name for name in SYSTEMS if not skipped[name]]
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="chubbyfs-bench-locks-") as tmp:
        for r in range(args.rounds):
            # Rotate the order so that no system always runs first while the
            # other load on the machine drifts.
            for name in systems[r % len(systems):] + systems[:r % len(systems)]:
                if args.rounds > 1:
                    log(f"round {r + 1}/{args.rounds}: {name}")
                workdir = Path(tmp) / f"r{r}"
                workdir.mkdir(exist_ok=True)
                rounds[name].append(runners[name](args, workdir))
    results = {name: merge_rounds(rounds[name]) for name in systems}
    if args.json:
        text = json.dumps(to_json(results, args), indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(format_table(results, args))
    for path in args.profiles:
        print(f"\npy-spy {path}: top functions by self time (self %, inclusive %)")
        for fn, self_pct, incl_pct in top_functions(Path(path)):
            print(f"  {self_pct:5.1f} {incl_pct:5.1f}  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
