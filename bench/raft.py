"""Benchmark of the replicated log: chubbyfs beside etcd, same workload, same run.

    .venv/bin/python bench/raft.py [--duration 10] [--clients 1,8,64] [--trials 5]
                                   [--skip-etcd] [--skip-chubbyfs] [--json [FILE]]
                                   [--rounds 1] [--clients-per-proc 16] [--py-spy DIR]
                                   [--py-spy-replica leader|follower]

For each system, a 3-replica cell on 127.0.0.1 with fsync on (both systems'
defaults): N concurrent clients each doing sequential puts of a 100-byte value
to distinct keys for `--duration` seconds; commits/s, p50/p99 latency and the
replicas' CPU time per write. Then failover: with one writer running, kill -9
the leader and time until the first write issued after the kill is
acknowledged; restart the killed replica between trials.

Clients run in separate worker processes (this script with `--worker`), at most
`--clients-per-proc` per process, so that a saturated Python client does not
cap what is measured. A script, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root, for `chubbyfs`

import trio  # noqa: E402

from _workers import percentile, run_workers  # noqa: E402

VALUE = b"v" * 100
# The failover writer's etcd client abandons an unanswered attempt after this
# long (steady-state p99 is a few ms); it bounds how much a put lost with the
# old leader inflates etcd's measured failover.
FAILOVER_ATTEMPT_TIMEOUT_S = 0.2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- worker process: the clients -------------------------------------------------------------

async def _make_putters(spec: dict, n: int, stack: Any) -> list[Callable[[str], Awaitable[None]]]:
    """One independent client per entry: its own connection to the system."""
    putters: list[Callable[[str], Awaitable[None]]] = []
    if spec["system"] == "chubbyfs":
        from chubbyfs.client.connection import open_cell_connection

        for _ in range(n):
            conn = await stack.enter_async_context(
                open_cell_connection(spec["addresses"], cell=spec["cell"], call_timeout_s=30.0))

            async def put(key: str, conn: Any = conn) -> None:
                await conn.call("put", key=key, value=VALUE)
            putters.append(put)
    else:
        from _etcd import EtcdClient

        addresses = [tuple(a) for a in spec["addresses"]]
        for _ in range(n):
            client = EtcdClient(addresses)
            stack.push_async_callback(client.aclose)

            async def put(key: str, client: Any = client) -> None:
                await client.put(key, VALUE)
            putters.append(put)
    return putters


async def _worker_main() -> None:
    from contextlib import AsyncExitStack

    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = bytearray()

    async def read_line() -> dict:
        while b"\n" not in buffer:
            data = await stdin.receive_some(65536)
            if not data:
                raise EOFError("the benchmark driver went away")
            buffer.extend(data)
        at = buffer.index(b"\n")
        line = bytes(buffer[:at])
        del buffer[:at + 1]
        return json.loads(line)

    spec = await read_line()
    async with AsyncExitStack() as stack:
        putters = await _make_putters(spec, spec["clients"], stack)
        async with trio.open_nursery() as nursery:  # warm-up: connect, find the leader
            for i, put in enumerate(putters):
                nursery.start_soon(put, f"{spec['prefix']}-{i}-warmup")
        print("ready", flush=True)
        window = await read_line()
        t0, t1 = window["t0"], window["t1"]
        latencies: list[float] = []
        errors = [0]

        async def client(i: int, put: Callable[[str], Awaitable[None]]) -> None:
            await trio.sleep(max(0.0, t0 - time.monotonic()))
            seq = 0
            while True:
                start = time.monotonic()
                if start >= t1:
                    return
                try:
                    await put(f"{spec['prefix']}-{i}-{seq}")
                except Exception:  # the benchmark counts failures rather than dying on one
                    errors[0] += 1
                    continue
                finally:
                    seq += 1
                end = time.monotonic()
                if end <= t1:
                    latencies.append(end - start)

        async with trio.open_nursery() as nursery:
            for i, put in enumerate(putters):
                nursery.start_soon(client, i, put)
    sys.stdout.write(json.dumps({"latencies_s": latencies, "errors": errors[0]}) + "\n")
    sys.stdout.flush()


# ---- driver --------------------------------------------------------------------------------

@dataclass
class Point:
    clients: int
    writes: int
    duration_s: float
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_write: float
    leader_cpu_us_per_write: float  # the leader alone (the rest: followers)
    server_cpu_percent: float
    client_cpu_percent: float
    # CPU that neither the servers nor our clients used: other load on the
    # machine that competed with the measurement.
    other_cpu_percent: float
    # Time the servers' threads were runnable but waiting for a CPU, per write.
    server_runq_wait_us_per_write: float
    client_procs: int
    errors: int
    # With --rounds: writes/s of every round; the other fields are the median round's.
    rounds_writes_per_s: list[float] = field(default_factory=list)


@dataclass
class Failover:
    trials_s: list[float] = field(default_factory=list)
    elected_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.trials_s) if self.trials_s else float("nan")


def run_point(system: str, spec_base: dict, server_pids: list[int], leader_pid: int, clients: int,
              duration_s: float, per_proc: int, run_id: str) -> Point:
    procs = max(1, math.ceil(clients / per_proc))
    sizes = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    specs = [dict(spec_base, system=system, clients=size, prefix=f"{run_id}-c{clients}-w{w}")
             for w, size in enumerate(sizes)]
    groups = {"leader": [leader_pid], "followers": [pid for pid in server_pids if pid != leader_pid]}
    results, window = run_workers(__file__, specs, duration_s, groups, start_delay_s=0.2, what=system + " client")
    server_s = window.cpu_s["leader"] + window.cpu_s["followers"]
    server_wait_s = window.runq_wait_s["leader"] + window.runq_wait_s["followers"]
    latencies = [x for out in results for x in out["latencies_s"]]
    errors = sum(out["errors"] for out in results)
    latencies.sort()
    writes = len(latencies)
    return Point(clients=clients, writes=writes, duration_s=duration_s,
                 writes_per_s=writes / duration_s,
                 p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
                 server_cpu_us_per_write=server_s / writes * 1e6 if writes else float("nan"),
                 leader_cpu_us_per_write=window.cpu_s["leader"] / writes * 1e6 if writes else float("nan"),
                 server_cpu_percent=server_s / duration_s * 100,
                 client_cpu_percent=window.cpu_s["workers"] / duration_s * 100,
                 other_cpu_percent=window.other_cpu_s() / duration_s * 100,
                 server_runq_wait_us_per_write=server_wait_s / writes * 1e6 if writes else float("nan"),
                 client_procs=procs, errors=errors)


async def failover_trial(put: Callable[[str], Awaitable[None]], kill_leader: Callable[[], Awaitable[float]],
                         any_leader: Callable[[], Awaitable[bool]], prefix: str,
                         timeout_s: float = 60.0) -> tuple[float, float]:
    """(kill -> first write issued after the kill acknowledged, kill -> a new leader seen)."""
    acked_after_kill = trio.Event()
    state: dict[str, float] = {}

    async def writer() -> None:
        seq = 0
        while True:
            issued = time.monotonic()
            try:
                await put(f"{prefix}-{seq}")
            except Exception:  # unavailable past the client's deadline: keep writing
                await trio.sleep(0.01)
                continue
            finally:
                seq += 1
            if "kill" in state and issued >= state["kill"]:
                state["first_write"] = time.monotonic()
                acked_after_kill.set()
                return

    async def watch_election() -> None:
        while "kill" not in state:
            await trio.sleep(0.005)
        while not await any_leader():
            await trio.sleep(0.01)
        state["elected"] = time.monotonic()

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(1.0)  # steady state before the kill
            state["kill"] = await kill_leader()
            nursery.start_soon(watch_election)
            await acked_after_kill.wait()
            with trio.move_on_after(5.0):
                while "elected" not in state:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    kill = state["kill"]
    return state["first_write"] - kill, state.get("elected", float("nan")) - kill


# ---- chubbyfs ------------------------------------------------------------------------------

def bench_chubbyfs(args: argparse.Namespace, workdir: Path, run_id: str, trials: int) -> dict:
    from chubbyfs.client.connection import open_cell_connection
    from chubbyfs.testing.localcell import LocalCell

    directory = workdir / f"chubbyfs-{run_id}"
    directory.mkdir()
    # The replicated register (put/get) isolates the log from the Chubby namespace.
    cell = LocalCell(directory, 3, name="bench", state_machine="kv")
    addresses = list(cell.addresses.values())
    cell.start_all()
    profiles: list[str] = []
    try:
        async def leader_now() -> int:
            async with open_cell_connection(addresses, cell=cell.name) as conn:
                with trio.move_on_after(60):
                    while all(cell.running(rid) for rid in cell.addresses):
                        with trio.move_on_after(0.5):
                            return await cell.wait_for_leader(conn, timeout_s=1.0)
            return 0  # a replica exited, or no leader within the minute

        leader = 0
        try:
            leader = trio.run(leader_now)
        except* trio.TooSlowError:
            pass
        if not leader:
            tails = "\n".join(f"--- replica {rid} log (tail):\n{cell.log_text(rid)[-4000:]}" for rid in cell.addresses)
            raise SystemExit(f"chubbyfs: a replica exited or no leader within 60 s\n{tails}") from None
        log(f"chubbyfs: 3 replicas up, leader {leader}")
        points = []
        spec = {"addresses": addresses, "cell": cell.name}
        for n in args.clients:
            pids = [p.pid for p in cell.procs.values()]
            profiled = leader if args.py_spy_replica == "leader" else min(r for r in cell.procs if r != leader)
            profiler = start_profiler(args, cell.procs[profiled].pid, workdir, f"chubbyfs-{args.py_spy_replica}-c{n}")
            point = run_point("chubbyfs", spec, pids, cell.procs[leader].pid, n, args.duration,
                              args.clients_per_proc, run_id)
            if profiler is not None:
                profiles.append(finish_profiler(*profiler))
            log(f"chubbyfs {n:>3} clients: {point.writes_per_s:8.0f} writes/s  p50 {point.p50_ms:6.2f} ms  "
                f"p99 {point.p99_ms:6.2f} ms  {point.server_cpu_us_per_write:6.0f} us cpu/write "
                f"(leader {point.leader_cpu_us_per_write:.0f})  "
                f"clients {point.client_cpu_percent:.0f}% cpu, other load {point.other_cpu_percent:.0f}%, "
                f"run-queue wait {point.server_runq_wait_us_per_write:.0f} us/write")
            points.append(point)

        async def failovers() -> Failover:
            result = Failover()
            async with open_cell_connection(addresses, cell=cell.name, call_timeout_s=30.0) as conn:
                async def put(key: str) -> None:
                    await conn.call("put", key=key, value=VALUE)

                for trial in range(trials):
                    leader = await cell.wait_for_leader(conn, timeout_s=60)

                    async def kill_leader(leader: int = leader) -> float:
                        t = time.monotonic()
                        cell.kill(leader)
                        return t

                    async def any_leader(old: int = leader) -> bool:
                        for rid in cell.addresses:
                            if rid != old:
                                st = await cell.status(conn, rid)
                                if st and st["role"] == "leader":
                                    return True
                        return False

                    total, elected = await failover_trial(put, kill_leader, any_leader, f"{run_id}-fo{trial}")
                    result.trials_s.append(total)
                    result.elected_s.append(elected)
                    log(f"chubbyfs failover trial {trial + 1}: first write {total:.3f} s after kill -9 "
                        f"(new leader seen at {elected:.3f} s)")
                    cell.start(leader)
                    new_leader = await cell.wait_for_leader(conn, timeout_s=60)
                    commit = (await cell.status(conn, new_leader))["commit"]
                    await cell.wait_caught_up(conn, leader, commit, timeout_s=60)
            return result

        failover = trio.run(failovers) if trials else Failover()
    finally:
        cell.stop_all()
    return {"points": points, "failover": failover, "profiles": profiles}


# ---- etcd ----------------------------------------------------------------------------------

def bench_etcd(args: argparse.Namespace, workdir: Path, run_id: str, trials: int) -> dict:
    from _etcd import EtcdClient, EtcdCluster, ensure_etcd_installed, etcd_version
    from chubbyfs.testing.localcell import free_ports

    binary = ensure_etcd_installed()
    directory = workdir / f"etcd-{run_id}"
    directory.mkdir()
    ports = free_ports(6)
    cluster = EtcdCluster(directory, binary, ports[:3], ports[3:])
    cluster.start_all()
    try:
        leader = trio.run(cluster.wait_for_leader)
        log(f"etcd {etcd_version(binary)}: 3 members up, leader m{leader}")

        def addresses_from(first: int) -> list[tuple[str, int]]:
            order = [first] + [m for m in cluster.members if m != first]
            return [cluster.client_address(m) for m in order]

        points = []
        for n in args.clients:
            # Clients talk to the leader, as chubbyfs clients talk to the master.
            spec = {"addresses": addresses_from(leader)}
            pids = [cluster.pid(m) for m in cluster.members]
            point = run_point("etcd", spec, pids, cluster.pid(leader), n, args.duration, args.clients_per_proc,
                              run_id)
            log(f"etcd     {n:>3} clients: {point.writes_per_s:8.0f} writes/s  p50 {point.p50_ms:6.2f} ms  "
                f"p99 {point.p99_ms:6.2f} ms  {point.server_cpu_us_per_write:6.0f} us cpu/write "
                f"(leader {point.leader_cpu_us_per_write:.0f})  "
                f"clients {point.client_cpu_percent:.0f}% cpu, other load {point.other_cpu_percent:.0f}%, "
                f"run-queue wait {point.server_runq_wait_us_per_write:.0f} us/write")
            points.append(point)

        async def failovers() -> Failover:
            result = Failover()
            for trial in range(trials):
                leader = await cluster.wait_for_leader(timeout_s=60)
                client = EtcdClient(addresses_from(leader), attempt_timeout_s=FAILOVER_ATTEMPT_TIMEOUT_S)

                async def put(key: str) -> None:
                    await client.put(key, VALUE)

                async def kill_leader(leader: int = leader) -> float:
                    t = time.monotonic()
                    cluster.kill(leader)
                    return t

                async def any_leader(old: int = leader) -> bool:
                    for m in cluster.members:
                        if m != old:
                            st = await cluster.member_status(m)
                            if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                                return True
                    return False

                try:
                    total, elected = await failover_trial(put, kill_leader, any_leader, f"{run_id}-efo{trial}")
                finally:
                    await client.aclose()
                result.trials_s.append(total)
                result.elected_s.append(elected)
                log(f"etcd failover trial {trial + 1}: first write {total:.3f} s after kill -9 "
                    f"(new leader seen at {elected:.3f} s)")
                cluster.start(leader)
                await wait_etcd_member_caught_up(cluster, leader)
            return result

        failover = trio.run(failovers) if trials else Failover()
        version = etcd_version(binary)
    finally:
        cluster.stop_all()
    return {"points": points, "failover": failover, "version": version}


async def wait_etcd_member_caught_up(cluster: Any, member: int, timeout_s: float = 60.0) -> None:
    with trio.fail_after(timeout_s):
        while True:
            leader = await cluster.wait_for_leader(timeout_s=timeout_s)
            lst, mst = await cluster.member_status(leader), await cluster.member_status(member)
            if lst and mst and int(mst["raftAppliedIndex"]) >= int(lst["raftIndex"]) - 1:
                return
            await trio.sleep(0.05)


def merge_rounds(rounds: list[dict]) -> dict:
    """One result per system: for each client count, the round with the median
    writes/s (so that its latency and CPU figures belong together)."""
    merged = dict(rounds[-1])  # failover, version and profiles come from the last round
    points = []
    for i in range(len(rounds[0]["points"])):
        candidates = sorted((r["points"][i] for r in rounds), key=lambda p: p.writes_per_s)
        median = candidates[(len(candidates) - 1) // 2]
        median.rounds_writes_per_s = [r["points"][i].writes_per_s for r in rounds]
        points.append(median)
    merged["points"] = points
    merged["profiles"] = [path for r in rounds for path in r.get("profiles", [])]
    return merged


# ---- profiling (investigation only) ---------------------------------------------------------

def start_profiler(args: argparse.Namespace, pid: int, workdir: Path, name: str) -> tuple | None:
    """With --py-spy, sample a replica (the leader, or with --py-spy-replica
    follower a follower) during one point while it holds the GIL
    (Python CPU time; waits in epoll and fdatasync release the GIL and are left out).
    py-spy must be on PATH."""
    if not args.py_spy:
        return None
    out_dir = Path(args.py_spy)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.txt"
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.duration) + 1),
           "--rate", "250", "--format", "raw", "--nonblocking", "--gil", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def finish_profiler(proc: subprocess.Popen, out: Path) -> str:
    proc.wait(timeout=60)
    return str(out)


def top_functions(collapsed: Path, limit: int = 25) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from py-spy's collapsed-stack output."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        self_counts[leaf] = self_counts.get(leaf, 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    ranked = sorted(self_counts.items(), key=lambda kv: -kv[1])[:limit]
    return [(f, c / total * 100, incl_counts[f] / total * 100) for f, c in ranked]


# ---- output --------------------------------------------------------------------------------

def format_table(results: dict, args: argparse.Namespace) -> str:
    systems = [s for s in ("chubbyfs", "etcd") if s in results]
    lines = [f"Replicated log, 3 replicas on 127.0.0.1, fsync on, {len(VALUE)}-byte puts to distinct keys, "
             f"{args.duration:g} s per point, {os.cpu_count()} cores"
             + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")]
    if "etcd" in results:
        lines[0] += f", etcd {results['etcd']['version']}"
    head = f"{'clients':>7}"
    for s in systems:
        head += (f" | {s + ' writes/s':>18} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/w':>8} {'ldr us/w':>8}"
                 f" {'wait us/w':>9}")
    if len(systems) == 2:
        head += f" | {'ratio':>5}"
    lines += [head, "-" * len(head)]
    for i, n in enumerate(args.clients):
        row = f"{n:>7}"
        for s in systems:
            p = results[s]["points"][i]
            row += (f" | {p.writes_per_s:>18.0f} {p.p50_ms:>7.2f} {p.p99_ms:>7.2f} "
                    f"{p.server_cpu_us_per_write:>8.0f} {p.leader_cpu_us_per_write:>8.0f} "
                    f"{p.server_runq_wait_us_per_write:>9.0f}")
        if len(systems) == 2:
            a, b = (results[s]["points"][i].writes_per_s for s in systems)
            row += f" | {a / b if b else float('nan'):>5.2f}"
        lines.append(row)
    if args.rounds > 1:
        for s in systems:
            lines.append(f"  {s} writes/s per round: " + "; ".join(
                f"{p.clients}c " + ", ".join(f"{w:.0f}" for w in p.rounds_writes_per_s)
                for p in results[s]["points"]))
    if args.trials:
        lines.append("")
        lines.append("failover: kill -9 of the leader -> first write acknowledged (median; all trials; "
                     "new leader seen)")
        for s in systems:
            fo = results[s]["failover"]
            trials = ", ".join(f"{t:.2f}" for t in fo.trials_s)
            elected = ", ".join(f"{t:.2f}" for t in fo.elected_s)
            lines.append(f"  {s:<9} median {fo.median_s:.2f} s   trials [{trials}] s   elected [{elected}] s")
    lines.append("")
    lines.append("cpu us/w: the 3 replicas' CPU time (utime+stime) over the interval / writes; ldr us/w: the "
                 "leader's share; wait us/w: "
                 "time their threads were runnable but waiting for a CPU / writes.")
    lines.append(("ratio: chubbyfs writes/s / etcd writes/s. " if len(systems) == 2 else "")
                 + "client CPU per point: " + "; ".join(
                     f"{s} " + ", ".join(f"{p.clients}c {p.client_cpu_percent:.0f}% in {p.client_procs}p"
                                         for p in results[s]["points"]) for s in systems))
    lines.append("other load (CPU used by neither the servers nor the clients, of "
                 f"{os.cpu_count() * 100}%): " + "; ".join(
                     f"{s} " + ", ".join(f"{p.clients}c {p.other_cpu_percent:.0f}%" for p in results[s]["points"])
                     for s in systems))
    return "\n".join(lines)


def json_header(args: argparse.Namespace) -> dict[str, Any]:
    """When, where and how a benchmark ran (shared with bench/locks.py)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "load_average_at_end": os.getloadavg()},
        "duration_s": args.duration, "rounds": args.rounds, "value_bytes": len(VALUE), "replicas": 3,
    }


