"""The Chubby cell's replicated state machine (pure core).

`CellStateMachine.apply(index, command_bytes)` applies one committed Raft log
entry and returns an `ApplyResult`: the caller's `Result`, the events the
apply caused, the paths whose cached state changed, the queued Acquires it
answered (`LockWakeup`) and the sessions it ended. `query(command)` serves
read-only commands from applied state; `snapshot()` / `restore()` move the
whole state as canonical msgpack.

Determinism rules kept here:
- Time is only the `now_ms` stamped in commands, clamped to never go back.
- Every command first advances time: sessions whose lease ended are ended,
  lock-delays that ran out let waiters in. `Tick` does only that.
- Any iteration whose order can reach a result, an event or the snapshot is
  over sorted keys (dict insertion order differs after a restore).
- A bad request returns an error `Result` and changes nothing: every handler
  validates completely before its first mutation.

See docs/cell-state-machine.md for the semantics.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any, Callable

import msgpack

from chubbyfs.cell import acl as acl_mod
from chubbyfs.cell import names
from chubbyfs.cell.acl import AclKind, AclNames
from chubbyfs.cell.commands import (
    ALL_EVENTS, NUMBERED_TYPES, READ_ONLY_TYPES, Acquire, ApplyResult, CellLimits, CheckResult,
    CheckSequencer, Close, ContentsResult, CreateMode, CreateSession, Delete, DirEntry,
    EndSession, ErrorCode, Event, EventKind, ExtendLeases, GetContentsAndStat,
    GetSequencer, GetStat, InitCell, LockResult, LockWakeup, MalformedCommand,
    NodeStat, Open, OpenResult, ReadDir, ReadDirResult, Release, Rename, Result,
    SequencerResult, SessionResult, SetACL, SetContents, SetSequencer, Tick,
    TryAcquire, decode_command,
)
from chubbyfs.cell.handles import (
    ALL_INTENTS, HandleRecord, HandleRef, Intent, make_ref, ref_is_authentic,
)
from chubbyfs.cell.session_requests import RequestTable, wakeup_outcome
from chubbyfs.locks import (
    DEFAULT_LOCK_DELAY_MS, LockMode, LockState, Sequencer, SequencerError,
    check_lock_delay_ms,
)

# 2 added the master epoch and the ephemeral sweep; 3 each session's creation
# nonce and request table. 1 and 2 still restore (their logs had no numbered
# requests, so their sessions start with empty tables).
SNAPSHOT_VERSION = 3
_SNAPSHOT_FIELDS = {1: 15, 2: 18, 3: 18}
ADMIN_ACL_NAME = "admin"
MIN_SECRET_BYTES = 16


class InvariantViolation(AssertionError):
    """The state machine's state broke one of its documented invariants."""


class SnapshotError(ValueError):
    """Snapshot bytes that cannot be restored."""


class _Fail(Exception):
    """Internal: a request is refused; carries the error result."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def checksum64(contents: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(contents, digest_size=8).digest(), "big")


# Which ACL each intent needs at Open (locking needs write permission, so a
# reader cannot block writers).
_INTENT_ACL = ((Intent.READ, AclKind.READ), (Intent.WRITE, AclKind.WRITE),
               (Intent.LOCK, AclKind.WRITE), (Intent.CHANGE_ACL, AclKind.CHANGE_ACL))


class Node:
    __slots__ = ("instance", "parent_instance", "path", "is_directory", "ephemeral",
                 "contents", "checksum", "content_generation", "acl_generation", "acl",
                 "children", "handle_ids", "lock", "acl_cache")

    def __init__(self, instance: int, parent_instance: int, path: str, is_directory: bool,
                 ephemeral: bool, contents: bytes, content_generation: int,
                 acl_generation: int, acl: AclNames) -> None:
        self.instance = instance
        self.parent_instance = parent_instance  # 0 for the root
        self.path = path
        self.is_directory = is_directory
        self.ephemeral = ephemeral
        self.contents = contents
        self.checksum = checksum64(contents)
        self.content_generation = content_generation
        self.acl_generation = acl_generation
        self.acl = acl
        self.children: dict[str, int] = {}  # name -> instance
        self.handle_ids: set[int] = set()  # open, non-stale handles
        self.lock = LockState()
        # (content_generation, principals) of this node read as an ACL file;
        # derived state, keyed by a generation that is never reused.
        self.acl_cache: tuple[int, frozenset[str]] | None = None


class Session:
    __slots__ = ("session_id", "lease_end_ms", "handle_ids", "nonce", "requests")

    def __init__(self, session_id: int, lease_end_ms: int, nonce: int = 0) -> None:
        self.session_id = session_id
        self.lease_end_ms = lease_end_ms
        self.handle_ids: set[int] = set()
        self.nonce = nonce  # the client's CreateSession nonce (0: none)
        self.requests = RequestTable()


class _Effects:
    """What one apply caused, collected while it runs."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.events: list[Event] = []
        self.invalidated: set[str] = set()
        self.wakeups: list[LockWakeup] = []
        self.ended_sessions: list[int] = []

    def mark(self) -> tuple[int, set[str], int]:
        return (len(self.events), set(self.invalidated), len(self.wakeups))

    def rollback(self, mark: tuple[int, set[str], int]) -> None:
        del self.events[mark[0]:]
        self.invalidated = mark[1]
        del self.wakeups[mark[2]:]

    def finish(self, result: Result) -> ApplyResult:
        return ApplyResult(result, tuple(self.events), tuple(sorted(self.invalidated)),
                           tuple(self.wakeups), tuple(sorted(self.ended_sessions)))


