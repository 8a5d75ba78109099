"""Benchmark of sessions and the client cache: chubbyfs beside ZooKeeper and etcd, same run.

    .venv/bin/python bench/sessions.py [--sessions 1000,10000] [--window 30] [--settle 15]
                                       [--reads-duration 5] [--cachers 10] [--write-trials 20]
                                       [--skip-zk] [--skip-etcd] [--json [FILE]]

Each system runs 3 replicas on 127.0.0.1 with fsync on, in a temporary
directory, stopped by PID at the end (chubbyfs: `LocalCell`; ZooKeeper 3.8
and etcd 3.4: Debian's packages, see bench/_zk.py and bench/_etcd.py).

1. Idle sessions. For each N in `--sessions`, a fresh cell holds N idle
   sessions for `--window` seconds (after `--settle` seconds, so that the
   creation burst is over and every session is on its regular KeepAlive
   cycle). Reported: the servers' CPU (% of one core: the 3 replicas
   summed, and the master/leader alone), their RSS, and what went over the
   wire and into the log per second.
   - chubbyfs: default 12 s leases; every session runs the library's real
     KeepAlive protocol (a long poll the master holds until a quarter lease
     before the lease ends, then answers with the extended lease and the
     session's items, which the next KeepAlive acknowledges), many sessions
     per client process over a few `CellConnection`s.
   - ZooKeeper: a 12 s session timeout; each session is its own TCP
     connection speaking ZooKeeper's wire protocol directly (connect, then a
     ping every 9 s, the rate a chubbyfs session renews at): the lightest
     real client, since a kazoo client per session (threads each) cannot run
     10,000 at once here. Sessions are spread over the 3 servers, as
     ZooKeeper clients are.
   etcd leases are not measured here (the JSON gateway streams keep-alives;
   see docs/benchmarks.md for the issue's figure).
2. Reads of one 100-byte file by one client process, `--reads-duration`
   seconds each: chubbyfs through the library with its cache, the same
   without the cache (every read a request to the master), ZooKeeper
   through kazoo's `get`, etcd through the JSON gateway's range (a
   linearizable read, its default). Reads/s and p50/p99 latency.
3. Invalidation: `--cachers` sessions cache a file; another session writes
   it. Reported: from the write's call to the moment the last caching
   session has dropped the old value (its `on_invalidate` hook ran), and the
   write's latency, beside the same write with nobody caching.

Client processes are this script with `--worker`. A script, not a test: it
prints numbers (progress on stderr, the table on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root, for `chubbyfs`

from _workers import percentile, run_workers  # noqa: E402
from locks import _counts, _no_nan, _num, _read_line, _ready, _report  # noqa: E402
from raft import json_header, log  # noqa: E402

VALUE = b"v" * 100
LEASE_MS = 12_000  # chubbyfs's default; ZooKeeper gets the same session timeout
ZK_PING_S = 9.0  # a chubbyfs session renews every 9 s (lease - a quarter lease)
SESSIONS_PER_WORKER = 2_500
CONNECTIONS_PER_WORKER = 4
CREATE_CONCURRENCY = 64
CREATE_RATE_PER_S = 500  # per worker: 10,000 sessions arrive over ~5 s, not in one burst
# Client processes yield the CPU to the servers: on this machine they share
# its cores, where real clients would run elsewhere.
WORKER_NICE = 10


# ---- worker processes ---------------------------------------------------------------------------

class _Stats:
    def __init__(self) -> None:
        self.renewals = 0
        self.errors = 0
        self.expired = 0
        self.first_error = ""

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text

    def as_dict(self) -> dict:
        return {"renewals": self.renewals, "errors": self.errors, "expired": self.expired,
                "first_error": self.first_error}

    async def count_window(self, window: dict) -> None:
        """Renewals are counted inside the CPU window only, so that the rate
        and the CPU time cover the same seconds."""
        import trio

        await trio.sleep(max(0.0, window["t0"] - time.monotonic()))
        before = self.renewals
        await trio.sleep(max(0.0, window["t1"] - time.monotonic()))
        self.renewals -= before


async def _chubbyfs_idle_worker(spec: dict) -> None:
    """`sessions` sessions, each with one KeepAlive always outstanding, acking
    what the previous reply delivered: what the library's session does."""
    import trio

    from chubbyfs.client.connection import CellError, open_cell_connection

    stats = _Stats()

    async def create(conn: Any) -> tuple[int, int]:
        for attempt in range(50):
            try:
                value = (await conn.call("create_session", idempotent=False))["value"]
                return value["session_id"], value["epoch"]
            except CellError as exc:
                # Concurrent creations can reach the log out of id order and
                # be refused (nothing created): ask again. An unknown outcome
                # may leave a session behind; it expires on its own.
                if exc.code not in ("invalid_argument", "unknown_outcome"):
                    raise
                await trio.sleep(0.01 * random.random() * (attempt + 1))
        raise RuntimeError("could not create a session")

    async def keep_alive(conn: Any, session_id: int, epoch: int) -> None:
        last = 0
        while True:
            try:
                reply = await conn.call("keep_alive", session_id=session_id, hold=True, ack=last,
                                        ack_epoch=epoch, timeout_s=LEASE_MS / 1000)
            except CellError as exc:
                if exc.code == "session_expired":
                    stats.expired += 1
                    return
                stats.error(f"{exc.code}: {exc.message}")
                await trio.sleep(0.05)
                continue
            value = reply["value"]
            if value["epoch"] != epoch:
                epoch, last = value["epoch"], 0
            for item in value["items"]:
                last = max(last, item[0])
            stats.renewals += 1

    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(open_cell_connection(spec["addresses"], cell=spec["cell"],
                                                                      call_timeout_s=60.0))
                 for _ in range(CONNECTIONS_PER_WORKER)]
        created = 0
        async with trio.open_nursery() as sessions:

            async def start(conn: Any) -> None:
                nonlocal created
                sessions.start_soon(keep_alive, conn, *await create(conn))
                created += 1

            for conn in conns:
                # One call alone first: a redirect to the master drops the
                # link, and with it every call in flight on it.
                await start(conn)
            limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)

            async def make(i: int) -> None:
                async with limiter:
                    await start(conns[i % len(conns)])

            async with trio.open_nursery() as nursery:
                for i in range(created, spec["sessions"]):
                    nursery.start_soon(make, i)
                    await trio.sleep(1 / CREATE_RATE_PER_S)
            _ready()
            await stats.count_window(await trio.to_thread.run_sync(_read_line))
            sessions.cancel_scope.cancel()
    _report(stats.as_dict())


