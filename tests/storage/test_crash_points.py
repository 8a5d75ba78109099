"""Exhaustive crash-point tests of DiskStorage on SimFS (testing-anchors §6.5).

For every filesystem operation of a workload, and for every crash image at
that point (nothing pending kept, everything kept, every prefix tear of the
last write with old/zero/garbage sectors, with and without the un-fsynced
directory entries, plus seeded random crashes), recovery must give a state
the workload really had, no older than what was acknowledged durable;
recovering twice changes nothing; appends after recovery survive a crash.
"""

from __future__ import annotations

import random

import pytest

from .crashcheck import (
    DurabilityViolation,
    check_all,
    check_image,
    crash_images,
    long_workload,
    random_workload,
    record,
    small_workload,
)


@pytest.mark.parametrize("segment_bytes_max", [300, 700, 1 << 20])
def test_small_workload_every_crash_point_every_tear(segment_bytes_max):
    rec = record(small_workload(), segment_bytes_max=segment_bytes_max)
    assert len(rec.images) > 30
    assert check_all(rec, tears="all", random_seeds=3) > 300


def test_long_workload_every_crash_point():
    rec = record(long_workload(), segment_bytes_max=700)
    segments_cut = sum("create" in line and ".wal" in line for line in rec.images[-1].op_log)
    assert segments_cut >= 4
    assert check_all(rec, tears="bounded", random_seeds=2) > 500


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads(seed):
    rng = random.Random(seed)
    rec = record(random_workload(rng, steps=25), segment_bytes_max=rng.choice((300, 900)))
    check_all(rec, tears="bounded", random_seeds=2)


def test_lying_fsync_is_caught_as_lost_acknowledged_writes():
    """Negative control: a disk that acknowledges fsync without persisting
    must be caught by the same checker."""
    rec = record(small_workload(), segment_bytes_max=700, lying_fsync=True)
    lost = []
    for k in range(len(rec.images)):
        for label, img in crash_images(rec.images[k], tears="bounded", random_seeds=0, k=k):
            try:
                check_image(rec, k, label, img)
            except DurabilityViolation as exc:
                if "lost acknowledged writes" in str(exc):
                    lost.append((k, label))
    assert lost, "the checker missed every lost acknowledged write"
    assert any(label == "data-none/dirs-dropped" for _, label in lost)


def test_honest_disk_same_images_pass():
    """The positive twin of the negative control (same images, honest disk)."""
    rec = record(small_workload(), segment_bytes_max=700)
    for k in range(len(rec.images)):
        for label, img in crash_images(rec.images[k], tears="bounded", random_seeds=0, k=k):
            check_image(rec, k, label, img)


@pytest.mark.slow
@pytest.mark.parametrize("segment_bytes_max", [200, 300, 700, 2000, 1 << 20])
def test_full_long_workload(segment_bytes_max):
    rec = record(long_workload(), segment_bytes_max=segment_bytes_max)
    check_all(rec, tears="all", random_seeds=25)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 60))
def test_full_random_workloads(seed):
    rng = random.Random(seed)
    rec = record(random_workload(rng, steps=45), segment_bytes_max=rng.choice((200, 300, 900, 4000)))
    check_all(rec, tears="all", random_seeds=10)
