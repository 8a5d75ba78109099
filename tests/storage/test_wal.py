"""WAL framing, group commit, segments and the recovery decision table."""

from __future__ import annotations

import posixpath
import struct

import crc32c
import pytest

from chubbyfs.storage.wal import (
    HEADER_BYTES,
    RecordType,
    WalCorruptionError,
    decode_header,
    encode_header,
    encode_record,
    open_wal,
    parse_segment_name,
    segment_name,
)

from .helpers import CountingFS, append_raw, flip_bit, make_fs, overwrite, truncate_raw

FS_KINDS = ["sim", "real"]


def payloads(n: int, size: int = 20) -> list[bytes]:
    return [bytes([i % 251]) * (size + i % 13) for i in range(n)]


def write_records(fs, directory, items, *, segment_bytes_max=1 << 20, sync_every=1):
    wal, _, _ = open_wal(fs, directory, segment_bytes_max=segment_bytes_max)
    for i, payload in enumerate(items):
        wal.append(RecordType.ENTRIES, payload)
        if (i + 1) % sync_every == 0:
            wal.sync()
    wal.sync()
    wal.close()


def reopen(fs, directory, **kw):
    wal, records, report = open_wal(fs, directory, **kw)
    wal.assert_invariants()
    return wal, [r.payload for r in records], report


def segment_paths(fs, directory) -> list[str]:
    return [posixpath.join(directory, n) for n in fs.listdir(directory) if parse_segment_name(n)]


# -- framing --------------------------------------------------------------------


def test_record_golden_bytes_and_chain():
    frame, crc = encode_record(RecordType.HARD_STATE, b"abc", 0)
    assert crc == crc32c.crc32c(b"\x02abc")
    assert frame == struct.pack("<IIB", 3, crc, 2) + b"abc" + bytes(4)  # 9 + 3 padded to 16
    frame2, crc2 = encode_record(RecordType.ENTRIES, b"", crc)
    assert crc2 == crc32c.crc32c(b"\x01", crc)  # seeded with the previous record's crc
    assert frame2 == struct.pack("<IIB", 0, crc2, 1) + bytes(7)


def test_header_round_trip_and_damage():
    header = encode_header(0xDEADBEEF, 7, 42)
    assert len(header) == HEADER_BYTES == 40
    parsed = decode_header(header)
    assert (parsed.prev_crc, parsed.seq, parsed.first_index) == (0xDEADBEEF, 7, 42)
    for i in range(HEADER_BYTES):
        damaged = bytearray(header)
        damaged[i] ^= 1
        assert decode_header(bytes(damaged)) is None, f"flip at byte {i} went unnoticed"
    assert decode_header(header[:39]) is None


def test_segment_names():
    assert segment_name(1, 255) == "0000000000000001-00000000000000ff.wal"
    assert parse_segment_name(segment_name(3, 9)) == (3, 9)
    assert parse_segment_name("0001-0002.wal") is None
    assert parse_segment_name(segment_name(3, 9) + ".broken") is None


@pytest.mark.parametrize("kind", FS_KINDS)
def test_round_trip_all_types_and_sizes(kind, tmp_path):
    fs, d = make_fs(kind, tmp_path)
    wal, records, report = open_wal(fs, d)
    assert records == [] and report.created
    items = [(RecordType.ENTRIES, b""), (RecordType.HARD_STATE, b"x" * 7),
             (RecordType.SNAPSHOT, b"y" * 8), (RecordType.ENTRIES, bytes(range(256)) * 5)]
    for t, p in items:
        wal.append(t, p)
    wal.sync()
    size = fs.file_size(segment_paths(fs, d)[0])
    assert size % 8 == 0
    wal.close()
    _, records, report = open_wal(fs, d)
    assert [(r.type, r.payload) for r in records] == items
    assert report.torn_tail is None and not report.created
    assert [r.offset for r in records][0] == HEADER_BYTES


# -- group commit -----------------------------------------------------------------


def test_group_commit_one_write_one_fdatasync():
    fs, d = make_fs("sim", None)
    counting = CountingFS(fs)
    wal, _, _ = open_wal(counting, d)
    counting.calls.clear()
    for p in payloads(100):
        wal.append(RecordType.ENTRIES, p)
    assert counting.calls["file.write"] == 0 and counting.calls["file.fdatasync"] == 0
    wal.sync()
    assert counting.calls["file.write"] == 1
    assert counting.calls["file.fdatasync"] == 1
    wal.sync()  # nothing new: no syscall at all
    assert counting.calls["file.fdatasync"] == 1
    assert wal.statistics().syncs == 1
    assert wal.statistics().records_appended == 100


