"""Handles: what `Open` returns, and the cell's record of each open handle.

A `HandleRef` is what the client holds. It names the handle, its session, the
node instance, the master epoch it was made in and its intent, plus check
digits: an HMAC over those fields keyed by the cell secret (replicated state,
set by the bootstrap command). A forged ref fails the HMAC; a closed handle's
ref fails because handle ids are never reused; a ref for a node that was
deleted (even if re-created under the same name) fails because the record is
marked stale and instance numbers are never reused.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from chubbyfs.locks import LockMode

_CHECK_BYTES = 8


class Intent(enum.IntFlag):
    READ = 1
    WRITE = 2
    LOCK = 4
    CHANGE_ACL = 8


ALL_INTENTS = Intent.READ | Intent.WRITE | Intent.LOCK | Intent.CHANGE_ACL


@dataclass(frozen=True, slots=True)
class HandleRef:
    handle_id: int
    session_id: int
    instance: int
    epoch: int
    intent: int
    check: bytes

    def to_wire(self) -> list:
        return [self.handle_id, self.session_id, self.instance, self.epoch, self.intent, self.check]

    @classmethod
    def from_wire(cls, value: object) -> HandleRef:
        if not isinstance(value, (list, tuple)) or len(value) != 6:
            raise ValueError("handle must be a 6-element array")
        *numbers, check = value
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError("handle fields must be non-negative ints")
        if not isinstance(check, bytes) or len(check) != _CHECK_BYTES:
            raise ValueError(f"handle check digits must be {_CHECK_BYTES} bytes")
        return cls(*numbers, check)


def compute_check(secret: bytes, handle_id: int, session_id: int, instance: int,
                  epoch: int, intent: int) -> bytes:
    # Fixed-width packing so that distinct field tuples never share a message.
    # Ids are bounded to 64 bits by the command decoder.
    message = struct.pack(">QQQQQ", handle_id, session_id, instance, epoch, intent)
    return hmac.new(secret, message, hashlib.sha256).digest()[:_CHECK_BYTES]


def make_ref(secret: bytes, handle_id: int, session_id: int, instance: int,
             epoch: int, intent: int) -> HandleRef:
    check = compute_check(secret, handle_id, session_id, instance, epoch, intent)
    return HandleRef(handle_id, session_id, instance, epoch, intent, check)


def ref_is_authentic(secret: bytes, ref: HandleRef) -> bool:
    expected = compute_check(secret, ref.handle_id, ref.session_id, ref.instance,
                             ref.epoch, ref.intent)
    return hmac.compare_digest(expected, ref.check)


class HandleRecord:
    """The cell's replicated record of one open handle."""

    __slots__ = ("handle_id", "session_id", "instance", "epoch", "intent", "events",
                 "lock_delay_ms", "stale", "held_mode", "waiting_mode", "sequencer")

    def __init__(self, handle_id: int, session_id: int, instance: int, epoch: int,
                 intent: int, events: int, lock_delay_ms: int) -> None:
        self.handle_id = handle_id
        self.session_id = session_id
        self.instance = instance
        self.epoch = epoch
        self.intent = intent
        self.events = events  # EventKind subscription mask
        self.lock_delay_ms = lock_delay_ms
        # True once the node instance is gone; every call but Close then fails.
        self.stale = False
        self.held_mode: LockMode | None = None
        self.waiting_mode: LockMode | None = None
        # Set by SetSequencer: later calls fail once it is no longer valid.
        self.sequencer: str | None = None

    def matches(self, ref: HandleRef) -> bool:
        return (self.handle_id == ref.handle_id and self.session_id == ref.session_id
                and self.instance == ref.instance and self.epoch == ref.epoch
                and self.intent == ref.intent)

    def to_wire(self) -> list:
        return [self.handle_id, self.session_id, self.instance, self.epoch, self.intent,
                self.events, self.lock_delay_ms, self.stale,
                None if self.held_mode is None else int(self.held_mode),
                None if self.waiting_mode is None else int(self.waiting_mode),
                self.sequencer]

    @classmethod
    def from_wire(cls, value: list) -> HandleRecord:
        (handle_id, session_id, instance, epoch, intent, events, lock_delay_ms, stale,
         held, waiting, sequencer) = value
        record = cls(handle_id, session_id, instance, epoch, intent, events, lock_delay_ms)
        record.stale = bool(stale)
        record.held_mode = None if held is None else LockMode(held)
        record.waiting_mode = None if waiting is None else LockMode(waiting)
        record.sequencer = sequencer
        return record
