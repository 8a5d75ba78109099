"""Real replica processes on 127.0.0.1, for end-to-end tests and benchmarks.

Each replica is its own `python -m chubbyfs cell start` process so a test can
`kill -9` one, damage its files, and start it again.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from chubbyfs.cell.config import write_cell_config, write_cells_file
from chubbyfs.client.connection import CellConnection


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalCell:
    def __init__(self, directory: Path, replicas: int = 3, *, name: str = "test", state_machine: str = "kv",
                 **cell_options: object) -> None:
        self.directory = directory
        self.name = name
        ports = free_ports(replicas)
        self.addresses = {i + 1: f"127.0.0.1:{port}" for i, port in enumerate(ports)}
        self.config_path = directory / "cell.toml"
        write_cell_config(self.config_path, name,
                          [(rid, addr, str(rid)) for rid, addr in self.addresses.items()],
                          state_machine=state_machine, **cell_options)
        self.cells_path = directory / "cells.toml"
        write_cells_file(self.cells_path, {name: list(self.addresses.values())})
        self.procs: dict[int, subprocess.Popen] = {}

    def data_dir(self, rid: int) -> Path:
        return self.directory / str(rid)

    def start(self, rid: int, *, join: bool = False) -> None:
        assert rid not in self.procs or self.procs[rid].poll() is not None, f"replica {rid} already running"
        log = open(self.directory / f"replica-{rid}.log", "ab")
        cmd = [sys.executable, "-m", "chubbyfs", "cell", "start", "--config", str(self.config_path), "--id", str(rid)]
        if join:
            cmd.append("--join")
        self.procs[rid] = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def start_all(self) -> None:
        for rid in self.addresses:
            self.start(rid)

    def kill(self, rid: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[rid]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.kill()
                proc.wait(timeout=10)

    def running(self, rid: int) -> bool:
        return rid in self.procs and self.procs[rid].poll() is None

    def log_text(self, rid: int) -> str:
        return (self.directory / f"replica-{rid}.log").read_text(errors="replace")

    async def status(self, conn: CellConnection, rid: int) -> dict | None:
        try:
            reply = await conn.call_replica(self.addresses[rid], "status", timeout_s=1.0)
            return reply["status"]
        except (OSError, EOFError, trio.TooSlowError, ConnectionRefusedError):
            return None

    async def wait_for_leader(self, conn: CellConnection, timeout_s: float = 20.0, exclude: int | None = None) -> int:
        with trio.fail_after(timeout_s):
            while True:
                for rid in self.addresses:
                    if rid == exclude or not self.running(rid):
                        continue
                    st = await self.status(conn, rid)
                    if st and st["role"] == "leader" and st["lease_valid"]:
                        return rid
                await trio.sleep(0.05)

    async def wait_caught_up(self, conn: CellConnection, rid: int, index: int, timeout_s: float = 30.0) -> dict:
        with trio.fail_after(timeout_s):
            while True:
                st = await self.status(conn, rid)
                if st and st["applied"] >= index:
                    return st
                await trio.sleep(0.05)
