"""Durable Raft storage: a segmented write-ahead log, snapshot files and
`DiskStorage`, all on a small `FileSystem` protocol (real or simulated).
docs/storage.md describes the on-disk format and the recovery rules."""

from .fs import AppendFile, FileSystem, RealFS
from .raft_storage import DiskStorage, StorageRecovery, StorageStatistics
from .snapshot import SnapshotFormatError
from .wal import RecoveryReport, TornTail, WalCorruptionError

__all__ = [
    "AppendFile",
    "DiskStorage",
    "FileSystem",
    "RealFS",
    "RecoveryReport",
    "SnapshotFormatError",
    "StorageRecovery",
    "StorageStatistics",
    "TornTail",
    "WalCorruptionError",
]
