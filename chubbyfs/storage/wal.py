"""Segmented write-ahead log with chained CRC32C framing and group commit.

Format (docs/storage.md has the full description):

    segment file  <seq:016x>-<first_index:016x>.wal
    header (40 B) magic "CHUBWAL\\0" | u32 version | u32 prev_crc | u64 seq
                  | u64 first_index | u32 crc32c(previous 32 bytes) | u32 zero
    record        u32 length | u32 crc | u8 type | payload[length] | zero pad to 8

Integers are little-endian. `crc` is crc32c(type byte + payload) seeded with
the previous record's crc; a segment's first record is seeded with the
header's prev_crc, which is the last crc of the previous segment, so one
chain runs through the whole log and a lost record or segment shows.

Recovery is a decision table (`open_wal`):

    all records valid                                    -> accept
    bad bytes at the tail of the last segment, no valid
    record after them (short, zeroed or garbage)         -> torn tail: keep a
                                                            .broken copy, truncate
    bad record followed by a valid one, damage in a
    non-final segment, a broken chain, a missing segment -> WalCorruptionError

"A valid record after" means two consecutive frames at some 8-aligned offset
past the damage where the second one's crc verifies against the first one's
crc field: random bytes pass that with probability ~2^-32.

Group commit: `append()` only encodes into a buffer; `sync()` writes the
buffer with one write() and makes it durable with one fdatasync().
"""

from __future__ import annotations

import enum
import posixpath
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import crc32c

from .fs import AppendFile, FileSystem

MAGIC = b"CHUBWAL\x00"
FORMAT_VERSION = 1
SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
BUFFER_BYTES_MAX_DEFAULT = 1024 * 1024

_HEADER = struct.Struct("<8sIIQQ")  # magic, version, prev_crc, seq, first_index
_HEADER_TAIL = struct.Struct("<II")  # header crc, reserved zero
HEADER_BYTES = _HEADER.size + _HEADER_TAIL.size  # 40: keeps records 8-aligned
_RECORD_HEAD = struct.Struct("<IIB")  # length, crc, type
RECORD_HEAD_BYTES = _RECORD_HEAD.size  # 9
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")


class RecordType(enum.IntEnum):
    # 0 is never valid so that zeroed sectors can never parse as a record.
    ENTRIES = 1  # a batch of contiguous log entries (overwrites from its first index)
    HARD_STATE = 2
    SNAPSHOT = 3  # the log was replaced by the snapshot at (index, term)


_VALID_TYPES = frozenset(int(t) for t in RecordType)


class WalCorruptionError(Exception):
    """The log is damaged in a way a crash cannot explain: refuse to start."""

    def __init__(self, file: str, offset: int, reason: str) -> None:
        self.file = file
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"WAL corruption in {file} at offset {offset}: {reason}; refusing to start "
            "(repair by hand or rebuild this replica from a peer's snapshot)"
        )


@dataclass(frozen=True, slots=True)
class WalRecord:
    type: RecordType
    payload: bytes
    segment_seq: int
    segment: str  # file name, for error messages
    offset: int


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    seq: int
    first_index: int  # last_index + 1 when the segment was started (informational)
    name: str


@dataclass(frozen=True, slots=True)
class TornTail:
    segment: str
    offset: int  # where the valid prefix ends (the file is cut here)
    dropped_bytes: int
    kind: str  # "short", "zeroed", "garbage" or "bad-header" (the segment is removed)
    broken_copy: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    segments: tuple[str, ...]
    records: int
    torn_tail: TornTail | None
    created: bool  # no segment existed: a fresh log was started


@dataclass(frozen=True, slots=True)
class WalStatistics:
    bytes_written: int
    records_appended: int
    syncs: int
    segments_created: int
    segments_removed: int
    segment_count: int
    current_segment_bytes: int


def segment_name(seq: int, first_index: int) -> str:
    return f"{seq:016x}-{first_index:016x}.wal"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    m = _SEGMENT_NAME.match(name)
    return None if m is None else (int(m.group(1), 16), int(m.group(2), 16))


def _padded(n: int) -> int:
    return (n + 7) & ~7


def encode_header(prev_crc: int, seq: int, first_index: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, prev_crc, seq, first_index)
    return head + _HEADER_TAIL.pack(crc32c.crc32c(head), 0)


_TYPE_BYTES = [bytes((t,)) for t in range(256)]
_PADS = [bytes(n) for n in range(8)]
_crc32c = crc32c.crc32c
_pack_head = _RECORD_HEAD.pack


def record_crc(record_type: int, payload: bytes, prev_crc: int) -> int:
    return _crc32c(payload, _crc32c(_TYPE_BYTES[record_type], prev_crc))