class _ZkSession:
    """One ZooKeeper session over its own connection, in the wire protocol:
    a ConnectRequest, then pings (xid -2, op 11); each answer is framed with
    a 4-byte length."""

    PING = struct.pack(">iii", 8, -2, 11)

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def frame(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack_from(">i", self.buffer)
                if len(self.buffer) >= 4 + size:
                    body = bytes(self.buffer[4:4 + size])
                    del self.buffer[:4 + size]
                    return body
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("ZooKeeper closed the connection")
            self.buffer += data

    async def connect(self, timeout_ms: int) -> int:
        # protocolVersion, lastZxidSeen, timeOut, sessionId, passwd (16 bytes), readOnly
        request = struct.pack(">iqiqi", 0, 0, timeout_ms, 0, 16) + b"\0" * 16 + b"\0"
        await self.stream.send_all(struct.pack(">i", len(request)) + request)
        _protocol, negotiated_ms, session_id = struct.unpack_from(">iiq", await self.frame())
        if session_id == 0:
            raise RuntimeError("ZooKeeper refused the session")
        return negotiated_ms

    async def ping(self) -> None:
        await self.stream.send_all(self.PING)
        xid, _zxid, err = struct.unpack_from(">iqi", await self.frame())
        if xid != -2 or err != 0:
            raise RuntimeError(f"unexpected ZooKeeper reply xid={xid} err={err}")


async def _zookeeper_idle_worker(spec: dict) -> None:
    import trio

    stats = _Stats()
    limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)
    hosts = [tuple(h) for h in spec["hosts"]]

    async def session(i: int, connected: list[int]) -> None:
        async with limiter:
            stream = await trio.open_tcp_stream(*hosts[i % len(hosts)])
            zk = _ZkSession(stream)
            await zk.connect(LEASE_MS)
            connected.append(i)
        await trio.sleep(random.random() * ZK_PING_S)  # spread the pings over the period
        try:
            while True:
                await zk.ping()
                stats.renewals += 1
                await trio.sleep(ZK_PING_S)
        except (OSError, EOFError, RuntimeError, trio.BrokenResourceError) as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        connected: list[int] = []
        for i in range(spec["sessions"]):
            nursery.start_soon(session, i, connected)
        while len(connected) < spec["sessions"]:
            await trio.sleep(0.05)
        _ready()
        await stats.count_window(await trio.to_thread.run_sync(_read_line))
        nursery.cancel_scope.cancel()
    _report(stats.as_dict())