def test_buffer_is_flushed_when_full_but_not_synced():
    fs, d = make_fs("sim", None)
    counting = CountingFS(fs)
    wal, _, _ = open_wal(counting, d, buffer_bytes_max=256)
    counting.calls.clear()
    for p in payloads(20, size=50):
        wal.append(RecordType.ENTRIES, p)
    assert counting.calls["file.write"] >= 3
    assert counting.calls["file.fdatasync"] == 0
    wal.sync()
    assert counting.calls["file.fdatasync"] == 1
    wal.assert_invariants()


def test_unsynced_records_are_lost_on_crash_synced_ones_kept():
    import random

    fs, d = make_fs("sim", None)
    wal, _, _ = open_wal(fs, d)
    wal.append(RecordType.ENTRIES, b"kept")
    wal.sync()
    wal.append(RecordType.ENTRIES, b"maybe")
    wal.flush()
    fs.crash(random.Random(0), tear_probability=0.0)
    images = []
    for seed in range(20):
        fs2, d2 = make_fs("sim", None)
        wal, _, _ = open_wal(fs2, d2)
        wal.append(RecordType.ENTRIES, b"kept")
        wal.sync()
        wal.append(RecordType.ENTRIES, b"maybe")
        wal.flush()
        fs2.crash(random.Random(seed))
        _, got, _ = reopen(fs2, d2)
        images.append(got)
    assert all(got[0] == b"kept" for got in images)
    assert {len(got) for got in images} == {1, 2}  # both outcomes happen


# -- segments -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", FS_KINDS)
def test_rollover_creates_chained_segments(kind, tmp_path):
    fs, d = make_fs(kind, tmp_path)
    counting = CountingFS(fs)
    items = payloads(60)
    wal, _, _ = open_wal(counting, d, segment_bytes_max=300)
    counting.calls.clear()
    for i, p in enumerate(items):
        wal.append(RecordType.ENTRIES, p)
        if i % 4 == 3:
            wal.sync()
    wal.sync()
    stats = wal.statistics()
    wal.close()
    paths = segment_paths(fs, d)
    assert len(paths) >= 5 and stats.segment_count == len(paths)
    assert counting.calls["fsync_dir"] == stats.segments_created  # one per new segment
    seqs = [parse_segment_name(posixpath.basename(p))[0] for p in paths]
    assert seqs == list(range(1, len(paths) + 1))
    for p in paths[:-1]:
        assert fs.file_size(p) <= 300 or fs.file_size(p) <= HEADER_BYTES + 48
    _, got, report = reopen(fs, d, segment_bytes_max=300)
    assert got == items and report.torn_tail is None


def test_cut_preamble_and_remove_segments():
    fs, d = make_fs("sim", None)
    wal, _, _ = open_wal(
        fs, d, segment_bytes_max=200,
        segment_start=lambda: (99, [(RecordType.HARD_STATE, b"hs")]),
    )
    for p in payloads(30):
        wal.append(RecordType.ENTRIES, p)
    wal.sync()
    segs = wal.segments()
    assert len(segs) > 3 and all(s.first_index == 99 for s in segs[1:])
    removed = wal.remove_segments_through(segs[2].seq)
    assert removed == [s.name for s in segs[:3]]
    assert wal.remove_segments_through(10**9) == [s.name for s in segs[3:-1]]  # never the current
    assert wal.segments() == [segs[-1]]
    wal.close()
    _, records, _ = open_wal(fs, d)
    assert records[0].type == RecordType.HARD_STATE and records[0].payload == b"hs"


def test_appends_continue_in_recovered_segment_and_can_cut():
    fs, d = make_fs("sim", None)
    write_records(fs, d, payloads(5), segment_bytes_max=400)
    wal, got, _ = reopen(fs, d, segment_bytes_max=400)
    more = payloads(40)[5:]
    for p in more:
        wal.append(RecordType.ENTRIES, p)
    wal.sync()
    wal.close()
    _, got2, report = reopen(fs, d)
    assert got2 == payloads(5) + more and report.torn_tail is None
    assert len(report.segments) > 1


