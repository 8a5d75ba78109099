"""Crash-point enumeration for DiskStorage on SimFS (testing-anchors §6.5).

A workload is a list of steps, each a storage call mirrored on a tiny model.
Running it on a SimFS snapshots the disk after every filesystem operation
(every crash point). For each crash point and each crash image, recovery
must produce a state that equals the model after some call that had started
by then, and no older than the last call whose durability was acknowledged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chubbyfs.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from chubbyfs.sim.disk import SimFS
from chubbyfs.storage.raft_storage import DiskStorage
from chubbyfs.storage.wal import WalCorruptionError

DIRECTORY = "/raft"


class DurabilityViolation(AssertionError):
    pass


@dataclass
class Model:
    """What the log logically holds (never compacted: compaction is not
    a change of content)."""

    dummy_index: int = 0
    dummy_term: int = 0
    log: dict[int, Entry] = field(default_factory=dict)
    hs: HardState = HardState()
    snapshot: Snapshot = Snapshot()

    @property
    def last(self) -> int:
        return max(self.log, default=self.dummy_index)

    def term(self, index: int) -> int | None:
        if index == self.dummy_index:
            return self.dummy_term
        e = self.log.get(index)
        return None if e is None else e.term

    def copy(self) -> Model:
        return Model(self.dummy_index, self.dummy_term, dict(self.log), self.hs, self.snapshot)


@dataclass(frozen=True)
class Version:
    number: int
    label: str
    start_ops: int  # filesystem operations issued before the call began
    end_ops: int  # ... and when it returned
    durable: bool  # returning acknowledged durability of everything so far
    model: Model


Step = tuple[str, Callable[[DiskStorage, Model], bool]]  # returns "durable"


def append_step(entries: list[Entry]) -> Step:
    def run(st: DiskStorage, m: Model) -> bool:
        st.append(entries)
        for i in [i for i in m.log if i >= entries[0].index]:
            del m.log[i]
        for e in entries:
            if e.index > m.dummy_index:
                m.log[e.index] = e
        return False

    return (f"append {entries[0].index}..{entries[-1].index}@{entries[0].term}", run)


def hard_state_step(hs: HardState) -> Step:
    def run(st: DiskStorage, m: Model) -> bool:
        st.set_hard_state(hs)
        m.hs = hs
        return False

    return (f"hard_state {hs.term}/{hs.vote}/{hs.commit}", run)


def sync_step() -> Step:
    def run(st: DiskStorage, m: Model) -> bool:
        st.sync()
        return True

    return ("sync", run)


def create_snapshot_step(index: int, data: bytes, compact_to: int | None = None) -> Step:
    def run(st: DiskStorage, m: Model) -> bool:
        m.snapshot = st.create_snapshot(index, ConfState((1, 2, 3)), data)
        if compact_to is not None:
            st.compact(compact_to)
        return True

    return (f"create_snapshot {index} compact {compact_to}", run)


def apply_snapshot_step(index: int, term: int) -> Step:
    snap = Snapshot(SnapshotMeta(index=index, term=term, conf=ConfState((1, 2))), b"remote-state")

    def run(st: DiskStorage, m: Model) -> bool:
        st.apply_snapshot(snap)
        m.snapshot = snap
        m.log.clear()
        m.dummy_index, m.dummy_term = index, term
        return True

    return (f"apply_snapshot {index}@{term}", run)


def entries(lo: int, hi: int, term: int, size: int = 40) -> list[Entry]:
    return [Entry(term=term, index=i, data=bytes([i % 256]) * size) for i in range(lo, hi)]


def small_workload() -> list[Step]:
    """Group-committed appends, hard state changes, an overwrite, a snapshot
    with compaction, segment cuts and an installed snapshot."""
    return [
        append_step(entries(1, 4, 1)),
        hard_state_step(HardState(1, 1, 0)),
        sync_step(),
        append_step(entries(4, 6, 1, size=300)),  # a multi-sector write
        append_step(entries(6, 7, 1)),
        hard_state_step(HardState(1, 1, 3)),
        sync_step(),
        append_step(entries(7, 9, 1)),
        hard_state_step(HardState(2, 2, 5)),
        sync_step(),
        append_step(entries(6, 8, 2)),  # overwrite a conflicting suffix
        hard_state_step(HardState(2, 2, 6)),
        sync_step(),
        create_snapshot_step(6, b"state-at-6", compact_to=5),
        append_step(entries(8, 11, 2, size=200)),
        sync_step(),
        apply_snapshot_step(15, 3),
        hard_state_step(HardState(3, 0, 15)),
        append_step(entries(16, 18, 3)),
        sync_step(),
    ]


def long_workload() -> list[Step]:
    """More of everything: several segments, two local snapshots, two
    overwrites, an installed snapshot in the middle."""
    steps = small_workload()
    steps += [
        append_step(entries(18, 24, 3, size=120)),
        hard_state_step(HardState(3, 0, 20)),
        sync_step(),
        append_step(entries(22, 25, 4)),
        hard_state_step(HardState(4, 4, 21)),
        sync_step(),
        create_snapshot_step(21, b"state-at-21", compact_to=19),
        append_step(entries(25, 30, 4, size=250)),
        hard_state_step(HardState(4, 4, 27)),
        sync_step(),
        create_snapshot_step(27, b"state-at-27", compact_to=28),
        append_step(entries(30, 32, 4)),
        sync_step(),
    ]
    return steps


@dataclass
class Recording:
    versions: list[Version]
    images: list[SimFS]  # images[k]: the disk after k operations
    segment_bytes_max: int


def record(steps: list[Step], *, segment_bytes_max: int, lying_fsync: bool = False) -> Recording:
    fs = SimFS(lying_fsync=lying_fsync)
    images = [fs.clone()]
    fs.on_op = lambda f: images.append(f.clone())
    model = Model()
    versions = [Version(0, "initial", 0, 0, True, model.copy())]
    st = DiskStorage.open(fs, DIRECTORY, segment_bytes_max=segment_bytes_max)
    versions.append(Version(1, "open", 0, fs.op_count, True, model.copy()))
    for label, run in steps:
        start = fs.op_count
        durable = run(st, model)
        st.assert_invariants()
        versions.append(Version(len(versions), label, start, fs.op_count, durable, model.copy()))
    fs.on_op = None
    return Recording(versions, images, segment_bytes_max)


def observe(st: DiskStorage) -> tuple:
    first, last = st.first_index(), st.last_index()
    return (first, last, st.term(first - 1), tuple(st.entries(first, last + 1)),
            st.initial_state()[0], st.snapshot())


def matches(st: DiskStorage, v: Version) -> bool:
    m = v.model
    if st.initial_state()[0] != m.hs or st.last_index() != m.last:
        return False
    first = st.first_index()
    if m.term(first - 1) != st.term(first - 1):
        return False
    return all(m.log.get(e.index) == e for e in st.entries(first, st.last_index() + 1))


def crash_images(image: SimFS, *, tears: str, random_seeds: int, k: int) -> Iterator[tuple[str, SimFS]]:
    for label, img in image.crash_images(garbage_seed=k):
        if tears == "bounded" and label.startswith("torn-keep") and not (
            label.startswith("torn-keep0-") or "-zero/" in label
        ):
            continue
        yield label, img
    for seed in range(random_seeds):
        img = image.clone()
        img.crash(random.Random(k * 1000 + seed))
        yield f"random-{seed}", img


def check_image(rec: Recording, k: int, label: str, img: SimFS) -> None:
    where = f"crash point {k} ({rec.images[k].op_log[-1] if k else 'start'}), image {label}"
    candidates = [v for v in rec.versions if v.start_ops <= k]
    acked = max(v.number for v in rec.versions if v.durable and v.end_ops <= k)
    # Only the recorded run may lie (the negative control): recovery and the
    # checks after it run on an honest disk.
    img.lying_fsync = False
    try:
        st = DiskStorage.open(img, DIRECTORY, segment_bytes_max=rec.segment_bytes_max)
    except WalCorruptionError as exc:
        raise DurabilityViolation(f"{where}: refused to start after a legal crash: {exc}") from exc
    st.assert_invariants()
    matched = [v for v in candidates if matches(st, v)]
    snapshots = {v.model.snapshot for v in candidates}
    if not any(v.number >= acked for v in matched):
        if matched:
            raise DurabilityViolation(
                f"{where}: lost acknowledged writes: recovered state is version "
                f"{matched[-1].number} ({matched[-1].label}) but version {acked} "
                f"({rec.versions[acked].label}) was acknowledged durable"
            )
        raise DurabilityViolation(
            f"{where}: recovered state matches nothing written: last={st.last_index()} "
            f"hs={st.initial_state()[0]} first={st.first_index()}"
        )
    if st.snapshot() not in snapshots:
        raise DurabilityViolation(f"{where}: recovered snapshot {st.snapshot().meta} was never written")
    acked_hs = rec.versions[acked].model.hs
    if (st.initial_state()[0].term, st.initial_state()[0].commit) < (acked_hs.term, acked_hs.commit):
        raise DurabilityViolation(f"{where}: hard state went back below {acked_hs}")
    state = observe(st)
    st.close()

    # Recovery is idempotent: a second open sees the same and repairs nothing.
    again = DiskStorage.open(img, DIRECTORY, segment_bytes_max=rec.segment_bytes_max)
    if observe(again) != state or again.recovery.wal.torn_tail is not None:
        raise DurabilityViolation(f"{where}: a second recovery changed the state")

    # Appends after recovery work and are durable.
    last = again.last_index()
    nxt = Entry(term=max(again.term(last), again.initial_state()[0].term, 1), index=last + 1, data=b"after")
    again.append([nxt])
    again.sync()
    again.close()
    img.crash(random.Random(k), tear_probability=1.0)
    final = DiskStorage.open(img, DIRECTORY, segment_bytes_max=rec.segment_bytes_max)
    if final.last_index() != nxt.index or final.entries(nxt.index, nxt.index + 1) != [nxt]:
        raise DurabilityViolation(f"{where}: an append made after recovery did not survive a crash")
    final.close()


def check_all(rec: Recording, *, tears: str = "all", random_seeds: int = 2,
              crash_points: range | None = None) -> int:
    """Check every crash point; returns the number of images recovered."""
    count = 0
    for k in crash_points or range(len(rec.images)):
        for label, img in crash_images(rec.images[k], tears=tears, random_seeds=random_seeds, k=k):
            check_image(rec, k, label, img)
            count += 1
    return count


def random_workload(rng: random.Random, steps: int = 30) -> list[Step]:
    """A random but Raft-shaped workload: terms never go down, overwrites
    stay above the commit index, snapshots stay at or below it."""
    out: list[Step] = []
    last = term = 1
    commit = snap = dummy = 0
    out.append(append_step(entries(1, 2, 1)))
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.35:
            start = rng.randint(max(commit, dummy) + 1, last + 1)
            if start <= last:
                term += 1  # a new leader overwrote an uncommitted suffix
            n = rng.randint(1, 4)
            out.append(append_step(entries(start, start + n, term, size=rng.choice((8, 90, 400)))))
            last = start + n - 1
        elif roll < 0.55:
            commit = rng.randint(commit, last)
            out.append(hard_state_step(HardState(term, rng.randint(0, 3), commit)))
        elif roll < 0.8:
            out.append(sync_step())
        elif roll < 0.92 and commit > max(snap, dummy):
            snap = rng.randint(max(snap, dummy) + 1, commit)
            compact_to = rng.randint(dummy + 1, snap + 1)
            out.append(create_snapshot_step(snap, f"state-{snap}".encode(), compact_to))
            dummy = max(dummy, compact_to - 1)
        elif roll >= 0.92:
            term += 1
            snap = dummy = commit = last = max(last, commit) + rng.randint(1, 5)
            out.append(apply_snapshot_step(snap, term))
            out.append(hard_state_step(HardState(term, 0, commit)))
    out.append(sync_step())
    return out
