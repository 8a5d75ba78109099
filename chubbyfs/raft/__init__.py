"""A pure, deterministic Raft core shaped after etcd-io/raft (see docs/raft.md)."""

from .confchange import (
    BOOTSTRAP_TERM,
    InvalidConfChangeError,
    bootstrap_log,
    apply_change,
    decode_conf_change,
    encode_conf_change,
)
from .core import TRANSFER_CONTEXT, Config, NotLeaderError, ProposalDroppedError
from .log import InvariantViolation
from .memory_storage import MemoryStorage
from .progress import ProgressState
from .rawnode import PeerProgress, RawNode, Status
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

__all__ = [
    "BOOTSTRAP_TERM",
    "bootstrap_log",
    "Config",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "HardState",
    "InvalidConfChangeError",
    "InvariantViolation",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NotLeaderError",
    "PeerProgress",
    "ProgressState",
    "ProposalDroppedError",
    "RawNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SoftState",
    "Status",
    "TRANSFER_CONTEXT",
    "apply_change",
    "decode_conf_change",
    "encode_conf_change",
]
