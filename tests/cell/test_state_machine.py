"""CellStateMachine: every call's success and error paths (invariants are
checked after every apply by the harness)."""

from __future__ import annotations

import msgpack
import pytest

from chubbyfs.cell.commands import (
    Acquire, CheckSequencer, Close, ContentsResult, CreateMode, CreateSession, Delete,
    EndSession, ErrorCode, EventKind, ExtendLeases, GetContentsAndStat, GetSequencer, GetStat,
    InitCell, ReadDir, Rename, SetACL, SetContents, Tick, encode_command,
)
from chubbyfs.cell.handles import Intent
from chubbyfs.cell.state_machine import CellStateMachine, checksum64
from chubbyfs.locks import LockMode

from .harness import CELL, SECRET, Harness, forged, p

R, W, L, C = int(Intent.READ), int(Intent.WRITE), int(Intent.LOCK), int(Intent.CHANGE_ACL)


# ------------------------------------------------------------------ apply, bootstrap

def test_noop_malformed_oversized_and_index_order() -> None:
    h = Harness()
    assert h.sm.apply(100, b"").result.message == "no-op"
    with pytest.raises(ValueError):
        h.sm.apply(100, b"")
    result = h.sm.apply(101, b"\x93\x01")
    assert result.result.code == ErrorCode.MALFORMED_COMMAND
    big = h.sm.limits.max_request_bytes + 1
    assert h.sm.apply(102, b"x" * big).result.code == ErrorCode.TOO_LARGE
    h.sm.assert_invariants()


def test_commands_before_init_are_refused() -> None:
    h = Harness(init=False)
    h.err(CreateSession(now_ms=1, session_id=1, lease_end_ms=5), ErrorCode.NOT_INITIALIZED)
    assert h.sm.query(CheckSequencer(now_ms=1, sequencer="x")).code == ErrorCode.NOT_INITIALIZED


def test_init_cell_builds_root_acl_directory_and_admin_acl() -> None:
    h = Harness(admins=("root", "ops"))
    root = h.sm.stat(p())
    assert root is not None and root.is_directory and root.acl_write == "admin"
    admin = h.sm.stat(p("acl/admin"))
    assert admin is not None and not admin.is_directory
    assert h.sm.nodes[admin.instance].contents == b"ops\nroot\n"
    h.err(InitCell(now_ms=h.now_ms, cell=CELL, admins=("x",), secret=SECRET, limits={}),
          ErrorCode.EXISTS)


@pytest.mark.parametrize("kwargs, code", [
    (dict(cell="bad/cell"), ErrorCode.INVALID_NAME),
    (dict(admins=()), ErrorCode.INVALID_ARGUMENT),
    (dict(admins=("ok", " bad")), ErrorCode.INVALID_ARGUMENT),
    (dict(secret=b"short"), ErrorCode.INVALID_ARGUMENT),
    (dict(limits={"max_node_bytes": 0}), ErrorCode.INVALID_ARGUMENT),
    (dict(limits={"no_such_limit": 1}), ErrorCode.INVALID_ARGUMENT),
    (dict(limits={"max_node_bytes": 4}), ErrorCode.INVALID_ARGUMENT),
    (dict(limits={"max_path_depth": 1}), ErrorCode.INVALID_ARGUMENT),
    (dict(limits={"max_name_bytes": 2}), ErrorCode.INVALID_ARGUMENT),
])
def test_init_cell_errors(kwargs: dict, code: ErrorCode) -> None:
    h = Harness(init=False)
    fields = dict(now_ms=1, cell=CELL, admins=("root",), secret=SECRET, limits={})
    fields.update(kwargs)
    h.err(InitCell(**fields), code)
    assert h.sm.cell is None


# ------------------------------------------------------------------ sessions