class CellStateMachine:
    """Namespace, metadata, ACLs, sessions, handles and locks of one cell."""

    def __init__(self) -> None:
        self.applied_index = 0
        self._reset()

    def _reset(self) -> None:
        self.cell: str | None = None  # None until InitCell
        self.secret = b""
        self.admins: frozenset[str] = frozenset()
        self.limits = CellLimits()
        self.now_ms = 0
        self.next_instance = 1
        # One cell-wide counter feeds content, lock and ACL generations, so each
        # is strictly increasing per node and never reused across re-creation.
        self.generation_counter = 0
        self.next_handle_id = 1
        self.last_session_id = 0
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[str, int] = {}
        self.sessions: dict[int, Session] = {}
        self.session_nonces: dict[int, int] = {}  # nonce -> live session id (derived)
        self.handles: dict[int, HandleRecord] = {}
        # Lock-delay left behind by a deleted node: a node re-created at the
        # same path inherits it, so deleting an ephemeral lock file cannot
        # cut a failed holder's lock-delay short.
        self.path_delays: dict[str, int] = {}
        # The master epoch a new master's Tick started, and its ephemeral
        # sweep: handles open on ephemeral nodes when the epoch started that
        # have not been re-created in it (ExtendLeases.renew), and when
        # ephemeral nodes with only such handles go (0: no sweep pending).
        self.epoch = 0
        self.sweep_at_ms = 0
        self.unconfirmed: set[int] = set()
        # Derived timers (lazy heaps: an entry is live only if it still equals
        # the state it was pushed for). Rebuilt on restore.
        self._lease_heap: list[tuple[int, int]] = []
        self._delay_heap: list[tuple[int, int]] = []
        self._path_delay_heap: list[tuple[int, str]] = []
        self._seen_lock_generations: dict[int, int] = {}

    # ================================================================ entry points

    def apply(self, index: int, command: bytes) -> ApplyResult:
        """Apply one committed log entry. Never raises for a bad request."""
        if index <= self.applied_index:
            raise ValueError(f"apply index {index} not after applied index {self.applied_index}")
        self.applied_index = index
        if not command:  # a leader's no-op entry
            return ApplyResult(Result(ErrorCode.OK, "no-op"))
        if len(command) > self.limits.max_request_bytes:
            return ApplyResult(Result(ErrorCode.TOO_LARGE,
                                      f"command of {len(command)} bytes exceeds "
                                      f"{self.limits.max_request_bytes}"))
        try:
            cmd = decode_command(command)
        except MalformedCommand as exc:
            return ApplyResult(Result(ErrorCode.MALFORMED_COMMAND, str(exc)))
        return self.apply_command(cmd)

    def apply_command(self, cmd: Any) -> ApplyResult:
        """Apply an already-decoded command (apply() minus index and decoding)."""
        if self.cell is None and not isinstance(cmd, InitCell):
            return ApplyResult(Result(ErrorCode.NOT_INITIALIZED, "cell has no InitCell yet"))
        self.now_ms = max(self.now_ms, cmd.now_ms)
        fx = _Effects(self.now_ms)
        if self.cell is not None:
            self._advance_time(fx)
        mark = fx.mark()
        table = self._request_table(cmd)
        answer = None if table is None else table.admit(cmd.request_no, cmd.answered_below)
        if answer is not None:  # a duplicate (or refused as one): applied no further
            self._settle_acquires(fx)
            return fx.finish(answer)
        handler = self._handlers()[type(cmd)]
        try:
            result = handler(cmd, fx)
        except _Fail as fail:
            fx.rollback(mark)
            result = Result(fail.code, fail.message)
        self._settle_acquires(fx)
        if table is not None and cmd.session_id in self.sessions:
            # Refusals are recorded too: a late duplicate of a refused request
            # must not succeed after its client was told it failed.
            queued = (cmd.handle.handle_id if isinstance(cmd, Acquire) and result.ok
                      and not result.value.granted else None)
            table.record(cmd.request_no, result, queued, self.limits.max_unanswered_requests)
        return fx.finish(result)

    def _request_table(self, cmd: Any) -> RequestTable | None:
        """The request table a numbered command is checked against (None:
        not numbered, or no live session, which its handler refuses)."""
        if type(cmd) not in NUMBERED_TYPES or not cmd.request_no:
            return None
        session = self.sessions.get(cmd.session_id)
        return None if session is None else session.requests

    def _settle_acquires(self, fx: _Effects) -> None:
        """Queued Acquires that ended in this apply answer a retry with their end."""
        for wakeup in fx.wakeups:
            session = self.sessions.get(wakeup.session_id)
            if session is not None:
                session.requests.woken(wakeup.handle_id, wakeup_outcome(
                    wakeup.code, wakeup.lock_generation, wakeup.sequencer))

    def query(self, command: Any) -> Result:
        """Serve a read-only command (a dataclass or its bytes) from applied
        state, without changing anything."""
        if isinstance(command, (bytes, bytearray)):
            try:
                command = decode_command(bytes(command))
            except MalformedCommand as exc:
                return Result(ErrorCode.MALFORMED_COMMAND, str(exc))
        if type(command) not in READ_ONLY_TYPES:
            return Result(ErrorCode.INVALID_ARGUMENT,
                          f"{type(command).__name__} is not a read-only command")
        if self.cell is None:
            return Result(ErrorCode.NOT_INITIALIZED, "cell has no InitCell yet")
        fx = _Effects(max(self.now_ms, command.now_ms))
        try:
            return self._handlers()[type(command)](command, fx)
        except _Fail as fail:
            return Result(fail.code, fail.message)

    def _handlers(self) -> dict[type, Callable[[Any, _Effects], Result]]:
        return {
            InitCell: self._init_cell, CreateSession: self._create_session,
            ExtendLeases: self._extend_leases, EndSession: self._end_session_cmd,
            Tick: self._tick, Open: self._open, Close: self._close,
            GetContentsAndStat: self._get_contents, GetStat: self._get_stat,
            ReadDir: self._read_dir, SetContents: self._set_contents, SetACL: self._set_acl,
            Delete: self._delete, Acquire: self._acquire, TryAcquire: self._try_acquire,
            Release: self._release, GetSequencer: self._get_sequencer,
            SetSequencer: self._set_sequencer, CheckSequencer: self._check_sequencer,
            Rename: self._rename,
        }

    # ================================================================ read accessors

    def stat(self, path: str) -> NodeStat | None:
        instance = self.by_path.get(path)
        return None if instance is None else self._stat(self.nodes[instance])

    def session_lease_ends(self) -> dict[int, int]:
        """session_id -> lease_end_ms of every live session (for failover)."""
        return {sid: self.sessions[sid].lease_end_ms for sid in sorted(self.sessions)}

    def next_deadline_ms(self) -> int | None:
        """The earliest stamped time at which a Tick may change something (a
        lease or a lock-delay ending, the ephemeral sweep; possibly earlier,
        never later): the master proposes a Tick then."""
        # Every lease extension leaves its old end behind in the heap; drop
        # those here, or each would cost the master a needless Tick.
        heap = self._lease_heap
        while heap and (heap[0][1] not in self.sessions
                        or self.sessions[heap[0][1]].lease_end_ms != heap[0][0]):
            heapq.heappop(heap)
        times = [h[0][0] for h in (heap, self._delay_heap, self._path_delay_heap) if h]
        if self.sweep_at_ms:
            times.append(self.sweep_at_ms)
        return min(times) if times else None

    def sessions_expiring_by(self, now_ms: int) -> list[int]:
        """Live sessions whose lease ends at or before `now_ms`, in expiry
        order; walks only the heap entries that are due, not every session."""
        heap, found, todo = self._lease_heap, [], [0]
        while todo:
            i = todo.pop()
            if i < len(heap) and heap[i][0] <= now_ms:
                lease_end, sid = heap[i]
                session = self.sessions.get(sid)
                if session is not None and session.lease_end_ms == lease_end:
                    found.append(heap[i])
                todo += [2 * i + 1, 2 * i + 2]
        return [sid for _, sid in sorted(found)]

    def ephemeral_sweep_paths(self, now_ms: int) -> list[str]:
        """Paths of the ephemeral nodes the sweep deletes if applied at
        `now_ms` (none before it is due), so the master can invalidate their
        cachers first."""
        if not self.sweep_at_ms or now_ms < self.sweep_at_ms:
            return []
        return [node.path for node in self._unrenewed_ephemerals()]

    def session_handle_ids(self, session_id: int) -> tuple[int, ...]:
        session = self.sessions.get(session_id)
        return () if session is None else tuple(sorted(session.handle_ids))

    # ================================================================ time

    def _advance_time(self, fx: _Effects) -> None:
        now = fx.now_ms
        expired: list[int] = []
        while self._lease_heap and self._lease_heap[0][0] <= now:
            lease_end, sid = heapq.heappop(self._lease_heap)
            session = self.sessions.get(sid)
            if session is not None and session.lease_end_ms == lease_end:
                expired.append(sid)
        if expired:  # heap order: (lease_end_ms, session_id)
            self._end_sessions(expired, fx)
        while self._delay_heap and self._delay_heap[0][0] <= now:
            until, instance = heapq.heappop(self._delay_heap)
            node = self.nodes.get(instance)
            if node is not None and node.lock.delay_until_ms == until:
                node.lock.expire_delay(now)
                self._regrant(node, fx)
        while self._path_delay_heap and self._path_delay_heap[0][0] <= now:
            until, path = heapq.heappop(self._path_delay_heap)
            if self.path_delays.get(path) == until:
                del self.path_delays[path]
        if self.sweep_at_ms and now >= self.sweep_at_ms:
            self._sweep_ephemerals(fx)

    def _tick(self, cmd: Tick, fx: _Effects) -> Result:
        if cmd.epoch > self.epoch:
            self._start_epoch(cmd.epoch, cmd.ephemeral_grace_ms, fx)
        return Result(ErrorCode.OK, value=fx.now_ms)

    # ================================================================ master epochs

    def _start_epoch(self, epoch: int, grace_ms: int, fx: _Effects) -> None:
        """A new master: handles on ephemeral nodes must be re-created in this
        epoch (a client re-creates those it still holds) within the grace
        interval, or stop keeping their node alive. One pass over the nodes
        per fail-over. A sweep still pending from an earlier epoch is
        replaced: its handles get the new, full interval."""
        self.epoch = epoch
        self.unconfirmed = set()
        self.sweep_at_ms = 0
        if grace_ms <= 0:
            return
        for instance in sorted(self.nodes):
            node = self.nodes[instance]
            if node.ephemeral:
                self.unconfirmed.update(node.handle_ids)
        if self.unconfirmed:
            self.sweep_at_ms = fx.now_ms + grace_ms

    def _unrenewed_ephemerals(self) -> list[Node]:
        """Ephemeral nodes whose every open handle awaits re-creation."""
        instances = {self.handles[h].instance for h in self.unconfirmed if not self.handles[h].stale}
        return [self.nodes[i] for i in sorted(instances)
                if self.nodes[i].handle_ids <= self.unconfirmed]

    def _sweep_ephemerals(self, fx: _Effects) -> None:
        """The grace interval is over: handles never re-created are closed
        where they alone keep an ephemeral node, as if their session had
        ended for them (the lock goes with its lock-delay: its holder may not
        know), and the node is collected."""
        doomed = self._unrenewed_ephemerals()
        self.unconfirmed = set()
        self.sweep_at_ms = 0
        for node in doomed:
            for handle_id in sorted(node.handle_ids):
                self._close_handle(self.handles[handle_id], fx, session_ending=True)
        for node in doomed:
            if node.instance in self.nodes:
                self._regrant(node, fx)
                self._collect_ephemeral(node, fx)

    def _set_lock_delay(self, node: Node, until_ms: int) -> None:
        if until_ms > node.lock.delay_until_ms:
            node.lock.delay_until_ms = until_ms
            heapq.heappush(self._delay_heap, (until_ms, node.instance))

    # ================================================================ bootstrap, sessions

    def _init_cell(self, cmd: InitCell, fx: _Effects) -> Result:
        if self.cell is not None:
            raise _Fail(ErrorCode.EXISTS, f"cell {self.cell!r} is already initialized")
        try:
            names.check_cell_name(cmd.cell)
        except names.InvalidNameError as exc:
            raise _Fail(ErrorCode.INVALID_NAME, str(exc)) from None
        if not cmd.admins:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, "InitCell needs at least one administrator")
        for admin in cmd.admins:
            self._check_principal(admin)
        if len(cmd.secret) < MIN_SECRET_BYTES:
            raise _Fail(ErrorCode.INVALID_ARGUMENT,
                        f"cell secret must be at least {MIN_SECRET_BYTES} bytes")
        try:
            limits = CellLimits().with_overrides(cmd.limits)
        except ValueError as exc:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        admin_contents = acl_mod.format_acl(cmd.admins)
        if (len(admin_contents) > limits.max_node_bytes
                or limits.max_name_bytes < len(ADMIN_ACL_NAME)
                or limits.max_name_bytes < len(names.ACL_DIRECTORY_NAME)
                or limits.max_path_depth < 2):
            raise _Fail(ErrorCode.INVALID_ARGUMENT,
                        "limits are too small for the bootstrap nodes")
        self.cell = cmd.cell
        self.secret = cmd.secret
        self.admins = frozenset(cmd.admins)
        self.limits = limits
        admin_acl = AclNames(ADMIN_ACL_NAME, ADMIN_ACL_NAME, ADMIN_ACL_NAME)
        root = self._new_node(None, names.cell_root(cmd.cell), True, False, b"", admin_acl)
        acl_dir = self._new_node(root, names.acl_directory(cmd.cell), True, False, b"",
                                 admin_acl)
        self._new_node(acl_dir, names.acl_file_path(cmd.cell, ADMIN_ACL_NAME), False, False,
                       admin_contents, admin_acl)
        return Result(ErrorCode.OK, value=self._stat(root))

    def _create_session(self, cmd: CreateSession, fx: _Effects) -> Result:
        existing = self.session_nonces.get(cmd.nonce) if cmd.nonce else None
        if existing is not None:  # a retry: its first attempt created the session
            return Result(ErrorCode.OK, value=SessionResult(existing, self.sessions[existing].lease_end_ms))
        if cmd.session_id <= self.last_session_id:
            raise _Fail(ErrorCode.INVALID_ARGUMENT,
                        f"session id {cmd.session_id} must exceed every earlier session id "
                        f"({self.last_session_id})")
        if cmd.lease_end_ms <= fx.now_ms:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, "session lease must end after now_ms")
        if len(self.sessions) >= self.limits.max_sessions:
            raise _Fail(ErrorCode.LIMIT_EXCEEDED,
                        f"cell already has {self.limits.max_sessions} sessions")
        self.last_session_id = cmd.session_id
        self.sessions[cmd.session_id] = Session(cmd.session_id, cmd.lease_end_ms, cmd.nonce)
        if cmd.nonce:
            self.session_nonces[cmd.nonce] = cmd.session_id
        heapq.heappush(self._lease_heap, (cmd.lease_end_ms, cmd.session_id))
        return Result(ErrorCode.OK, value=SessionResult(cmd.session_id, cmd.lease_end_ms))

    def _extend_leases(self, cmd: ExtendLeases, fx: _Effects) -> Result:
        # Sessions that ended meanwhile are skipped, not an error: the master
        # batches watermarks and must not lose the whole batch to one of them.
        # So are re-creations of handles that were closed (a closed handle
        # never comes back) or belong to another session.
        for handle_id in sorted(cmd.renew):
            handle = self.handles.get(handle_id)
            if handle is not None and handle.session_id == cmd.renew[handle_id]:
                self.unconfirmed.discard(handle_id)
        unknown = []
        for sid in sorted(cmd.leases):
            session = self.sessions.get(sid)
            if session is None:
                unknown.append(sid)
            elif cmd.leases[sid] > session.lease_end_ms:
                session.lease_end_ms = cmd.leases[sid]
                heapq.heappush(self._lease_heap, (session.lease_end_ms, sid))
        return Result(ErrorCode.OK, value=tuple(unknown))

    def _end_session_cmd(self, cmd: EndSession, fx: _Effects) -> Result:
        self._require_session(cmd.session_id, fx)
        self._end_sessions([cmd.session_id], fx)
        return Result(ErrorCode.OK)

    def _end_sessions(self, sids: list[int], fx: _Effects) -> None:
        """Close every handle of the sessions, release their locks with their
        lock-delay, drop their queued Acquires and delete the ephemeral nodes
        no one else has open: all within this one apply."""
        touched: dict[int, Node] = {}
        for sid in sids:
            session = self.sessions[sid]
            for handle_id in sorted(session.handle_ids):
                node = self._close_handle(self.handles[handle_id], fx, session_ending=True)
                if node is not None:
                    touched[node.instance] = node
            del self.sessions[sid]
            self.session_nonces.pop(session.nonce, None)
            fx.ended_sessions.append(sid)
        # Grants only once every ending session is gone, so none goes to a
        # session that ends in this same apply.
        for instance in sorted(touched):
            node = self.nodes.get(instance)
            if node is not None:
                self._regrant(node, fx)
                self._collect_ephemeral(node, fx)

    def _require_session(self, sid: int, fx: _Effects) -> Session:
        session = self.sessions.get(sid)
        if session is None or session.lease_end_ms <= fx.now_ms:
            raise _Fail(ErrorCode.SESSION_EXPIRED, f"session {sid} does not exist or has ended")
        return session

    # ================================================================ helpers

    def _check_principal(self, principal: str) -> None:
        try:
            acl_mod.check_principal(principal)
        except ValueError as exc:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def _split(self, path: str) -> tuple[str, ...]:
        assert self.cell is not None
        try:
            return names.split_path(path, self.cell, self.limits.max_name_bytes,
                                    self.limits.max_path_depth)
        except names.InvalidNameError as exc:
            raise _Fail(ErrorCode.INVALID_NAME, str(exc)) from None

    def _take_generation(self) -> int:
        self.generation_counter += 1
        return self.generation_counter

    def _acl_principals(self, acl_name: str) -> frozenset[str]:
        assert self.cell is not None
        instance = self.by_path.get(names.acl_file_path(self.cell, acl_name))
        if instance is None:
            return frozenset()
        node = self.nodes[instance]
        if node.is_directory:
            return frozenset()
        if node.acl_cache is None or node.acl_cache[0] != node.content_generation:
            node.acl_cache = (node.content_generation, acl_mod.parse_acl(node.contents))
        return node.acl_cache[1]

    def _allowed(self, principal: str, acl: AclNames, kind: AclKind) -> bool:
        if principal in self.admins:
            return True
        return acl_mod.admits(self._acl_principals(acl.for_kind(kind)), principal)

    def _require_acl(self, principal: str, node: Node, kind: AclKind) -> None:
        if not self._allowed(principal, node.acl, kind):
            raise _Fail(ErrorCode.PERMISSION_DENIED,
                        f"{principal!r} is not in the {kind.name.lower()} ACL "
                        f"{node.acl.for_kind(kind)!r} of {node.path}")

    def _require_intent_acls(self, principal: str, acl: AclNames, intent: int, path: str) -> None:
        for bit, kind in _INTENT_ACL:
            if intent & bit and not self._allowed(principal, acl, kind):
                raise _Fail(ErrorCode.PERMISSION_DENIED,
                            f"{principal!r} may not open {path} for {bit.name.lower()} "
                            f"(ACL {acl.for_kind(kind)!r})")

    def _validate_acl_names(self, acl_names: tuple[str, ...]) -> AclNames:
        if len(acl_names) != 3:
            raise _Fail(ErrorCode.INVALID_ARGUMENT,
                        "ACL names must be (read, write, change_acl)")
        for acl_name in acl_names:
            try:
                names.check_component(acl_name, self.limits.max_name_bytes)
            except names.InvalidNameError as exc:
                raise _Fail(ErrorCode.INVALID_NAME, f"ACL name: {exc}") from None
        return AclNames(*acl_names)

    def _is_protected(self, node: Node) -> bool:
        assert self.cell is not None
        return node.path in (names.cell_root(self.cell), names.acl_directory(self.cell))

    def _stat(self, node: Node) -> NodeStat:
        return NodeStat(node.path, node.instance, node.is_directory, node.ephemeral,
                        node.content_generation, node.lock.generation, node.acl_generation,
                        node.checksum, len(node.contents), node.acl.read, node.acl.write,
                        node.acl.change_acl, len(node.children))

    def _notify(self, node: Node, kind: EventKind, fx: _Effects, name: str = "",
                only: Any = None) -> None:
        for handle_id in sorted(node.handle_ids if only is None else only):
            handle = self.handles[handle_id]
            if handle.events & kind:
                fx.events.append(Event(kind, handle.session_id, handle_id, node.path, name))

    def _notify_parent(self, node: Node, kind: EventKind, fx: _Effects) -> None:
        parent = self.nodes.get(node.parent_instance)
        if parent is not None:
            self._notify(parent, kind, fx, names.base_name(node.path))
            fx.invalidated.add(parent.path)

    def _sequencer_for(self, node: Node, mode: LockMode) -> str:
        assert self.cell is not None
        return Sequencer(self.cell, node.path, node.instance, mode, node.lock.generation).encode()

    def _sequencer_problem(self, text: str) -> str | None:
        """None if the sequencer is valid now, else why not."""
        try:
            seq = Sequencer.decode(text)
        except SequencerError as exc:
            raise _Fail(ErrorCode.BAD_SEQUENCER, str(exc)) from None
        if seq.cell != self.cell:
            return f"sequencer is for cell {seq.cell!r}, not {self.cell!r}"
        instance = self.by_path.get(seq.path)
        if instance is None:
            return f"{seq.path} no longer exists"
        node = self.nodes[instance]
        if node.instance != seq.instance:
            return f"{seq.path} was deleted and created again"
        if node.lock.generation != seq.lock_generation:
            return f"lock generation is now {node.lock.generation}"
        if node.lock.held_mode() != seq.mode:
            return f"lock is no longer held in {seq.mode.name.lower()} mode"
        return None

    # ================================================================ nodes

    def _new_node(self, parent: Node | None, path: str, is_directory: bool, ephemeral: bool,
                  contents: bytes, acl: AclNames) -> Node:
        instance = self.next_instance
        self.next_instance += 1
        generation = self._take_generation()
        node = Node(instance, 0 if parent is None else parent.instance, path, is_directory,
                    ephemeral, contents, generation, generation, acl)
        self.nodes[instance] = node
        self.by_path[path] = instance
        if parent is not None:
            parent.children[names.base_name(path)] = instance
        inherited_delay = self.path_delays.pop(path, 0)
        if inherited_delay > self.now_ms:
            self._set_lock_delay(node, inherited_delay)
        return node

    def _remove_node(self, node: Node, fx: _Effects) -> None:
        """Delete a node with no children: its handles become stale, its queued
        Acquires fail, watchers of it and of its parent hear about it."""
        if node.children:
            raise InvariantViolation(f"removing {node.path} with children")
        lock = node.lock
        for handle_id, _mode in list(lock.waiters):
            handle = self.handles[handle_id]
            handle.waiting_mode = None
            fx.wakeups.append(LockWakeup(handle.session_id, handle_id, ErrorCode.STALE_HANDLE))
        lock.waiters.clear()
        for handle_id in sorted(lock.holders):
            self.handles[handle_id].held_mode = None
        lock.holders.clear()
        if lock.delay_until_ms > self.now_ms:
            until = max(self.path_delays.get(node.path, 0), lock.delay_until_ms)
            self.path_delays[node.path] = until
            heapq.heappush(self._path_delay_heap, (until, node.path))
        self._notify(node, EventKind.HANDLE_INVALID, fx)
        for handle_id in node.handle_ids:
            self.handles[handle_id].stale = True
        node.handle_ids.clear()
        parent = self.nodes[node.parent_instance]
        del parent.children[names.base_name(node.path)]
        del self.by_path[node.path]
        del self.nodes[node.instance]
        self._seen_lock_generations.pop(node.instance, None)
        fx.invalidated.add(node.path)
        self._notify_parent(node, EventKind.CHILD_REMOVED, fx)

    def _collect_ephemeral(self, node: Node | None, fx: _Effects) -> None:
        """Delete ephemeral nodes nobody has open (directories only once
        empty), walking up as parents become empty in turn."""
        while (node is not None and node.instance in self.nodes and node.ephemeral
               and not node.handle_ids and not node.children):
            parent = self.nodes.get(node.parent_instance)
            self._remove_node(node, fx)
            node = parent

    # ================================================================ handles

    def _resolve(self, cmd: Any, fx: _Effects, intent: Intent | None = None,
                 acl: AclKind | None = None, allow_stale: bool = False,
                 check_sequencer: bool = True) -> tuple[HandleRecord, Node | None]:
        """Check session, check digits, ownership, staleness, the handle's
        sequencer, the intent it was opened with and the principal's ACL."""
        self._check_principal(cmd.principal)
        self._require_session(cmd.session_id, fx)
        ref: HandleRef = cmd.handle
        if not ref_is_authentic(self.secret, ref):
            raise _Fail(ErrorCode.BAD_HANDLE, "handle check digits do not match")
        handle = self.handles.get(ref.handle_id)
        if handle is None or not handle.matches(ref):
            raise _Fail(ErrorCode.BAD_HANDLE, f"handle {ref.handle_id} is closed or unknown")
        if handle.session_id != cmd.session_id:
            raise _Fail(ErrorCode.BAD_HANDLE, "handle belongs to another session")
        if handle.stale:
            if allow_stale:
                return handle, None
            raise _Fail(ErrorCode.STALE_HANDLE, "the handle's node was deleted")
        node = self.nodes[handle.instance]
        if check_sequencer and handle.sequencer is not None:
            problem = self._sequencer_problem(handle.sequencer)
            if problem is not None:
                raise _Fail(ErrorCode.BAD_SEQUENCER, f"handle's sequencer is invalid: {problem}")
        if intent is not None and not handle.intent & intent:
            raise _Fail(ErrorCode.PERMISSION_DENIED,
                        f"handle was not opened for {intent.name.lower()}")
        if acl is not None:
            self._require_acl(cmd.principal, node, acl)
        return handle, node

    def _open(self, cmd: Open, fx: _Effects) -> Result:
        self._check_principal(cmd.principal)
        session = self._require_session(cmd.session_id, fx)
        if cmd.intent == 0 or cmd.intent & ~int(ALL_INTENTS):
            raise _Fail(ErrorCode.INVALID_ARGUMENT, f"invalid intent {cmd.intent}")
        if cmd.events & ~int(ALL_EVENTS):
            raise _Fail(ErrorCode.INVALID_ARGUMENT, f"invalid event mask {cmd.events}")
        lock_delay_ms = DEFAULT_LOCK_DELAY_MS if cmd.lock_delay_ms is None else cmd.lock_delay_ms
        try:
            check_lock_delay_ms(lock_delay_ms)
        except ValueError as exc:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        components = self._split(cmd.path)
        if len(session.handle_ids) >= self.limits.max_handles_per_session:
            raise _Fail(ErrorCode.LIMIT_EXCEEDED,
                        f"session has {self.limits.max_handles_per_session} handles open")
        existing = self.by_path.get(cmd.path)
        created = False
        if existing is not None:
            node = self.nodes[existing]
            if cmd.create != CreateMode.NONE and cmd.exclusive:
                raise _Fail(ErrorCode.EXISTS, f"{cmd.path} exists")
            if cmd.create == CreateMode.FILE and node.is_directory:
                raise _Fail(ErrorCode.IS_A_DIRECTORY, f"{cmd.path} is a directory")
            if cmd.create == CreateMode.DIRECTORY and not node.is_directory:
                raise _Fail(ErrorCode.NOT_A_DIRECTORY, f"{cmd.path} is a file")
            self._require_intent_acls(cmd.principal, node.acl, cmd.intent, cmd.path)
        else:
            if cmd.create == CreateMode.NONE:
                raise _Fail(ErrorCode.NOT_FOUND, f"{cmd.path} does not exist")
            assert components  # the root always exists once initialized
            parent_path = names.parent_of(cmd.path)
            parent_instance = self.by_path.get(parent_path)
            if parent_instance is None:
                raise _Fail(ErrorCode.NOT_FOUND, f"parent directory {parent_path} does not exist")
            parent = self.nodes[parent_instance]
            if not parent.is_directory:
                raise _Fail(ErrorCode.NOT_A_DIRECTORY, f"{parent_path} is a file")
            if len(parent.children) >= self.limits.max_children_per_directory:
                raise _Fail(ErrorCode.LIMIT_EXCEEDED,
                            f"{parent_path} has {self.limits.max_children_per_directory} children")
            self._require_acl(cmd.principal, parent, AclKind.WRITE)
            is_directory = cmd.create == CreateMode.DIRECTORY
            if is_directory and cmd.contents:
                raise _Fail(ErrorCode.INVALID_ARGUMENT, "a directory has no contents")
            if len(cmd.contents) > self.limits.max_node_bytes:
                raise _Fail(ErrorCode.TOO_LARGE,
                            f"contents of {len(cmd.contents)} bytes exceed "
                            f"{self.limits.max_node_bytes}")
            acl = parent.acl if not cmd.acl else self._validate_acl_names(cmd.acl)
            self._require_intent_acls(cmd.principal, acl, cmd.intent, cmd.path)
            node = self._new_node(parent, cmd.path, is_directory, cmd.ephemeral, cmd.contents,
                                  acl)
            created = True
            fx.invalidated.add(node.path)
            self._notify_parent(node, EventKind.CHILD_ADDED, fx)
        handle_id = self.next_handle_id
        self.next_handle_id += 1
        handle = HandleRecord(handle_id, cmd.session_id, node.instance, cmd.epoch, cmd.intent,
                              cmd.events, lock_delay_ms)
        self.handles[handle_id] = handle
        session.handle_ids.add(handle_id)
        node.handle_ids.add(handle_id)
        ref = make_ref(self.secret, handle_id, cmd.session_id, node.instance, cmd.epoch,
                       cmd.intent)
        return Result(ErrorCode.OK, value=OpenResult(ref, created, self._stat(node)))

    def _close_handle(self, handle: HandleRecord, fx: _Effects,
                      session_ending: bool) -> Node | None:
        """Forget a handle; returns its node (if any) for the caller to regrant
        its lock and collect it if ephemeral. A session that ends leaves the
        lock under lock-delay; an explicit Close releases it at once."""
        node = None
        if not handle.stale:
            node = self.nodes[handle.instance]
            if handle.waiting_mode is not None:
                node.lock.remove_waiter(handle.handle_id)
                handle.waiting_mode = None
                code = ErrorCode.SESSION_EXPIRED if session_ending else ErrorCode.CANCELLED
                fx.wakeups.append(LockWakeup(handle.session_id, handle.handle_id, code))
            if handle.held_mode is not None:
                delay_ms = handle.lock_delay_ms if session_ending else 0
                node.lock.release(handle.handle_id, fx.now_ms)
                if delay_ms:
                    self._set_lock_delay(node, fx.now_ms + delay_ms)
                handle.held_mode = None
            node.handle_ids.discard(handle.handle_id)
        self.sessions[handle.session_id].handle_ids.discard(handle.handle_id)
        self.unconfirmed.discard(handle.handle_id)
        del self.handles[handle.handle_id]
        return node

    def _close(self, cmd: Close, fx: _Effects) -> Result:
        handle, _ = self._resolve(cmd, fx, allow_stale=True, check_sequencer=False)
        node = self._close_handle(handle, fx, session_ending=False)
        if node is not None:
            self._regrant(node, fx)
            self._collect_ephemeral(node, fx)
        return Result(ErrorCode.OK)

    # ================================================================ contents, metadata

    def _get_contents(self, cmd: GetContentsAndStat, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.READ, AclKind.READ)
        assert node is not None
        if node.is_directory:
            raise _Fail(ErrorCode.IS_A_DIRECTORY, f"{node.path} is a directory")
        return Result(ErrorCode.OK, value=ContentsResult(node.contents, self._stat(node)))

    def _get_stat(self, cmd: GetStat, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.READ, AclKind.READ)
        assert node is not None
        return Result(ErrorCode.OK, value=self._stat(node))

    def _read_dir(self, cmd: ReadDir, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.READ, AclKind.READ)
        assert node is not None
        if not node.is_directory:
            raise _Fail(ErrorCode.NOT_A_DIRECTORY, f"{node.path} is a file")
        entries = tuple(DirEntry(name, self._stat(self.nodes[node.children[name]]))
                        for name in sorted(node.children))
        return Result(ErrorCode.OK, value=ReadDirResult(entries))

    def _set_contents(self, cmd: SetContents, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.WRITE, AclKind.WRITE)
        assert node is not None
        if node.is_directory:
            raise _Fail(ErrorCode.IS_A_DIRECTORY, f"{node.path} is a directory")
        if len(cmd.contents) > self.limits.max_node_bytes:
            raise _Fail(ErrorCode.TOO_LARGE, f"contents of {len(cmd.contents)} bytes exceed "
                                             f"{self.limits.max_node_bytes}")
        if cmd.expected_generation is not None and \
                cmd.expected_generation != node.content_generation:
            raise _Fail(ErrorCode.CAS_MISMATCH,
                        f"content generation is {node.content_generation}, "
                        f"not {cmd.expected_generation}")
        node.contents = cmd.contents
        node.checksum = checksum64(cmd.contents)
        node.content_generation = self._take_generation()
        fx.invalidated.add(node.path)
        self._notify(node, EventKind.CONTENTS_MODIFIED, fx)
        self._notify_parent(node, EventKind.CHILD_MODIFIED, fx)
        return Result(ErrorCode.OK, value=self._stat(node))

    def _set_acl(self, cmd: SetACL, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.CHANGE_ACL, AclKind.CHANGE_ACL)
        assert node is not None
        new_acl = self._validate_acl_names((cmd.read, cmd.write, cmd.change_acl))
        if new_acl != node.acl:
            node.acl = new_acl
            node.acl_generation = self._take_generation()
            fx.invalidated.add(node.path)
            self._notify_parent(node, EventKind.CHILD_MODIFIED, fx)
        return Result(ErrorCode.OK, value=self._stat(node))

    def _delete(self, cmd: Delete, fx: _Effects) -> Result:
        _, node = self._resolve(cmd, fx, Intent.WRITE, AclKind.WRITE)
        assert node is not None
        if self._is_protected(node):
            raise _Fail(ErrorCode.INVALID_ARGUMENT, f"{node.path} cannot be deleted")
        if node.children:
            raise _Fail(ErrorCode.NOT_EMPTY, f"{node.path} has {len(node.children)} children")
        parent = self.nodes[node.parent_instance]
        self._remove_node(node, fx)
        self._collect_ephemeral(parent, fx)
        return Result(ErrorCode.OK)

    def _rename(self, cmd: Rename, fx: _Effects) -> Result:
        self._check_principal(cmd.principal)
        self._require_session(cmd.session_id, fx)
        src_components = self._split(cmd.src_path)
        dst_components = self._split(cmd.dst_path)
        if not src_components or not dst_components:
            raise _Fail(ErrorCode.INVALID_ARGUMENT, "the cell root cannot be renamed")
        if src_components[:-1] != dst_components[:-1]:
            raise _Fail(ErrorCode.INVALID_ARGUMENT,
                        "rename only works within one directory")
        src_instance = self.by_path.get(cmd.src_path)
        if src_instance is None:
            raise _Fail(ErrorCode.NOT_FOUND, f"{cmd.src_path} does not exist")
        node = self.nodes[src_instance]
        if self._is_protected(node):
            raise _Fail(ErrorCode.INVALID_ARGUMENT, f"{node.path} cannot be renamed")
        parent = self.nodes[node.parent_instance]
        self._require_acl(cmd.principal, parent, AclKind.WRITE)
        self._require_acl(cmd.principal, node, AclKind.WRITE)
        if cmd.src_path == cmd.dst_path:
            return Result(ErrorCode.OK, value=self._stat(node))
        target_instance = self.by_path.get(cmd.dst_path)
        target = None if target_instance is None else self.nodes[target_instance]
        if target is not None:
            if self._is_protected(target):
                raise _Fail(ErrorCode.INVALID_ARGUMENT, f"{target.path} cannot be replaced")
            if node.is_directory and not target.is_directory:
                raise _Fail(ErrorCode.NOT_A_DIRECTORY, f"{target.path} is a file")
            if not node.is_directory and target.is_directory:
                raise _Fail(ErrorCode.IS_A_DIRECTORY, f"{target.path} is a directory")
            if target.children:
                raise _Fail(ErrorCode.NOT_EMPTY, f"{target.path} is not empty")
            self._require_acl(cmd.principal, target, AclKind.WRITE)
        # -- validated; mutate.
        if target is not None:
            self._remove_node(target, fx)
        self._notify_parent(node, EventKind.CHILD_REMOVED, fx)
        del parent.children[names.base_name(node.path)]
        parent.children[names.base_name(cmd.dst_path)] = node.instance
        self._move_subtree(node, cmd.src_path, cmd.dst_path, fx)
        # The moved node now answers to the target's name: like a node newly
        # created there, it inherits any lock-delay the replaced target left.
        inherited = self.path_delays.pop(cmd.dst_path, 0)
        if inherited > fx.now_ms:
            self._set_lock_delay(node, inherited)
        self._notify_parent(node, EventKind.CHILD_ADDED, fx)
        return Result(ErrorCode.OK, value=self._stat(node))

    def _move_subtree(self, node: Node, old_prefix: str, new_prefix: str, fx: _Effects) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            old_path = current.path
            new_path = new_prefix + old_path[len(old_prefix):]
            del self.by_path[old_path]
            self.by_path[new_path] = current.instance
            current.path = new_path
            fx.invalidated.add(old_path)
            fx.invalidated.add(new_path)
            stack.extend(self.nodes[current.children[name]] for name in sorted(current.children))

    # ================================================================ locks

    def _grant(self, node: Node, handle: HandleRecord, mode: LockMode, fx: _Effects) -> int:
        lock = node.lock
        newly_held = lock.is_free()
        generation = lock.grant(handle.handle_id, mode,
                                self._take_generation() if newly_held else 0)
        handle.held_mode = mode
        if newly_held:
            fx.invalidated.add(node.path)  # the lock generation is metadata
            self._notify(node, EventKind.LOCK_ACQUIRED, fx)
        return generation

    def _regrant(self, node: Node, fx: _Effects) -> None:
        """Grant the waiters at the head of the queue that can run now."""
        for handle_id, mode in node.lock.pop_grantable(fx.now_ms):
            handle = self.handles[handle_id]
            handle.waiting_mode = None
            generation = self._grant(node, handle, mode, fx)
            fx.wakeups.append(LockWakeup(handle.session_id, handle_id, ErrorCode.OK, generation,
                                         self._sequencer_for(node, mode)))

    def _acquire_common(self, cmd: Acquire | TryAcquire, fx: _Effects,
                        blocking: bool) -> Result:
        handle, node = self._resolve(cmd, fx, Intent.LOCK, AclKind.WRITE)
        assert node is not None
        # A repeated request in the same mode answers as the first one did:
        # a client that lost its master mid-call retries at the next one and
        # must neither fail nor queue twice.
        if handle.held_mode is not None:
            if handle.held_mode == cmd.mode:
                return Result(ErrorCode.OK, value=LockResult(True, node.lock.generation,
                                                             self._sequencer_for(node, cmd.mode)))
            raise _Fail(ErrorCode.LOCK_HELD, "this handle already holds the lock in another mode")
        if handle.waiting_mode is not None:
            if blocking and handle.waiting_mode == cmd.mode:
                return Result(ErrorCode.OK, value=LockResult(False))
            raise _Fail(ErrorCode.INVALID_ARGUMENT, "this handle already waits for the lock")
        lock = node.lock
        if lock.can_grant_now(cmd.mode, fx.now_ms):
            generation = self._grant(node, handle, cmd.mode, fx)
            return Result(ErrorCode.OK, value=LockResult(True, generation,
                                                         self._sequencer_for(node, cmd.mode)))
        if not blocking:
            if lock.in_delay(fx.now_ms):
                reason = f"in lock-delay until {lock.delay_until_ms} ms"
            elif lock.holders:
                reason = f"held {lock.held_mode().name.lower()}"  # type: ignore[union-attr]
            else:
                reason = f"{len(lock.waiters)} requests are queued"
            raise _Fail(ErrorCode.LOCK_HELD, f"lock on {node.path} is {reason}")
        if len(lock.waiters) >= self.limits.max_waiters_per_lock:
            raise _Fail(ErrorCode.LIMIT_EXCEEDED,
                        f"{self.limits.max_waiters_per_lock} requests already wait for this lock")
        lock.enqueue(handle.handle_id, cmd.mode)
        handle.waiting_mode = cmd.mode
        self._notify(node, EventKind.CONFLICTING_LOCK, fx, only=lock.holders)
        return Result(ErrorCode.OK, value=LockResult(False))

    def _acquire(self, cmd: Acquire, fx: _Effects) -> Result:
        return self._acquire_common(cmd, fx, blocking=True)

    def _try_acquire(self, cmd: TryAcquire, fx: _Effects) -> Result:
        return self._acquire_common(cmd, fx, blocking=False)

    def _release(self, cmd: Release, fx: _Effects) -> Result:
        # No ACL check: giving a lock up must work even after losing write access.
        handle, node = self._resolve(cmd, fx, Intent.LOCK)
        assert node is not None
        if handle.held_mode is not None:
            node.lock.release(handle.handle_id, fx.now_ms)
            handle.held_mode = None
            self._regrant(node, fx)
            return Result(ErrorCode.OK)
        if handle.waiting_mode is not None:
            node.lock.remove_waiter(handle.handle_id)
            handle.waiting_mode = None
            fx.wakeups.append(LockWakeup(handle.session_id, handle.handle_id, ErrorCode.CANCELLED))
            # Leaving the head of the queue may let those behind in.
            self._regrant(node, fx)
            return Result(ErrorCode.OK)
        raise _Fail(ErrorCode.LOCK_NOT_HELD, "this handle neither holds nor waits for the lock")

    def _get_sequencer(self, cmd: GetSequencer, fx: _Effects) -> Result:
        handle, node = self._resolve(cmd, fx, Intent.LOCK)
        assert node is not None
        if handle.held_mode is None:
            raise _Fail(ErrorCode.LOCK_NOT_HELD, "this handle does not hold the lock")
        return Result(ErrorCode.OK, value=SequencerResult(self._sequencer_for(node,
                                                                              handle.held_mode)))

    def _set_sequencer(self, cmd: SetSequencer, fx: _Effects) -> Result:
        handle, _ = self._resolve(cmd, fx, check_sequencer=False)
        problem = self._sequencer_problem(cmd.sequencer)
        if problem is not None:
            raise _Fail(ErrorCode.BAD_SEQUENCER, problem)
        handle.sequencer = cmd.sequencer
        return Result(ErrorCode.OK)

    def _check_sequencer(self, cmd: CheckSequencer, fx: _Effects) -> Result:
        problem = self._sequencer_problem(cmd.sequencer)
        return Result(ErrorCode.OK, value=CheckResult(problem is None, problem or ""))

    # ================================================================ snapshot

    def snapshot(self) -> bytes:
        """Canonical msgpack of the whole state: equal states, equal bytes."""
        nodes = []
        for instance in sorted(self.nodes):
            n = self.nodes[instance]
            lock = n.lock
            nodes.append([
                n.instance, n.parent_instance, n.path, n.is_directory, n.ephemeral, n.contents,
                n.content_generation, n.acl_generation, list(n.acl.as_tuple()),
                lock.generation, [[h, int(lock.holders[h])] for h in sorted(lock.holders)],
                [[h, int(m)] for h, m in lock.waiters], lock.delay_until_ms,
            ])
        state = [
            SNAPSHOT_VERSION, self.applied_index, self.cell, self.secret, sorted(self.admins),
            sorted(self.limits.to_wire().items()), self.now_ms, self.next_instance,
            self.generation_counter, self.next_handle_id, self.last_session_id, nodes,
            [self._session_to_wire(self.sessions[sid]) for sid in sorted(self.sessions)],
            [self.handles[h].to_wire() for h in sorted(self.handles)],
            sorted([path, until] for path, until in self.path_delays.items()),
            self.epoch, self.sweep_at_ms, sorted(self.unconfirmed),
        ]
        return msgpack.packb(state, use_bin_type=True)

    @staticmethod
    def _session_to_wire(session: Session) -> list:
        return [session.session_id, session.lease_end_ms, session.nonce, session.requests.to_wire()]

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's. On SnapshotError the
        current state is left as it was."""
        fresh = CellStateMachine()
        try:
            state = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if (not isinstance(state, list) or not state
                    or _SNAPSHOT_FIELDS.get(state[0]) != len(state)):
                raise SnapshotError("not a cell snapshot of a known version")
            fresh._restore_fields(state)
            fresh.assert_invariants()
        except SnapshotError:
            raise
        except Exception as exc:  # malformed or inconsistent content of any shape
            raise SnapshotError(f"bad cell snapshot: {type(exc).__name__}: {exc}") from None
        self.__dict__.update(fresh.__dict__)

    def _restore_fields(self, state: list) -> None:
        (_, applied_index, cell, secret, admins, limits, now_ms, next_instance,
         generation_counter, next_handle_id, last_session_id, nodes, sessions, handles,
         path_delays) = state[:15]
        self._reset()
        if len(state) > 15:  # version 2
            epoch, sweep_at_ms, unconfirmed = state[15:]
            self.epoch = int(epoch)
            self.sweep_at_ms = int(sweep_at_ms)
            self.unconfirmed = {int(h) for h in unconfirmed}
        self.applied_index = applied_index
        self.cell = cell
        self.secret = secret
        self.admins = frozenset(admins)
        self.limits = CellLimits().with_overrides(dict(limits))
        self.now_ms = now_ms
        self.next_instance = next_instance
        self.generation_counter = generation_counter
        self.next_handle_id = next_handle_id
        self.last_session_id = last_session_id
        for (instance, parent_instance, path, is_directory, ephemeral, contents, content_gen,
             acl_gen, acl, lock_gen, holders, waiters, delay_until) in nodes:
            node = Node(instance, parent_instance, path, is_directory, ephemeral, contents,
                        content_gen, acl_gen, AclNames(*acl))
            node.lock.generation = lock_gen
            node.lock.holders = {h: LockMode(m) for h, m in holders}
            node.lock.waiters.extend((h, LockMode(m)) for h, m in waiters)
            node.lock.delay_until_ms = delay_until
            if delay_until:
                heapq.heappush(self._delay_heap, (delay_until, instance))
            self.nodes[instance] = node
            self.by_path[path] = instance
        for node in self.nodes.values():
            if node.parent_instance:
                self.nodes[node.parent_instance].children[names.base_name(node.path)] = \
                    node.instance
        for wire in sessions:
            session = self._session_from_wire(state[0], wire)
            self.sessions[session.session_id] = session
            if session.nonce:
                self.session_nonces[session.nonce] = session.session_id
            heapq.heappush(self._lease_heap, (session.lease_end_ms, session.session_id))
        for wire in handles:
            handle = HandleRecord.from_wire(wire)
            self.handles[handle.handle_id] = handle
            self.sessions[handle.session_id].handle_ids.add(handle.handle_id)
            if not handle.stale:
                self.nodes[handle.instance].handle_ids.add(handle.handle_id)
        for path, until in path_delays:
            self.path_delays[path] = until
            heapq.heappush(self._path_delay_heap, (until, path))

    @staticmethod
    def _session_from_wire(version: int, wire: list) -> Session:
        if version < 3:  # before request numbers: nothing to remember yet
            sid, lease_end = wire
            return Session(sid, lease_end)
        sid, lease_end, nonce, requests = wire
        session = Session(sid, lease_end, nonce)
        session.requests = RequestTable.from_wire(requests)
        return session

    # ================================================================ invariants

    def assert_invariants(self) -> None:
        """Raise InvariantViolation if the state is inconsistent. O(state)."""

        def check(condition: bool, message: str) -> None:
            if not condition:
                raise InvariantViolation(message)

        now = self.now_ms
        if self.cell is None:
            check(not self.nodes and not self.sessions and not self.handles,
                  "state before InitCell")
            return
        limits = self.limits
        root_path = names.cell_root(self.cell)
        check(root_path in self.by_path, "cell root missing")
        check(len(self.by_path) == len(self.nodes), "path index and node table differ in size")
        for path, instance in self.by_path.items():
            check(instance in self.nodes and self.nodes[instance].path == path,
                  f"path index entry {path} is wrong")
        for instance, node in self.nodes.items():
            check(0 < instance < self.next_instance, f"instance {instance} out of range")
            if node.path == root_path:
                check(node.parent_instance == 0 and node.is_directory, "bad root")
            else:
                parent = self.nodes.get(node.parent_instance)
                check(parent is not None and parent.is_directory,
                      f"{node.path} has no parent directory")
                assert parent is not None
                check(names.parent_of(node.path) == parent.path, f"{node.path} path/parent differ")
                check(parent.children.get(names.base_name(node.path)) == instance,
                      f"{node.path} missing from its parent's children")
            for name, child in node.children.items():
                check(child in self.nodes and self.nodes[child].parent_instance == instance,
                      f"{node.path} lists a foreign child {name}")
            check(len(node.children) <= limits.max_children_per_directory,
                  f"{node.path} has too many children")
            check(not node.children or node.is_directory, f"file {node.path} has children")
            check(not (node.is_directory and node.contents), f"directory {node.path} has contents")
            check(len(node.contents) <= limits.max_node_bytes, f"{node.path} is too large")
            check(node.checksum == checksum64(node.contents), f"{node.path} checksum mismatch")
            check(0 < node.content_generation <= self.generation_counter
                  and 0 < node.acl_generation <= self.generation_counter,
                  f"{node.path} generation out of range")
            if node.ephemeral:
                check(bool(node.handle_ids) or bool(node.children),
                      f"ephemeral {node.path} has no open handle")
            self._check_lock(node, now, check)
            for handle_id in node.handle_ids:
                handle = self.handles.get(handle_id)
                check(handle is not None and not handle.stale and handle.instance == instance,
                      f"{node.path} lists a bad handle {handle_id}")
        for sid, session in self.sessions.items():
            check(0 < sid <= self.last_session_id, f"session id {sid} out of range")
            check(session.lease_end_ms > now, f"session {sid} outlived its lease")
            check(len(session.handle_ids) <= limits.max_handles_per_session,
                  f"session {sid} has too many handles")
            for handle_id in session.handle_ids:
                check(handle_id in self.handles and self.handles[handle_id].session_id == sid,
                      f"session {sid} lists a foreign handle {handle_id}")
            self._check_requests(session, check)
        check(all(self.sessions.get(sid) is not None and self.sessions[sid].nonce == nonce
                  for nonce, sid in self.session_nonces.items())
              and len(self.session_nonces) == sum(1 for s in self.sessions.values() if s.nonce),
              "the session nonce index disagrees with the sessions")
        for handle_id, handle in self.handles.items():
            check(0 < handle_id < self.next_handle_id, f"handle {handle_id} out of range")
            session = self.sessions.get(handle.session_id)
            check(session is not None and handle_id in session.handle_ids,
                  f"handle {handle_id} is owned by ended session {handle.session_id}")
            if handle.stale:
                check(handle.instance not in self.nodes, f"stale handle {handle_id} has a node")
                check(handle.held_mode is None and handle.waiting_mode is None,
                      f"stale handle {handle_id} holds or waits")
            else:
                node = self.nodes.get(handle.instance)
                check(node is not None and handle_id in node.handle_ids,
                      f"handle {handle_id} names a missing node instance")
        for path, until in self.path_delays.items():
            check(until > now and path not in self.by_path, f"bad leftover lock-delay at {path}")
        check(self.unconfirmed <= self.handles.keys(), "a closed handle awaits re-creation")
        check(bool(self.sweep_at_ms) or not self.unconfirmed,
              "handles await re-creation but no ephemeral sweep is due")
        check(self.sweep_at_ms == 0 or self.sweep_at_ms > now, "the ephemeral sweep is overdue")

    def _check_requests(self, session: Session, check: Callable[[bool, str], None]) -> None:
        for problem in session.requests.problems(self.limits.max_unanswered_requests):
            check(False, f"session {session.session_id}: {problem}")
        for handle_id in session.requests.waiting:
            handle = self.handles.get(handle_id)
            check(handle is not None and handle.session_id == session.session_id
                  and handle.waiting_mode is not None,
                  f"session {session.session_id}: handle {handle_id} has a recorded queued Acquire "
                  "but does not wait")

    def _check_lock(self, node: Node, now: int, check: Callable[[bool, str], None]) -> None:
        lock = node.lock
        try:
            lock.assert_invariants()
        except AssertionError as exc:
            raise InvariantViolation(f"{node.path}: {exc}") from None
        check(lock.generation <= self.generation_counter, f"{node.path} lock generation too big")
        previous = self._seen_lock_generations.get(node.instance, 0)
        check(lock.generation >= previous, f"{node.path} lock generation went backwards")
        self._seen_lock_generations[node.instance] = lock.generation
        for handle_id, mode in lock.holders.items():
            handle = self.handles.get(handle_id)
            check(handle is not None and handle.instance == node.instance
                  and handle.held_mode == mode, f"{node.path}: holder {handle_id} inconsistent")
        for handle_id, mode in lock.waiters:
            handle = self.handles.get(handle_id)
            check(handle is not None and handle.instance == node.instance
                  and handle.waiting_mode == mode, f"{node.path}: waiter {handle_id} inconsistent")
        check(len(lock.waiters) <= self.limits.max_waiters_per_lock,
              f"{node.path}: too many waiters")
        check(lock.delay_until_ms == 0 or lock.delay_until_ms > now,
              f"{node.path}: lock-delay ended but not cleared")
        if lock.waiters and not lock.in_delay(now):
            check(not lock.compatible(lock.waiters[0][1]),
                  f"{node.path}: head waiter could be granted (lost wakeup)")
        for handle_id in node.handle_ids:
            handle = self.handles[handle_id]
            check((handle.held_mode is not None) == (handle_id in lock.holders),
                  f"{node.path}: handle {handle_id} held_mode disagrees with the lock")
            check((handle.waiting_mode is not None) == lock.is_waiting(handle_id),
                  f"{node.path}: handle {handle_id} waiting_mode disagrees with the lock")
