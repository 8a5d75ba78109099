"""The `chubbyfs` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from chubbyfs.storage.wal import WalCorruptionError
from chubbyfs.cell.config import (
    ConfigError, load_cell_config, load_cells_file, write_cell_config, write_cells_file,
)


def default_cells_file() -> Path:
    """CHUBBYFS_CELLS, else /etc/chubbyfs/cells.toml, else the user's config dir."""
    env = os.environ.get("CHUBBYFS_CELLS")
    if env:
        return Path(env)
    system = Path("/etc/chubbyfs/cells.toml")
    if system.exists():
        return system
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "chubbyfs" / "cells.toml"


def default_local_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/chubbyfs/local")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "chubbyfs" / "local"


def _cell_addresses(args: argparse.Namespace) -> tuple[str, list[str]]:
    cells = load_cells_file(args.cells or default_cells_file())
    if args.cell:
        if args.cell not in cells:
            raise ConfigError(f"no cell {args.cell!r} in the cells file (cells: {', '.join(sorted(cells))})")
        return args.cell, cells[args.cell]
    if len(cells) != 1:
        raise ConfigError(f"the cells file names {len(cells)} cells; pick one with --cell")
    name = next(iter(cells))
    return name, cells[name]


# ---- cell start / local ----------------------------------------------------------------

async def _run_replica_until_signal(config_path: str, replica_id: int, join: bool) -> None:
    from chubbyfs.cell.replica import Replica

    cell = load_cell_config(config_path)
    replica = Replica(cell, replica_id, join=join)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def cmd_cell_start(args: argparse.Namespace) -> int:
    trio.run(_run_replica_until_signal, args.config, args.id, args.join)
    return 0


