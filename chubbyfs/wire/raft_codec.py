"""Raft messages to and from msgpack-ready lists (pure).

Positional lists rather than maps: replication messages are the hot path,
and a list is both smaller on the wire and faster to build and parse.
"""

from __future__ import annotations

from typing import Any

from chubbyfs.raft.types import ConfState, Entry, EntryType, Message, MessageType, SnapshotMeta

from .framing import FrameError

# Enum lookups by value, as dicts: calling the enum class costs more than the
# rest of decoding a small message. A value not in the table is malformed.
_MESSAGE_TYPES = {int(t): t for t in MessageType}
_ENTRY_TYPES = {int(t): t for t in EntryType}


def _entry_out(e: Entry) -> list:
    return [e.term, e.index, int(e.type), e.data]


def _meta_out(m: SnapshotMeta | None) -> list | None:
    if m is None:
        return None
    return [m.index, m.term, list(m.conf.voters)]


def message_to_wire(m: Message) -> list:
    return [
        int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
        [_entry_out(e) for e in m.entries],
        m.commit, m.reject, m.reject_hint, m.context, m.lease_tick,
        _meta_out(m.snapshot_meta), m.snapshot_offset, m.snapshot_data, m.snapshot_done, m.streamed,
    ]


def message_from_wire(obj: Any) -> Message:
    try:
        (mtype, to, frm, term, log_term, index, entries, commit, reject, reject_hint,
         context, lease_tick, meta, snap_off, snap_data, snap_done, streamed) = obj
        meta_obj = None
        if meta is not None:
            meta_obj = SnapshotMeta(index=meta[0], term=meta[1], conf=ConfState(tuple(meta[2])))
        return Message(
            type=_MESSAGE_TYPES[mtype], to=to, frm=frm, term=term, log_term=log_term, index=index,
            entries=tuple([Entry(term=t, index=i, type=_ENTRY_TYPES[ty], data=d) for t, i, ty, d in entries]),
            commit=commit, reject=bool(reject), reject_hint=reject_hint, context=context,
            lease_tick=lease_tick, snapshot_meta=meta_obj, snapshot_offset=snap_off,
            snapshot_data=snap_data, snapshot_done=bool(snap_done), streamed=bool(streamed),
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise FrameError(f"malformed raft message: {exc!r}") from None
