"""SimFS: the crash model itself (what survives, tears, nemeses, errors)."""

from __future__ import annotations

import random

import pytest

from chubbyfs.sim.disk import SimCrashedError, SimFS


def fresh() -> SimFS:
    fs = SimFS()
    fs.mkdir("/d")
    fs.fsync_dir("/")
    return fs


def durable_file(fs: SimFS, path: str, data: bytes) -> None:
    f = fs.open_append(path, create=True)
    f.write(data)
    f.fsync()
    f.close()
    fs.fsync_dir(path.rsplit("/", 1)[0] or "/")


def images(fs: SimFS) -> dict[str, SimFS]:
    return dict(fs.crash_images())


def test_unsynced_write_may_vanish_synced_write_stays():
    fs = fresh()
    durable_file(fs, "/d/f", b"a" * 10)
    f = fs.open_append("/d/f", create=False)
    f.write(b"b" * 10)
    imgs = images(fs)
    assert imgs["data-none/dirs-dropped"].read_file("/d/f") == b"a" * 10
    assert imgs["data-all/dirs-dropped"].read_file("/d/f") == b"a" * 10 + b"b" * 10
    f.fdatasync()
    for label, img in fs.crash_images():
        assert img.read_file("/d/f") == b"a" * 10 + b"b" * 10, label


def test_new_file_needs_directory_fsync():
    fs = fresh()
    f = fs.open_append("/d/new", create=True)
    f.write(b"data")
    f.fsync()
    imgs = images(fs)
    assert not imgs["data-all/dirs-dropped"].exists("/d/new")
    assert imgs["data-all/dirs-applied"].read_file("/d/new") == b"data"
    fs.crash(random.Random(1))
    assert not fs.exists("/d/new")  # crash() drops un-fsynced directory entries


def test_rename_and_unlink_need_directory_fsync():
    fs = fresh()
    durable_file(fs, "/d/a", b"A")
    fs.rename("/d/a", "/d/b")
    assert fs.listdir("/d") == ["b"]
    assert images(fs)["data-none/dirs-dropped"].listdir("/d") == ["a"]
    fs.fsync_dir("/d")
    assert images(fs)["data-none/dirs-dropped"].listdir("/d") == ["b"]
    fs.unlink("/d/b")
    assert images(fs)["data-none/dirs-dropped"].read_file("/d/b") == b"A"
    fs.fsync_dir("/d")
    assert images(fs)["data-none/dirs-dropped"].listdir("/d") == []


def test_mkdir_needs_parent_fsync_and_is_idempotent():
    fs = SimFS()
    fs.mkdir("/x")
    fs.mkdir("/x")
    assert not images(fs)["data-none/dirs-dropped"].exists("/x")
    fs.fsync_dir("/")
    assert images(fs)["data-none/dirs-dropped"].exists("/x")
    durable_file(fs, "/x/f", b"")
    with pytest.raises(FileExistsError):
        fs.mkdir("/x/f")


def test_truncate_is_pending_until_sync():
    fs = fresh()
    durable_file(fs, "/d/f", b"0123456789")
    f = fs.open_append("/d/f", create=False)
    f.truncate(4)
    assert fs.read_file("/d/f") == b"0123"
    assert images(fs)["data-none/dirs-dropped"].read_file("/d/f") == b"0123456789"
    f.truncate(6)  # growing fills with zeros
    assert fs.read_file("/d/f") == b"0123\0\0"
    f.fsync()
    assert images(fs)["data-none/dirs-dropped"].read_file("/d/f") == b"0123\0\0"
    with pytest.raises(ValueError):
        f.truncate(-1)


def test_tear_variants_of_the_last_write():
    fs = fresh()
    durable_file(fs, "/d/f", b"")
    f = fs.open_append("/d/f", create=False)
    data = bytes(range(256)) * 5 + b"xyz" * 5  # 1295 bytes: 3 sectors
    f.write(data)
    imgs = images(fs)
    torn = sorted(label for label in imgs if label.startswith("torn") and "dropped" in label)
    assert len(torn) == 3 * 3
    assert imgs["torn-keep1-zero/dirs-dropped"].read_file("/d/f") == data[:512] + bytes(len(data) - 512)
    assert imgs["torn-keep2-old/dirs-dropped"].read_file("/d/f") == data[:1024]
    assert imgs["torn-keep0-old/dirs-dropped"].read_file("/d/f") == b""
    garbage = imgs["torn-keep1-garbage/dirs-dropped"].read_file("/d/f")
    assert len(garbage) == len(data) and garbage[:512] == data[:512] and garbage[512:] != data[512:]


def test_tears_follow_sector_boundaries_of_the_file():
    fs = fresh()
    durable_file(fs, "/d/f", b"o" * 100)
    f = fs.open_append("/d/f", create=False)
    f.write(b"n" * 1000)  # covers [100, 1100): pieces end at 512 and 1024
    imgs = images(fs)
    assert imgs["torn-keep1-old/dirs-dropped"].read_file("/d/f") == b"o" * 100 + b"n" * 412
    assert imgs["torn-keep2-zero/dirs-dropped"].read_file("/d/f") == (
        b"o" * 100 + b"n" * 924 + bytes(76)
    )


