"""Single-server membership changes: pure application and byte encoding.

A change takes effect on a node as soon as the entry is in its log (Raft
thesis §4.1), so every node derives its configuration from its own log. One
change at a time keeps any two successive majorities overlapping.
"""

from __future__ import annotations

import msgpack

from .types import ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState

# Term of the bootstrap entries. Elections start at BOOTSTRAP_TERM + 1, so no
# leader ever exists in this term.
BOOTSTRAP_TERM = 1


class InvalidConfChangeError(ValueError):
    """The change does not make sense for the configuration it applies to."""


def apply_change(conf: ConfState, cc: ConfChange) -> ConfState:
    if cc.node_id <= 0:
        raise InvalidConfChangeError(f"node id must be positive, got {cc.node_id}")
    voters = set(conf.voters)
    if cc.type == ConfChangeType.ADD_VOTER:
        if cc.node_id in voters:
            raise InvalidConfChangeError(f"node {cc.node_id} is already a voter")
        voters.add(cc.node_id)
    elif cc.type == ConfChangeType.REMOVE_VOTER:
        if cc.node_id not in voters:
            raise InvalidConfChangeError(f"node {cc.node_id} is not a voter")
        if len(voters) == 1:
            raise InvalidConfChangeError("cannot remove the last voter")
        voters.discard(cc.node_id)
    else:  # pragma: no cover - enum is closed
        raise InvalidConfChangeError(f"unknown change type {cc.type!r}")
    return ConfState(voters=tuple(sorted(voters)))


def revert_change(conf: ConfState, cc: ConfChange) -> ConfState:
    """The configuration `cc` was applied to, given the one it produced."""
    voters = set(conf.voters)
    if cc.type == ConfChangeType.ADD_VOTER:
        if cc.node_id not in voters:
            raise InvalidConfChangeError(f"cannot revert adding {cc.node_id}: not a voter")
        voters.discard(cc.node_id)
    else:
        if cc.node_id in voters:
            raise InvalidConfChangeError(f"cannot revert removing {cc.node_id}: still a voter")
        voters.add(cc.node_id)
    return ConfState(voters=tuple(sorted(voters)))


def encode_conf_change(cc: ConfChange) -> bytes:
    return msgpack.packb([int(cc.type), cc.node_id, cc.context], use_bin_type=True)


def decode_conf_change(data: bytes) -> ConfChange:
    try:
        fields = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidConfChangeError(f"undecodable conf change: {exc}") from exc
    if (
        not isinstance(fields, list)
        or len(fields) != 3
        or not isinstance(fields[0], int)
        or not isinstance(fields[1], int)
        or not isinstance(fields[2], bytes)
    ):
        raise InvalidConfChangeError(f"malformed conf change: {fields!r}")
    try:
        kind = ConfChangeType(fields[0])
    except ValueError as exc:
        raise InvalidConfChangeError(f"unknown conf change type {fields[0]}") from exc
    return ConfChange(type=kind, node_id=fields[1], context=fields[2])


def bootstrap_log(voters: tuple[int, ...]) -> tuple[list[Entry], HardState]:
    """The identical first log every founding member starts with.

    One ADD_VOTER entry per founding voter, already committed (as etcd's
    Bootstrap does). Putting the initial membership in the log, not beside
    it, means a node added later learns it by ordinary replication.
    """
    if not voters or tuple(sorted(set(voters))) != tuple(voters):
        raise InvalidConfChangeError(f"bootstrap voters must be sorted, unique, non-empty: {voters}")
    entries = [
        Entry(
            term=BOOTSTRAP_TERM,
            index=i,
            type=EntryType.CONF_CHANGE,
            data=encode_conf_change(ConfChange(ConfChangeType.ADD_VOTER, node_id)),
        )
        for i, node_id in enumerate(voters, start=1)
    ]
    return entries, HardState(term=BOOTSTRAP_TERM, vote=0, commit=len(entries))
