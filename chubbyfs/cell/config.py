"""Cell configuration (TOML): the cell's name, its replicas, and timing.

    [cell]
    name = "local"
    tick_ms = 10          # Raft tick
    election_ms = 300     # base election timeout (randomized up to 2x)
    heartbeat_ms = 30

    [[replica]]
    id = 1
    address = "127.0.0.1:7101"
    data_dir = "1"        # relative to the config file's directory

The client-side cells file (`cells.toml`, read by the library and the mount)
is separate: it only lists each cell's replica addresses.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from chubbyfs.wire.stream import parse_address


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ReplicaConfig:
    id: int
    address: str
    data_dir: Path


@dataclass(frozen=True)
class CellConfig:
    name: str
    replicas: tuple[ReplicaConfig, ...]
    tick_ms: int = 10
    election_ms: int = 300
    heartbeat_ms: int = 30
    snapshot_every: int = 10_000
    snapshot_keep_entries: int = 1_000  # kept behind a snapshot so slow followers avoid a full transfer
    # And only once the log since the last snapshot is this many times its size.
    snapshot_log_ratio: float = 1.0
    # "chubby": the Chubby namespace; "kv": the bare replicated register that
    # Raft-level tests and benchmarks use.
    state_machine: str = "chubby"
    admins: tuple[str, ...] = ("root",)
    session_lease_ms: int = 12_000

    def replica(self, replica_id: int) -> ReplicaConfig:
        for r in self.replicas:
            if r.id == replica_id:
                return r
        raise ConfigError(f"replica id {replica_id} is not in cell {self.name!r} "
                          f"(ids: {', '.join(str(r.id) for r in self.replicas)})")

    def addresses(self) -> dict[int, str]:
        return {r.id: r.address for r in self.replicas}

    @property
    def election_tick(self) -> int:
        return max(2, round(self.election_ms / self.tick_ms))

    @property
    def heartbeat_tick(self) -> int:
        return max(1, round(self.heartbeat_ms / self.tick_ms))


def load_cell_config(path: str | Path) -> CellConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"cell config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cell config {path} is not valid TOML: {exc}") from None
    cell = raw.get("cell", {})
    name = cell.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{path}: [cell] name must be a non-empty string without '/'")
    replicas = []
    seen: set[int] = set()
    for r in raw.get("replica", []):
        rid, address = r.get("id"), r.get("address")
        if not isinstance(rid, int) or rid <= 0 or rid in seen:
            raise ConfigError(f"{path}: replica id must be a unique positive integer, got {rid!r}")
        seen.add(rid)
        try:
            parse_address(str(address))
        except ValueError as exc:
            raise ConfigError(f"{path}: replica {rid}: {exc}") from None
        data_dir = Path(r.get("data_dir", str(rid)))
        if not data_dir.is_absolute():
            data_dir = path.parent / data_dir
        replicas.append(ReplicaConfig(rid, address, data_dir))
    if not replicas:
        raise ConfigError(f"{path}: no [[replica]] entries")
    kwargs: dict = {k: int(cell[k]) for k in ("tick_ms", "election_ms", "heartbeat_ms", "snapshot_every",
                                                "snapshot_keep_entries", "session_lease_ms") if k in cell}
    if "snapshot_log_ratio" in cell:
        ratio = cell["snapshot_log_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
            raise ConfigError(f"{path}: [cell] snapshot_log_ratio must be a number >= 0, not {ratio!r}")
        kwargs["snapshot_log_ratio"] = float(ratio)
    state_machine = cell.get("state_machine", "chubby")
    if state_machine not in ("chubby", "kv"):
        raise ConfigError(f"{path}: [cell] state_machine must be 'chubby' or 'kv', not {state_machine!r}")
    admins = cell.get("admins", ["root"])
    if not isinstance(admins, list) or not all(isinstance(a, str) and a for a in admins):
        raise ConfigError(f"{path}: [cell] admins must be a list of user names")
    cfg = CellConfig(name=name, replicas=tuple(replicas), state_machine=state_machine, admins=tuple(admins),
                     **kwargs)
    if cfg.heartbeat_ms * 3 > cfg.election_ms:
        raise ConfigError(f"{path}: heartbeat_ms must be at most a third of election_ms")
    return cfg


def write_cell_config(path: Path, name: str, replicas: list[tuple[int, str, str]], **cell: object) -> None:
    lines = ["[cell]", f'name = "{name}"'] + [f"{k} = {_toml_value(v)}" for k, v in cell.items()]
    for rid, address, data_dir in replicas:
        lines += ["", "[[replica]]", f"id = {rid}", f'address = "{address}"', f'data_dir = "{data_dir}"']
    path.write_text("\n".join(lines) + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def write_cells_file(path: Path, cells: dict[str, list[str]]) -> None:
    """The client-side cells file: cell name -> replica addresses."""
    lines = []
    for name, addresses in sorted(cells.items()):
        quoted = ", ".join(f'"{a}"' for a in addresses)
        lines += [f"[cells.{name}]", f"replicas = [{quoted}]", ""]
    path.write_text("\n".join(lines))


def load_cells_file(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"cells file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cells file {path} is not valid TOML: {exc}") from None
    cells = {}
    for name, spec in raw.get("cells", {}).items():
        replicas = spec.get("replicas")
        if not isinstance(replicas, list) or not replicas:
            raise ConfigError(f"{path}: cells.{name}.replicas must be a non-empty list of HOST:PORT")
        cells[name] = [str(a) for a in replicas]
    return cells