def test_session_create_extend_end() -> None:
    h = Harness()
    sid = h.session(lease_ms=1_000)
    h.err(CreateSession(now_ms=h.now_ms, session_id=sid, lease_end_ms=h.now_ms + 5),
          ErrorCode.INVALID_ARGUMENT)  # ids never go back, so an ended one never revives
    h.err(CreateSession(now_ms=h.now_ms, session_id=sid + 10, lease_end_ms=h.now_ms),
          ErrorCode.INVALID_ARGUMENT)
    unknown = h.ok(ExtendLeases(now_ms=h.now_ms, leases={sid: h.now_ms + 5_000, 77: 1}))
    assert unknown == (77,)
    h.ok(ExtendLeases(now_ms=h.now_ms, leases={sid: h.now_ms + 10}))  # never earlier
    assert h.sm.session_lease_ends() == {sid: h.now_ms + 5_000}
    result = h.apply(EndSession(now_ms=h.now_ms, session_id=sid))
    assert result.result.ok and result.ended_sessions == (sid,)
    h.err(EndSession(now_ms=h.now_ms, session_id=sid), ErrorCode.SESSION_EXPIRED)
    h.err(h.open_cmd(sid, p()), ErrorCode.SESSION_EXPIRED)


def test_session_limit() -> None:
    h = Harness(limits={"max_sessions": 2})
    h.session()
    h.session()
    h.err(CreateSession(now_ms=h.now_ms, session_id=99, lease_end_ms=h.now_ms + 10),
          ErrorCode.LIMIT_EXCEEDED)


def test_expiry_by_stamped_time_of_any_command_and_clamped_clock() -> None:
    h = Harness()
    short = h.session(lease_ms=100)
    long = h.session(lease_ms=10_000)
    # A command from another session stamped after the lease ends expires it.
    h.now_ms += 100
    result = h.apply(h.open_cmd(long, p()))
    assert result.result.ok
    assert result.ended_sessions == (short,)
    # The master's clock going back cannot revive anything or undo expiry.
    result = h.apply(Tick(now_ms=5))
    assert h.sm.now_ms == 1_100 and result.result.value == 1_100
    h.err(h.open_cmd(short, p()), ErrorCode.SESSION_EXPIRED)
    assert long in h.sm.sessions


# ------------------------------------------------------------------ Open

def test_open_create_file_and_directory() -> None:
    h = Harness()
    sid = h.session()
    d = h.open(sid, p("d"), create=CreateMode.DIRECTORY)
    assert d.created and d.stat.is_directory and d.stat.acl_read == "admin"
    result = h.apply(h.open_cmd(sid, p("d/f"), create=CreateMode.FILE, contents=b"hello"))
    f = result.result.value
    assert f.created and f.stat.size == 5 and f.stat.checksum == checksum64(b"hello")
    assert set(result.invalidated_paths) == {p("d"), p("d/f")}
    again = h.open(sid, p("d/f"), create=CreateMode.FILE, contents=b"ignored")
    assert not again.created and again.stat.instance == f.stat.instance
    plain = h.open(sid, p("d/f"))
    assert plain.handle.handle_id != again.handle.handle_id
    h.err(h.open_cmd(sid, p("d/f"), create=CreateMode.FILE, exclusive=True), ErrorCode.EXISTS)


@pytest.mark.parametrize("path, options, code", [
    ("missing", {}, ErrorCode.NOT_FOUND),
    ("nodir/x", dict(create=CreateMode.FILE), ErrorCode.NOT_FOUND),
    ("file/x", dict(create=CreateMode.FILE), ErrorCode.NOT_A_DIRECTORY),
    ("dir", dict(create=CreateMode.FILE), ErrorCode.IS_A_DIRECTORY),
    ("file", dict(create=CreateMode.DIRECTORY), ErrorCode.NOT_A_DIRECTORY),
    ("a//b", dict(create=CreateMode.FILE), ErrorCode.INVALID_NAME),
    ("..", {}, ErrorCode.INVALID_NAME),
    ("x" * 300, dict(create=CreateMode.FILE), ErrorCode.INVALID_NAME),
    ("/".join(["d"] * 70), dict(create=CreateMode.FILE), ErrorCode.INVALID_NAME),
    ("new", dict(create=CreateMode.DIRECTORY, contents=b"x"), ErrorCode.INVALID_ARGUMENT),
    ("new", dict(create=CreateMode.FILE, contents=b"x" * (256 * 1024 + 1)), ErrorCode.TOO_LARGE),
    ("new", dict(create=CreateMode.FILE, acl=("a", "b")), ErrorCode.INVALID_ARGUMENT),
    ("new", dict(create=CreateMode.FILE, acl=("a", "b", "..")), ErrorCode.INVALID_NAME),
    ("file", dict(intent=0), ErrorCode.INVALID_ARGUMENT),
    ("file", dict(intent=16), ErrorCode.INVALID_ARGUMENT),
    ("file", dict(events=1 << 10), ErrorCode.INVALID_ARGUMENT),
    ("file", dict(lock_delay_ms=60_001), ErrorCode.INVALID_ARGUMENT),
    ("file", dict(principal=""), ErrorCode.INVALID_ARGUMENT),
])
def test_open_errors(path: str, options: dict, code: ErrorCode) -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("file"), create=CreateMode.FILE)
    h.open(sid, p("dir"), create=CreateMode.DIRECTORY)
    principal = options.pop("principal", "root")
    intent = options.pop("intent", R | W)
    h.err(h.open_cmd(sid, p(path), principal, intent, **options), code)


