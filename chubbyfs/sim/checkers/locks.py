"""White-box lock, session and ephemeral-node checks over every replica's
apply stream (testing-anchors P1, P2, P5, P6).

The cell simulation calls `on_apply` after every apply on every replica
(every incarnation) and `on_restore` after a snapshot restore. Per apply:

- P1: `CellStateMachine.assert_invariants()`, plus an independent exclusion
  check (one exclusive holder, or only shared holders) that does not trust the
  state machine's own bookkeeping, and every holder's session is live.
- P2: the lock grants an apply made (a lock generation that changed) are
  recorded by log index; every replica must make the same grants at the same
  index, and at the end grants of one lock path must have strictly
  increasing generations in index order, across all replicas and restarts.
- P5: a lock whose holder's session ended is recorded with its stamped end
  time and the handle's lock-delay; at the end, every later grant at that path
  must be stamped at or after end + lock-delay.
- P6: an ended session owns nothing and never comes back; an ephemeral file
  exists only while it has an open handle of a live session, and one that
  vanished without a Delete lost all its handles in that same apply.
- P5/P6 lease: a session that ends other than by its own EndSession (it
  expired, so its locks go to others after lock-delay) ends only once the
  apply's stamped time has reached the lease end the replica knew before
  that apply: a session is never taken away before its lease.

Pure: no trio, no clock; the state machine is read, never changed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ...cell.commands import Delete, EndSession, MalformedCommand, Rename, decode_command
from ...cell.state_machine import CellStateMachine, InvariantViolation
from ...locks import LockMode


@dataclass(frozen=True, slots=True)
class Grant:
    """A lock going from free to held (a new generation) at one log index."""

    index: int
    path: str
    instance: int
    generation: int
    mode: int
    now_ms: int
    session_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SessionEndRelease:
    """A lock freed because its holder's session ended (lock-delay applies)."""

    index: int
    path: str
    now_ms: int
    lock_delay_ms: int
    session_id: int


# (handle_id, session_id, mode, lock_delay_ms) of one holder
_Holder = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class _LockView:
    path: str
    generation: int
    holders: tuple[_Holder, ...]
    ephemeral_file: bool
    handle_ids: frozenset[int]


def _view(sm: CellStateMachine) -> dict[int, _LockView]:
    views = {}
    for instance, node in sm.nodes.items():
        holders = tuple(sorted(
            (h, sm.handles[h].session_id, int(mode), sm.handles[h].lock_delay_ms)
            for h, mode in node.lock.holders.items() if h in sm.handles))
        views[instance] = _LockView(node.path, node.lock.generation, holders,
                                    node.ephemeral and not node.is_directory, frozenset(node.handle_ids))
    return views


