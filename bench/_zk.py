"""A 3-server ZooKeeper ensemble on 127.0.0.1 for the benchmark, and its set-up.

Debian's `zookeeper` package (3.8) provides the server jar; each server is a
`java ... QuorumPeerMain zoo.cfg` child process of ours, started directly (not
through zkServer.sh, which daemonizes) so that we hold its PID and stop it by
PID. Every server has its own config, data dir and ports under the
benchmark's temporary directory; a system ZooKeeper on the default ports is
never touched. Durability is ZooKeeper's default: `forceSync=yes`, an fsync
of the transaction log before a proposal is acknowledged.

The Python client is kazoo, a bench-only dependency installed into the
running interpreter's environment when missing; chubbyfs itself does not
depend on it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ZK_PACKAGES = ["zookeeper"]
ZK_JAR = Path("/usr/share/java/zookeeper.jar")
ZK_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
# ZooKeeper's own defaults (zoo.cfg of the distribution): a 2 s tick, so a
# follower is declared dead after syncLimit ticks.
TICK_MS = 2000


class ZkSetupError(Exception):
    pass


def _apt_install(packages: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing: apt-get install -y " + " ".join(packages), file=sys.stderr, flush=True)
    result = subprocess.run(["apt-get", "install", "-y", *packages], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        # The package lists may be missing on a fresh machine.
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = subprocess.run(["apt-get", "install", "-y", *packages], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return result


def ensure_zookeeper_installed() -> str:
    """Return the `java` binary to run ZooKeeper with, installing Debian's
    package (which pulls a JRE) when the server jar or java is missing.

    The package does not start a service by itself; if some other ZooKeeper
    runs on this machine it uses ports we never use.
    """
    java = shutil.which("java")
    if java and ZK_JAR.exists():
        return java
    if shutil.which("apt-get") is None:
        raise ZkSetupError("ZooKeeper is not installed and apt-get is not available; install ZooKeeper 3.8 "
                           f"so that {ZK_JAR} and java exist")
    result = _apt_install(ZK_PACKAGES)
    java = shutil.which("java")
    if result.returncode != 0 or java is None or not ZK_JAR.exists():
        raise ZkSetupError(f"installing ZooKeeper failed:\n{result.stdout[-2000:]}")
    return java


def ensure_kazoo() -> str:
    """Import kazoo, pip-installing it into this interpreter's environment
    (the project venv) when missing; return its version."""
    try:
        importlib.import_module("kazoo")
    except ImportError:
        print("installing: pip install kazoo (bench-only ZooKeeper client)", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "kazoo"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise ZkSetupError(f"pip install kazoo failed:\n{result.stdout[-2000:]}")
        importlib.invalidate_caches()
        importlib.import_module("kazoo")
    from importlib.metadata import version

    return version("kazoo")


def zookeeper_version() -> str:
    """The Debian package's version (the jar carries no version of its own)."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "zookeeper"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    return out.split("-")[0] if out else "?"


def four_letter(port: int, command: str, timeout_s: float = 1.0) -> str | None:
    """A ZooKeeper four-letter-word command's answer, or None if the server is down."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(command.encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return None


class ZkEnsemble:
    def __init__(self, directory: Path, java: str, client_ports: list[int], quorum_ports: list[int],
                 election_ports: list[int]) -> None:
        if not len(client_ports) == len(quorum_ports) == len(election_ports):
            raise ValueError("one client, one quorum and one election port per server")
        self.directory = directory
        self.java = java
        self.servers = list(range(1, len(client_ports) + 1))
        self.client_ports = dict(zip(self.servers, client_ports))
        self.procs: dict[int, subprocess.Popen] = {}
        members = [f"server.{s}=127.0.0.1:{q}:{e}" for s, q, e in zip(self.servers, quorum_ports, election_ports)]
        for s in self.servers:
            data_dir = self.data_dir(s)
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "myid").write_text(f"{s}\n")
            config = [f"tickTime={TICK_MS}", "initLimit=10", "syncLimit=5", f"dataDir={data_dir}",
                      f"clientPort={self.client_ports[s]}", "clientPortAddress=127.0.0.1",
                      "forceSync=yes", "admin.enableServer=false", "4lw.commands.whitelist=srvr,ruok",
                      "maxClientCnxns=0", *members]
            self.config_path(s).write_text("\n".join(config) + "\n")

    def data_dir(self, server: int) -> Path:
        return self.directory / f"zk{server}"

    def config_path(self, server: int) -> Path:
        return self.directory / f"zoo{server}.cfg"

    @property
    def connect_string(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports.values())

    def start(self, server: int) -> None:
        if self.running(server):
            raise ZkSetupError(f"ZooKeeper server {server} is already running")
        log = open(self.directory / f"zk{server}.log", "ab")
        cmd = [self.java, f"-Dzookeeper.log.dir={self.directory}", "-cp", str(ZK_JAR), ZK_MAIN,
               str(self.config_path(server))]
        self.procs[server] = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def start_all(self) -> None:
        for s in self.servers:
            self.start(s)

    def running(self, server: int) -> bool:
        return server in self.procs and self.procs[server].poll() is None

    def pid(self, server: int) -> int:
        return self.procs[server].pid

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def mode(self, server: int) -> str | None:
        """'leader', 'follower', or None while the server is down or not in a quorum."""
        if not self.running(server):
            return None
        answer = four_letter(self.client_ports[server], "srvr")
        for line in (answer or "").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_for_leader(self, timeout_s: float = 60.0) -> int:
        """Our number of the server that leads, once every server serves."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for s in self.servers:
                if not self.running(s):
                    tail = (self.directory / f"zk{s}.log").read_text(errors="replace")[-3000:]
                    raise ZkSetupError(f"ZooKeeper server {s} exited:\n{tail}")
            modes = {s: self.mode(s) for s in self.servers}
            leaders = [s for s, m in modes.items() if m == "leader"]
            if leaders and all(m in ("leader", "follower") for m in modes.values()):
                return leaders[0]
            time.sleep(0.1)
        raise ZkSetupError(f"no ZooKeeper quorum within {timeout_s:g} s")
