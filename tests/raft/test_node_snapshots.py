"""When RaftNode takes a snapshot: after `snapshot_every` entries, and only
once the entries applied since the last snapshot add up to its size times
`snapshot_log_ratio`, so that a large state is not rewritten every N entries."""

from __future__ import annotations

import random

import pytest
import trio

from chubbyfs.cell.config import ConfigError, load_cell_config, write_cell_config
from chubbyfs.raft import Config, Entry, MemoryStorage, Message, MessageType
from chubbyfs.raft.node import RaftNode, bootstrap_storage


class _Outbox:
    def send(self, msg: Message) -> None:
        pass

    def flush(self) -> None:
        pass


class _FixedSizeState:
    """A state machine whose snapshot is always `size` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.snapshots = 0

    def apply(self, index: int, command: bytes) -> None:
        pass

    def query(self, query: object) -> None:
        return None

    def snapshot(self) -> bytes:
        self.snapshots += 1
        return b"s" * self.size

    def restore(self, data: bytes) -> None:
        pass


async def _snapshot_indexes(*, entry_bytes: int, snapshot_bytes: int, entries: int, every: int,
                            ratio: float) -> list[int]:
    """Feed `entries` committed entries one per Ready to a follower (after
    the 3 bootstrap entries); the log indexes at which it took a snapshot."""
    storage = MemoryStorage()
    bootstrap_storage(storage, [1, 2, 3])
    state = _FixedSizeState(snapshot_bytes)
    node = RaftNode(config=Config(id=2), storage=storage, transport=_Outbox(), state_machine=state,
                    rng=random.Random(2), snapshot_every=every, snapshot_keep_entries=0,
                    snapshot_log_ratio=ratio)
    taken: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        first = node.raw.status().last_index + 1
        for index in range(first, first + entries):
            node.deliver_now([Message(type=MessageType.APPEND, to=2, frm=1, term=2, log_term=1 if index == first else 2,
                                      index=index - 1, commit=index,
                                      entries=(Entry(term=2, index=index, data=b"e" * entry_bytes),))])
            if storage.snapshot().meta.index == index:
                taken.append(index)
        nursery.cancel_scope.cancel()
    return taken


async def test_by_count_alone_when_the_ratio_is_zero() -> None:
    taken = await _snapshot_indexes(entry_bytes=10, snapshot_bytes=10_000, entries=50, every=10, ratio=0.0)
    assert taken == [10, 20, 30, 40, 50]


async def test_a_large_state_waits_for_as_many_log_bytes() -> None:
    # Entries of 100 bytes, a 3,000-byte snapshot: after the first snapshot
    # (nothing to compare with), 30 entries between snapshots, not 10.
    taken = await _snapshot_indexes(entry_bytes=100, snapshot_bytes=3_000, entries=100, every=10, ratio=1.0)
    assert taken == [10, 40, 70, 100]


async def test_a_small_state_still_waits_for_the_count() -> None:
    taken = await _snapshot_indexes(entry_bytes=100, snapshot_bytes=50, entries=30, every=10, ratio=1.0)
    assert taken == [10, 20, 30]


async def test_the_ratio_scales_the_bytes_needed() -> None:
    taken = await _snapshot_indexes(entry_bytes=100, snapshot_bytes=1_000, entries=60, every=5, ratio=2.0)
    assert taken == [5, 25, 45]


def test_the_cell_config_carries_the_ratio(tmp_path) -> None:
    replicas = [(1, "127.0.0.1:7001", "1")]
    path = tmp_path / "cell.toml"
    write_cell_config(path, "c", replicas)
    assert load_cell_config(path).snapshot_log_ratio == 1.0
    write_cell_config(path, "c", replicas, snapshot_log_ratio=0.5)
    assert load_cell_config(path).snapshot_log_ratio == 0.5
    for bad in ("-1", '"x"', "true"):
        path.write_text(path.read_text().replace("snapshot_log_ratio = 0.5", f"snapshot_log_ratio = {bad}"))
        with pytest.raises(ConfigError, match="snapshot_log_ratio"):
            load_cell_config(path)
        write_cell_config(path, "c", replicas, snapshot_log_ratio=0.5)
