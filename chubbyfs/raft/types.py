"""The data Raft passes around: log entries, hard state, snapshots, messages.

Shared by the pure core (`core.py`, `rawnode.py`), durable storage
(`chubbyfs.storage`), the trio shell (`node.py`) and the simulator. Every type
is a frozen dataclass so that a message handed to the network or an entry
handed to the disk can never be changed behind the core's back; the ones
built per entry or per message use `@frozen`, whose constructor costs about
half of the dataclass's (timeit: an Entry 2.1 -> 1.3 us, a Message 5.4 -> 2.8 us).

Node ids are positive ints; 0 means "none" (no vote, no known leader).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from chubbyfs._frozen import frozen

NONE = 0


class EntryType(enum.IntEnum):
    NORMAL = 0  # data is an opaque state-machine command (b"" for a leader's no-op)
    CONF_CHANGE = 1  # data is an encoded ConfChange


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class MessageType(enum.IntEnum):
    # Local-only inputs (never cross the network); carried through step()
    # so that every input to the core goes through one function.
    HUP = 0  # start an election (campaign)
    BEAT = 1  # leader: send heartbeats now
    # Network messages.
    APPEND = 10  # AppendEntries (also carries heartbeats when entries == ())
    APPEND_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    PRE_VOTE = 14
    PRE_VOTE_RESP = 15
    HEARTBEAT = 16
    HEARTBEAT_RESP = 17
    SNAPSHOT = 18  # one InstallSnapshot chunk
    SNAPSHOT_RESP = 19
    TIMEOUT_NOW = 20  # leadership transfer: campaign at once, skipping pre-vote
    TRANSFER_LEADER = 21  # follower asks the leader to transfer to it (or local)


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0
    REMOVE_VOTER = 1


@frozen
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def size(self) -> int:
        """Approximate encoded size, for batching limits."""
        return len(self.data) + 24


@frozen
class HardState:
    """What must be durable before the node answers any vote or append."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    voters: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.voters))) != self.voters:
            raise ValueError(f"voters must be sorted and unique: {self.voters}")


@dataclass(frozen=True, slots=True)
class ConfChange:
    """Single-server membership change; takes effect when appended.

    `context` is opaque to Raft; the shell uses it to carry the new
    member's address so every replica learns it from the log.
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.meta.index == 0


@frozen
class Message:
    """One Raft message. Fields unused by a type keep their defaults.

    - APPEND: index/log_term = the entry preceding `entries`; commit.
    - APPEND_RESP: index = last index matched (or rejected index when
      reject); reject_hint/log_term drive fast conflict back-off.
    - VOTE/PRE_VOTE: index/log_term = candidate's last entry. PRE_VOTE uses
      term = the term the candidate would campaign in.
    - HEARTBEAT: commit (min of follower's match and leader's commit);
      context carries ReadIndex request ids.
    - SNAPSHOT: snapshot_meta; snapshot_offset, snapshot_data is one chunk;
      snapshot_done marks the last one.
    - SNAPSHOT_RESP: index = bytes received so far (offset to send next),
      reject on a mismatch; snapshot_done with index = snapshot index when
      installed.
    - lease_tick: the leader's tick when it sent an APPEND or HEARTBEAT;
      followers echo it in the response, so the leader can compute its lease
      from send times (never receive times).
    - streamed (APPEND): sent by a leader streaming to a follower it knows
      to match (REPLICATE), not a probe. A follower may hold a streamed
      APPEND that arrived before the entries it follows; a probe always gets
      an answer at once.
    """

    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""
    lease_tick: int = 0
    snapshot_meta: SnapshotMeta | None = None
    snapshot_offset: int = 0
    snapshot_data: bytes = b""
    snapshot_done: bool = False
    streamed: bool = False


@frozen
class SoftState:
    """Volatile state the shell may want to report (status, redirects)."""

    leader: int = NONE
    role: Role = Role.FOLLOWER


@frozen
class ReadState:
    """A read request (`request_ctx`) may be served once applied >= index."""

    index: int
    request_ctx: bytes


@dataclass(slots=True)
class Ready:
    """The core's to-do list. The shell must, in this order:

    1. persist `snapshot` (if any), then `entries`, then `hard_state`,
       and fsync if `must_sync`;
    2. only then send `messages`;
    3. apply `snapshot` (if any) to the state machine, then `committed_entries`;
       answer `read_states` once applied >= their index;
    4. call `advance(ready)`.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    must_sync: bool = False

    def is_empty(self) -> bool:
        return (
            self.soft_state is None
            and self.hard_state is None
            and not self.entries
            and self.snapshot is None
            and not self.committed_entries
            and not self.messages
            and not self.read_states
        )
