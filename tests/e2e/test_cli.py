"""The `chubbyfs` command as a user runs it: `cell local`, `status`, `kv`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chubbyfs.testing.localcell import free_ports

pytestmark = pytest.mark.e2e


def chubbyfs(*args, env=None, check=True, timeout=30):
    return subprocess.run([sys.executable, "-m", "chubbyfs", *args], capture_output=True, text=True,
                          env=env, check=check, timeout=timeout)


def _wait_for_leader(env, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = chubbyfs("status", "--json", env=env, check=False)
        if out.returncode == 0:
            rows = json.loads(out.stdout)
            # Every row has every key, an unreachable replica's too.
            assert all({"id", "address", "pid", "role", "term", "commit", "applied"} <= set(r) for r in rows), rows
            if any(r["role"] == "leader" for r in rows) and all(r["role"] != "unreachable" for r in rows):
                return rows
        time.sleep(0.1)
    raise AssertionError(f"no leader: {out.stdout} {out.stderr}")


def test_cell_local_status_kv_and_clean_stop(tmp_path):
    base = min(free_ports(1)[0], 60000)
    proc = subprocess.Popen([sys.executable, "-m", "chubbyfs", "cell", "local", "--dir", str(tmp_path),
                             "--port", str(base), "--state-machine", "kv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env = dict(os.environ, CHUBBYFS_CELLS=str(tmp_path / "cells.toml"))
    try:
        rows = _wait_for_leader(env)
        assert len(rows) == 3
        assert sorted(r["id"] for r in rows) == [1, 2, 3]
        for r in rows:
            assert {"id", "address", "pid", "role", "term", "commit", "applied"} <= set(r)
            assert (tmp_path / str(r["id"]) / "pid").read_text().strip() == str(r["pid"])
        assert chubbyfs("kv", "put", "greeting", "hello", env=env).stdout.startswith("version ")
        assert chubbyfs("kv", "get", "greeting", env=env).stdout == "hello\n"
        missing = chubbyfs("kv", "get", "nope", env=env, check=False)
        assert missing.returncode == 1 and "not found" in missing.stderr
        table = chubbyfs("status", env=env).stdout
        assert "leader:" in table and "follower" in table
        pids = [r["pid"] for r in rows]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_bad_config_and_bad_cells_file_get_clear_errors(tmp_path):
    bad = tmp_path / "cell.toml"
    bad.write_text("[cell]\nname = 'x'\n")
    out = chubbyfs("cell", "start", "--config", str(bad), "--id", "1", check=False)
    assert out.returncode == 2 and "no [[replica]] entries" in out.stderr
    out = chubbyfs("cell", "start", "--config", str(tmp_path / "missing.toml"), "--id", "1", check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr
    bad.write_text("[cell]\nname = 'x'\n[[replica]]\nid = 1\naddress = '127.0.0.1:1'\n")
    out = chubbyfs("cell", "start", "--config", str(bad), "--id", "7", check=False)
    assert out.returncode == 2 and "replica id 7 is not in cell" in out.stderr
    env = dict(os.environ, CHUBBYFS_CELLS=str(tmp_path / "nocells.toml"))
    out = chubbyfs("status", env=env, check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_status_of_an_unreachable_replica_has_every_field(tmp_path):
    port = free_ports(1)[0]  # nothing listens there
    cells = tmp_path / "cells.toml"
    cells.write_text(f'[cells.gone]\nreplicas = ["127.0.0.1:{port}"]\n')
    env = dict(os.environ, CHUBBYFS_CELLS=str(cells))
    [row] = json.loads(chubbyfs("status", "--json", env=env).stdout)
    assert row["role"] == "unreachable" and row["address"] == f"127.0.0.1:{port}" and row["error"]
    assert {k: row[k] for k in ("id", "pid", "term", "commit", "applied")} == dict.fromkeys(
        ("id", "pid", "term", "commit", "applied"))
    table = chubbyfs("status", env=env, check=False)
    assert table.returncode == 1 and "unreachable" in table.stdout and "leader: none" in table.stdout
