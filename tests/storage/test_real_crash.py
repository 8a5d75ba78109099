"""Real-filesystem smoke test: SIGKILL a writer, the acknowledged prefix stays.

A process kill (unlike power loss) keeps everything written to the OS, so
this checks the code paths on real files (O_APPEND writes, fdatasync,
recovery on real segments, snapshots and compaction), not the crash model;
SimFS covers power loss.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from chubbyfs.raft.types import HardState
from chubbyfs.storage.fs import RealFS
from chubbyfs.storage.raft_storage import DiskStorage

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
from chubbyfs.raft.types import ConfState, Entry, HardState
from chubbyfs.storage.fs import RealFS
from chubbyfs.storage.raft_storage import DiskStorage

st = DiskStorage.open(RealFS(), sys.argv[1], segment_bytes_max=4096)
i = st.last_index()
print(f"start {i}", flush=True)
while True:
    batch = [Entry(term=1, index=i + k, data=f"entry-{i + k}".encode() * 3) for k in (1, 2, 3)]
    st.append(batch)
    i += 3
    st.set_hard_state(HardState(term=1, vote=1, commit=i))
    st.sync()
    print(f"ack {i}", flush=True)
    if i % 60 == 0:
        st.create_snapshot(i - 10, ConfState((1,)), b"snap-%d" % (i - 10))
        st.compact(i - 20)
"""


def run_and_kill(directory: str, acks_wanted: int, delay_s: float) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, directory],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    last_ack = -1
    try:
        start = proc.stdout.readline().decode()
        assert start.startswith("start "), proc.stderr.read().decode()
        for _ in range(acks_wanted):
            line = proc.stdout.readline().decode()
            assert line.startswith("ack "), f"child died: {line!r} {proc.stderr.read().decode()}"
            last_ack = int(line.split()[1])
        time.sleep(delay_s)  # land the kill somewhere inside the next batch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return last_ack


def test_sigkill_keeps_the_acknowledged_prefix(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    directory = str(tmp_path / "raft")
    for round_number in range(4):
        acked = run_and_kill(directory, rng.randint(5, 90), rng.random() * 0.004)
        st = DiskStorage.open(RealFS(), directory, segment_bytes_max=4096)
        context = f"seed {seed} round {round_number}: acked {acked}"
        assert st.last_index() >= acked, context
        hs, _ = st.initial_state()
        assert hs.term == 1 and hs.commit >= acked, context
        for e in st.entries(st.first_index(), st.last_index() + 1):
            assert e.data == f"entry-{e.index}".encode() * 3, context
        st.assert_invariants()
        st.close()
    final = DiskStorage.open(RealFS(), directory, segment_bytes_max=4096)
    assert final.initial_state()[0] != HardState()
    assert final.statistics().segment_count >= 1
    final.close()