def test_open_outside_the_cell_is_invalid() -> None:
    h = Harness()
    sid = h.session()
    h.err(h.open_cmd(sid, "/ls/othercell/x"), ErrorCode.INVALID_NAME)
    h.err(h.open_cmd(sid, "relative"), ErrorCode.INVALID_NAME)


def test_open_limits_children_and_handles() -> None:
    h = Harness(limits={"max_children_per_directory": 2, "max_handles_per_session": 3})
    sid = h.session()
    # The root already holds `acl`.
    h.open(sid, p("a"), create=CreateMode.FILE)
    h.err(h.open_cmd(sid, p("b"), create=CreateMode.FILE), ErrorCode.LIMIT_EXCEEDED)
    h.open(sid, p("a"))
    h.open(sid, p("a"))
    h.err(h.open_cmd(sid, p("a")), ErrorCode.LIMIT_EXCEEDED)
    other = h.session()
    h.open(other, p("a"))  # the limit is per session


def test_recreated_node_gets_a_new_instance_and_old_handles_are_stale() -> None:
    h = Harness()
    sid = h.session()
    first = h.open(sid, p("f"), create=CreateMode.FILE)
    watcher = h.open(sid, p("f"), events=int(EventKind.HANDLE_INVALID))
    result = h.apply(h.call(Delete, sid, first.handle))
    assert [(e.kind, e.handle_id) for e in result.events] == [
        (EventKind.HANDLE_INVALID, watcher.handle.handle_id)]
    second = h.open(sid, p("f"), create=CreateMode.FILE)
    assert second.stat.instance > first.stat.instance
    h.err(h.call(GetStat, sid, watcher.handle), ErrorCode.STALE_HANDLE)
    h.err(h.call(GetStat, sid, first.handle), ErrorCode.STALE_HANDLE)
    h.ok(h.call(Close, sid, watcher.handle))  # Close works on a stale handle


# ------------------------------------------------------------------ handles

def test_forged_closed_and_foreign_handles() -> None:
    h = Harness()
    sid = h.session()
    other = h.session()
    ref = h.open(sid, p(), intent=R).handle
    h.err(h.call(GetStat, sid, forged(ref, check=b"\x00" * 8)), ErrorCode.BAD_HANDLE)
    h.err(h.call(GetStat, sid, forged(ref, intent=R | W)), ErrorCode.BAD_HANDLE)
    h.err(h.call(GetStat, other, ref), ErrorCode.BAD_HANDLE)
    h.ok(h.call(GetStat, sid, ref))
    h.ok(h.call(Close, sid, ref))
    h.err(h.call(GetStat, sid, ref), ErrorCode.BAD_HANDLE)
    h.err(h.call(Close, sid, ref), ErrorCode.BAD_HANDLE)
    # A handle from another cell secret never verifies here.
    stranger = CellStateMachine()
    stranger.apply(1, encode_command(InitCell(now_ms=1, cell=CELL, admins=("root",),
                                              secret=b"another secret 12345", limits={})))
    stranger.apply(2, encode_command(CreateSession(now_ms=1, session_id=sid, lease_end_ms=10**9)))
    alien = stranger.apply(3, encode_command(h.open_cmd(sid, p()))).result.value.handle
    h.err(h.call(GetStat, sid, alien), ErrorCode.BAD_HANDLE)


