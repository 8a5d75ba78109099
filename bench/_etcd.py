"""A 3-member etcd cluster on 127.0.0.1 for the benchmark, and its client.

etcd runs with its defaults (fsync on every commit, 100 ms heartbeat, 1 s
election timeout) on ports of its own, with data dirs under the benchmark's
temporary directory. Members are our child processes; we stop them by PID.
The client speaks the v3 JSON gateway (`/v3/kv/put`, base64 keys and values)
over keep-alive HTTP/1.1, which costs the client far less than `etcdctl`.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
from pathlib import Path

import trio

from _http import HttpConnection, HttpError

ETCD_PACKAGES = ["etcd-server", "etcd-client"]


class EtcdSetupError(Exception):
    pass


def ensure_etcd_installed() -> str:
    """Return the etcd binary, installing Debian's package when missing.

    Debian's package enables a system `etcd` service on the default ports; we
    never use those ports, so a running system etcd does not disturb us.
    """
    binary = shutil.which("etcd")
    if binary:
        return binary
    if shutil.which("apt-get") is None:
        raise EtcdSetupError("etcd is not installed and apt-get is not available; install etcd 3.4+")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing etcd: apt-get install -y " + " ".join(ETCD_PACKAGES), flush=True)
    result = subprocess.run(["apt-get", "install", "-y", *ETCD_PACKAGES], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        # The package lists may be missing on a fresh machine.
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = subprocess.run(["apt-get", "install", "-y", *ETCD_PACKAGES], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    binary = shutil.which("etcd")
    if result.returncode != 0 or binary is None:
        raise EtcdSetupError(f"installing etcd failed:\n{result.stdout[-2000:]}")
    return binary


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, text=True).stdout
    return out.splitlines()[0].split()[-1] if out else "?"


class EtcdCluster:
    def __init__(self, directory: Path, binary: str, client_ports: list[int], peer_ports: list[int]) -> None:
        if len(client_ports) != len(peer_ports):
            raise ValueError("one client port and one peer port per member")
        self.directory = directory
        self.binary = binary
        self.members = list(range(1, len(client_ports) + 1))
        self.client_ports = dict(zip(self.members, client_ports))
        self.peer_ports = dict(zip(self.members, peer_ports))
        self.procs: dict[int, subprocess.Popen] = {}
        self._initial_cluster = ",".join(f"m{m}=http://127.0.0.1:{self.peer_ports[m]}" for m in self.members)

    def client_address(self, member: int) -> tuple[str, int]:
        return "127.0.0.1", self.client_ports[member]

    def start(self, member: int) -> None:
        if self.running(member):
            raise EtcdSetupError(f"etcd member {member} is already running")
        data_dir = self.directory / f"m{member}"
        client_url = f"http://127.0.0.1:{self.client_ports[member]}"
        peer_url = f"http://127.0.0.1:{self.peer_ports[member]}"
        cmd = [self.binary, "--name", f"m{member}", "--data-dir", str(data_dir),
               "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", self._initial_cluster, "--initial-cluster-token", "chubbyfs-bench",
               "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap"]
        log = open(self.directory / f"etcd-m{member}.log", "ab")
        self.procs[member] = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def start_all(self) -> None:
        for m in self.members:
            self.start(m)

    def running(self, member: int) -> bool:
        return member in self.procs and self.procs[member].poll() is None

    def pid(self, member: int) -> int:
        return self.procs[member].pid

    def kill(self, member: int) -> None:
        proc = self.procs[member]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    async def member_status(self, member: int, timeout_s: float = 1.0) -> dict | None:
        """The member's /v3/maintenance/status answer, or None if it is down."""
        if not self.running(member):
            return None
        conn = HttpConnection(*self.client_address(member))
        try:
            with trio.fail_after(timeout_s):
                return await conn.post_json("/v3/maintenance/status", {})
        except (OSError, EOFError, HttpError, trio.TooSlowError, trio.BrokenResourceError, ValueError):
            return None
        finally:
            await conn.aclose()

    async def wait_for_leader(self, timeout_s: float = 30.0, exclude: int | None = None) -> int:
        """Our member number of the leader that a running member reports."""
        with trio.fail_after(timeout_s):
            while True:
                for m in self.members:
                    if m == exclude:
                        continue
                    st = await self.member_status(m)
                    if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                        return m
                await trio.sleep(0.05)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdClient:
    """Sequential puts through one keep-alive connection, failing over between members."""

    def __init__(self, addresses: list[tuple[str, int]], *, attempt_timeout_s: float = 5.0,
                 retry_s: float = 0.01) -> None:
        if not addresses:
            raise ValueError("an etcd client needs at least one member address")
        self.addresses = list(addresses)
        # A request forwarded to a leader that just died is never answered, so
        # the client gives up on an attempt after this long and tries again.
        self.attempt_timeout_s = attempt_timeout_s
        self.retry_s = retry_s
        self._at = 0
        self._conn = HttpConnection(*self.addresses[0])

    async def put(self, key: str, value: bytes, *, deadline_s: float = 30.0) -> None:
        """Put until one attempt succeeds. A put is idempotent, so retrying an
        attempt whose outcome is unknown is safe."""
        payload = {"key": _b64(key.encode()), "value": _b64(value)}
        with trio.fail_after(deadline_s):
            while True:
                try:
                    with trio.fail_after(self.attempt_timeout_s):
                        await self._conn.post_json("/v3/kv/put", payload)
                    return
                except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError):
                    await self._conn.aclose()
                    self._rotate()
                except HttpError:
                    pass  # no leader yet, leader changed, request timed out: retry on this member
                await trio.sleep(self.retry_s)

    def _rotate(self) -> None:
        self._at = (self._at + 1) % len(self.addresses)
        self._conn = HttpConnection(*self.addresses[self._at])

    async def aclose(self) -> None:
        await self._conn.aclose()
