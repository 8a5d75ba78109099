"""A small replicated key/value register: the state machine the Raft layer is
tested and benchmarked with until (and beside) the Chubby cell.

Deterministic and pure: the same commands in the same order give the same
state on every replica. Values are bytes; every key also carries the log index
of its last write, which is the register's version for compare-and-set.
"""

from __future__ import annotations

from typing import Any

import msgpack

_PUT = 1
_CAS = 2


def encode_put(key: str, value: bytes) -> bytes:
    return msgpack.packb([_PUT, key, value], use_bin_type=True)


def encode_cas(key: str, expected: bytes | None, new: bytes) -> bytes:
    """Set key to `new` only if its value is `expected` (None: key absent)."""
    return msgpack.packb([_CAS, key, expected, new], use_bin_type=True)


class KVStateMachine:
    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}  # key -> (value, version)
        self.applied_index = 0

    def apply(self, index: int, command: bytes) -> Any:
        self.applied_index = index
        if not command:  # a leader's no-op entry
            return None
        try:
            op = msgpack.unpackb(command, raw=False)
            kind = op[0]
            if kind == _PUT:
                _, key, value = op
                self.data[key] = (value, index)
                return {"ok": True, "version": index}
            if kind == _CAS:
                _, key, expected, new = op
                current = self.data.get(key)
                current_value = current[0] if current else None
                if current_value != expected:
                    return {"ok": False, "value": current_value}
                self.data[key] = (new, index)
                return {"ok": True, "version": index}
        except (ValueError, TypeError, IndexError, msgpack.UnpackException):
            pass
        # A malformed command is committed like any other entry, so it must be
        # rejected identically everywhere rather than crash the replica.
        return {"ok": False, "error": "malformed command"}

    def query(self, query: Any) -> Any:
        kind, key = query
        if kind != "get":
            raise ValueError(f"unknown query {kind!r}")
        current = self.data.get(key)
        if current is None:
            return {"value": None, "version": 0}
        return {"value": current[0], "version": current[1]}

    def snapshot(self) -> bytes:
        items = sorted((k, v, ver) for k, (v, ver) in self.data.items())
        return msgpack.packb([self.applied_index, items], use_bin_type=True)

    def restore(self, data: bytes) -> None:
        applied, items = msgpack.unpackb(data, raw=False)
        self.applied_index = applied
        self.data = {k: (v, ver) for k, v, ver in items}