def test_handle_intent_is_enforced() -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("f"), create=CreateMode.FILE)
    read_only = h.open(sid, p("f"), intent=R).handle
    write_only = h.open(sid, p("f"), intent=W).handle
    h.err(h.call(SetContents, sid, read_only, contents=b"x"), ErrorCode.PERMISSION_DENIED)
    h.err(h.call(GetContentsAndStat, sid, write_only), ErrorCode.PERMISSION_DENIED)
    h.err(h.call(Acquire, sid, read_only, mode=LockMode.SHARED), ErrorCode.PERMISSION_DENIED)
    h.err(h.call(SetACL, sid, write_only, read="a", write="a", change_acl="a"),
          ErrorCode.PERMISSION_DENIED)
    h.err(h.call(Delete, sid, read_only), ErrorCode.PERMISSION_DENIED)
    h.err(h.call(GetSequencer, sid, read_only), ErrorCode.PERMISSION_DENIED)


# ------------------------------------------------------------------ contents

def test_get_contents_stat_and_read_dir() -> None:
    h = Harness()
    sid = h.session()
    d = h.open(sid, p("d"), create=CreateMode.DIRECTORY).handle
    for name in ("zeta", "alpha", "mid"):
        h.open(sid, p(f"d/{name}"), create=CreateMode.FILE, contents=name.encode())
    f = h.open(sid, p("d/mid")).handle
    value = h.ok(h.call(GetContentsAndStat, sid, f))
    assert isinstance(value, ContentsResult) and value.contents == b"mid"
    assert h.ok(h.call(GetStat, sid, d)).child_count == 3
    listing = h.ok(h.call(ReadDir, sid, d))
    assert [e.name for e in listing.entries] == ["alpha", "mid", "zeta"]
    assert listing.entries[1].stat.size == 3
    h.err(h.call(ReadDir, sid, f), ErrorCode.NOT_A_DIRECTORY)
    h.err(h.call(GetContentsAndStat, sid, d), ErrorCode.IS_A_DIRECTORY)


def test_set_contents_generations_checksum_events_and_cas() -> None:
    h = Harness()
    sid = h.session()
    watcher_dir = h.open(sid, p(), events=int(EventKind.CHILD_MODIFIED)).handle
    f = h.open(sid, p("f"), create=CreateMode.FILE, contents=b"v1",
               events=int(EventKind.CONTENTS_MODIFIED))
    result = h.apply(h.call(SetContents, sid, f.handle, contents=b"v2"))
    stat = result.result.value
    assert stat.content_generation > f.stat.content_generation
    assert stat.checksum == checksum64(b"v2") and stat.instance == f.stat.instance
    assert [(e.kind, e.handle_id, e.name) for e in result.events] == [
        (EventKind.CONTENTS_MODIFIED, f.handle.handle_id, ""),
        (EventKind.CHILD_MODIFIED, watcher_dir.handle_id, "f")]
    assert result.invalidated_paths == (p(), p("f"))
    h.err(h.call(SetContents, sid, f.handle, contents=b"v3",
                 expected_generation=f.stat.content_generation), ErrorCode.CAS_MISMATCH)
    cas = h.ok(h.call(SetContents, sid, f.handle, contents=b"v3",
                      expected_generation=stat.content_generation))
    assert cas.content_generation > stat.content_generation
    h.err(h.call(SetContents, sid, f.handle, contents=b"x" * (256 * 1024 + 1)),
          ErrorCode.TOO_LARGE)
    d = h.open(sid, p()).handle
    h.err(h.call(SetContents, sid, d, contents=b"x"), ErrorCode.IS_A_DIRECTORY)


def test_node_size_limit_is_per_cell() -> None:
    h = Harness(limits={"max_node_bytes": 8})
    sid = h.session()
    f = h.open(sid, p("f"), create=CreateMode.FILE, contents=b"12345678").handle
    h.err(h.call(SetContents, sid, f, contents=b"123456789"), ErrorCode.TOO_LARGE)
    h.err(h.open_cmd(sid, p("g"), create=CreateMode.FILE, contents=b"123456789"),
          ErrorCode.TOO_LARGE)
    assert h.ok(h.call(GetContentsAndStat, sid, f)).contents == b"12345678"


# ------------------------------------------------------------------ ACLs

def _make_acl(h: Harness, sid: int, name: str, principals: bytes) -> None:
    h.open(sid, p(f"acl/{name}"), create=CreateMode.FILE, contents=principals)