def test_errors_on_misuse():
    fs, d = make_fs("sim", None)
    with pytest.raises(ValueError, match="too small"):
        open_wal(fs, d, segment_bytes_max=16)
    wal, _, _ = open_wal(fs, d)
    wal.close()
    with pytest.raises(ValueError, match="closed"):
        wal.append(RecordType.ENTRIES, b"x")
    with pytest.raises(ValueError, match="closed"):
        wal.sync()


# -- the recovery decision table ---------------------------------------------------------


def build(kind, tmp_path, n=12, segment_bytes_max=1 << 20):
    fs, d = make_fs(kind, tmp_path)
    items = payloads(n)
    write_records(fs, d, items, segment_bytes_max=segment_bytes_max)
    return fs, d, items


def record_offsets(fs, d, path):
    _, records, _ = open_wal(fs, d)
    name = posixpath.basename(path)
    return [r.offset for r in records if r.segment == name]


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_all_valid_accept(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    _, got, report = reopen(fs, d)
    assert got == items and report.torn_tail is None
    assert not [n for n in fs.listdir(d) if "broken" in n]


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_short_tail_is_torn(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    original = fs.read_file(path)
    last = record_offsets(fs, d, path)[-1]
    truncate_raw(fs, path, last + 11)  # cut inside the last record
    wal, got, report = reopen(fs, d)
    assert got == items[:-1]
    torn = report.torn_tail
    assert torn is not None and torn.kind == "short" and torn.offset == last
    assert fs.file_size(path) == last
    assert fs.read_file(posixpath.join(d, torn.broken_copy)) == original[: last + 11]
    assert torn.broken_copy == posixpath.basename(path) + ".broken"


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_zeroed_tail_is_torn(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    end = fs.file_size(path)
    append_raw(fs, path, bytes(1024))
    _, got, report = reopen(fs, d)
    assert got == items
    assert report.torn_tail.kind == "zeroed" and report.torn_tail.offset == end
    assert report.torn_tail.dropped_bytes == 1024


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_zeroed_sector_inside_last_record_is_torn(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    last = record_offsets(fs, d, path)[-1]
    data = bytearray(fs.read_file(path))
    data[last + 9 :] = bytes(len(data) - last - 9)  # payload zeroed, header intact
    overwrite(fs, path, bytes(data))
    _, got, report = reopen(fs, d)
    assert got == items[:-1] and report.torn_tail.offset == last


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_garbage_tail_is_torn(kind, tmp_path):
    import random

    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    append_raw(fs, path, random.Random(5).randbytes(1500))
    _, got, report = reopen(fs, d)
    assert got == items and report.torn_tail.kind == "garbage"


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_bad_record_followed_by_valid_refuses(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    offsets = record_offsets(fs, d, path)
    flip_bit(fs, path, offsets[5] + 12)  # inside the payload of record 5
    with pytest.raises(WalCorruptionError) as info:
        open_wal(fs, d)
    err = info.value
    assert err.file == posixpath.basename(path) and err.offset == offsets[5]
    assert "followed by a valid record" in str(err) and posixpath.basename(path) in str(err)
    assert f"offset {offsets[5]}" in str(err)
    assert not [n for n in fs.listdir(d) if "broken" in n]  # nothing was touched


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_bad_length_word_followed_by_valid_refuses(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    offsets = record_offsets(fs, d, path)
    data = bytearray(fs.read_file(path))
    data[offsets[3] : offsets[3] + 4] = struct.pack("<I", 0xFFFFFF)  # length now points past EOF
    overwrite(fs, path, bytes(data))
    with pytest.raises(WalCorruptionError, match="followed by a valid record"):
        open_wal(fs, d)


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_damage_in_non_final_segment_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    assert len(paths) > 2
    # Damage the *last* record of a middle segment: nothing follows it there.
    last = record_offsets(fs, d, paths[1])[-1]
    flip_bit(fs, paths[1], last + 10)
    with pytest.raises(WalCorruptionError, match="non-final segment") as info:
        open_wal(fs, d)
    assert info.value.file == posixpath.basename(paths[1]) and info.value.offset == last


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_torn_tail_of_non_final_segment_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    last = record_offsets(fs, d, paths[0])[-1]
    truncate_raw(fs, paths[0], last + 5)
    with pytest.raises(WalCorruptionError, match="non-final"):
        open_wal(fs, d)


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_non_final_segment_lost_whole_records_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    last = record_offsets(fs, d, paths[1])[-1]
    truncate_raw(fs, paths[1], last)  # a clean record boundary: only the chain can tell
    with pytest.raises(WalCorruptionError, match="chain broken") as info:
        open_wal(fs, d)
    assert info.value.file == posixpath.basename(paths[2])


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_missing_segment_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    fs.unlink(paths[2])
    with pytest.raises(WalCorruptionError, match="missing"):
        open_wal(fs, d)


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_bad_header_in_non_final_segment_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    flip_bit(fs, paths[1], 20)
    with pytest.raises(WalCorruptionError, match="header") as info:
        open_wal(fs, d)
    assert info.value.offset == 0


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_torn_header_of_last_segment_removes_it(kind, tmp_path):
    fs, d, items = build(kind, tmp_path, n=40, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    last_records = len(record_offsets(fs, d, paths[-1]))
    # A crash while a segment was being started: only part of its header.
    name = segment_name(len(paths) + 1, 999)
    f = fs.open_append(posixpath.join(d, name), create=True)
    f.write(encode_header(0, len(paths) + 1, 999)[:20])
    f.fsync()
    f.close()
    wal, got, report = reopen(fs, d, segment_bytes_max=300)
    assert got == items and last_records > 0
    assert report.torn_tail.kind == "bad-header" and report.torn_tail.segment == name
    assert not fs.exists(posixpath.join(d, name))
    assert fs.exists(posixpath.join(d, name + ".broken"))
    wal.append(RecordType.ENTRIES, b"after")
    wal.sync()
    wal.close()
    _, got, _ = reopen(fs, d)
    assert got == items + [b"after"]


@pytest.mark.parametrize("kind", FS_KINDS)
def test_case_bad_header_but_valid_records_refuses(kind, tmp_path):
    fs, d, _ = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    flip_bit(fs, path, 3)  # the magic
    with pytest.raises(WalCorruptionError, match="invalid segment header but a valid record"):
        open_wal(fs, d)


def test_only_segment_with_torn_header_starts_fresh():
    fs, d = make_fs("sim", None)
    name = segment_name(1, 1)
    f = fs.open_append(posixpath.join(d, name), create=True)
    f.write(b"CHUB")
    f.fsync()
    f.close()
    wal, got, report = reopen(fs, d)
    assert got == [] and report.torn_tail.kind == "bad-header"
    wal.append(RecordType.ENTRIES, b"a")
    wal.sync()
    wal.close()
    assert reopen(fs, d)[1] == [b"a"]


@pytest.mark.parametrize("kind", FS_KINDS)
def test_appends_after_torn_recovery_and_recovery_is_idempotent(kind, tmp_path):
    fs, d, items = build(kind, tmp_path)
    path = segment_paths(fs, d)[-1]
    append_raw(fs, path, bytes(100))
    wal, got, first = reopen(fs, d)
    assert first.torn_tail is not None
    wal.close()
    listing = fs.listdir(d)
    wal, got_again, second = reopen(fs, d)
    assert got_again == got and second.torn_tail is None
    assert fs.listdir(d) == listing  # the second recovery changed nothing
    wal.append(RecordType.ENTRIES, b"new")
    wal.sync()
    wal.close()
    _, got3, third = reopen(fs, d)
    assert got3 == items + [b"new"] and third.torn_tail is None


def test_second_broken_copy_gets_a_new_name():
    fs, d, _ = build("sim", None)
    path = segment_paths(fs, d)[-1]
    append_raw(fs, path, bytes(64))
    reopen(fs, d)[0].close()
    append_raw(fs, path, bytes(64))
    report = reopen(fs, d)[2]
    assert report.torn_tail.broken_copy == posixpath.basename(path) + ".broken.1"


def test_chain_runs_across_segments():
    fs, d, _ = build("sim", None, n=30, segment_bytes_max=300)
    paths = segment_paths(fs, d)
    wal, records, _ = open_wal(fs, d)
    for path in paths[1:]:
        header = decode_header(fs.read_file(path))
        previous = [r for r in records if r.segment_seq == header.seq - 1][-1]
        data = fs.read_file(posixpath.join(d, previous.segment))
        assert header.prev_crc == struct.unpack_from("<I", data, previous.offset + 4)[0]


def test_header_that_disagrees_with_the_file_name_refuses():
    fs, d, _ = build("sim", None)
    path = segment_paths(fs, d)[-1]
    fs.rename(path, posixpath.join(d, segment_name(1, 77)))
    with pytest.raises(WalCorruptionError, match="header says seq 1 first index 1"):
        open_wal(fs, d)