def encode_record(record_type: int, payload: bytes, prev_crc: int) -> tuple[bytes, int]:
    """The framed record and its crc (the seed of the next record)."""
    n = len(payload)
    crc = _crc32c(payload, _crc32c(_TYPE_BYTES[record_type], prev_crc))
    return _pack_head(n, crc, record_type) + payload + _PADS[-(RECORD_HEAD_BYTES + n) & 7], crc


@dataclass(frozen=True, slots=True)
class _Header:
    prev_crc: int
    seq: int
    first_index: int


def decode_header(data: bytes) -> _Header | None:
    if len(data) < HEADER_BYTES:
        return None
    magic, version, prev_crc, seq, first_index = _HEADER.unpack_from(data, 0)
    header_crc, reserved = _HEADER_TAIL.unpack_from(data, _HEADER.size)
    if magic != MAGIC or version != FORMAT_VERSION or reserved != 0:
        return None
    if header_crc != crc32c.crc32c(data[: _HEADER.size]):
        return None
    return _Header(prev_crc, seq, first_index)


@dataclass(slots=True)
class _Scan:
    records: list[tuple[int, bytes, int]]  # (type, payload, offset)
    valid_end: int
    last_crc: int
    bad_offset: int | None = None
    bad_kind: str = ""


def _frame_at(data: bytes, offset: int) -> tuple[int, int, int, int] | None:
    """(length, crc, type, padded end) of a plausible frame at offset."""
    if len(data) - offset < RECORD_HEAD_BYTES:
        return None
    length, crc, rtype = _RECORD_HEAD.unpack_from(data, offset)
    end = _padded(offset + RECORD_HEAD_BYTES + length)
    if rtype not in _VALID_TYPES or end > len(data):
        return None
    return length, crc, rtype, end


def _scan_records(data: bytes, seed_crc: int) -> _Scan:
    records: list[tuple[int, bytes, int]] = []
    offset, crc = HEADER_BYTES, seed_crc
    size = len(data)
    while offset < size:
        frame = _frame_at(data, offset)
        if frame is None:
            return _Scan(records, offset, crc, offset, _bad_kind(data, offset))
        length, stored_crc, rtype, end = frame
        body_start = offset + RECORD_HEAD_BYTES
        payload = data[body_start : body_start + length]
        pad = data[body_start + length : end]
        if record_crc(rtype, payload, crc) != stored_crc or pad.count(0) != len(pad):
            return _Scan(records, offset, crc, offset, _bad_kind(data, offset))
        records.append((rtype, payload, offset))
        offset, crc = end, stored_crc
    return _Scan(records, offset, crc)


def _bad_kind(data: bytes, offset: int) -> str:
    rest = data[offset:]
    if rest.count(0) == len(rest):
        return "zeroed"
    frame_head_fits = len(rest) >= RECORD_HEAD_BYTES
    if frame_head_fits:
        length, _, rtype = _RECORD_HEAD.unpack_from(data, offset)
        if rtype in _VALID_TYPES and offset + RECORD_HEAD_BYTES + length > len(data):
            return "short"
        return "garbage"
    return "short"


def find_valid_record_after(data: bytes, start: int) -> int | None:
    """Offset of a record past `start` proven genuine by the chain, or None.

    A frame at q followed by a frame whose crc verifies when seeded with the
    crc stored at q: only records the log really wrote chain that way."""
    q = _padded(start)
    size = len(data)
    nonzero_end = len(data.rstrip(b"\x00"))  # past it only zeros: no frame
    while q + RECORD_HEAD_BYTES <= size and q < nonzero_end:
        first = _frame_at(data, q)
        if first is not None:
            _, seed, _, nxt = first
            second = _frame_at(data, nxt)
            if second is not None:
                length, crc, rtype, _ = second
                body = nxt + RECORD_HEAD_BYTES
                if record_crc(rtype, data[body : body + length], seed) == crc:
                    return nxt
        q += 8
    return None