def test_acls_enforced_per_request_and_inherited() -> None:
    h = Harness()
    admin = h.session()
    _make_acl(h, admin, "readers", b"alice\nbob\n")
    _make_acl(h, admin, "writers", b"alice\n")
    dref = h.open(admin, p("d"), create=CreateMode.DIRECTORY).handle
    before = h.sm.stat(p("d"))
    stat = h.ok(h.call(SetACL, admin, dref, read="readers", write="writers", change_acl="admin"))
    assert stat.acl_generation > before.acl_generation
    # No change, no new ACL generation.
    same = h.ok(h.call(SetACL, admin, dref, read="readers", write="writers", change_acl="admin"))
    assert same.acl_generation == stat.acl_generation

    sid = h.session()
    # alice may create inside d (write on the parent); the child inherits d's ACL names.
    child = h.open(sid, p("d/f"), "alice", R | W, create=CreateMode.FILE, contents=b"x")
    assert (child.stat.acl_read, child.stat.acl_write) == ("readers", "writers")
    h.err(h.open_cmd(sid, p("d/g"), "bob", R, create=CreateMode.FILE),
          ErrorCode.PERMISSION_DENIED)
    h.err(h.open_cmd(sid, p("d/f"), "bob", R | W), ErrorCode.PERMISSION_DENIED)
    h.err(h.open_cmd(sid, p("d/f"), "bob", R | L), ErrorCode.PERMISSION_DENIED)
    h.err(h.open_cmd(sid, p("d/f"), "bob", C), ErrorCode.PERMISSION_DENIED)
    bob = h.open(sid, p("d/f"), "bob", R).handle
    assert h.ok(h.call(GetContentsAndStat, sid, bob, "bob")).contents == b"x"
    h.err(h.open_cmd(sid, p("d/f"), "mallory", R), ErrorCode.PERMISSION_DENIED)
    # Enforced on every request: the same handle, another principal.
    h.err(h.call(GetContentsAndStat, sid, bob, "mallory"), ErrorCode.PERMISSION_DENIED)
    # Removing bob from the ACL file takes effect at once.
    acl_handle = h.open(admin, p("acl/readers")).handle
    h.ok(h.call(SetContents, admin, acl_handle, contents=b"alice\n"))
    h.err(h.call(GetContentsAndStat, sid, bob, "bob"), ErrorCode.PERMISSION_DENIED)
    h.err(h.call(SetACL, sid, child.handle, "alice", read="x", write="x", change_acl="x"),
          ErrorCode.PERMISSION_DENIED)
    h.err(h.call(SetACL, admin, dref, read="ok", write="not/ok", change_acl="ok"),
          ErrorCode.INVALID_NAME)


def test_everyone_acl_missing_acl_and_admin_override() -> None:
    h = Harness()
    admin = h.session()
    _make_acl(h, admin, "all", b"*\n")
    h.open(admin, p("pub"), create=CreateMode.FILE, acl=("all", "nobody-file", "admin"))
    sid = h.session()
    h.open(sid, p("pub"), "anyone", R)
    # The write ACL file does not exist: nobody but the administrators.
    h.err(h.open_cmd(sid, p("pub"), "anyone", W), ErrorCode.PERMISSION_DENIED)
    h.open(sid, p("pub"), "root", W)
    # Creating with ACL names that exclude the creator fails and creates nothing.
    _make_acl(h, admin, "w", b"alice\n")
    h.open(admin, p("shared"), create=CreateMode.DIRECTORY, acl=("all", "w", "admin"))
    h.err(h.open_cmd(sid, p("shared/x"), "alice", R, create=CreateMode.FILE,
                     acl=("nobody-file", "w", "w")), ErrorCode.PERMISSION_DENIED)
    assert h.sm.stat(p("shared/x")) is None


# ------------------------------------------------------------------ Delete

