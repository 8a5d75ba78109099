"""The client <-> master request format for the Chubby cell (shared by both).

A request is a map `{"id": n, "op": NAME, ...fields}`; the reply is
`{"id": n, "ok": true, "value": ...}` or `{"id": n, "error": CODE, "message":
TEXT}`. Results travel as plain maps (dataclass fields by name; a handle is
its 6-element array), so the client needs none of the cell's classes.

Error codes are the cell's ErrorCode names in lower case (`not_found`,
`stale_handle`, `permission_denied`, ...), plus the transport-level ones the
connection layer handles itself (`not_leader`, `retry`, `timeout`, ...).

Master epochs: any request but `keep_alive` and `end_session` may carry
`epoch`, the master epoch its client last heard of. A master with a newer
epoch refuses it unexecuted with `stale_epoch` (the reply's `epoch` is the
master's); one with an older epoch answers `not_leader`.

Request numbers: every call in `NUMBERED_OPS` may carry `request_no` (per
session 1, 2, 3, ...; every attempt of one call sends the same number) and
`answered_below` (the client has had the answer of every number below it;
at most `request_no`). The cell applies each number at most once: an attempt
whose number was applied is answered with the first attempt's result, one
below `answered_below` is refused with `stale_request`. So a client may retry
any numbered call after an ambiguous outcome. `create_session` may carry
`nonce` (a random non-zero 64-bit int, the same for every attempt): a retry
whose first attempt created the session gets that session.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

# Handle calls: op name -> (fields beyond session_id/handle, read-only?)
HANDLE_OPS: dict[str, tuple[tuple[str, ...], bool]] = {
    "close": ((), False),
    "get_contents_and_stat": ((), True),
    "get_stat": ((), True),
    "read_dir": ((), True),
    "set_contents": (("contents", "expected_generation"), False),
    "set_acl": (("read", "write", "change_acl"), False),
    "delete": ((), False),
    "acquire": (("mode",), False),
    "try_acquire": (("mode",), False),
    "release": ((), False),
    "get_sequencer": ((), True),
    "set_sequencer": (("sequencer",), False),
}

# Calls whose requests carry request numbers: every mutating call of a
# session but end_session (its retry finds the session gone, which is fine).
NUMBERED_OPS = frozenset({"open", "rename"} | {op for op, (_, read_only) in HANDLE_OPS.items()
                                                if not read_only})
REQUEST_NUMBER_FIELDS = ("request_no", "answered_below")
STALE_REQUEST = "stale_request"

# KeepAlive replies carry `items`: [seq, kind, handle_id, path, name], one
# per-session sequence for invalidations and events alike. `kind` is one of
# these or an event kind bit (the cell's EventKind values, 1..64).
ITEM_INVALIDATE = 0  # drop cached state of `path`
ITEM_MASTER_FAILOVER = 128  # a new master: flush the whole cache, events may be lost
ITEM_EVENTS_LOST = 256  # the session fell too far behind: flush everything


class EventKind(enum.IntFlag):
    """Event types: a handle subscribes with a mask of the first seven at
    Open; MASTER_FAILOVER is always delivered, never subscribed to."""

    CONTENTS_MODIFIED = 1
    CHILD_ADDED = 2
    CHILD_REMOVED = 4
    CHILD_MODIFIED = 8
    HANDLE_INVALID = 16
    LOCK_ACQUIRED = 32
    CONFLICTING_LOCK = 64
    MASTER_FAILOVER = ITEM_MASTER_FAILOVER
# Optional request fields: `keep_alive` takes `ack` (last seq processed; a
# KeepAlive without it acks on delivery, for clients that neither cache nor
# watch), `ack_epoch` and `handles` (ids of the handles the client holds,
# sent after a fail-over: they are re-created at the new master, the others
# do not keep ephemeral nodes alive); read-only handle calls take
# `cache: true`, and their reply then has `cacheable`, `seq`, `epoch` and
# `cache_path` beside `value`.
STALE_EPOCH = "stale_epoch"

OPEN_FIELDS = ("path", "intent", "create", "exclusive", "ephemeral", "contents", "acl", "events",
               "lock_delay_ms")


def value_to_wire(value: Any) -> Any:
    """A cell result value as plain msgpack-able data."""
    if value is None or isinstance(value, (bool, int, str, bytes, float)):
        return int(value) if isinstance(value, enum.Enum) else value
    if hasattr(value, "to_wire") and type(value).__name__ == "HandleRef":
        return value.to_wire()
    if dataclasses.is_dataclass(value):
        return {f.name: value_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [value_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: value_to_wire(v) for k, v in value.items()}
    raise TypeError(f"cannot send {type(value).__name__} to a client")


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """A node's metadata as the client sees it."""

    path: str
    instance: int
    is_directory: bool
    ephemeral: bool
    content_generation: int
    lock_generation: int
    acl_generation: int
    checksum: int
    size: int
    acl_read: str
    acl_write: str
    acl_change: str
    child_count: int

    @classmethod
    def from_wire(cls, m: dict) -> Stat:
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})