class WriteAheadLog:
    """Appends framed records to the newest segment. Open with `open_wal`."""

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        segments: list[SegmentInfo],
        file: AppendFile,
        crc: int,
        *,
        segment_bytes_max: int,
        buffer_bytes_max: int,
        segment_start: Callable[[], tuple[int, list[tuple[RecordType, bytes]]]] | None,
    ) -> None:
        self._fs = fs
        self._directory = directory
        self._segments = segments
        self._file = file
        self._crc = crc
        self._size_bytes = file.size()  # includes the buffer
        # Cut only once something follows the header (and the preamble, for
        # segments this process started), so a tiny limit cannot loop.
        self._segment_body_start = HEADER_BYTES
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._dirty = False  # written to the file but not yet fdatasync'ed
        self.segment_bytes_max = segment_bytes_max
        self.buffer_bytes_max = buffer_bytes_max
        # What a new segment starts with: its first index and records to
        # repeat there (the owner's hard state), so old segments can go.
        self.segment_start = segment_start or (lambda: (self._segments[-1].first_index, []))
        self._bytes_written = 0
        self._records_appended = 0
        self._syncs = 0
        self._segments_created = 0
        self._segments_removed = 0
        self._closed = False

    # -- writing -------------------------------------------------------------

    def append(self, record_type: RecordType, payload: bytes) -> int:
        """Buffer one record; returns the seq of the segment it goes to."""
        if self._closed:
            raise ValueError("the write-ahead log is closed")
        framed_bytes = (RECORD_HEAD_BYTES + len(payload) + 7) & ~7
        if (
            self._size_bytes + framed_bytes > self.segment_bytes_max
            and self._size_bytes > self._segment_body_start
        ):
            first_index, preamble = self.segment_start()
            self.cut(first_index, preamble)
        frame, self._crc = encode_record(record_type, payload, self._crc)
        self._buffer.append(frame)
        self._buffer_bytes += framed_bytes
        self._size_bytes += framed_bytes
        self._records_appended += 1
        if self._buffer_bytes >= self.buffer_bytes_max:
            self.flush()
        return self._segments[-1].seq

    def flush(self) -> None:
        """Hand the buffer to the file in one write (not yet durable)."""
        if self._buffer:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer.clear()
            self._buffer_bytes = 0
            self._file.write(data)
            self._bytes_written += len(data)
            self._dirty = True

    def sync(self) -> None:
        """Make every appended record durable: one write, one fdatasync."""
        self._check_open()
        self.flush()
        if self._dirty:
            self._file.fdatasync()
            self._syncs += 1
            self._dirty = False

    def cut(self, first_index: int, preamble: list[tuple[RecordType, bytes]]) -> int:
        """Start a new segment beginning with `preamble`; returns its seq.

        The old segment is synced before the new one exists, and the new one
        (header and preamble) plus its directory entry are durable before
        any record lands in it: so damage in a non-final segment, or a torn
        tail anywhere but the last one, can never be a crash's doing."""
        self._check_open()
        self.sync()
        self._file.close()
        seq = self._segments[-1].seq + 1
        name = segment_name(seq, first_index)
        chunks = [encode_header(self._crc, seq, first_index)]
        crc = self._crc
        for record_type, payload in preamble:
            frame, crc = encode_record(record_type, payload, crc)
            chunks.append(frame)
        data = b"".join(chunks)
        file = self._fs.open_append(posixpath.join(self._directory, name), create=True)
        file.write(data)
        file.fdatasync()
        self._fs.fsync_dir(self._directory)
        self._file, self._crc = file, crc
        self._segments.append(SegmentInfo(seq, first_index, name))
        self._size_bytes = self._segment_body_start = len(data)
        self._bytes_written += len(data)
        self._records_appended += len(preamble)
        self._syncs += 1
        self._segments_created += 1
        return seq

    def remove_segments_through(self, seq: int) -> list[str]:
        """Delete every segment with seq <= `seq` (never the current one),
        oldest first so a crash part-way leaves a contiguous suffix."""
        self._check_open()
        doomed = [s for s in self._segments[:-1] if s.seq <= seq]
        if not doomed:
            return []
        for s in doomed:
            self._fs.unlink(posixpath.join(self._directory, s.name))
        self._fs.fsync_dir(self._directory)
        self._segments = self._segments[len(doomed) :]
        self._segments_removed += len(doomed)
        return [s.name for s in doomed]

    def close(self) -> None:
        """Release the file. Unsynced records are written but not synced."""
        if not self._closed:
            self.flush()
            self._file.close()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the write-ahead log is closed")

    # -- introspection -------------------------------------------------------

    def segments(self) -> list[SegmentInfo]:
        return list(self._segments)

    def current_segment(self) -> SegmentInfo:
        return self._segments[-1]

    def statistics(self) -> WalStatistics:
        return WalStatistics(
            bytes_written=self._bytes_written,
            records_appended=self._records_appended,
            syncs=self._syncs,
            segments_created=self._segments_created,
            segments_removed=self._segments_removed,
            segment_count=len(self._segments),
            current_segment_bytes=self._size_bytes,
        )

    def assert_invariants(self) -> None:
        seqs = [s.seq for s in self._segments]
        assert seqs, "a WAL always has a current segment"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"segment gap: {seqs}"
        assert self._buffer_bytes == sum(len(b) for b in self._buffer), "buffer accounting"
        if not self._closed:
            assert self._size_bytes == self._file.size() + self._buffer_bytes, "size accounting"
        assert self._size_bytes % 8 == 0, "records stay 8-aligned"
        assert self._size_bytes >= self._segment_body_start >= HEADER_BYTES