class _Latencies:
    """Per-read latencies inside the window, summarised in the worker."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def summary(self, duration_s: float, errors: int = 0, first_error: str = "") -> dict:
        values = sorted(self.samples)
        return {"reads": len(values), "reads_per_s": len(values) / duration_s,
                "p50_us": percentile(values, 0.50) * 1e6, "p99_us": percentile(values, 0.99) * 1e6,
                "errors": errors, "first_error": first_error}


async def _timed_loop(read: Callable[[], Any], window: dict, *, yield_every: int = 1) -> _Latencies:
    import trio

    lat = _Latencies()
    await trio.sleep(max(0.0, window["t0"] - time.monotonic()))
    now, n = time.monotonic(), 0
    while now < window["t1"]:
        await read()
        done = time.monotonic()
        lat.samples.append(done - now)
        now = done
        n += 1
        if n % yield_every == 0:
            # A cache hit does not yield to trio; let the session's KeepAlive run.
            await trio.lowlevel.checkpoint()
    return lat


async def _chubbyfs_reads_worker(spec: dict) -> None:
    import trio

    from chubbyfs.client.session import open_session

    async with open_session(spec["cell"], addresses=spec["addresses"], cache=spec["cache"]) as session:
        handle = await session.open(spec["path"])
        for _ in range(3):
            await handle.get_contents_and_stat()  # warm: a live link, and the cache filled
        _ready()
        window = await trio.to_thread.run_sync(_read_line)
        lat = await _timed_loop(handle.get_contents_and_stat, window, yield_every=100 if spec["cache"] else 1)
        hits = session.cache.hits
    _report({**lat.summary(window["t1"] - window["t0"]), "cache_hits": hits})


async def _etcd_reads_worker(spec: dict) -> None:
    import base64

    import trio

    from _http import HttpConnection

    conn = HttpConnection(*spec["address"])
    key = base64.b64encode(spec["path"].encode()).decode()
    try:
        await conn.post_json("/v3/kv/put", {"key": key, "value": base64.b64encode(VALUE).decode()})

        async def read() -> None:
            await conn.post_json("/v3/kv/range", {"key": key})

        await read()
        _ready()
        window = await trio.to_thread.run_sync(_read_line)
        lat = await _timed_loop(read, window)
    finally:
        await conn.aclose()
    _report(lat.summary(window["t1"] - window["t0"]))


def _zookeeper_reads_worker(spec: dict) -> None:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=spec["hosts"], timeout=30.0)
    client.start(timeout=30)
    try:
        client.ensure_path("/bench")
        if not client.exists(spec["path"]):
            client.create(spec["path"], VALUE)
        client.get(spec["path"])
        _ready()
        window = _read_line()
        time.sleep(max(0.0, window["t0"] - time.monotonic()))
        lat = _Latencies()
        now = time.monotonic()
        while now < window["t1"]:
            client.get(spec["path"])
            done = time.monotonic()
            lat.samples.append(done - now)
            now = done
    finally:
        client.stop()
        client.close()
    _report(lat.summary(window["t1"] - window["t0"]))


def worker_main() -> None:
    spec = _read_line()
    kind = spec["kind"]
    if kind.endswith("-idle"):
        os.nice(WORKER_NICE)
    if kind == "zookeeper-reads":
        _zookeeper_reads_worker(spec)
        return
    import trio

    trio.run({"chubbyfs-idle": _chubbyfs_idle_worker, "zookeeper-idle": _zookeeper_idle_worker,
              "chubbyfs-reads": _chubbyfs_reads_worker, "etcd-reads": _etcd_reads_worker}[kind], spec)


# ---- driver ---------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


@dataclass
class IdlePoint:
    system: str
    sessions: int
    window_s: float
    cpu_percent_all: float  # of one core, the 3 servers summed
    cpu_percent_leader: float  # the master / ZooKeeper leader alone
    rss_mb_all: float
    rss_mb_leader: float
    renewals_per_s: float  # KeepAlive replies / pings answered, in the CPU window
    cpu_us_per_renewal_all: float  # the 3 servers' CPU per renewal
    cpu_us_per_renewal_leader: float
    log_entries_per_s: float  # chubbyfs: Raft entries (lease extensions, Ticks)
    sessions_alive_at_end: int
    master_changes: int  # chubbyfs: Raft term changes from the start of the sessions to the end
    errors: int
    expired: int
    first_error: str
    other_cpu_percent: float  # machine CPU used by neither the servers nor the clients


def measure_idle(system: str, n: int, args: argparse.Namespace, specs: list[dict], leader_pid: int,
                 follower_pids: list[int], status: Callable[[], dict]) -> IdlePoint:
    """Workers bring up their sessions and say ready; the window starts
    `--settle` s later. `status`: the master's replica status (chubbyfs)."""
    marks: list[tuple[float, dict]] = [(time.monotonic(), status())]

    def during() -> Callable[[], None]:
        log(f"{system}: {n} sessions up; settling {args.settle:g} s")
        marks.append((time.monotonic(), status()))
        return lambda: marks.append((time.monotonic(), status()))

    results, window = run_workers(__file__, specs, args.window, {"leader": [leader_pid], "followers": follower_pids},
                                  start_delay_s=args.settle, during=during, what=system)
    rss = {pid: rss_mb(pid) for pid in [leader_pid, *follower_pids]}
    (_, first), (t_ready, ready), (t_end, end) = marks
    server_s = window.cpu_s["leader"] + window.cpu_s["followers"]
    commit0, commit1 = ready.get("commit", -1), end.get("commit", -1)
    renewals = sum(r["renewals"] for r in results)
    return IdlePoint(
        system=system, sessions=n, window_s=window.duration_s,
        cpu_percent_all=server_s / window.duration_s * 100,
        cpu_percent_leader=window.cpu_s["leader"] / window.duration_s * 100,
        rss_mb_all=sum(rss.values()), rss_mb_leader=rss[leader_pid],
        renewals_per_s=renewals / window.duration_s,
        cpu_us_per_renewal_all=server_s / renewals * 1e6 if renewals else float("nan"),
        cpu_us_per_renewal_leader=window.cpu_s["leader"] / renewals * 1e6 if renewals else float("nan"),
        log_entries_per_s=(commit1 - commit0) / (t_end - t_ready) if commit0 >= 0 else float("nan"),
        sessions_alive_at_end=end.get("master", {}).get("sessions", -1),
        master_changes=end.get("term", 0) - first.get("term", 0),
        errors=sum(r["errors"] for r in results), expired=sum(r["expired"] for r in results),
        first_error=next((r["first_error"] for r in results if r["first_error"]), ""),
        other_cpu_percent=window.other_cpu_s() / window.duration_s * 100)