def to_json(results: dict, args: argparse.Namespace) -> dict:
    out: dict[str, Any] = json_header(args)
    for s, r in results.items():
        out[s] = {
            "points": [asdict(p) for p in r["points"]],
            "failover": {"median_s": r["failover"].median_s, "trials_s": r["failover"].trials_s,
                         "new_leader_seen_s": r["failover"].elected_s},
        }
        if "version" in r:
            out[s]["version"] = r["version"]
        if r.get("profiles"):
            out[s]["profiles"] = r["profiles"]
    return out


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: an undefined number (no writes, no trials) becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per throughput point (default 10)")
    ap.add_argument("--clients", default="1,8,64", help="concurrent client counts (default 1,8,64)")
    ap.add_argument("--trials", type=int, default=5, help="failover trials per system (default 5; 0 skips)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the throughput points N times, alternating which system goes first, "
                    "and report the median round per point (failover runs in the last round; default 1)")
    ap.add_argument("--skip-etcd", action="store_true", help="benchmark chubbyfs only")
    ap.add_argument("--skip-chubbyfs", action="store_true", help="benchmark etcd only")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="print the results as JSON instead of the table; with FILE, write the JSON there "
                    "and print the table as well")
    ap.add_argument("--clients-per-proc", type=int, default=16,
                    help="at most this many clients per worker process (default 16)")
    ap.add_argument("--py-spy", metavar="DIR", help="record the chubbyfs leader with py-spy into DIR "
                    "(py-spy must be on PATH) and print its top functions")
    ap.add_argument("--py-spy-replica", choices=("leader", "follower"), default="leader",
                    help="which replica --py-spy records (default: the leader)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        ap.error("--clients takes a comma-separated list of integers, e.g. 1,8,64")
    if not args.clients or any(c <= 0 for c in args.clients):
        ap.error("--clients needs positive counts")
    if args.duration <= 0 or args.trials < 0 or args.clients_per_proc <= 0 or args.rounds <= 0:
        ap.error("--duration, --clients-per-proc and --rounds must be positive, --trials at least 0")
    if args.skip_etcd and args.skip_chubbyfs:
        ap.error("nothing to run: both systems skipped")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        trio.run(_worker_main)
        return 0
    run_id = f"b{int(time.time())}"
    systems = [name for name, skip in (("chubbyfs", args.skip_chubbyfs), ("etcd", args.skip_etcd)) if not skip]
    runners = {"chubbyfs": bench_chubbyfs, "etcd": bench_etcd}
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="chubbyfs-bench-") as tmp:
        workdir = Path(tmp)
        for r in range(args.rounds):
            # Alternate the order so that neither system always runs first,
            # while the other load on the machine drifts.
            order = systems if r % 2 == 0 else systems[::-1]
            last = r == args.rounds - 1
            for name in order:
                if args.rounds > 1:
                    log(f"round {r + 1}/{args.rounds}: {name}")
                rounds[name].append(runners[name](args, workdir, f"{run_id}r{r}", args.trials if last else 0))
    results = {name: merge_rounds(rounds[name]) for name in systems}
    if args.json:
        text = json.dumps(_no_nan(to_json(results, args)), indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(format_table(results, args))
    for path in results.get("chubbyfs", {}).get("profiles", []):
        print(f"\npy-spy {path}: top functions by self time (self %, inclusive %)")
        for fn, self_pct, incl_pct in top_functions(Path(path)):
            print(f"  {self_pct:5.1f} {incl_pct:5.1f}  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