def open_wal(
    fs: FileSystem,
    directory: str,
    *,
    first_index: int = 1,
    segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT,
    buffer_bytes_max: int = BUFFER_BYTES_MAX_DEFAULT,
    segment_start: Callable[[], tuple[int, list[tuple[RecordType, bytes]]]] | None = None,
) -> tuple[WriteAheadLog, list[WalRecord], RecoveryReport]:
    """Recover the log in `directory` (which must exist) and open it for appends.

    Returns the writer, every valid record in order, and what recovery did.
    Raises WalCorruptionError when the decision table says refuse."""
    if segment_bytes_max < HEADER_BYTES + 8:
        raise ValueError(f"segment_bytes_max too small: {segment_bytes_max}")
    found = []
    for name in fs.listdir(directory):
        parsed = parse_segment_name(name)
        if parsed is not None:
            found.append(SegmentInfo(parsed[0], parsed[1], name))
    found.sort(key=lambda s: s.seq)
    for before, after in zip(found, found[1:]):
        if after.seq != before.seq + 1:
            raise WalCorruptionError(
                after.name, 0, f"segment {before.seq + 1} is missing (found {before.name} then {after.name})"
            )

    def path(name: str) -> str:
        return posixpath.join(directory, name)

    records: list[WalRecord] = []
    torn: TornTail | None = None
    segments: list[SegmentInfo] = []
    crc = 0
    for i, seg in enumerate(found):
        is_last = i == len(found) - 1
        data = fs.read_file(path(seg.name))
        header = decode_header(data)
        if header is None:
            if not is_last:
                raise WalCorruptionError(seg.name, 0, "invalid segment header in a non-final segment")
            valid_at = find_valid_record_after(data, HEADER_BYTES)
            if valid_at is not None:
                raise WalCorruptionError(
                    seg.name, 0, f"invalid segment header but a valid record at offset {valid_at}"
                )
            # A crash while the segment was being started: nothing in it was
            # ever acknowledged (cut() syncs header and directory first).
            broken = _save_broken(fs, directory, seg.name, data)
            fs.unlink(path(seg.name))
            fs.fsync_dir(directory)
            torn = TornTail(seg.name, 0, len(data), "bad-header", broken)
            break
        if (header.seq, header.first_index) != (seg.seq, seg.first_index):
            raise WalCorruptionError(
                seg.name, 0, f"header says seq {header.seq} first index {header.first_index}"
            )
        if segments and header.prev_crc != crc:
            raise WalCorruptionError(
                seg.name, 0,
                f"chain broken: header expects crc {header.prev_crc:08x} but {segments[-1].name} "
                f"ends with {crc:08x} (records lost at its end)",
            )
        scan = _scan_records(data, header.prev_crc)
        if scan.bad_offset is not None:
            if not is_last:
                raise WalCorruptionError(
                    seg.name, scan.bad_offset, f"invalid record ({scan.bad_kind}) in a non-final segment"
                )
            valid_at = find_valid_record_after(data, scan.bad_offset)
            if valid_at is not None:
                raise WalCorruptionError(
                    seg.name, scan.bad_offset,
                    f"invalid record ({scan.bad_kind}) followed by a valid record at offset {valid_at}",
                )
            broken = _save_broken(fs, directory, seg.name, data)
            file = fs.open_append(path(seg.name), create=False)
            file.truncate(scan.valid_end)
            file.fdatasync()
            file.close()
            torn = TornTail(seg.name, scan.valid_end, len(data) - scan.valid_end, scan.bad_kind, broken)
        for rtype, payload, offset in scan.records:
            records.append(WalRecord(RecordType(rtype), payload, seg.seq, seg.name, offset))
        segments.append(seg)
        crc = scan.last_crc

    created = False
    if segments:
        file = fs.open_append(path(segments[-1].name), create=False)
    else:
        # Fresh log (or the only segment was torn while being started).
        created = not found
        seq = found[0].seq if found else 1
        name = segment_name(seq, first_index)
        file = fs.open_append(path(name), create=True)
        file.write(encode_header(0, seq, first_index))
        file.fdatasync()
        fs.fsync_dir(directory)
        segments.append(SegmentInfo(seq, first_index, name))
    wal = WriteAheadLog(
        fs, directory, segments, file, crc,
        segment_bytes_max=segment_bytes_max, buffer_bytes_max=buffer_bytes_max,
        segment_start=segment_start,
    )
    report = RecoveryReport(tuple(s.name for s in segments), len(records), torn, created)
    return wal, records, report


def _save_broken(fs: FileSystem, directory: str, name: str, data: bytes) -> str:
    """Keep the damaged bytes for a post-mortem before repairing."""
    broken = f"{name}.broken"
    n = 1
    while fs.exists(posixpath.join(directory, broken)):
        broken = f"{name}.broken.{n}"
        n += 1
    file = fs.open_append(posixpath.join(directory, broken), create=True)
    file.write(data)
    file.fdatasync()
    file.close()
    fs.fsync_dir(directory)
    return broken