def split_sessions(n: int) -> list[int]:
    workers = max(1, -(-n // SESSIONS_PER_WORKER))
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


@dataclass
class ReadPoint:
    system: str  # "chubbyfs cached", "chubbyfs uncached", "zookeeper", "etcd"
    reads_per_s: float
    p50_us: float
    p99_us: float
    errors: int


def measure_reads(label: str, spec: dict, duration_s: float) -> ReadPoint:
    [result], _ = run_workers(__file__, [spec], duration_s, {}, what=label)
    log(f"{label}: {result['reads_per_s']:.0f} reads/s")
    return ReadPoint(label, result["reads_per_s"], result["p50_us"], result["p99_us"], result["errors"])


@dataclass
class Invalidation:
    cachers: int
    trials: int
    all_dropped_p50_ms: float  # write call -> the last caching session dropped the old value
    all_dropped_max_ms: float
    write_p50_ms: float  # with the cachers
    write_uncached_p50_ms: float  # the same write to a file nobody caches
    late_drops: int  # cachers that had not dropped the value when the write returned (must be 0)


async def invalidation_trials(cell: str, addresses: list[str], cachers: int, trials: int) -> Invalidation:
    import trio

    from chubbyfs.client.session import open_session

    path, lonely = f"/ls/{cell}/invalidated", f"/ls/{cell}/uncached"
    dropped: dict[int, float] = {}

    def hook(i: int) -> Callable[[str], None]:
        def on_invalidate(p: str) -> None:
            if p == path:
                dropped.setdefault(i, time.monotonic())
        return on_invalidate

    async with AsyncExitStack() as stack:
        writer = await stack.enter_async_context(open_session(cell, addresses=addresses))
        hw = await writer.open(path, write=True, create="file", contents=b"0")
        hl = await writer.open(lonely, write=True, create="file")
        readers, handles = [], []
        for i in range(cachers):
            session = await stack.enter_async_context(open_session(cell, addresses=addresses))
            session.on_invalidate = hook(i)
            readers.append(session)
            handles.append(await session.open(path))
        spans, writes, uncached, late = [], [], [], 0
        for t in range(trials):
            for session, h in zip(readers, handles):
                while session.cache.get_contents(path) is None:
                    await h.get_contents_and_stat()  # cacheable again once the last change is settled
            dropped.clear()
            t0 = time.monotonic()
            await hw.set_contents(b"%d" % (t + 1))
            t1 = time.monotonic()
            late += cachers - len(dropped)
            spans.append(max(dropped.values(), default=t1) - t0)
            writes.append(t1 - t0)
            t0 = time.monotonic()
            await hl.set_contents(b"%d" % t)
            uncached.append(time.monotonic() - t0)
            await trio.sleep(0.01)
    spans.sort()
    writes.sort()
    uncached.sort()
    return Invalidation(cachers, trials, percentile(spans, 0.5) * 1e3, spans[-1] * 1e3,
                        percentile(writes, 0.5) * 1e3, percentile(uncached, 0.5) * 1e3, late)


def bench_chubbyfs(args: argparse.Namespace, workdir: Path) -> dict:
    import trio

    from chubbyfs.client.connection import open_cell_connection
    from chubbyfs.testing.localcell import LocalCell

    def start_cell(name: str) -> tuple[LocalCell, int, list[str]]:
        directory = workdir / name
        directory.mkdir()
        options = {} if args.election_ms is None else {"election_ms": args.election_ms}
        cell = LocalCell(directory, 3, name="bench", state_machine="chubby", session_lease_ms=LEASE_MS, **options)
        cell.start_all()
        addresses = list(cell.addresses.values())

        async def leader_now() -> int:
            async with open_cell_connection(addresses, cell=cell.name) as conn:
                return await cell.wait_for_leader(conn, timeout_s=60)

        leader = trio.run(leader_now)
        # The master first: clients find it at once, as after their first redirect.
        ordered = [cell.addresses[leader]] + [a for rid, a in cell.addresses.items() if rid != leader]
        return cell, leader, ordered

    def master_status(cell: LocalCell) -> dict:
        """The status of whichever replica is master now."""
        async def get() -> dict:
            async with open_cell_connection(list(cell.addresses.values()), cell=cell.name) as conn:
                leader = await cell.wait_for_leader(conn, timeout_s=30)
                return await cell.status(conn, leader) or {}
        return trio.run(get)

    idle = []
    for n in args.sessions:
        cell, leader, addresses = start_cell(f"chubbyfs-idle{n}")
        try:
            log(f"chubbyfs: 3 replicas up, master {leader}; creating {n} sessions")
            specs = [{"kind": "chubbyfs-idle", "cell": cell.name, "addresses": addresses, "sessions": k}
                     for k in split_sessions(n)]
            followers = [p.pid for rid, p in cell.procs.items() if rid != leader]
            point = measure_idle("chubbyfs", n, args, specs, cell.procs[leader].pid, followers,
                                 lambda: master_status(cell))
            idle.append(point)
            log(f"chubbyfs {n} sessions: {point.cpu_percent_all:.1f}% CPU (master {point.cpu_percent_leader:.1f}%)")
        except Exception:
            for rid in cell.addresses:
                log(f"--- chubbyfs replica {rid} log (tail):\n{cell.log_text(rid)[-1500:]}")
            raise
        finally:
            cell.stop_all()
    cell, leader, addresses = start_cell("chubbyfs-reads")
    try:
        spec = {"kind": "chubbyfs-reads", "cell": cell.name, "addresses": addresses, "path": "/ls/bench/f"}

        async def make_file() -> None:
            from chubbyfs.client.session import open_session

            async with open_session(cell.name, addresses=addresses) as session:
                await session.open(spec["path"], create="file", contents=VALUE)

        trio.run(make_file)
        reads = [measure_reads("chubbyfs cached", dict(spec, cache=True), args.reads_duration),
                 measure_reads("chubbyfs uncached", dict(spec, cache=False), args.reads_duration)]
        invalidation = trio.run(invalidation_trials, cell.name, addresses, args.cachers, args.write_trials)
        log(f"chubbyfs invalidation: all {args.cachers} cachers dropped the value "
            f"{invalidation.all_dropped_p50_ms:.1f} ms after the write (p50)")
    finally:
        cell.stop_all()
    return {"version": "this tree", "idle": idle, "reads": reads, "invalidation": invalidation}


def bench_zookeeper(args: argparse.Namespace, workdir: Path) -> dict:
    from _zk import ZkEnsemble, ensure_kazoo, ensure_zookeeper_installed, zookeeper_version
    from chubbyfs.testing.localcell import free_ports

    java = ensure_zookeeper_installed()
    kazoo_version = ensure_kazoo()
    version = zookeeper_version()

    def start_ensemble(name: str) -> tuple[ZkEnsemble, int]:
        directory = workdir / name
        directory.mkdir()
        ports = free_ports(9)
        ensemble = ZkEnsemble(directory, java, ports[:3], ports[3:6], ports[6:])
        ensemble.start_all()
        return ensemble, ensemble.wait_for_leader()

    idle = []
    for n in args.sessions:
        ensemble, leader = start_ensemble(f"zookeeper-idle{n}")
        try:
            log(f"zookeeper {version}: 3 servers up, leader {leader}; opening {n} sessions")
            hosts = [["127.0.0.1", ensemble.client_ports[s]] for s in ensemble.servers]
            specs = [{"kind": "zookeeper-idle", "hosts": hosts, "sessions": k} for k in split_sessions(n)]
            followers = [ensemble.pid(s) for s in ensemble.servers if s != leader]
            point = measure_idle("zookeeper", n, args, specs, ensemble.pid(leader), followers, dict)
            idle.append(point)
            log(f"zookeeper {n} sessions: {point.cpu_percent_all:.1f}% CPU (leader {point.cpu_percent_leader:.1f}%)")
        finally:
            ensemble.stop_all()
    ensemble, leader = start_ensemble("zookeeper-reads")
    try:
        spec = {"kind": "zookeeper-reads", "hosts": f"127.0.0.1:{ensemble.client_ports[leader]}",
                "path": "/bench/f"}
        reads = [measure_reads("zookeeper", spec, args.reads_duration)]
    finally:
        ensemble.stop_all()
    return {"version": version, "client": f"raw protocol (sessions), kazoo {kazoo_version} (reads)",
            "idle": idle, "reads": reads}


def bench_etcd(args: argparse.Namespace, workdir: Path) -> dict:
    import trio

    from _etcd import EtcdCluster, ensure_etcd_installed, etcd_version
    from chubbyfs.testing.localcell import free_ports

    binary, ports = ensure_etcd_installed(), free_ports(6)
    (workdir / "etcd").mkdir()
    cluster = EtcdCluster(workdir / "etcd", binary, ports[:3], ports[3:])
    cluster.start_all()
    try:
        address = cluster.client_address(trio.run(cluster.wait_for_leader))
        reads = [measure_reads("etcd", {"kind": "etcd-reads", "address": list(address), "path": "/bench/f"},
                               args.reads_duration)]
    finally:
        cluster.stop_all()
    return {"version": etcd_version(binary), "client": "v3 JSON gateway", "idle": [], "reads": reads}


# ---- output ---------------------------------------------------------------------------------------

def _known(value: int) -> str:
    return "-" if value < 0 else str(value)


def format_table(results: dict, args: argparse.Namespace) -> str:
    versions = ", ".join(f"{s} {r['version']}" for s, r in results.items())
    election = "" if args.election_ms is None else f", chubbyfs election timeout {args.election_ms} ms"
    lines = [f"Sessions and the client cache, 3 replicas each on 127.0.0.1, fsync on, {os.cpu_count()} cores "
             f"({versions}{election})", "",
             f"Idle sessions ({LEASE_MS // 1000} s leases / session timeout), {args.window:g} s window after "
             f"{args.settle:g} s settling; CPU in % of one core",
             f"{'sessions':>8} {'system':<9} | {'cpu all':>7} {'master':>7} {'rss all':>8} {'master':>7} "
             f"{'renew/s':>8} {'us/ren':>6} {'master':>6} {'log/s':>6} {'alive':>6} {'err':>4} {'exp':>4} "
             f"{'fail':>4} | {'other':>5}"]
    lines.append("-" * len(lines[-1]))
    for n in args.sessions:
        for s, r in results.items():
            for p in r["idle"]:
                if p.sessions == n:
                    lines.append(f"{n:>8} {s:<9} | {p.cpu_percent_all:>6.1f}% {p.cpu_percent_leader:>6.1f}% "
                                 f"{p.rss_mb_all:>6.0f}MB {p.rss_mb_leader:>5.0f}MB {p.renewals_per_s:>8.0f} "
                                 f"{_num(p.cpu_us_per_renewal_all):>6} {_num(p.cpu_us_per_renewal_leader):>6} "
                                 f"{_num(p.log_entries_per_s):>6} {_known(p.sessions_alive_at_end):>6} {p.errors:>4} "
                                 f"{p.expired:>4} {_known(p.master_changes if s == 'chubbyfs' else -1):>4} | "
                                 f"{p.other_cpu_percent:>4.0f}%")
    lines += ["", f"Reads of one 100-byte file, one client process, {args.reads_duration:g} s",
              f"{'system':<18} | {'reads/s':>9} {'p50 us':>8} {'p99 us':>8} {'err':>4} | {'x zk':>6}"]
    lines.append("-" * len(lines[-1]))
    zk = next((p.reads_per_s for p in results.get("zookeeper", {}).get("reads", [])), None)
    for r in results.values():
        for p in r["reads"]:
            ratio = f"{p.reads_per_s / zk:.1f}" if zk else "-"
            lines.append(f"{p.system:<18} | {p.reads_per_s:>9.0f} {_num(p.p50_us, 1):>8} {_num(p.p99_us, 1):>8} "
                         f"{p.errors:>4} | {ratio:>6}")
    inv = results.get("chubbyfs", {}).get("invalidation")
    if inv is not None:
        lines += ["", f"Invalidation, {inv.cachers} caching sessions, {inv.trials} writes: the last cacher dropped "
                  f"the old value {inv.all_dropped_p50_ms:.1f} ms (p50; max {inv.all_dropped_max_ms:.1f} ms) after "
                  f"the write was called; the write took {inv.write_p50_ms:.1f} ms (p50), "
                  f"{inv.write_uncached_p50_ms:.1f} ms with nobody caching; late drops: {inv.late_drops}"]
    lines += ["", "cpu/rss all: the 3 servers summed; master: the chubbyfs master / ZooKeeper leader alone. "
              "renew/s: KeepAlive replies / pings answered in the window; us/ren: the servers' CPU per renewal "
              "(all, master). log/s: Raft entries appended (lease extensions "
              "and Ticks). alive: sessions the master holds at the end. fail: master changes (chubbyfs). other: machine CPU used by neither "
              f"the servers nor the clients (of {os.cpu_count() * 100}%)."]
    return "\n".join(lines)


def to_json(results: dict, args: argparse.Namespace) -> dict:
    out: dict[str, Any] = json_header(args)
    out.update({"window_s": args.window, "settle_s": args.settle, "lease_ms": LEASE_MS,
                "election_ms": args.election_ms})
    for s, r in results.items():
        out[s] = {"version": r["version"], "idle": [asdict(p) for p in r["idle"]],
                  "reads": [asdict(p) for p in r["reads"]]}
        if "client" in r:
            out[s]["client"] = r["client"]
        if "invalidation" in r:
            out[s]["invalidation"] = asdict(r["invalidation"])
    return _no_nan(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1000,10000", help="idle session counts (default 1000,10000)")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of idle measurement (default 30)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds between the last session's creation "
                    "and the window (default 15)")
    ap.add_argument("--reads-duration", type=float, default=5.0, help="seconds per read point (default 5)")
    ap.add_argument("--cachers", type=int, default=10, help="caching sessions in the invalidation test (default 10)")
    ap.add_argument("--write-trials", type=int, default=20, help="writes in the invalidation test (default 20)")
    ap.add_argument("--election-ms", type=int, help="the chubbyfs cell's Raft election timeout (default: the "
                    "cell's, 300 ms); a loaded machine may need more")
    ap.add_argument("--skip-zk", action="store_true", help="leave ZooKeeper out")
    ap.add_argument("--skip-etcd", action="store_true", help="leave etcd out")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="print the results as JSON instead of the table; with FILE, write the JSON there "
                    "and print the table as well")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.sessions = _counts(ap, args.sessions, "--sessions")
    if min(args.window, args.settle + 1, args.reads_duration, args.cachers, args.write_trials) <= 0:
        ap.error("--window, --reads-duration, --cachers and --write-trials must be positive")
    args.duration, args.rounds = args.window, 1  # for the shared JSON header
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="chubbyfs-bench-sessions-") as tmp:
        results["chubbyfs"] = bench_chubbyfs(args, Path(tmp))
        if not args.skip_zk:
            results["zookeeper"] = bench_zookeeper(args, Path(tmp))
        if not args.skip_etcd:
            results["etcd"] = bench_etcd(args, Path(tmp))
    if args.json:
        text = json.dumps(to_json(results, args), indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(format_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