def test_overwrite_tear_keeps_old_bytes():
    fs = fresh()
    durable_file(fs, "/d/f", b"o" * 1024)
    f = fs.open_append("/d/f", create=False)
    f.truncate(0)
    f.write(b"n" * 1024)
    img = images(fs)["torn-keep1-old/dirs-dropped"]
    assert img.read_file("/d/f") == b"n" * 512  # truncation applied, second sector never landed


def test_crash_is_deterministic_and_a_prefix_of_pending_writes():
    outcomes = set()
    for seed in range(40):
        results = []
        for _ in range(2):
            fs = fresh()
            durable_file(fs, "/d/f", b"base")
            f = fs.open_append("/d/f", create=False)
            for chunk in (b"1" * 600, b"2" * 600, b"3" * 10):
                f.write(chunk)
            fs.crash(random.Random(seed), tear_probability=0.0)
            results.append(fs.read_file("/d/f"))
        assert results[0] == results[1]
        full = b"base" + b"1" * 600 + b"2" * 600 + b"3" * 10
        assert full.startswith(results[0])
        outcomes.add(len(results[0]))
    assert outcomes == {4, 604, 1204, 1214}


def test_stale_and_closed_handles_fail():
    fs = fresh()
    durable_file(fs, "/d/f", b"x")
    f = fs.open_append("/d/f", create=False)
    fs.crash(random.Random(0))
    with pytest.raises(SimCrashedError):
        f.write(b"y")
    g = fs.open_append("/d/f", create=False)
    g.close()
    with pytest.raises(ValueError, match="closed"):
        g.write(b"z")


def test_lying_fsync_acknowledges_without_persisting():
    fs = SimFS(lying_fsync=True)
    fs.mkdir("/d")
    fs.fsync_dir("/")
    f = fs.open_append("/d/f", create=True)
    f.write(b"acked")
    f.fsync()
    fs.fsync_dir("/d")
    assert fs.read_file("/d/f") == b"acked"
    assert fs.statistics["syncs"] == 1
    img = images(fs)["data-none/dirs-dropped"]
    assert not img.exists("/d")


def test_bitrot_flips_one_durable_bit():
    fs = fresh()
    durable_file(fs, "/d/f", b"\x00" * 64)
    offset = fs.bitrot("/d/f", random.Random(3))
    data = fs.read_file("/d/f")
    assert sum(bin(b).count("1") for b in data) == 1 and data[offset] != 0
    assert fs.durable_bytes("/d/f") == data
    fs.bitrot("/d/f", offset=0, bit=7)
    assert fs.read_file("/d/f")[0] == 0x80 | data[0]
    with pytest.raises(ValueError, match="outside"):
        fs.bitrot("/d/f", offset=64)
    with pytest.raises(ValueError, match="rng"):
        fs.bitrot("/d/f")
    durable_file(fs, "/d/empty", b"")
    with pytest.raises(ValueError, match="no durable bytes"):
        fs.bitrot("/d/empty", random.Random(0))
    with pytest.raises(FileNotFoundError):
        fs.bitrot("/d/missing", random.Random(0))


def test_bitrot_under_pending_writes_keeps_the_pending_view():
    fs = fresh()
    durable_file(fs, "/d/f", b"\x00" * 8)
    f = fs.open_append("/d/f", create=False)
    f.write(b"tail")
    fs.bitrot("/d/f", offset=1, bit=0)
    assert fs.read_file("/d/f") == b"\x00\x01" + b"\x00" * 6 + b"tail"
    fs.assert_invariants()


def test_errors_match_the_os():
    fs = fresh()
    durable_file(fs, "/d/f", b"")
    with pytest.raises(FileExistsError):
        fs.open_append("/d/f", create=True)
    with pytest.raises(FileNotFoundError):
        fs.open_append("/d/g", create=False)
    with pytest.raises(FileNotFoundError):
        fs.open_append("/nodir/g", create=True)
    with pytest.raises(FileNotFoundError):
        fs.read_file("/d/g")
    with pytest.raises(FileNotFoundError):
        fs.file_size("/d/g")
    with pytest.raises(FileNotFoundError):
        fs.unlink("/d/g")
    with pytest.raises(FileNotFoundError):
        fs.rename("/d/g", "/d/h")
    with pytest.raises(FileNotFoundError):
        fs.listdir("/nodir")
    with pytest.raises(FileNotFoundError):
        fs.fsync_dir("/nodir")
    fs.mkdir("/e")
    with pytest.raises(ValueError, match="one directory"):
        fs.rename("/d/f", "/e/f")
    fs.mkdir("/d/sub")
    with pytest.raises(IsADirectoryError):
        fs.rename("/d/f", "/d/sub")
    with pytest.raises(ValueError, match="absolute"):
        fs.read_file("d/f")
    with pytest.raises(ValueError, match=r"\.\."):
        fs.read_file("/d/../f")


def test_op_log_hook_and_clone_are_independent():
    fs = fresh()
    seen = []
    fs.on_op = lambda f: seen.append(f.op_count)
    durable_file(fs, "/d/f", b"x")
    assert seen == [3, 4, 5, 6]
    assert fs.op_log[-4:] == ["create /d/f", "write /d/f @0 +1", "fsync /d/f", "fsync_dir /d"]
    twin = fs.clone()
    assert twin.on_op is None and fs.on_op is not None
    twin.unlink("/d/f")
    assert fs.exists("/d/f") and not twin.exists("/d/f")
    fs.assert_invariants()
    twin.assert_invariants()
