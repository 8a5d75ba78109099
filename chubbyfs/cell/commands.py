"""The cell state machine's interface: replicated commands in, results out.

Every command is a frozen dataclass carrying `now_ms`, stamped by the master,
so that expiry and lock-delay decide identically on every replica. Commands
that act for a client also carry the `session_id` and the `principal` the
master took from the client's authenticated connection. A session's mutating
commands may carry the client's request numbers (`request_no`,
`answered_below`), which the state machine uses to apply each at most once
(see session_requests.py).

Encoding: ``msgpack([COMMAND_VERSION, tag, [field values in declaration
order]])``. `decode_command` checks the version, the tag, the arity and every
field's type and range, and raises `MalformedCommand` for anything else, so a
garbage log entry is rejected the same way on every replica.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from chubbyfs.cell.handles import HandleRef
from chubbyfs.locks import LockMode
from chubbyfs.wire.cell_protocol import EventKind  # one definition for cell and client

COMMAND_VERSION = 1
_U64_LIMIT = 1 << 64


class ErrorCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    EXISTS = 2
    NOT_EMPTY = 3
    PERMISSION_DENIED = 4
    STALE_HANDLE = 5  # the handle's node instance was deleted
    BAD_HANDLE = 6  # forged, closed, or of another session
    INVALID_NAME = 7
    TOO_LARGE = 8
    CAS_MISMATCH = 9
    LOCK_HELD = 10
    LOCK_NOT_HELD = 11
    SESSION_EXPIRED = 12  # unknown, ended or lease-expired session
    LIMIT_EXCEEDED = 13
    NOT_A_DIRECTORY = 14
    IS_A_DIRECTORY = 15
    INVALID_ARGUMENT = 16
    BAD_SEQUENCER = 17
    MALFORMED_COMMAND = 18
    NOT_INITIALIZED = 19
    CANCELLED = 20  # a queued Acquire ended by Close or Release of its handle
    STALE_REQUEST = 21  # a numbered request below what its client has had answered


class CreateMode(enum.IntEnum):
    NONE = 0  # open an existing node only
    FILE = 1
    DIRECTORY = 2


ALL_EVENTS = (EventKind.CONTENTS_MODIFIED | EventKind.CHILD_ADDED | EventKind.CHILD_REMOVED
              | EventKind.CHILD_MODIFIED | EventKind.HANDLE_INVALID
              | EventKind.LOCK_ACQUIRED | EventKind.CONFLICTING_LOCK)


@dataclass(frozen=True, slots=True)
class CellLimits:
    """Every bound that keeps one client from hurting the cell.

    A breach is refused with TOO_LARGE (sizes) or LIMIT_EXCEEDED (counts) and
    changes nothing already stored. Set per cell by the bootstrap command, so
    every replica enforces the same limits.
    """

    max_node_bytes: int = 256 * 1024
    # Room for the largest node plus the rest of a command.
    max_request_bytes: int = 256 * 1024 + 16 * 1024
    max_handles_per_session: int = 1_000
    max_waiters_per_lock: int = 1_000
    max_children_per_directory: int = 10_000
    max_sessions: int = 50_000
    max_name_bytes: int = 255
    max_path_depth: int = 64
    # Results of numbered requests kept per session until their client says
    # it has had them; beyond this the oldest are forgotten (see
    # session_requests.py).
    max_unanswered_requests: int = 1_000

    def with_overrides(self, overrides: dict[str, int]) -> CellLimits:
        known = {f.name for f in fields(self)}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in sorted(overrides):
            if name not in known:
                raise ValueError(f"unknown limit {name!r}")
            value = overrides[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} must be a positive int")
            values[name] = value
        return CellLimits(**values)

    def to_wire(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class NodeStat:
    path: str
    instance: int
    is_directory: bool
    ephemeral: bool
    content_generation: int
    lock_generation: int
    acl_generation: int
    checksum: int  # 64-bit digest of the contents
    size: int
    acl_read: str
    acl_write: str
    acl_change: str
    child_count: int


@dataclass(frozen=True, slots=True)
class OpenResult:
    handle: HandleRef
    created: bool
    stat: NodeStat


@dataclass(frozen=True, slots=True)
class ContentsResult:
    contents: bytes
    stat: NodeStat


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    stat: NodeStat


@dataclass(frozen=True, slots=True)
class ReadDirResult:
    entries: tuple[DirEntry, ...]  # sorted by name


@dataclass(frozen=True, slots=True)
class LockResult:
    """granted=False means the Acquire is queued; a LockWakeup will follow."""

    granted: bool
    lock_generation: int = 0
    sequencer: str = ""


@dataclass(frozen=True, slots=True)
class SequencerResult:
    sequencer: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    valid: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SessionResult:
    session_id: int
    lease_end_ms: int


@dataclass(frozen=True, slots=True)
class Result:
    code: ErrorCode
    message: str = ""
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.code == ErrorCode.OK


@dataclass(frozen=True, slots=True)
class Event:
    """One event for one subscribed handle; delivered after the apply."""

    kind: EventKind
    session_id: int
    handle_id: int
    path: str  # the node the handle is open on
    name: str = ""  # for CHILD_*: the child's name


@dataclass(frozen=True, slots=True)
class LockWakeup:
    """The outcome of an earlier queued Acquire, so the master can answer it:
    OK (granted), CANCELLED, STALE_HANDLE or SESSION_EXPIRED."""

    session_id: int
    handle_id: int
    code: ErrorCode
    lock_generation: int = 0
    sequencer: str = ""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    result: Result
    events: tuple[Event, ...] = ()
    invalidated_paths: tuple[str, ...] = ()  # sorted; cached state changed
    wakeups: tuple[LockWakeup, ...] = ()
    ended_sessions: tuple[int, ...] = ()  # sorted; ended in this apply


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class InitCell:
    """Bootstrap: create the root, the ACL directory and the `admin` ACL."""

    TAG: ClassVar[int] = 1
    now_ms: int
    cell: str
    admins: tuple[str, ...]
    secret: bytes  # HMAC key for handle check digits; at least 16 bytes
    limits: dict[str, int]  # overrides of CellLimits defaults


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateSession:
    TAG: ClassVar[int] = 2
    now_ms: int
    session_id: int  # chosen by the master; must exceed every earlier one
    lease_end_ms: int
    # Chosen by the client, the same for every attempt: a retry whose first
    # attempt created the session is answered with that session (0: none).
    nonce: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtendLeases:
    """Replicated lease watermarks; leases only ever move later.

    `renew` re-creates handles in the current master epoch (handle_id ->
    owning session_id): a handle made in an earlier epoch that is not
    re-created before the epoch's ephemeral sweep does not keep an ephemeral
    node alive (see Tick)."""

    TAG: ClassVar[int] = 3
    now_ms: int
    leases: dict[int, int]  # session_id -> lease_end_ms
    renew: dict[int, int] = field(default_factory=dict)  # handle_id -> session_id


@dataclass(frozen=True, slots=True, kw_only=True)
class EndSession:
    TAG: ClassVar[int] = 4
    now_ms: int
    session_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Advance stamped time: expire sessions whose lease ended, end lock-delays
    and grant waiters. (Every command does this for its own now_ms first.)

    A new master's first Tick names its `epoch` (the Raft term): every handle
    open on an ephemeral node then awaits re-creation (ExtendLeases.renew),
    and once `ephemeral_grace_ms` of stamped time has passed, ephemeral nodes
    none of whose handles was re-created are deleted with those handles
    (Chubby's post-fail-over rule). 0 starts no epoch / sweeps nothing."""

    TAG: ClassVar[int] = 5
    now_ms: int
    epoch: int = 0
    ephemeral_grace_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Open:
    TAG: ClassVar[int] = 6
    now_ms: int
    session_id: int
    principal: str
    epoch: int  # the master epoch the handle is made in
    path: str
    intent: int  # Intent flags
    create: CreateMode = CreateMode.NONE
    exclusive: bool = False  # with create: fail with EXISTS if the node exists
    ephemeral: bool = False
    contents: bytes = b""  # initial contents of a created file
    acl: tuple[str, ...] = ()  # () inherits the parent's; else (read, write, change)
    events: int = 0  # EventKind subscription mask
    lock_delay_ms: int | None = None  # None: DEFAULT_LOCK_DELAY_MS
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    TAG: ClassVar[int] = 7
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GetContentsAndStat:
    TAG: ClassVar[int] = 8
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef


@dataclass(frozen=True, slots=True, kw_only=True)
class GetStat:
    TAG: ClassVar[int] = 9
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadDir:
    TAG: ClassVar[int] = 10
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef


@dataclass(frozen=True, slots=True, kw_only=True)
class SetContents:
    TAG: ClassVar[int] = 11
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    contents: bytes
    expected_generation: int | None = None  # compare-and-swap when given
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SetACL:
    TAG: ClassVar[int] = 12
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    read: str
    write: str
    change_acl: str
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    TAG: ClassVar[int] = 13
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquire:
    """Blocking acquire: granted now, or queued FIFO (answered by a LockWakeup)."""

    TAG: ClassVar[int] = 14
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    mode: LockMode
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TryAcquire:
    TAG: ClassVar[int] = 15
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    mode: LockMode
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Release the lock held by the handle, or cancel its queued Acquire."""

    TAG: ClassVar[int] = 16
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSequencer:
    TAG: ClassVar[int] = 17
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef


@dataclass(frozen=True, slots=True, kw_only=True)
class SetSequencer:
    TAG: ClassVar[int] = 18
    now_ms: int
    session_id: int
    principal: str
    handle: HandleRef
    sequencer: str
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckSequencer:
    """Anyone may check a sequencer; no session needed."""

    TAG: ClassVar[int] = 19
    now_ms: int
    sequencer: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Rename:
    """Rename within one directory; atomically replaces an existing target."""

    TAG: ClassVar[int] = 20
    now_ms: int
    session_id: int
    principal: str
    src_path: str
    dst_path: str
    request_no: int = 0  # see session_requests.py; 0: not numbered
    answered_below: int = 0


COMMAND_TYPES: tuple[type, ...] = (
    InitCell, CreateSession, ExtendLeases, EndSession, Tick, Open, Close,
    GetContentsAndStat, GetStat, ReadDir, SetContents, SetACL, Delete, Acquire,
    TryAcquire, Release, GetSequencer, SetSequencer, CheckSequencer, Rename,
)
_BY_TAG: dict[int, type] = {cls.TAG: cls for cls in COMMAND_TYPES}
if len(_BY_TAG) != len(COMMAND_TYPES):
    raise RuntimeError("duplicate command tags")

# Commands that may carry request numbers (every mutating call of a session
# but EndSession, which ends the numbering with the session).
NUMBERED_TYPES: tuple[type, ...] = (Open, Close, SetContents, SetACL, Delete, Acquire, TryAcquire,
                                    Release, SetSequencer, Rename)

# Commands that only read state: the master may serve them with `query`.
READ_ONLY_TYPES: tuple[type, ...] = (GetContentsAndStat, GetStat, ReadDir, GetSequencer,
                                     CheckSequencer)


class MalformedCommand(ValueError):
    """Bytes that do not decode to a well-formed command."""


# ---------------------------------------------------------------- codec

def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64_LIMIT


def _dec_int(value: Any) -> int:
    if not _is_u64(value):
        raise MalformedCommand(f"expected an unsigned 64-bit int, got {value!r:.80}")
    return value


def _dec_str(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedCommand(f"expected a string, got {type(value).__name__}")
    return value


def _dec_bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedCommand(f"expected bytes, got {type(value).__name__}")
    return value


def _dec_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise MalformedCommand(f"expected a bool, got {type(value).__name__}")
    return value


def _dec_optional_int(value: Any) -> int | None:
    return None if value is None else _dec_int(value)


def _dec_handle(value: Any) -> HandleRef:
    try:
        ref = HandleRef.from_wire(value)
    except ValueError as exc:
        raise MalformedCommand(str(exc)) from None
    if not all(_is_u64(n) for n in ref.to_wire()[:5]):
        raise MalformedCommand("handle fields out of range")
    return ref


def _dec_str_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise MalformedCommand("expected an array of strings")
    return tuple(_dec_str(v) for v in value)


def _dec_int_map(value: Any) -> dict[int, int]:
    if not isinstance(value, dict):
        raise MalformedCommand("expected a map of int to int")
    return {_dec_int(k): _dec_int(v) for k, v in value.items()}


def _dec_str_int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise MalformedCommand("expected a map of string to int")
    return {_dec_str(k): _dec_int(v) for k, v in value.items()}


def _dec_enum(enum_type: type[enum.IntEnum]):
    def decode(value: Any) -> enum.IntEnum:
        if not _is_u64(value):
            raise MalformedCommand(f"expected a {enum_type.__name__} number")
        try:
            return enum_type(value)
        except ValueError:
            raise MalformedCommand(f"{value} is not a {enum_type.__name__}") from None
    return decode


def _enc_plain(value: Any) -> Any:
    return value


def _enc_int_enum(value: Any) -> int:
    return int(value)


def _enc_handle(value: HandleRef) -> list:
    return value.to_wire()


def _enc_tuple(value: tuple) -> list:
    return list(value)


# Field annotation (a string, because of `from __future__ import annotations`)
# -> (encoder, decoder).
_CODECS: dict[str, tuple[Any, Any]] = {
    "int": (_enc_plain, _dec_int),
    "str": (_enc_plain, _dec_str),
    "bytes": (_enc_plain, _dec_bytes),
    "bool": (_enc_plain, _dec_bool),
    "int | None": (_enc_plain, _dec_optional_int),
    "HandleRef": (_enc_handle, _dec_handle),
    "tuple[str, ...]": (_enc_tuple, _dec_str_tuple),
    "dict[int, int]": (_enc_plain, _dec_int_map),
    "dict[str, int]": (_enc_plain, _dec_str_int_map),
    "LockMode": (_enc_int_enum, _dec_enum(LockMode)),
    "CreateMode": (_enc_int_enum, _dec_enum(CreateMode)),
}
_SCHEMAS: dict[type, tuple[tuple[str, Any, Any], ...]] = {
    cls: tuple((f.name, *_CODECS[f.type]) for f in fields(cls)) for cls in COMMAND_TYPES
}
# Fields added later have defaults and come last: an entry written before
# they existed (exactly that much shorter) still decodes, as it did then.
_ADDED_FIELDS: dict[type, int] = {Tick: 2, ExtendLeases: 1, CreateSession: 1,
                                   **{cls: 2 for cls in NUMBERED_TYPES}}
_ARITIES: dict[type, tuple[int, ...]] = {
    cls: (len(_SCHEMAS[cls]), len(_SCHEMAS[cls]) - _ADDED_FIELDS.get(cls, 0)) for cls in COMMAND_TYPES
}


def encode_command(command: Any) -> bytes:
    schema = _SCHEMAS.get(type(command))
    if schema is None:
        raise TypeError(f"not a cell command: {type(command).__name__}")
    values = [encoder(getattr(command, name)) for name, encoder, _ in schema]
    return msgpack.packb([COMMAND_VERSION, type(command).TAG, values], use_bin_type=True)


def decode_command(data: bytes) -> Any:
    """Decode one command; raises MalformedCommand for anything not well formed."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False,
                                   use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedCommand(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(envelope, list) or len(envelope) != 3:
        raise MalformedCommand("command must be [version, tag, fields]")
    version, tag, values = envelope
    if version != COMMAND_VERSION or isinstance(version, bool):
        raise MalformedCommand(f"unsupported command version {version!r:.40}")
    cls = _BY_TAG.get(tag) if _is_u64(tag) else None
    if cls is None:
        raise MalformedCommand(f"unknown command tag {tag!r:.40}")
    schema = _SCHEMAS[cls]
    if not isinstance(values, list) or len(values) not in _ARITIES[cls]:
        raise MalformedCommand(f"{cls.__name__} needs {len(schema)} fields")
    kwargs = {name: decoder(value) for (name, _, decoder), value in zip(schema, values)}
    return cls(**kwargs)
