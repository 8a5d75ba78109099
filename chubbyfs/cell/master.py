"""The Chubby master: the Raft leader's request handling for the cell.

Every replica runs a `CellService`; only the one whose Raft node leads
serves (the others answer `not_leader` with the master's address, which the
replica layer does for us via NotLeaderError). The master:

- stamps its clock (`now_ms`) into every command, so that expiry and
  lock-delay are decided identically by every replica applying the log;
- proposes writes and answers them once applied; serves read-only calls from
  applied state after a linearizable read barrier (lease or ReadIndex);
- keeps a blocked Acquire open until a later apply's wakeup names it,
  without holding up anyone else;
- grants session leases: it replicates a session's lease end (ExtendLeases)
  *before* promising it to the client, so a new master that starts from the
  replicated watermarks never expires a session earlier than the old master
  promised (the Chubby failover rule);
- proposes Tick when stamped time must move for an idle cell (a lease or a
  lock-delay ending);
- keeps the consistent client cache (`cache_registry.py`): a read may be
  cached only while its path is not being modified; before a change is
  proposed, every session caching an affected path is sent an invalidation
  and the change waits until each has acknowledged it (its next KeepAlive
  `ack`s it) or its lease has run out. With no cachers it is proposed at once;
- delivers events and invalidations on KeepAlive replies, one sequence per
  session, re-sent until acknowledged;
- on taking over, extends every session's lease (the lease clock stops
  while there is no master), starts its epoch in the state machine (which
  schedules the ephemeral sweep) and sends each session a fail-over item;
  until a session acknowledges it, it counts as caching everything. The
  acknowledgement re-creates the handles the client still holds;
- passes a mutating request's number (`request_no`, `answered_below`) and a
  CreateSession's `nonce` into the command: the state machine applies each
  at most once, so an attempt this master held (for acknowledgements, for
  mastership) while the client's retry went through is answered, or
  refused, but never applied again (`session_requests.py`);
- rejects a request that names an older epoch than its own (`stale_epoch`),
  so a client hears of the fail-over before a new master serves it, and
  sends one naming a newer epoch away (`not_leader`): that master is gone.

Master epoch = the Raft term in which this replica became leader; handles
carry the epoch they were made in.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from chubbyfs.locks import LockMode
from chubbyfs.raft.node import ProposalLostError, ProposalOutcomeUnknownError, RaftNode
from chubbyfs.raft.rawnode import NotLeaderError, ProposalDroppedError
from chubbyfs.raft.types import Role
from chubbyfs.wire.cell_protocol import (
    HANDLE_OPS, OPEN_FIELDS, REQUEST_NUMBER_FIELDS, STALE_EPOCH, value_to_wire,
)

from . import commands as c
from . import names
from .cache_registry import CacheRegistry
from .commands import ApplyResult, ErrorCode, LockWakeup, MalformedCommand, Result
from .handles import HandleRef
from .keep_alive_core import HeldKeepAlives, LeaseBatch, Link, PendingKeepAlive, ReplyTo
from .state_machine import CellStateMachine

log = logging.getLogger(__name__)

DEFAULT_SESSION_LEASE_MS = 12_000
# After a fail-over, ephemeral nodes whose handles no client re-created in
# this long are deleted. Five leases (a minute by default, as in Chubby):
# every live session reaches the new master within one lease of it taking
# over and re-creates its handles on its next KeepAlive.
EPHEMERAL_GRACE_LEASES = 5
IDLE_TICK_MS = 1_000  # stamped time moves at least this often on an idle cell
# Lease extensions due within this long (at most a 40th of the lease) share
# one ExtendLeases entry. The reply waits for it, which costs a held
# KeepAlive nothing (its lease counts from when the hold ended) and keeps the
# log to a few entries a second however many sessions there are: every entry
# costs each replica a disk sync and a round of Raft messages.
LEASE_BATCH_MAX_MS = 200
# ... and at most this many sessions: after a fail-over every session renews
# at once, and one entry for all of them would keep each replica's Raft loop
# busy applying it past the election timeout.
LEASE_BATCH_MAX_SESSIONS = 1_000
# The KeepAlive timer sleeps at least this long (at most a 240th of the
# lease) unless woken: holds end at every millisecond (their spread), and a
# wakeup each would cost more than the KeepAlives. Holds end up to this late,
# well inside their margin; deliveries wake the timer at once.
TIMER_GRAIN_MAX_MS = 50
# KeepAlives the timer answers before it lets other tasks (the Raft loop)
# run: answering is a little work each, for thousands at once after a fail-over.
KEEP_ALIVE_ROUND = 256
PROPOSAL_TIMEOUT_S = 10.0
# KeepAlives the master works on at once. After a fail-over every session's
# KeepAlive arrives together; unbounded, one trio batch of them delays the
# Raft loop's heartbeats past the election timeout and starts another
# election (measured: 17 master changes in a minute at 10,000 sessions, 1
# with the bound). Bounded, the Raft loop gets its turn between small batches.
KEEP_ALIVE_CONCURRENCY = 64
CACHEABLE_OPS = ("get_contents_and_stat", "get_stat", "read_dir")

_OP_CLASSES: dict[str, type] = {
    "close": c.Close, "get_contents_and_stat": c.GetContentsAndStat, "get_stat": c.GetStat,
    "read_dir": c.ReadDir, "set_contents": c.SetContents, "set_acl": c.SetACL,
    "delete": c.Delete, "acquire": c.Acquire, "try_acquire": c.TryAcquire,
    "release": c.Release, "get_sequencer": c.GetSequencer, "set_sequencer": c.SetSequencer,
}


def wall_clock_ms() -> int:
    """Masters on different machines must agree on stamped time to within the
    assumed drift bound, so stamps come from the wall clock."""
    return time.time_ns() // 1_000_000


class ObservedStateMachine:
    """The cell state machine as Raft applies it, reporting every apply's
    side effects (wakeups, events) to the master that may be waiting on them."""

    def __init__(self, sm: CellStateMachine) -> None:
        self.sm = sm
        self.on_apply: Callable[[ApplyResult], None] = lambda result: None

    def apply(self, index: int, command: bytes) -> ApplyResult:
        result = self.sm.apply(index, command)
        self.on_apply(result)
        return result

    def query(self, query: Any) -> Any:
        if query is None:  # a pure read barrier
            return None
        return self.sm.query(query)

    def snapshot(self) -> bytes:
        return self.sm.snapshot()

    def restore(self, data: bytes) -> None:
        self.sm.restore(data)


class _Reply:
    """A value plus reply fields beside it (a cacheable read's `cacheable`, ...)."""

    __slots__ = ("value", "extra")

    def __init__(self, value: Any, extra: dict) -> None:
        self.value = value
        self.extra = extra


class _Call:
    """The `Link` of a KeepAlive made as a call: closed once the caller stops waiting."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class CellError(Exception):
    def __init__(self, code: str, message: str = "", **fields: Any) -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message
        self.fields = fields  # extra reply fields (stale_epoch: the current `epoch`)


# A background proposal (InitCell, Tick, ExtendLeases) that did not go through
# is retried by the next loop or KeepAlive; it must never end the service.
_PROPOSAL_FAILED = (NotLeaderError, CellError, ProposalLostError, ProposalDroppedError,
                    ProposalOutcomeUnknownError)


class CellService:
    def __init__(
        self,
        node: RaftNode,
        observed: ObservedStateMachine,
        *,
        cell_name: str,
        admins: tuple[str, ...],
        limits: dict[str, int] | None = None,
        session_lease_ms: int = DEFAULT_SESSION_LEASE_MS,
        ephemeral_grace_ms: int | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        secret_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node = node
        self.sm = observed.sm
        observed.on_apply = self._on_apply
        self.cell_name = cell_name
        self.admins = admins
        self.limits = limits or {}
        self.session_lease_ms = session_lease_ms
        self.ephemeral_grace_ms = (EPHEMERAL_GRACE_LEASES * session_lease_ms if ephemeral_grace_ms is None
                                   else ephemeral_grace_ms)
        self.clock_ms = clock_ms
        self.secret_source = secret_source
        self.epoch = 0  # 0 while not serving as master
        self._session_ids: itertools.count[int] = itertools.count(1)
        self._acquire_waiters: dict[tuple[int, int], trio.MemorySendChannel[LockWakeup]] = {}
        self._declared: set[int] = set()  # sessions that listed the handles they hold, this epoch
        self._wake_ticker = trio.Event()
        self._ready = trio.Event()  # set while serving as master
        # A held KeepAlive returns this long before the lease it renews ends,
        # leaving the client time to send the next one.
        self.keep_alive_margin_ms = session_lease_ms // 4
        # KeepAlives in flight (see keep_alive_core.py): held ones, those whose
        # hold ended early (woken) and those whose lease extension has been
        # applied (extended) wait for one timer task to answer them; the
        # lease batch gathers extensions for the next ExtendLeases entry.
        self._held = HeldKeepAlives()
        self._woken: deque[PendingKeepAlive] = deque()
        self._extended: deque[PendingKeepAlive] = deque()
        self._lease_batch = LeaseBatch(min(LEASE_BATCH_MAX_MS, session_lease_ms // 40), LEASE_BATCH_MAX_SESSIONS)
        self._extending = False  # an ExtendLeases entry is in flight
        self._timer_wake = trio.Event()
        self._timer_deadline_ms: int | None = None  # when the timer task wakes up next on its own
        self._timer_grain_ms = max(1, min(TIMER_GRAIN_MAX_MS, session_lease_ms // 240))
        # Writes the replies that `reply_to` callbacks queued (the replica's
        # connections); the timer calls it after each round.
        self.flush_replies: Callable[[], None] = lambda: None
        self._keep_alive_slots = trio.CapacityLimiter(KEEP_ALIVE_CONCURRENCY)
        self.cache = CacheRegistry()
        self._cache_changed = trio.Event()  # an ack, an expiry or a session end settled waits

    # ---- apply-side hooks (run inside the Raft loop: must not block) -------------

    def _on_apply(self, result: ApplyResult) -> None:
        for wakeup in result.wakeups:
            waiter = self._acquire_waiters.pop((wakeup.session_id, wakeup.handle_id), None)
            if waiter is not None:
                waiter.send_nowait(wakeup)
        if result.wakeups or result.ended_sessions:
            self._wake_ticker.set()
        if not self.epoch:
            return  # cache bookkeeping lives only on the serving master
        woken = self.cache.queue_events((e.session_id, int(e.kind), e.handle_id, e.path, e.name)
                                        for e in result.events)
        if result.invalidated_paths:
            # Changes announced before proposing have no cachers left; this
            # catches the rest (lock grants, expiries inside a command), and
            # parents because listings carry their children's stats.
            paths = set(result.invalidated_paths)
            paths.update(names.parent_of(path) for path in result.invalidated_paths)
            woken |= self.cache.invalidate_now(sorted(paths))
        for session_id in result.ended_sessions:
            woken.discard(session_id)
            if self.cache.session_ended(session_id):
                self._notify_cache()
        self._wake(woken)

    def _wake(self, session_ids: set[int]) -> None:
        """Held KeepAlives of these sessions have something to deliver."""
        for session_id in session_ids:
            ka = self._held.wake(session_id)
            if ka is not None:
                self._woken.append(ka)
                self._timer_wake.set()

    def _notify_cache(self) -> None:
        self._cache_changed.set()
        self._cache_changed = trio.Event()

    # ---- background: mastership, bootstrap, ticks -----------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_alive_timer)
            while True:
                if self.node.role == Role.LEADER and self.epoch != self.node.term:
                    await self._become_master()
                elif self.node.role != Role.LEADER and self.epoch:
                    self._step_down()
                if self.epoch:
                    await self._tick_if_due()
                with trio.move_on_after(0.05):
                    await self._wake_ticker.wait()
                self._wake_ticker = trio.Event()

    async def _become_master(self) -> None:
        term = self.node.term
        try:
            # Everything earlier masters committed is applied before we serve.
            await self.node.read(None)
            if self.sm.cell is None:
                await self._propose(c.InitCell(now_ms=self.clock_ms(), cell=self.cell_name,
                                               admins=tuple(self.admins), secret=self.secret_source(32),
                                               limits=dict(self.limits)))
        except _PROPOSAL_FAILED as exc:
            log.info("could not take mastership in term %d: %s", term, exc)
            return
        try:
            # The lease clock stops while there is no master (Chubby §2.9):
            # every session gets a full lease from now, replicated before we
            # serve. Stamped with the last stamped time, so that applying it
            # expires nobody whose lease ran out during the election.
            leases = self.sm.session_lease_ends()
            if leases:
                now = self.clock_ms()
                await self._propose(c.ExtendLeases(
                    now_ms=self.sm.now_ms,
                    leases={sid: max(end, now + self.session_lease_ms) for sid, end in leases.items()}))
            # Our epoch: the state machine schedules the ephemeral sweep.
            await self._propose(c.Tick(now_ms=self.clock_ms(), epoch=term,
                                       ephemeral_grace_ms=self.ephemeral_grace_ms))
        except _PROPOSAL_FAILED as exc:
            log.info("could not extend leases or start epoch %d: %s", term, exc)
            return
        if self.node.role != Role.LEADER or self.node.term != term:
            return
        self._lease_batch.renew.clear()  # of an earlier epoch: handles need re-creating again
        self._declared.clear()
        self.cache.reset()
        self.cache.fail_over(self.sm.session_lease_ends())
        self.epoch = term
        # Session ids: strictly increasing for the cell's life (term-major).
        self._session_ids = itertools.count((term << 32) + 1)
        self._ready.set()
        log.info("master of cell %s in epoch %d", self.cell_name, term)

    def _step_down(self) -> None:
        log.info("no longer master (epoch %d)", self.epoch)
        self.epoch = 0
        self._ready = trio.Event()
        self._declared.clear()
        self.cache.reset()
        self._notify_cache()
        # KeepAlives go back to their clients, which find the new master
        # (those whose ExtendLeases is in flight hear when it is settled).
        gone = NotLeaderError(self.node.leader)
        for ka in [*self._held.drain(), *self._woken, *self._extended, *self._lease_batch.take()[2]]:
            ka.answer(None, gone)
        self._woken.clear()
        self._extended.clear()
        self.flush_replies()
        # Blocked Acquires are answered by the client retrying at the new master.
        for waiter in self._acquire_waiters.values():
            waiter.close()
        self._acquire_waiters.clear()

    async def _tick_if_due(self) -> None:
        now = self.clock_ms()
        due = self.sm.next_deadline_ms()
        if (due is not None and due <= now) or now - self.sm.now_ms >= IDLE_TICK_MS:
            try:
                # Sessions this Tick expires take their ephemeral nodes along.
                await self._modify(c.Tick(now_ms=now), ())
            except _PROPOSAL_FAILED:
                pass

    # ---- request handling -------------------------------------------------------------

    async def handle(self, request: dict, principal: str) -> dict:
        """Answer one client request (raises NotLeaderError on a non-master)."""
        op = request["op"]
        try:
            value = await self._dispatch(op, request, principal)
        except (CellError, MalformedCommand) as exc:
            return _refusal(exc)
        if isinstance(value, _Reply):
            return {"ok": True, "value": value_to_wire(value.value), **value.extra}
        if op == "keep_alive":
            return {"ok": True, "value": value}  # built from plain values already
        return {"ok": True, "value": value_to_wire(value)}

    def handle_nowait(self, request: dict, principal: str,
                      reply_to: Callable[[dict | None, BaseException | None], None]) -> bool:
        """The hot path of writes and locks, without a task per request: a
        call on a handle that has nothing to wait for (this master serves, the
        session heard of the last fail-over, no session caches what the call
        changes) is proposed at once, and `reply_to(reply, error)` is called
        from the apply step that settles it (`error`: a Raft-layer exception
        for the replica to report). False: not taken; `handle` answers it,
        waiting where it must and reporting any refusal."""
        op = request.get("op")
        if op not in _INLINE_OPS or not self._ready.is_set() or self.node.role != Role.LEADER:
            return False
        try:
            self._check_epoch(request)
            cmd = self._handle_command(op, request, principal)
            if self.cache.failover_pending(cmd.session_id):
                return False
            paths: list[str] = []
            if op in _MODIFYING_OPS:
                paths = self._handle_paths(op, cmd.handle) + self._expiring_ephemeral_paths(cmd.now_ms)
                if self.cache.must_wait(paths):
                    return False
            data = self._encode_checked(cmd)
        except (CellError, MalformedCommand, NotLeaderError):
            return False  # the general path refuses it, with the same answer
        mod = None
        if paths:
            mod, woken = self.cache.begin(paths, self._lease_end_of)
            self._wake(woken)
        wait = None
        if op == "acquire":
            # Registered before proposing, as `_acquire` does: the grant may
            # be applied in the same Raft batch as the Acquire itself.
            wait = _InlineWait(reply_to)
            self._await_grant((cmd.session_id, cmd.handle.handle_id), wait)

        def settled(applied: Any, error: BaseException | None) -> None:
            if mod is not None:
                self.cache.finish(mod)
            try:
                if error is not None:
                    raise error
                value = _unwrap(applied.result)
            except CellError as exc:
                reply = _refusal(exc)
            except Exception as exc:  # a Raft-layer failure, reported by the replica
                self._forget_wait(cmd, wait)
                reply_to(None, exc)
                return
            else:
                if wait is not None and not value.granted:
                    return  # queued: the apply that grants (or ends) it answers
                reply = {"ok": True, "value": value_to_wire(value)}
            self._forget_wait(cmd, wait)
            reply_to(reply, None)

        try:
            # An Acquire of a held lock only queues: it may share a round
            # with the Release that will grant it (see RaftNode.propose).
            self.node.propose_nowait(data, settled, lazy=op == "acquire" and self._lock_busy(cmd))
        except (NotLeaderError, ProposalDroppedError) as exc:
            settled(None, exc)
        return True

    async def _dispatch(self, op: str, req: dict, principal: str) -> Any:
        if op == "check_sequencer":
            return await self._read(c.CheckSequencer(now_ms=self.clock_ms(), sequencer=_field(req, "sequencer")))
        await self._wait_master()
        if op not in ("keep_alive", "end_session"):
            self._check_epoch(req)
        if op == "create_session":
            sid = next(self._session_ids)
            now = self.clock_ms()
            created = await self._propose(c.CreateSession(now_ms=now, session_id=sid,
                                                          lease_end_ms=now + self.session_lease_ms,
                                                          nonce=_int(req, "nonce") if "nonce" in req else 0))
            return {"session_id": created.session_id, "lease_end_ms": created.lease_end_ms,
                    "lease_ms": self.session_lease_ms, "epoch": self.epoch}
        if op == "keep_alive":
            return await self._keep_alive(*_keep_alive_args(req))
        session_id = _int(req, "session_id")
        if op == "end_session":
            return await self._modify(c.EndSession(now_ms=self.clock_ms(), session_id=session_id),
                                      self._session_ephemeral_paths(session_id))
        await self._await_failover_ack(session_id)
        if op == "open":
            fields = {k: req[k] for k in OPEN_FIELDS if k in req}
            if "acl" in fields:
                fields["acl"] = tuple(fields["acl"])
            cmd = c.Open(now_ms=self.clock_ms(), session_id=session_id, principal=principal,
                         epoch=self.epoch, **fields, **_numbering(req))
            if not cmd.create:
                return await self._propose(cmd)
            path = _field(req, "path")
            return await self._modify(cmd, (path, names.parent_of(path)) if isinstance(path, str) else ())
        if op == "rename":
            cmd = c.Rename(now_ms=self.clock_ms(), session_id=session_id, principal=principal,
                           src_path=_field(req, "src_path"), dst_path=_field(req, "dst_path"),
                           **_numbering(req))
            return await self._modify(cmd, *self._rename_paths(cmd.src_path, cmd.dst_path))
        if op not in HANDLE_OPS:
            raise CellError("bad_request", f"unknown op {op!r}")
        cmd = self._handle_command(op, req, principal)
        handle = cmd.handle
        if HANDLE_OPS[op][1]:  # read-only
            value = await self._read(cmd)
            if op not in CACHEABLE_OPS or req.get("cache") is not True:
                return value
            # No await since the read: its result and the registration are
            # one step, so no modification can begin between them.
            path = self._node_path(handle)
            cacheable = path is not None and self.cache.may_cache(session_id, path)
            return _Reply(value, {"cacheable": cacheable, "seq": self.cache.last_seq(session_id),
                                  "epoch": self.epoch, "cache_path": path or ""})
        if op == "acquire":
            return await self._acquire(cmd)
        if op in ("set_contents", "set_acl", "delete", "close"):
            return await self._modify(cmd, self._handle_paths(op, handle))
        return await self._propose(cmd)

    def _handle_command(self, op: str, req: dict, principal: str) -> Any:
        """The command for a call on a handle (`op` in HANDLE_OPS)."""
        extra, read_only = HANDLE_OPS[op]
        try:
            handle = HandleRef.from_wire(req.get("handle"))
        except ValueError as exc:
            raise CellError("bad_request", f"bad handle: {exc}") from None
        kwargs = {k: req[k] for k in extra if k in req}
        if not read_only:
            kwargs.update(_numbering(req))
        if "mode" in kwargs:
            kwargs["mode"] = _mode(kwargs["mode"])
        return _OP_CLASSES[op](now_ms=self.clock_ms(), session_id=_int(req, "session_id"),
                               principal=principal, handle=handle, **kwargs)

    def _await_grant(self, key: tuple[int, int], waiter: Any) -> None:
        """Register who hears a blocked Acquire's outcome (a channel's send
        side or an `_InlineWait`); a retried Acquire replaces the earlier
        waiter, which is told to retry."""
        previous = self._acquire_waiters.pop(key, None)
        if previous is not None:
            previous.close()
        self._acquire_waiters[key] = waiter

    def _forget_wait(self, cmd: Any, wait: _InlineWait | None) -> None:
        key = (cmd.session_id, cmd.handle.handle_id)
        if wait is not None and self._acquire_waiters.get(key) is wait:
            del self._acquire_waiters[key]

    def _lock_busy(self, cmd: c.Acquire) -> bool:
        """Whether an Acquire would have to queue (as far as applied state says)."""
        node = self._node_of(cmd.handle)
        return node is not None and not node.lock.can_grant_now(cmd.mode, cmd.now_ms)

    def _check_epoch(self, req: dict) -> None:
        """A request names the master epoch its client last heard of (if it
        follows epochs at all). An older one: the client has not yet heard of
        this fail-over, so it must not be served yet; it retries once its
        KeepAlive has brought the news. A newer one: we are a deposed master."""
        if "epoch" not in req:
            return
        epoch = _int(req, "epoch")
        if epoch < self.epoch:
            raise CellError(STALE_EPOCH, f"request of master epoch {epoch}; this master's is {self.epoch}",
                            epoch=self.epoch)
        if epoch > self.epoch:
            raise NotLeaderError(self.node.leader if self.node.role != Role.LEADER else None)

    # ---- the consistent cache: what a change touches, and waiting for acks -----------

    def _lease_end_of(self, session_id: int) -> int | None:
        session = self.sm.sessions.get(session_id)
        return None if session is None else session.lease_end_ms

    def _node_of(self, ref: HandleRef) -> Any:
        record = self.sm.handles.get(ref.handle_id)
        if record is None or record.stale or not record.matches(ref):
            return None
        return self.sm.nodes.get(record.instance)

    def _node_path(self, ref: HandleRef) -> str | None:
        node = self._node_of(ref)
        return None if node is None else node.path

    def _ephemeral_chain(self, node: Any) -> list[str]:
        """An ephemeral node that may go away, and each ephemeral ancestor
        that may follow it (emptied), with their parents' listings."""
        paths: list[str] = []
        while node is not None and node.ephemeral:
            paths += [node.path, names.parent_of(node.path)]
            node = self.sm.nodes.get(node.parent_instance)
        return paths

    def _handle_paths(self, op: str, ref: HandleRef) -> list[str]:
        node = self._node_of(ref)
        if node is None:
            return []  # the call will fail, or closes a stale handle: nothing cached changes
        if op == "close":
            return self._ephemeral_chain(node)
        paths = [node.path, names.parent_of(node.path)]
        if op == "delete":
            paths += self._ephemeral_chain(self.sm.nodes.get(node.parent_instance))
        return paths

    def _rename_paths(self, src: Any, dst: Any) -> tuple[list[str], list[str]]:
        if not isinstance(src, str) or not isinstance(dst, str):
            return [], []
        paths = [src, dst, names.parent_of(src), names.parent_of(dst)]
        node = self.sm.nodes.get(self.sm.by_path.get(src, -1))
        return paths, [src] if node is not None and node.is_directory else []

    def _session_ephemeral_paths(self, session_id: int) -> list[str]:
        paths: list[str] = []
        for handle_id in self.sm.session_handle_ids(session_id):
            record = self.sm.handles[handle_id]
            if not record.stale:
                paths += self._ephemeral_chain(self.sm.nodes.get(record.instance))
        return paths

    def _expiring_ephemeral_paths(self, now_ms: int) -> list[str]:
        """What a command stamped `now_ms` deletes before its own effect:
        ephemeral nodes of sessions whose lease ends, and those the
        post-fail-over sweep removes."""
        due = self.sm.next_deadline_ms()
        if due is None or due > now_ms:
            return []
        paths: list[str] = []
        for session_id in self.sm.sessions_expiring_by(now_ms):
            paths += self._session_ephemeral_paths(session_id)
        for path in self.sm.ephemeral_sweep_paths(now_ms):
            paths += self._ephemeral_chain(self.sm.nodes[self.sm.by_path[path]])
        return paths

    async def _modify(self, cmd: Any, paths: Any, prefixes: Any = ()) -> Any:
        """Propose a change once no session may serve the old state of what it
        touches from its cache (fast path: no cachers, proposed at once)."""
        paths = list(paths) + self._expiring_ephemeral_paths(cmd.now_ms)
        mod, woken = self.cache.begin(paths, self._lease_end_of, prefixes)
        self._wake(woken)
        try:
            await self._wait_cache(lambda: self.cache.is_done(mod))
            return await self._propose(cmd)
        finally:
            self.cache.finish(mod)

    async def _await_failover_ack(self, session_id: int) -> None:
        """After a fail-over a session is served once it has heard of it (Chubby §2.9)."""
        await self._wait_cache(lambda: not self.cache.failover_pending(session_id))

    async def _wait_cache(self, done: Callable[[], bool]) -> None:
        while True:
            if self.cache.expire(self.clock_ms()):
                self._notify_cache()
            if done():
                return
            if not self.epoch or self.node.role != Role.LEADER:
                raise NotLeaderError(self.node.leader)
            changed = self._cache_changed
            deadline = self.cache.next_deadline_ms()
            wait_s = 1.0 if deadline is None else (deadline - self.clock_ms()) / 1000
            with trio.move_on_after(min(1.0, max(0.001, wait_s))):
                await changed.wait()

    async def _acquire(self, cmd: c.Acquire) -> Any:
        key = (cmd.session_id, cmd.handle.handle_id)
        # Registered before proposing: the wakeup may be applied in the same
        # Raft batch as the Acquire itself.
        send, receive = trio.open_memory_channel[LockWakeup](1)
        self._await_grant(key, send)
        try:
            # A held lock: the Acquire only queues, so it need not go out
            # alone; it can share a round with the Release that will grant it.
            value = await self._propose(cmd, lazy=self._lock_busy(cmd))
            if value.granted:
                return value
            try:
                wakeup = await receive.receive()
            except trio.EndOfChannel:
                # Mastership moved while we waited; the client retries the
                # Acquire at the new master, where it is still queued (a
                # numbered retry is answered "queued" and waits again).
                raise CellError("retry", "master changed while the Acquire waited") from None
            if wakeup.code != ErrorCode.OK:
                raise CellError(wakeup.code.name.lower(), f"Acquire ended: {wakeup.code.name.lower()}")
            return c.LockResult(True, wakeup.lock_generation, wakeup.sequencer)
        finally:
            if self._acquire_waiters.get(key) is send:
                del self._acquire_waiters[key]

    def keep_alive_nowait(self, request: dict, reply_to: Callable[[dict | None, BaseException | None], None],
                          link: Link) -> bool:
        """Take a KeepAlive straight from a connection's read loop, without a
        task: `reply_to(reply, error)` is called once, later or at once, as
        for `handle_nowait`, unless `link` (the connection) has closed by
        then. False when it needs the general path (`handle`): no master
        serving yet, or a session our applied state does not know (a read
        barrier decides that)."""
        if not self._ready.is_set():
            return False
        try:
            args = _keep_alive_args(request)
        except CellError as exc:
            reply_to(_refusal(exc), None)
            return True
        if args[0] not in self.sm.sessions:
            return False
        self._start_keep_alive(*args, partial(_reply_as_wire, reply_to), link)
        return True

    async def _keep_alive(self, session_id: int, hold: bool, ack: int | None = None,
                          ack_epoch: Any = None, handle_ids: list[int] | None = None) -> dict:
        """A KeepAlive as a call (the general path; `keep_alive_nowait` is the
        replica's fast one): the same protocol, waited for here."""
        async with self._keep_alive_slots:
            await trio.lowlevel.checkpoint()  # the slot is held across a turn of the scheduler
        if session_id not in self.sm.sessions:
            # Our applied state may be behind (a deposed master, or one still
            # catching up): decide "gone" only after a read barrier.
            await self.node.read(None)
            if session_id not in self.sm.sessions:
                raise CellError("session_expired", f"session {session_id} does not exist or has ended")
        if not self.epoch:
            raise NotLeaderError(self.node.leader)
        answered = trio.Event()
        outcome: list[Any] = []
        call = _Call()

        def reply_to(value: Any, error: BaseException | None) -> None:
            outcome[:] = [value, error]
            answered.set()

        self._start_keep_alive(session_id, hold, ack, ack_epoch, handle_ids, reply_to, call)
        try:
            await answered.wait()
        finally:
            call.closed = True  # cancelled (the client went away): no extension for it
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def _start_keep_alive(self, session_id: int, hold: bool, ack: int | None, ack_epoch: Any,
                          handle_ids: list[int] | None, reply_to: ReplyTo, link: Link) -> None:
        """A long poll: held until shortly before the lease we promised ends
        (or until the master has something for the session, or steps down),
        then the lease is extended, replicated first, and the reply says by
        how much and how long the request was held, so the client can count
        its local lease conservatively from its own send time.

        `ack` settles everything delivered up to that sequence. The reply
        carries every item not yet acknowledged, gathered only after the lease
        extension committed: a client can thus never hold a lease that was
        granted after an invalidation without having received it.

        A KeepAlive from a client that has heard of this epoch re-creates the
        session's handles in it: those in `handle_ids` (what the client still
        holds; the library sends them once, right after the fail-over), or,
        for a client that never says, all of them.

        Precondition: serving as master, and the session is in applied state."""
        if ack is not None and (ack_epoch is None or ack_epoch == self.epoch):
            failover_was_pending = self.cache.failover_pending(session_id)
            # Wake the waiters when a modification finished, and when the ack
            # settled the fail-over: calls held for it go on now, not at the
            # next poll (finding 4 of the cell simulation).
            if self.cache.ack(session_id, ack) or (
                    failover_was_pending and not self.cache.failover_pending(session_id)):
                self._notify_cache()
        if ack is None or ack_epoch == self.epoch:
            self._renew_handles(session_id, handle_ids)
        now = self.clock_ms()
        ka = PendingKeepAlive(session_id, hold=hold, acks=ack is not None, received_ms=now, reply_to=reply_to,
                              link=link)
        promised = self.sm.sessions[session_id].lease_end_ms
        hold_until_ms = promised - self.keep_alive_margin_ms - self._spread_ms(session_id)
        if hold and hold_until_ms > now and not self.cache.has_pending(session_id):
            displaced = self._held.hold(ka, hold_until_ms)
            if displaced is not None:
                self._end_hold(displaced, now)  # its client has moved on to this one
            self._timer_due(hold_until_ms)
        else:
            self._end_hold(ka, now)

    def _end_hold(self, ka: PendingKeepAlive, now: int) -> None:
        """The hold is over: extend the lease (answered once that is
        applied), or, woken early with most of the lease left, answer now
        promising only what is already replicated (no log write per delivery).
        One whose client went away is dropped: no answer, no extension."""
        if ka.abandoned:
            return
        if not self.epoch:
            ka.answer(None, NotLeaderError(self.node.leader))
            return
        session = self.sm.sessions.get(ka.session_id)
        if session is None:
            ka.answer(None, CellError("session_expired", f"session {ka.session_id} has ended"))
            return
        lease_ms = session.lease_end_ms - now
        if ka.hold and lease_ms >= self.session_lease_ms // 2:
            self._answer(ka, lease_ms, now)
            return
        self._lease_batch.add(ka, now + self.session_lease_ms, now)
        self._timer_due(self._lease_batch.next_deadline_ms())

    def _answer_extended(self, ka: PendingKeepAlive) -> None:
        """Its lease extension has been applied (or failed)."""
        session = self.sm.sessions.get(ka.session_id)
        if session is None:
            ka.answer(None, CellError("session_expired", f"session {ka.session_id} has ended"))
        elif session.lease_end_ms < ka.lease_end_ms:
            # The extension did not commit (mastership moved, say): the
            # session lives on; the client asks again, maybe elsewhere.
            ka.answer(None, CellError("retry", f"lease extension of session {ka.session_id} not committed"))
        else:
            self._answer(ka, self.session_lease_ms, ka.lease_end_ms - self.session_lease_ms)

    def _answer(self, ka: PendingKeepAlive, lease_ms: int, lease_from_ms: int) -> None:
        if not self.epoch or self.node.role != Role.LEADER or self.node.term != self.epoch:
            # Deposed, maybe not noticed yet (after a pause, say): our items
            # are an older epoch's, and must not reach a client that may
            # already have heard from the new master.
            ka.answer(None, NotLeaderError(self.node.leader))
            return
        session_id = ka.session_id
        items = self.cache.pending(session_id)
        if not ka.acks and items and self.cache.ack(session_id, items[-1].seq):
            # A client that sends no `ack` neither caches nor watches: what is
            # delivered counts as processed.
            self._notify_cache()
        ka.answer({"session_id": session_id, "lease_ms": lease_ms,
                   "held_ms": max(0, lease_from_ms - ka.received_ms), "epoch": self.epoch,
                   "items": [item.to_wire() for item in items]})

    def _spread_ms(self, session_id: int) -> int:
        """A fixed offset per session, within a third of the margin, by which
        its held KeepAlive returns earlier. A takeover gives every session
        the same lease end; without this, all their KeepAlives would return
        in one burst every lease forever. With it they spread at once, and
        their different periods keep them apart. (A wider spread renews more
        often.) Derived from the id, not drawn, so that runs replay exactly."""
        return (session_id * 2654435761 >> 16) % max(1, self.keep_alive_margin_ms // 3)

    def _timer_due(self, at_ms: int | None) -> None:
        """Something needs the KeepAlive timer at `at_ms`: wake it if it
        would sleep past that."""
        if at_ms is not None and (self._timer_deadline_ms is None or at_ms < self._timer_deadline_ms):
            self._timer_deadline_ms = at_ms
            self._timer_wake.set()

    async def _keep_alive_timer(self) -> None:
        """The one task that ends holds, starts lease batches and answers
        KeepAlives, a round at a time, writing each round's replies
        together (one write per connection)."""
        async with trio.open_nursery() as batches:
            while True:
                self._timer_wake = trio.Event()
                now = self.clock_ms()
                more = self._keep_alive_round(now, batches)
                self.flush_replies()
                if more:
                    await trio.lowlevel.checkpoint()  # the Raft loop's turn
                    continue
                # An entry in flight wakes us when it is done (the next batch waits for it).
                batch_due = None if self._extending else self._lease_batch.next_deadline_ms()
                deadlines = [d for d in (self._held.next_deadline_ms(), batch_due) if d is not None]
                wait_ms = min(1_000, max(self._timer_grain_ms, min(deadlines, default=now + 1_000) - now))
                self._timer_deadline_ms = now + wait_ms
                with trio.move_on_after(wait_ms / 1000):
                    await self._timer_wake.wait()

    def _keep_alive_round(self, now: int, batches: trio.Nursery) -> bool:
        """Up to KEEP_ALIVE_ROUND KeepAlives' worth of work; True if more is waiting."""
        budget = KEEP_ALIVE_ROUND
        while budget and self._extended:
            self._answer_extended(self._extended.popleft())
            budget -= 1
        while budget and self._woken:
            self._end_hold(self._woken.popleft(), now)
            budget -= 1
        for ka in self._held.due(now, budget):
            self._end_hold(ka, now)
            budget -= 1
        if self.epoch and not self._extending and self._lease_batch.ready(now):
            self._extending = True
            batches.start_soon(self._extend_leases, now, *self._lease_batch.take())
        return budget == 0

    async def _extend_leases(self, now: int, leases: dict[int, int], renew: dict[int, int],
                             waiting: list[PendingKeepAlive]) -> None:
        """One ExtendLeases entry for a batch (a task per entry, a few a
        second); its KeepAlives go back to the timer once it is applied.
        One at a time: a later-stamped entry that overtook this one (both
        waiting for a paused node, say) would expire the sessions this one
        extends."""
        try:
            await self._propose(c.ExtendLeases(now_ms=now, leases=leases, renew=renew))
        except _PROPOSAL_FAILED as exc:
            log.debug("lease extension failed: %s", exc)
            if self.epoch:
                # No client asks again for these: retry with a later batch.
                self._lease_batch.add_renewals(renew, self.clock_ms())
        finally:
            self._extending = False
        self._extended.extend(waiting)
        self._timer_wake.set()

    def _renew_handles(self, session_id: int, handle_ids: list[int] | None) -> None:
        """Re-create the session's handles in this epoch (next lease batch):
        the listed ones; with no list, all, unless the session has listed
        its handles in this epoch before (the list said what it holds)."""
        if not self.sm.unconfirmed:
            return  # no sweep pending: nothing to re-create
        if handle_ids is not None:
            self._declared.add(session_id)
        elif session_id in self._declared:
            return
        own = self.sm.session_handle_ids(session_id)
        keep = own if handle_ids is None else set(own).intersection(handle_ids)
        unconfirmed = self.sm.unconfirmed
        renew = {handle_id: session_id for handle_id in keep if handle_id in unconfirmed}
        if renew:
            self._lease_batch.add_renewals(renew, self.clock_ms())
            self._timer_due(self._lease_batch.next_deadline_ms())

    async def _wait_master(self) -> None:
        if not self._ready.is_set():
            if self.node.role != Role.LEADER:
                raise NotLeaderError(self.node.leader)
            with trio.move_on_after(2.0):
                await self._ready.wait()
                return
            raise CellError("retry", "master is still taking over")

    async def _read(self, cmd: Any) -> Any:
        result: Result = await self.node.read(cmd)
        return _unwrap(result)

    def _encode_checked(self, cmd: Any) -> bytes:
        data = c.encode_command(cmd)
        if len(data) > self.sm.limits.max_request_bytes:
            raise CellError("too_large", f"request of {len(data)} bytes exceeds {self.sm.limits.max_request_bytes}")
        c.decode_command(data)  # the cell would refuse it anyway; refuse before the log
        return data

    async def _propose(self, cmd: Any, *, lazy: bool = False) -> Any:
        data = self._encode_checked(cmd)
        with trio.move_on_after(PROPOSAL_TIMEOUT_S):
            applied: ApplyResult = await self.node.propose(data, lazy=lazy)
            return _unwrap(applied.result)
        raise CellError("timeout", "not committed in time; outcome unknown")

    def statistics(self) -> dict:
        return {"epoch": self.epoch, "sessions": len(self.sm.sessions), "held_keep_alives": len(self._held),
                "blocked_acquires": len(self._acquire_waiters), "initialized": self.sm.cell is not None,
                **self.cache.statistics()}


# Calls on handles `handle_nowait` takes; those that change what clients may
# cache go through the cache registry as `_modify` does.
_MODIFYING_OPS = frozenset({"set_contents"})
_INLINE_OPS = _MODIFYING_OPS | {"acquire", "try_acquire", "release"}


class _InlineWait:
    """A blocked Acquire taken by `handle_nowait`: answered by the apply that
    grants (or ends) it, like the channel a waiting task reads."""

    __slots__ = ("_reply_to",)

    def __init__(self, reply_to: Callable[[dict | None, BaseException | None], None]) -> None:
        self._reply_to = reply_to

    def send_nowait(self, wakeup: LockWakeup) -> None:
        if wakeup.code != ErrorCode.OK:
            code = wakeup.code.name.lower()
            self._reply_to({"error": code, "message": f"Acquire ended: {code}"}, None)
        else:
            self._reply_to({"ok": True, "value": value_to_wire(
                c.LockResult(True, wakeup.lock_generation, wakeup.sequencer))}, None)

    def close(self) -> None:
        # Mastership moved while it waited: the client retries at the new master.
        self._reply_to({"error": "retry", "message": "master changed while the Acquire waited"}, None)


def raft_error_reply(exc: BaseException, leader_address: str | None = None) -> dict | None:
    """The wire answer for an exception from the Raft layer under a call
    (not the leader, a proposal lost, dropped or of unknown outcome), or
    None for any other exception. The replica and the cell simulator both
    answer with it, so the simulator checks what clients really get."""
    if isinstance(exc, NotLeaderError):
        return {"error": "not_leader", "leader": exc.leader, "leader_address": leader_address}
    if isinstance(exc, ProposalLostError):
        return {"error": "lost", "message": str(exc)}
    if isinstance(exc, ProposalDroppedError):
        return {"error": "retry", "message": str(exc) or "proposal dropped; retry"}
    if isinstance(exc, ProposalOutcomeUnknownError):  # includes the replica stopping
        return {"error": "unavailable", "message": str(exc)}
    return None


def _reply_as_wire(reply_to: Callable[[dict | None, BaseException | None], None], value: Any,
                   error: BaseException | None) -> None:
    """A KeepAlive's outcome as `handle_nowait` reports one: a refusal as its
    reply, a Raft-layer error (not_leader) for the replica to report."""
    if error is None:
        reply_to({"ok": True, "value": value}, None)
    elif isinstance(error, CellError):
        reply_to(_refusal(error), None)
    else:
        reply_to(None, error)


def _refusal(exc: CellError | MalformedCommand) -> dict:
    if isinstance(exc, CellError):
        return {"error": exc.code, "message": exc.message, **exc.fields}
    return {"error": "bad_request", "message": str(exc)}


def _unwrap(result: Result) -> Any:
    if result.code != ErrorCode.OK:
        raise CellError(result.code.name.lower(), result.message)
    return result.value


def _field(req: dict, name: str) -> Any:
    if name not in req:
        raise CellError("bad_request", f"missing field {name!r}")
    return req[name]


def _keep_alive_args(req: dict) -> tuple[int, bool, int | None, Any, list[int] | None]:
    """A KeepAlive's fields: session_id, hold, ack, ack_epoch, handles."""
    ack = req.get("ack")
    return (_int(req, "session_id"), bool(req.get("hold", False)), None if ack is None else _int(req, "ack"),
            req.get("ack_epoch"), _handle_ids(req))


def _handle_ids(req: dict) -> list[int] | None:
    """A KeepAlive's optional `handles`: ids of the handles the client holds."""
    value = req.get("handles")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
        raise CellError("bad_request", "'handles' must be a list of handle ids")
    return value


def _numbering(req: dict) -> dict[str, int]:
    """A mutating call's request number and answered mark, if it is numbered
    (the state machine applies each number once; see session_requests.py)."""
    return {name: _int(req, name) for name in REQUEST_NUMBER_FIELDS if name in req}


def _int(req: dict, name: str) -> int:
    value = _field(req, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CellError("bad_request", f"{name!r} must be an integer")
    return value


def _mode(value: Any) -> LockMode:
    try:
        return LockMode(value) if isinstance(value, int) else LockMode[str(value).upper()]
    except (KeyError, ValueError):
        raise CellError("bad_request", f"lock mode must be 'exclusive' or 'shared', not {value!r}") from None
