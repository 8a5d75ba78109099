"""Snapshot files: format, atomic write, newest-valid loading, pruning."""

from __future__ import annotations

import pytest

from chubbyfs.raft.types import ConfState, Snapshot, SnapshotMeta
from chubbyfs.storage.snapshot import (
    SnapshotFormatError,
    SnapshotStore,
    decode_snapshot,
    encode_snapshot,
    parse_snapshot_name,
    snapshot_name,
)

from .helpers import flip_bit, make_fs, overwrite


def snap(index: int, term: int = 1, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index=index, term=term, conf=ConfState((1, 2, 3))), data)


def test_round_trip_and_every_byte_is_checked():
    s = snap(7, 2, bytes(range(200)))
    blob = encode_snapshot(s)
    assert decode_snapshot(blob) == s
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        with pytest.raises(SnapshotFormatError):
            decode_snapshot(bytes(damaged))
    for cut in (0, 10, len(blob) - 1):
        with pytest.raises(SnapshotFormatError):
            decode_snapshot(blob[:cut])


def test_names():
    assert snapshot_name(255, 3) == "00000000000000ff-0000000000000003.snap"
    assert parse_snapshot_name(snapshot_name(255, 3)) == (255, 3)
    assert parse_snapshot_name("x.snap") is None


@pytest.mark.parametrize("kind", ["sim", "real"])
def test_save_load_prune(kind, tmp_path):
    fs, d = make_fs(kind, tmp_path)
    store = SnapshotStore(fs, d, retain=2)
    assert store.load_newest().snapshot == Snapshot()
    for i in (3, 9, 5):
        store.save(snap(i))
    assert store.load_newest().snapshot == snap(9)
    assert store.prune() == [snapshot_name(3, 1)]
    assert store.names() == [snapshot_name(5, 1), snapshot_name(9, 1)]


def test_save_is_tmp_fsync_rename_fsync_dir():
    fs, d = make_fs("sim", None)
    SnapshotStore(fs, d).save(snap(4))
    name = snapshot_name(4, 1)
    assert fs.op_log[-5:] == [
        f"create {d}/{name}.tmp",
        f"write {d}/{name}.tmp @0 +{len(encode_snapshot(snap(4)))}",
        f"fsync {d}/{name}.tmp",
        f"rename {d}/{name}.tmp {d}/{name}",
        f"fsync_dir {d}",
    ]


def test_a_crash_during_save_leaves_nothing_or_the_whole_snapshot():
    fs, d = make_fs("sim", None)
    store = SnapshotStore(fs, d)
    store.save(snap(2))
    images = [fs.clone()]
    fs.on_op = lambda f: images.append(f.clone())
    store.save(snap(6, data=b"x" * 3000))
    fs.on_op = None
    seen = set()
    for image in images:
        for label, img in image.crash_images():
            result = SnapshotStore(img, d).load_newest()
            assert result.broken == (), label
            assert result.snapshot in (snap(2), snap(6, data=b"x" * 3000)), label
            seen.add(result.snapshot.meta.index)
            assert not [n for n in img.listdir(d) if n.endswith(".tmp")]
    assert seen == {2, 6}


def test_damaged_newest_falls_back_and_is_set_aside():
    fs, d = make_fs("sim", None)
    store = SnapshotStore(fs, d)
    store.save(snap(3))
    name = store.save(snap(8))
    flip_bit(fs, f"{d}/{name}", 30)
    result = store.load_newest()
    assert result.snapshot == snap(3) and result.name == snapshot_name(3, 1)
    assert result.broken == (name,)
    assert fs.exists(f"{d}/{name}.broken") and not fs.exists(f"{d}/{name}")


def test_content_must_match_the_name():
    fs, d = make_fs("sim", None)
    store = SnapshotStore(fs, d)
    name = store.save(snap(3))
    overwrite(fs, f"{d}/{name}", encode_snapshot(snap(4)))
    assert store.load_newest().broken == (name,)


def test_leftover_temp_files_are_removed():
    fs, d = make_fs("sim", None)
    f = fs.open_append(f"{d}/{snapshot_name(5, 1)}.tmp", create=True)
    f.write(b"partial")
    f.close()
    result = SnapshotStore(fs, d).load_newest()
    assert result.removed_temp_files == (snapshot_name(5, 1) + ".tmp",)
    assert fs.listdir(d) == []


def test_errors():
    fs, d = make_fs("sim", None)
    with pytest.raises(ValueError, match="at least one"):
        SnapshotStore(fs, d, retain=0)
    with pytest.raises(ValueError, match="empty"):
        SnapshotStore(fs, d).save(Snapshot())
    blob = bytearray(encode_snapshot(snap(1)))
    blob[0:8] = b"NOTASNAP"
    with pytest.raises(SnapshotFormatError, match="magic"):
        decode_snapshot(bytes(blob))
