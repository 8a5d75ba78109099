"""A small driver for CellStateMachine tests: encodes every command through
the real codec, applies it at the next index, and checks the invariants after
every apply (and that a refused request changed nothing)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from chubbyfs.cell.commands import (
    ApplyResult, CreateSession, ErrorCode, InitCell, Open, OpenResult, decode_command,
    encode_command,
)
from chubbyfs.cell.handles import ALL_INTENTS, HandleRef
from chubbyfs.cell.state_machine import CellStateMachine

CELL = "test"
SECRET = b"0123456789abcdef0123456789abcdef"


def p(relative: str = "") -> str:
    return f"/ls/{CELL}" + (f"/{relative}" if relative else "")


def state_without_index(sm: CellStateMachine) -> list:
    state = msgpack.unpackb(sm.snapshot(), raw=False)
    state[1] = None  # applied_index moves on every apply, even a refused one
    return state


class Harness:
    def __init__(self, admins: tuple[str, ...] = ("root",), limits: dict[str, int] | None = None,
                 now_ms: int = 1_000, init: bool = True) -> None:
        self.sm = CellStateMachine()
        self.index = 0
        self.now_ms = now_ms
        self.next_session_id = 1
        if init:
            self.ok(InitCell(now_ms=now_ms, cell=CELL, admins=admins, secret=SECRET,
                             limits=limits or {}))

    def apply(self, cmd: Any) -> ApplyResult:
        data = encode_command(cmd)
        assert decode_command(data) == cmd
        self.index += 1
        result = self.sm.apply(self.index, data)
        self.sm.assert_invariants()
        return result

    def ok(self, cmd: Any) -> Any:
        result = self.apply(cmd)
        assert result.result.ok, result.result
        return result.result.value

    def err(self, cmd: Any, code: ErrorCode) -> ApplyResult:
        before = state_without_index(self.sm)
        now_before = self.sm.now_ms
        result = self.apply(cmd)
        assert result.result.code == code, result.result
        assert result.result.message
        if getattr(cmd, "now_ms", 0) <= now_before:
            # Time did not move, so a refusal must leave the state untouched.
            assert state_without_index(self.sm) == before
            assert result.events == () and result.wakeups == ()
        return result

    def session(self, lease_ms: int = 60_000) -> int:
        sid = self.next_session_id
        self.next_session_id += 1
        self.ok(CreateSession(now_ms=self.now_ms, session_id=sid,
                              lease_end_ms=self.now_ms + lease_ms))
        return sid

    def open_cmd(self, sid: int, path: str, principal: str = "root",
                 intent: int = int(ALL_INTENTS), **options: Any) -> Open:
        return Open(now_ms=self.now_ms, session_id=sid, principal=principal, epoch=1,
                    path=path, intent=intent, **options)

    def open(self, sid: int, path: str, principal: str = "root",
             intent: int = int(ALL_INTENTS), **options: Any) -> OpenResult:
        return self.ok(self.open_cmd(sid, path, principal, intent, **options))

    def call(self, cls: type, sid: int, handle: HandleRef, principal: str = "root",
             **fields: Any) -> Any:
        return cls(now_ms=self.now_ms, session_id=sid, principal=principal, handle=handle,
                   **fields)


def forged(ref: HandleRef, **changes: Any) -> HandleRef:
    return dataclasses.replace(ref, **changes)