def test_delete_rules() -> None:
    h = Harness()
    sid = h.session()
    watcher = h.open(sid, p(), events=int(EventKind.CHILD_REMOVED | EventKind.CHILD_ADDED))
    d = h.open(sid, p("d"), create=CreateMode.DIRECTORY).handle
    f = h.open(sid, p("d/f"), create=CreateMode.FILE).handle
    h.err(h.call(Delete, sid, d), ErrorCode.NOT_EMPTY)
    h.ok(h.call(Delete, sid, f))
    h.err(h.call(Delete, sid, f), ErrorCode.STALE_HANDLE)
    result = h.apply(h.call(Delete, sid, d))
    assert result.result.ok
    assert [(e.kind, e.name) for e in result.events] == [(EventKind.CHILD_REMOVED, "d")]
    assert watcher.handle.handle_id == result.events[0].handle_id
    assert set(result.invalidated_paths) == {p(), p("d")}
    h.err(h.call(Delete, sid, watcher.handle), ErrorCode.INVALID_ARGUMENT)
    acl_dir = h.open(sid, p("acl")).handle
    h.err(h.call(Delete, sid, acl_dir), ErrorCode.INVALID_ARGUMENT)


# ------------------------------------------------------------------ Rename

def test_rename_keeps_metadata_and_handles() -> None:
    h = Harness()
    sid = h.session()
    f = h.open(sid, p("a"), create=CreateMode.FILE, contents=b"data")
    h.ok(h.call(Acquire, sid, f.handle, mode=LockMode.EXCLUSIVE))
    before = h.sm.stat(p("a"))
    result = h.apply(Rename(now_ms=h.now_ms, session_id=sid, principal="root",
                            src_path=p("a"), dst_path=p("b")))
    after = result.result.value
    assert after.path == p("b") and h.sm.stat(p("a")) is None
    assert (after.instance, after.content_generation, after.lock_generation, after.checksum) == \
        (before.instance, before.content_generation, before.lock_generation, before.checksum)
    assert set(result.invalidated_paths) == {p(), p("a"), p("b")}
    assert h.ok(h.call(GetContentsAndStat, sid, f.handle)).stat.path == p("b")
    # Same name: a no-op.
    h.ok(Rename(now_ms=h.now_ms, session_id=sid, principal="root", src_path=p("b"),
                dst_path=p("b")))


def test_rename_replaces_target_as_if_deleted() -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("new"), create=CreateMode.FILE, contents=b"new")
    old = h.open(sid, p("old"), create=CreateMode.FILE, contents=b"old",
                 events=int(EventKind.HANDLE_INVALID))
    other = h.session()
    waiter_holder = h.open(other, p("old")).handle
    h.ok(h.call(Acquire, other, waiter_holder, mode=LockMode.EXCLUSIVE))
    waiter = h.open(sid, p("old")).handle
    assert not h.ok(h.call(Acquire, sid, waiter, mode=LockMode.EXCLUSIVE)).granted
    result = h.apply(Rename(now_ms=h.now_ms, session_id=sid, principal="root",
                            src_path=p("new"), dst_path=p("old")))
    assert result.result.ok
    assert [(w.handle_id, w.code) for w in result.wakeups] == [
        (waiter.handle_id, ErrorCode.STALE_HANDLE)]
    assert (EventKind.HANDLE_INVALID, old.handle.handle_id) in \
        [(e.kind, e.handle_id) for e in result.events]
    h.err(h.call(GetStat, sid, old.handle), ErrorCode.STALE_HANDLE)
    assert h.sm.nodes[h.sm.by_path[p("old")]].contents == b"new"


def test_rename_directory_moves_its_subtree() -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("d"), create=CreateMode.DIRECTORY)
    h.open(sid, p("d/e"), create=CreateMode.DIRECTORY)
    f = h.open(sid, p("d/e/f"), create=CreateMode.FILE).handle
    h.open(sid, p("empty"), create=CreateMode.DIRECTORY)
    h.ok(Rename(now_ms=h.now_ms, session_id=sid, principal="root", src_path=p("d"),
                dst_path=p("empty")))
    assert h.ok(h.call(GetStat, sid, f)).path == p("empty/e/f")
    assert h.sm.stat(p("d/e")) is None and h.sm.stat(p("empty/e")) is not None