class LockSafetyChecker:
    def __init__(self, max_violations: int = 50) -> None:
        self.violations: list[str] = []
        self.max_violations = max_violations
        self._views: dict[tuple[int, int], dict[int, _LockView]] = {}
        self._ended: dict[tuple[int, int], set[int]] = defaultdict(set)
        self._leases: dict[tuple[int, int], dict[int, int]] = {}  # replica -> session -> lease end
        self.grants: dict[int, tuple[Grant, ...]] = {}  # index -> grants, first replica to apply it
        self.releases: dict[int, tuple[SessionEndRelease, ...]] = {}
        self.applies_checked = 0
        self.ended_sessions: set[int] = set()  # ended in any replica's apply stream

    def _violate(self, message: str) -> None:
        if len(self.violations) < self.max_violations:
            self.violations.append(message)

    # ---- hooks -------------------------------------------------------------------

    def on_restore(self, node_id: int, incarnation: int, sm: CellStateMachine) -> None:
        """A snapshot replaced the replica's state: diff from here on."""
        key = (node_id, incarnation)
        self._views[key] = _view(sm)
        self._ended[key] = set()
        self._leases[key] = {sid: session.lease_end_ms for sid, session in sm.sessions.items()}
        self._check_state(node_id, sm, f"n{node_id} after restore")

    def on_apply(self, node_id: int, incarnation: int, index: int, command: bytes, result: Any,
                 sm: CellStateMachine) -> None:
        self.applies_checked += 1
        key = (node_id, incarnation)
        where = f"n{node_id} index {index}"
        before = self._views.get(key, {})
        after = _view(sm)
        self._views[key] = after
        self._check_state(node_id, sm, where)
        self._check_sessions(key, sm, result, where)
        self._check_expiries(key, command, sm, result, where)
        self._check_ephemerals(before, after, command, sm, where)
        grants = self._grants(before, after, index, sm, where)
        releases = self._session_end_releases(before, result, index, sm)
        self._record(self.grants, index, grants, where, "grants")
        self._record(self.releases, index, releases, where, "session-end releases")

    # ---- per-apply checks ------------------------------------------------------------

    def _check_state(self, node_id: int, sm: CellStateMachine, where: str) -> None:
        try:
            sm.assert_invariants()
        except InvariantViolation as exc:
            self._violate(f"P1/P6 state machine invariant at {where}: {exc}")
        for node in sm.nodes.values():
            modes = list(node.lock.holders.values())
            if len(modes) > 1 and any(m != LockMode.SHARED for m in modes):
                self._violate(f"P1 exclusion at {where}: {node.path} held by {len(modes)} handles "
                              f"in modes {sorted(int(m) for m in modes)}")
            for handle_id in node.lock.holders:
                handle = sm.handles.get(handle_id)
                session = None if handle is None else sm.sessions.get(handle.session_id)
                if session is None or session.lease_end_ms <= sm.now_ms:
                    self._violate(f"P6 at {where}: {node.path} held by handle {handle_id} of an ended session")

    def _check_sessions(self, key: tuple[int, int], sm: CellStateMachine, result: Any, where: str) -> None:
        ended = self._ended[key]
        ended.update(getattr(result, "ended_sessions", ()))
        self.ended_sessions.update(getattr(result, "ended_sessions", ()))
        revived = ended & sm.sessions.keys()
        if revived:
            self._violate(f"P6 at {where}: ended sessions {sorted(revived)} are live again")
        for handle in sm.handles.values():
            if handle.session_id in ended:
                self._violate(f"P6 at {where}: handle {handle.handle_id} of ended session "
                              f"{handle.session_id} survived")
                break

    def _check_expiries(self, key: tuple[int, int], command: bytes, sm: CellStateMachine, result: Any,
                        where: str) -> None:
        before = self._leases.get(key, {})
        self._leases[key] = {sid: session.lease_end_ms for sid, session in sm.sessions.items()}
        ended = getattr(result, "ended_sessions", ())
        if not ended:
            return
        try:
            cmd = decode_command(command)
        except MalformedCommand:
            cmd = None
        for session_id in ended:
            if isinstance(cmd, EndSession) and cmd.session_id == session_id:
                continue
            lease_end = before.get(session_id)
            if lease_end is not None and sm.now_ms < lease_end:
                self._violate(f"P5 early expiry at {where}: session {session_id} ended at stamped {sm.now_ms} ms, "
                              f"before its lease end {lease_end} ms")

    def _check_ephemerals(self, before: dict[int, _LockView], after: dict[int, _LockView], command: bytes,
                          sm: CellStateMachine, where: str) -> None:
        for view in after.values():
            if view.ephemeral_file and not view.handle_ids:
                self._violate(f"P6 at {where}: ephemeral {view.path} has no open handle")
        for instance, view in before.items():
            if not view.ephemeral_file or instance in after:
                continue
            # Gone: by a Delete/Rename, or because its last handles closed
            # (Close or session end) in this very apply.
            still_open = sorted(h for h in view.handle_ids if h in sm.handles)
            if still_open and not self._is_delete(command):
                self._violate(f"P6 at {where}: ephemeral {view.path} vanished while handles {still_open} "
                              "were open")

    @staticmethod
    def _is_delete(command: bytes) -> bool:
        try:
            return isinstance(decode_command(command), (Delete, Rename))
        except MalformedCommand:
            return False

    def _grants(self, before: dict[int, _LockView], after: dict[int, _LockView], index: int,
                sm: CellStateMachine, where: str) -> tuple[Grant, ...]:
        grants = []
        for instance, view in sorted(after.items()):
            old = before.get(instance)
            old_generation = 0 if old is None else old.generation
            if view.generation != old_generation:
                if view.generation < old_generation:
                    self._violate(f"P2 at {where}: {view.path} lock generation went back "
                                  f"{old_generation} -> {view.generation}")
                mode = view.holders[0][2] if view.holders else 0
                grants.append(Grant(index, view.path, instance, view.generation, mode, sm.now_ms,
                                    tuple(sorted({h[1] for h in view.holders}))))
        return tuple(grants)

    @staticmethod
    def _session_end_releases(before: dict[int, _LockView], result: Any, index: int,
                              sm: CellStateMachine) -> tuple[SessionEndRelease, ...]:
        ended = set(getattr(result, "ended_sessions", ()))
        if not ended:
            return ()
        releases = []
        for view in before.values():
            for _handle, session_id, _mode, delay_ms in view.holders:
                if session_id in ended:
                    releases.append(SessionEndRelease(index, view.path, sm.now_ms, delay_ms, session_id))
        return tuple(sorted(releases, key=lambda r: (r.path, r.session_id)))

    def _record(self, table: dict[int, tuple], index: int, items: tuple, where: str, what: str) -> None:
        first = table.setdefault(index, items)
        if first != items:
            self._violate(f"P2 at {where}: replicas disagree on the {what} made at this index: "
                          f"{first} vs {items}")

    # ---- end of run ---------------------------------------------------------------------

    def check_history(self) -> list[str]:
        """P2 and P5 over the merged apply streams; returns all violations."""
        last_generation: dict[str, tuple[int, int]] = {}  # path -> (generation, index)
        blocked_until: dict[str, tuple[int, SessionEndRelease]] = {}
        for index in sorted(self.grants.keys() | self.releases.keys()):
            # Within one apply, session-end releases happen before regrants.
            for release in self.releases.get(index, ()):
                until = release.now_ms + release.lock_delay_ms
                if until > blocked_until.get(release.path, (0, release))[0]:
                    blocked_until[release.path] = (until, release)
            for grant in self.grants.get(index, ()):
                previous = last_generation.get(grant.path)
                if previous is not None and grant.generation <= previous[0]:
                    self._violate(f"P2: {grant.path} granted generation {grant.generation} at index {index} "
                                  f"after generation {previous[0]} at index {previous[1]}")
                last_generation[grant.path] = (grant.generation, index)
                until, release = blocked_until.get(grant.path, (0, None))
                if grant.now_ms < until:
                    self._violate(f"P5 lock-delay: {grant.path} granted at index {index} stamped {grant.now_ms} ms, "
                                  f"before {until} ms (session {release.session_id} ended at index "
                                  f"{release.index}, stamped {release.now_ms} ms, delay {release.lock_delay_ms} ms)")
        return list(self.violations)

    def session_ended(self, session_id: int) -> bool:
        """Has any replica applied the end of this session?"""
        return session_id in self.ended_sessions

    def granted(self, path: str, generation: int, mode: int) -> bool:
        """Did the cell ever grant this lock generation in this mode?"""
        return any(g.path == path and g.generation == generation and g.mode == mode
                   for grants in self.grants.values() for g in grants)
