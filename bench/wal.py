"""Durable append throughput of DiskStorage on the real disk, by group size.

    .venv/bin/python bench/wal.py [--seconds 3] [--groups 1,8,64] [--entry-bytes 100]
                                  [--dir PATH]

Each step appends `group` entries (one append() and one set_hard_state() per
entry, as a Raft leader would for `group` proposals batched into one Ready)
and then calls sync() once: one write() and one fdatasync(). Prints entries/s,
syncs/s and the mean time per sync. A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from chubbyfs.raft.types import Entry, HardState  # noqa: E402
from chubbyfs.storage.fs import RealFS  # noqa: E402
from chubbyfs.storage.raft_storage import DiskStorage  # noqa: E402


def run(directory: str, group: int, seconds: float, entry_bytes: int) -> tuple[int, int, float]:
    storage = DiskStorage.open(RealFS(), directory)
    payload = b"x" * entry_bytes
    index = storage.last_index()
    syncs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(group):
            index += 1
            storage.append([Entry(term=1, index=index, data=payload)])
            storage.set_hard_state(HardState(term=1, vote=1, commit=index - 1))
        storage.sync()
        syncs += 1
    elapsed = time.perf_counter() - start
    stats = storage.statistics()
    storage.close()
    assert stats.syncs >= syncs  # every step really synced
    return syncs * group, syncs, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--groups", default="1,8,64")
    parser.add_argument("--entry-bytes", type=int, default=100)
    parser.add_argument("--dir", default=None, help="parent directory (default: a temp dir)")
    args = parser.parse_args()
    parent = tempfile.mkdtemp(prefix="chubbyfs-wal-bench-", dir=args.dir)
    try:
        print(f"{'group':>6} {'entries/s':>12} {'syncs/s':>10} {'ms/sync':>9}")
        for group in (int(g) for g in args.groups.split(",")):
            directory = str(Path(parent) / f"group-{group}")
            entries, syncs, elapsed = run(directory, group, args.seconds, args.entry_bytes)
            print(f"{group:>6} {entries / elapsed:>12.0f} {syncs / elapsed:>10.0f} "
                  f"{1000 * elapsed / syncs:>9.3f}")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
