"""Command codec, name validation and ACL parsing."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from chubbyfs.cell import acl, names
from chubbyfs.cell.commands import (
    COMMAND_TYPES, COMMAND_VERSION, Acquire, CellLimits, CheckSequencer, Close, CreateMode,
    CreateSession, Delete, EndSession, ExtendLeases, GetContentsAndStat, GetSequencer, GetStat,
    InitCell, MalformedCommand, Open, ReadDir, Release, Rename, SetACL, SetContents,
    SetSequencer, Tick, TryAcquire, decode_command, encode_command,
)
from chubbyfs.cell.handles import Intent, make_ref, ref_is_authentic
from chubbyfs.locks import LockMode

REF = make_ref(b"k" * 32, 3, 4, 5, 6, int(Intent.READ))
COMMON = dict(now_ms=10, session_id=4, principal="alice")

SAMPLES = [
    InitCell(now_ms=1, cell="c", admins=("a", "b"), secret=b"s" * 16, limits={"max_sessions": 5}),
    CreateSession(now_ms=1, session_id=2, lease_end_ms=3),
    ExtendLeases(now_ms=1, leases={2: 5, 7: 9}),
    EndSession(now_ms=1, session_id=2),
    Tick(now_ms=99),
    Open(**COMMON, epoch=2, path="/ls/c/x", intent=3),
    Open(**COMMON, epoch=2, path="/ls/c/x", intent=15, create=CreateMode.DIRECTORY,
         exclusive=True, ephemeral=True, contents=b"", acl=("r", "w", "c"), events=5,
         lock_delay_ms=0),
    Close(**COMMON, handle=REF),
    GetContentsAndStat(**COMMON, handle=REF),
    GetStat(**COMMON, handle=REF),
    ReadDir(**COMMON, handle=REF),
    SetContents(**COMMON, handle=REF, contents=b"\x00\xff"),
    SetContents(**COMMON, handle=REF, contents=b"x", expected_generation=17),
    SetACL(**COMMON, handle=REF, read="r", write="w", change_acl="c"),
    Delete(**COMMON, handle=REF),
    Acquire(**COMMON, handle=REF, mode=LockMode.SHARED),
    TryAcquire(**COMMON, handle=REF, mode=LockMode.EXCLUSIVE),
    Release(**COMMON, handle=REF),
    GetSequencer(**COMMON, handle=REF),
    SetSequencer(**COMMON, handle=REF, sequencer="s"),
    CheckSequencer(now_ms=3, sequencer="s"),
    Rename(**COMMON, src_path="/ls/c/a", dst_path="/ls/c/b"),
]


def test_samples_cover_every_command_type() -> None:
    assert {type(s) for s in SAMPLES} == set(COMMAND_TYPES)


@pytest.mark.parametrize("command", SAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip(command: object) -> None:
    data = encode_command(command)
    decoded = decode_command(data)
    assert decoded == command and type(decoded) is type(command)
    assert encode_command(decoded) == data


def test_encode_rejects_non_command() -> None:
    with pytest.raises(TypeError):
        encode_command(object())


def envelope(tag: int, values: list, version: int = COMMAND_VERSION) -> bytes:
    return msgpack.packb([version, tag, values], use_bin_type=True)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # never-used msgpack byte
    msgpack.packb({"a": 1}),
    msgpack.packb([1, 2]),
    envelope(Tick.TAG, [5], version=2),
    envelope(Tick.TAG, [5], version=True),
    envelope(999, [5]),
    envelope(-1, [5]),
    envelope(Tick.TAG, []),
    envelope(Tick.TAG, [5, 6]),
    envelope(Tick.TAG, "x"),
    envelope(Tick.TAG, [-5]),
    envelope(Tick.TAG, [True]),
    envelope(Tick.TAG, ["5"]),
    envelope(EndSession.TAG, [1, 2.5]),
    envelope(CheckSequencer.TAG, [1, b"bytes-not-str"]),
    envelope(Close.TAG, [1, 2, "p", [1, 2, 3]]),
    envelope(Close.TAG, [1, 2, "p", [1, 2, 3, 4, 5, b"short"]]),
    envelope(Close.TAG, [1, 2, "p", [1, 2, 3, 4, -5, b"12345678"]]),
    envelope(Acquire.TAG, [1, 2, "p", REF.to_wire(), 9]),
    envelope(Acquire.TAG, [1, 2, "p", REF.to_wire(), "X"]),
    envelope(ExtendLeases.TAG, [1, [1, 2]]),
    envelope(ExtendLeases.TAG, [1, {"a": 2}]),
    envelope(InitCell.TAG, [1, "c", "not-a-list", b"s" * 16, {}]),
    envelope(InitCell.TAG, [1, "c", ["a"], b"s" * 16, {1: 2}]),
    envelope(Open.TAG, [1, 2, "p", 1, "/ls/c/x", 1, 0, "no", False, b"", [], 0, None]),
    envelope(SetContents.TAG, [1, 2, "p", REF.to_wire(), b"", "7"]),
])
def test_malformed_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(MalformedCommand):
        decode_command(data)


def test_handle_check_digits() -> None:
    secret = b"k" * 32
    assert ref_is_authentic(secret, REF)
    assert not ref_is_authentic(b"other" * 8, REF)
    for field, value in (("handle_id", 4), ("session_id", 5), ("instance", 9), ("epoch", 1),
                         ("intent", 15)):
        assert not ref_is_authentic(secret, dataclasses.replace(REF, **{field: value}))


def test_limits_overrides() -> None:
    limits = CellLimits().with_overrides({"max_node_bytes": 10})
    assert limits.max_node_bytes == 10 and limits.max_sessions == CellLimits().max_sessions
    for bad in ({"nope": 1}, {"max_node_bytes": 0}, {"max_node_bytes": True}):
        with pytest.raises(ValueError):
            CellLimits().with_overrides(bad)
    assert CellLimits().with_overrides(limits.to_wire()) == limits


def test_split_path_accepts_canonical_paths() -> None:
    assert names.split_path("/ls/c", "c", 255, 8) == ()
    assert names.split_path("/ls/c/a/b c/ü", "c", 255, 8) == ("a", "b c", "ü")
    assert names.parent_of("/ls/c/a/b") == "/ls/c/a"
    assert names.base_name("/ls/c/a/b") == "b"


@pytest.mark.parametrize("path", [
    "/ls/c/", "/ls/c//a", "/ls/c/a/", "/ls/c/./a", "/ls/c/a/..", "/ls/c/a\x00b",
    "/ls/c/a\nb", "/ls/other/a", "ls/c/a", "/ls/cc", "/ls/c/" + "x" * 11,
    "/ls/c/1/2/3/4", 7,
])
def test_split_path_rejects(path: object) -> None:
    with pytest.raises(names.InvalidNameError):
        names.split_path(path, "c", 10, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("cell", ["", ".", "..", "a/b", "a b", "x" * 65, 5])
def test_bad_cell_names(cell: object) -> None:
    with pytest.raises(names.InvalidNameError):
        names.check_cell_name(cell)  # type: ignore[arg-type]


def test_acl_parsing_and_admission() -> None:
    principals = acl.parse_acl(b"alice\n  bob  \n\n# comment\ncarol\r\n\xff\n")
    assert {"alice", "bob", "carol"} <= principals
    assert "# comment" not in principals
    assert acl.admits(principals, "bob") and not acl.admits(principals, "dave")
    assert acl.admits(acl.parse_acl(b"*\n"), "anyone")
    assert acl.format_acl(["b", "a", "b"]) == b"a\nb\n"


@pytest.mark.parametrize("principal", ["", " x", "x ", "*", "a\nb", "x" * 257, None])
def test_bad_principals(principal: object) -> None:
    with pytest.raises(ValueError):
        acl.check_principal(principal)  # type: ignore[arg-type]