async def _run_local_cell(args: argparse.Namespace) -> None:
    directory = Path(args.dir or default_local_dir()).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "cell.toml"
    if not config_path.exists():
        replicas = [(i, f"127.0.0.1:{args.port + i}", str(i)) for i in range(1, args.replicas + 1)]
        write_cell_config(config_path, args.name, replicas, state_machine=args.state_machine)
    cell = load_cell_config(config_path)
    cells_path = directory / "cells.toml"
    write_cells_file(cells_path, {cell.name: [r.address for r in cell.replicas]})
    print(f"cell {cell.name!r}: {len(cell.replicas)} replicas, data in {directory}", flush=True)
    print(f"client config: {cells_path}  (export CHUBBYFS_CELLS={cells_path})", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for r in cell.replicas:
                cmd = [sys.executable, "-m", "chubbyfs", "cell", "start", "--config", str(config_path), "--id", str(r.id)]
                nursery.start_soon(_supervise, cmd, r.id)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    print("stopping the cell", flush=True)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


async def _supervise(cmd: list[str], replica_id: int) -> None:
    async def terminate(process: trio.Process) -> None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await process.wait()
            return
        process.kill()

    proc = await trio.run_process(cmd, check=False, deliver_cancel=terminate)
    print(f"replica {replica_id} exited with status {proc.returncode}", flush=True)


def cmd_cell_local(args: argparse.Namespace) -> int:
    trio.run(_run_local_cell, args)
    return 0


# ---- client commands ----------------------------------------------------------------------

async def _status(args: argparse.Namespace) -> int:
    from chubbyfs.client.connection import CellConnection

    name, addresses = _cell_addresses(args)
    rows = []
    async with trio.open_nursery() as nursery:
        conn = CellConnection(addresses, nursery, cell=name)
        for address in addresses:
            try:
                reply = await conn.call_replica(address, "status")
                rows.append(reply["status"])
            except (OSError, EOFError, trio.TooSlowError, ConnectionRefusedError) as exc:
                # The same keys as a live replica's row, so scripts can index
                # any row; the client's cells file does not know its id.
                rows.append({"id": None, "address": address, "pid": None, "role": "unreachable", "term": None,
                             "commit": None, "applied": None, "error": str(exc) or type(exc).__name__})
        nursery.cancel_scope.cancel()
    if args.json:
        print(json.dumps(rows, indent=None))
        return 0
    print(f"cell {name}")
    print(f"{'id':>3} {'address':<22} {'pid':>7} {'role':<12} {'term':>6} {'commit':>9} {'applied':>9}")
    leader = None
    for r in rows:
        shown = {k: "-" if r.get(k) is None else r[k] for k in ("id", "pid", "term", "commit", "applied")}
        print(f"{shown['id']:>3} {r['address']:<22} {shown['pid']:>7} {r['role']:<12} "
              f"{shown['term']:>6} {shown['commit']:>9} {shown['applied']:>9}")
        if r.get("role") == "leader":
            leader = r
    print(f"leader: {leader['id']} at {leader['address']}" if leader else "leader: none")
    master = (leader or {}).get("master")
    if master:
        print(f"master: epoch {master['epoch']}, {master['sessions']} sessions, "
              f"{master['cached_paths']} cached paths, {master['blocked_acquires']} blocked acquires, "
              f"{master['queued_items']} events/invalidations awaiting acknowledgement")
    return 0 if leader else 1


async def _kv(args: argparse.Namespace) -> int:
    from chubbyfs.client.connection import CellError, open_cell_connection

    name, addresses = _cell_addresses(args)
    async with open_cell_connection(addresses, cell=name) as conn:
        try:
            if args.kv_op == "get":
                reply = await conn.call("get", key=args.key)
                if reply["value"] is None:
                    print(f"{args.key}: not found", file=sys.stderr)
                    return 1
                sys.stdout.buffer.write(reply["value"] + b"\n")
            elif args.kv_op == "put":
                reply = await conn.call("put", key=args.key, value=args.value.encode())
                print(f"version {reply['version']}")
            else:
                reply = await conn.call(args.kv_op.replace("-", "_"), idempotent=False,
                                        **({"target": args.replica} if args.kv_op == "transfer-leadership"
                                           else {"replica": args.replica}))
                print("ok")
        except CellError as exc:
            print(f"chubbyfs: {exc}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chubbyfs", description="A Chubby-style lock service used through a mount.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    cell = sub.add_parser("cell", help="run and manage a cell")
    cell_sub = cell.add_subparsers(dest="cell_command", required=True)
    start = cell_sub.add_parser("start", help="run one replica in the foreground")
    start.add_argument("--config", required=True, help="the cell's TOML config")
    start.add_argument("--id", required=True, type=int, help="this replica's id in the config")
    start.add_argument("--join", action="store_true",
                       help="join an existing cell with an empty data dir (add it with 'cell add-voter')")
    start.set_defaults(func=cmd_cell_start)
    local = cell_sub.add_parser("local", help="run a whole cell on this machine in the foreground")
    local.add_argument("--replicas", type=int, default=3, choices=(1, 3, 5))
    local.add_argument("--dir", help="data directory (default: a per-user or /var/lib location)")
    local.add_argument("--port", type=int, default=7100, help="replica i listens on PORT+i")
    local.add_argument("--name", default="local", help="the cell's name")
    local.add_argument("--state-machine", default="chubby", choices=("chubby", "kv"),
                       help="'kv' runs the bare replicated register used by Raft benchmarks")
    local.set_defaults(func=cmd_cell_local)
    for name, helptext in (("add-voter", "make a configured replica a voting member"),
                           ("remove-voter", "remove a replica from the voting members"),
                           ("transfer-leadership", "hand mastership to another replica")):
        c = cell_sub.add_parser(name, help=helptext)
        c.add_argument("replica", type=int)
        _client_options(c)
        c.set_defaults(func=lambda a: trio.run(_kv, a), kv_op=name)

    status = sub.add_parser("status", help="each replica's role, term, commit and applied index")
    status.add_argument("--json", action="store_true", help="one JSON object per replica")
    _client_options(status)
    status.set_defaults(func=lambda a: trio.run(_status, a))

    kv = sub.add_parser("kv", help="the test register (until the Chubby namespace lands)")
    kv_sub = kv.add_subparsers(dest="kv_op", required=True)
    get = kv_sub.add_parser("get")
    get.add_argument("key")
    put = kv_sub.add_parser("put")
    put.add_argument("key")
    put.add_argument("value")
    for c in (get, put):
        _client_options(c)
        c.set_defaults(func=lambda a: trio.run(_kv, a))

    from chubbyfs.cli_nodes import add_parsers

    add_parsers(sub, _client_options)
    from chubbyfs.cli_mount import add_parsers as add_mount_parsers

    add_mount_parsers(sub)
    return p


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cell", help="cell name from the cells file")
    p.add_argument("--cells", help="cells file (default: $CHUBBYFS_CELLS, /etc/chubbyfs/cells.toml, ~/.config)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"chubbyfs: {exc}", file=sys.stderr)
        return 2
    except WalCorruptionError as exc:
        print(f"chubbyfs: refusing to start: the replica's log is corrupt ({exc}). Wipe this replica's data "
              f"directory and re-add it with 'chubbyfs cell start --join' and 'chubbyfs cell add-voter'.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