@pytest.mark.parametrize("src, dst, code", [
    ("f", "d/f", ErrorCode.INVALID_ARGUMENT),
    ("missing", "x", ErrorCode.NOT_FOUND),
    ("d", "f", ErrorCode.NOT_A_DIRECTORY),
    ("f", "d", ErrorCode.IS_A_DIRECTORY),
    ("e", "d", ErrorCode.NOT_EMPTY),
    ("acl", "x", ErrorCode.INVALID_ARGUMENT),
    ("f", "acl", ErrorCode.INVALID_ARGUMENT),
    ("f", "", ErrorCode.INVALID_ARGUMENT),
    ("f", "a//b", ErrorCode.INVALID_NAME),
])
def test_rename_errors(src: str, dst: str, code: ErrorCode) -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("f"), create=CreateMode.FILE)
    h.open(sid, p("d"), create=CreateMode.DIRECTORY)
    h.open(sid, p("d/child"), create=CreateMode.FILE)
    h.open(sid, p("e"), create=CreateMode.DIRECTORY)
    h.err(Rename(now_ms=h.now_ms, session_id=sid, principal="root", src_path=p(src),
                 dst_path=p(dst)), code)


def test_rename_needs_write_permission() -> None:
    h = Harness()
    sid = h.session()
    h.open(sid, p("f"), create=CreateMode.FILE)
    h.err(Rename(now_ms=h.now_ms, session_id=sid, principal="eve", src_path=p("f"),
                 dst_path=p("g")), ErrorCode.PERMISSION_DENIED)
    h.err(Rename(now_ms=h.now_ms, session_id=99, principal="root", src_path=p("f"),
                 dst_path=p("g")), ErrorCode.SESSION_EXPIRED)


# ------------------------------------------------------------------ ephemeral nodes

def test_ephemeral_file_goes_with_its_last_handle() -> None:
    h = Harness()
    sid = h.session()
    other = h.session()
    watcher = h.open(other, p(), events=int(EventKind.CHILD_REMOVED)).handle
    e = h.open(sid, p("e"), create=CreateMode.FILE, ephemeral=True)
    assert e.stat.ephemeral
    second = h.open(other, p("e")).handle
    h.ok(h.call(Close, sid, e.handle))
    assert h.sm.stat(p("e")) is not None
    result = h.apply(h.call(Close, other, second))
    assert h.sm.stat(p("e")) is None
    assert [(ev.kind, ev.handle_id, ev.name) for ev in result.events] == [
        (EventKind.CHILD_REMOVED, watcher.handle_id, "e")]


def test_ephemeral_directory_waits_until_empty_and_session_end_collects() -> None:
    h = Harness()
    sid = h.session()
    other = h.session()
    d = h.open(sid, p("d"), create=CreateMode.DIRECTORY, ephemeral=True).handle
    child = h.open(other, p("d/c"), create=CreateMode.FILE).handle
    h.ok(h.call(Close, sid, d))
    assert h.sm.stat(p("d")) is not None  # not empty yet
    h.ok(h.call(Delete, other, child))
    assert h.sm.stat(p("d")) is None  # empty and unopened: gone
    h.open(sid, p("e"), create=CreateMode.FILE, ephemeral=True)
    result = h.apply(EndSession(now_ms=h.now_ms, session_id=sid))
    assert h.sm.stat(p("e")) is None and result.ended_sessions == (sid,)
    assert p("e") in result.invalidated_paths


# ------------------------------------------------------------------ query

def test_query_serves_reads_without_changing_state() -> None:
    h = Harness()
    sid = h.session(lease_ms=1_000)
    f = h.open(sid, p("f"), create=CreateMode.FILE, contents=b"q").handle
    snap = h.sm.snapshot()
    cmd = h.call(GetContentsAndStat, sid, f)
    assert h.sm.query(cmd).value.contents == b"q"
    assert h.sm.query(encode_command(cmd)).value.contents == b"q"
    assert h.sm.query(b"\x00junk").code == ErrorCode.MALFORMED_COMMAND
    assert h.sm.query(h.call(Delete, sid, f)).code == ErrorCode.INVALID_ARGUMENT
    late = GetStat(now_ms=h.now_ms + 1_000, session_id=sid, principal="root", handle=f)
    assert h.sm.query(late).code == ErrorCode.SESSION_EXPIRED
    assert h.sm.query(h.call(GetStat, sid, forged(f, check=b"1" * 8))).code == \
        ErrorCode.BAD_HANDLE
    assert h.sm.snapshot() == snap
    assert msgpack.unpackb(snap)[1] == h.index
