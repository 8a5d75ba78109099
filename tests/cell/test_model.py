"""Model-based test: random open/create/read/write/CAS/delete/acquire/release/
session-end/expiry/tick sequences against a simple reference model.

The model is a deliberately naive re-statement of the semantics (lists and
scans, no heaps, no indexes). Every apply's result code, lock outcome, wakeups
and ended sessions must equal the model's prediction, and after every apply:

- P1: at most one exclusive holder, never exclusive and shared together;
- P2: a grant's generation is above every earlier grant of that lock when the
  lock was free, and equal to the current one when a shared holder joins;
- P5: a lock freed by session end is granted to no one before that end's
  stamped time + the holder's lock-delay;
- P6: session end is atomic and final: no handle, holder, waiter or
  ephemeral node of an ended session is left, and it cannot act again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chubbyfs.cell.commands import (
    Acquire, Close, CreateMode, CreateSession, Delete, EndSession, ErrorCode, ExtendLeases,
    GetContentsAndStat, LockResult, Open, Release, SetContents, Tick, TryAcquire,
)
from chubbyfs.cell.handles import ALL_INTENTS, HandleRef
from chubbyfs.locks import LockMode, Sequencer

from .harness import Harness, p

# "a" most often, so that locks see contention.
PATHS = ("a", "a", "a", "b", "d", "d/x")
X, S = LockMode.EXCLUSIVE, LockMode.SHARED
# Indexes below 1000 pick a live handle or session; above, any one ever made
# (closed, stale or of an ended session), so refusals are exercised too.
HANDLE_PICK = st.one_of(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999),
                        st.integers(0, 999), st.integers(1_000, 1_999))
SESSION_PICK = HANDLE_PICK


@dataclass
class MHandle:
    sid: int
    ref: HandleRef
    instance: int
    delay_ms: int
    stale: bool = False


@dataclass
class MNode:
    instance: int
    path: str
    is_directory: bool
    ephemeral: bool
    contents: bytes
    generation: int


@dataclass
class MLock:
    holders: dict[int, LockMode] = field(default_factory=dict)
    waiters: list[tuple[int, LockMode]] = field(default_factory=list)
    delay_until_ms: int = 0
    generation: int = 0


class CellModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.now = self.h.now_ms
        self.counter = self.h.sm.generation_counter
        self.next_instance = self.h.sm.next_instance
        self.sessions: dict[int, int] = {}  # sid -> lease_end_ms
        self.ended: list[int] = []
        self.handles: dict[int, MHandle] = {}
        self.all_refs: list[MHandle] = []
        self.instance_of: dict[int, int] = {}  # handle id -> node instance, never forgotten
        self.nodes: dict[str, MNode] = {}
        self.locks: dict[int, MLock] = {}
        self.path_delays: dict[str, int] = {}
        # Property bookkeeping.
        self.expiry_free_at: dict[int, int] = {}  # instance -> earliest grant after expiry
        self.grant_log: dict[int, list[int]] = {}
        # The outputs the model expects from the current step.
        self.wakeups: list[tuple[int, int, ErrorCode, int]] = []
        self.ended_now: list[int] = []

    # ------------------------------------------------------------ model semantics

    def take(self) -> int:
        self.counter += 1
        return self.counter

    def advance(self, now: int) -> None:
        self.now = max(self.now, now)
        self.wakeups, self.ended_now = [], []
        expired = [sid for _, sid in sorted((e, s) for s, e in self.sessions.items()
                                            if e <= self.now)]
        if expired:
            self.end_sessions(expired)
        due = sorted((lock.delay_until_ms, inst) for inst, lock in self.locks.items()
                     if lock.delay_until_ms and lock.delay_until_ms <= self.now)
        for _, inst in due:
            if self.locks[inst].delay_until_ms:  # not already cleared by a regrant
                self.regrant(inst)
        for path in [q for q, until in self.path_delays.items() if until <= self.now]:
            del self.path_delays[path]

    def node_of(self, inst: int) -> MNode | None:
        return next((n for n in self.nodes.values() if n.instance == inst), None)

    def end_sessions(self, sids: list[int]) -> None:
        touched = set()
        for sid in sids:
            for hid in sorted(h for h, mh in self.handles.items() if mh.sid == sid):
                inst = self.close_handle(hid, ending=True)
                if inst is not None:
                    touched.add(inst)
            del self.sessions[sid]
            self.ended.append(sid)
            self.ended_now.append(sid)
        for inst in sorted(touched):
            if self.node_of(inst) is not None:
                self.regrant(inst)
                self.collect(inst)

    def close_handle(self, hid: int, ending: bool) -> int | None:
        mh = self.handles.pop(hid)
        if mh.stale:
            return None
        lock = self.locks[mh.instance]
        for i, (w, _) in enumerate(lock.waiters):
            if w == hid:
                del lock.waiters[i]
                code = ErrorCode.SESSION_EXPIRED if ending else ErrorCode.CANCELLED
                self.wakeups.append((mh.sid, hid, code, 0))
                break
        if hid in lock.holders:
            del lock.holders[hid]
            if ending and mh.delay_ms:
                until = self.now + mh.delay_ms
                lock.delay_until_ms = max(lock.delay_until_ms, until)
                self.expiry_free_at[mh.instance] = max(self.expiry_free_at.get(mh.instance, 0),
                                                       until)
        return mh.instance

    def compatible(self, lock: MLock, mode: LockMode) -> bool:
        modes = set(lock.holders.values())
        return not modes or (mode == S and modes == {S})

    def in_delay(self, lock: MLock) -> bool:
        return self.now < lock.delay_until_ms

    def grant(self, inst: int, hid: int, mode: LockMode) -> int:
        lock = self.locks[inst]
        if not lock.holders:
            lock.generation = self.take()
        lock.holders[hid] = mode
        return lock.generation

    def regrant(self, inst: int) -> None:
        lock = self.locks[inst]
        if lock.delay_until_ms and self.now >= lock.delay_until_ms:
            lock.delay_until_ms = 0
        if self.in_delay(lock):
            return
        while lock.waiters and self.compatible(lock, lock.waiters[0][1]):
            hid, mode = lock.waiters.pop(0)
            generation = self.grant(inst, hid, mode)
            self.wakeups.append((self.handles[hid].sid, hid, ErrorCode.OK, generation))

    def remove_node(self, node: MNode) -> None:
        lock = self.locks.pop(node.instance)
        for hid, _ in lock.waiters:
            self.wakeups.append((self.handles[hid].sid, hid, ErrorCode.STALE_HANDLE, 0))
        for mh in self.handles.values():
            if mh.instance == node.instance:
                mh.stale = True
        if lock.delay_until_ms > self.now:
            self.path_delays[node.path] = max(self.path_delays.get(node.path, 0),
                                              lock.delay_until_ms)
        del self.nodes[node.path]

    def collect(self, inst: int) -> None:
        node = self.node_of(inst)
        if node is not None and node.ephemeral and not any(
                mh.instance == inst and not mh.stale for mh in self.handles.values()):
            self.remove_node(node)

    # ------------------------------------------------------------ driving

    def apply(self, cmd, expected_code: ErrorCode):
        result = self.h.apply(cmd)
        assert result.result.code == expected_code, (cmd, result.result)
        got = [(w.session_id, w.handle_id, w.code, w.lock_generation) for w in result.wakeups]
        assert got == self.wakeups, (cmd, got, self.wakeups)
        assert result.ended_sessions == tuple(sorted(self.ended_now))
        for wakeup in result.wakeups:
            if wakeup.code == ErrorCode.OK:
                self.check_grant(self.instance_of[wakeup.handle_id], wakeup.lock_generation,
                                 wakeup.sequencer)
        return result.result

    def check_grant(self, inst: int, generation: int, sequencer: str) -> None:
        # P5: no grant before an expired holder's lock-delay has run out.
        assert self.now >= self.expiry_free_at.get(inst, 0), "granted inside lock-delay"
        # P2: generations never go back; they rise on every free -> held.
        log = self.grant_log.setdefault(inst, [])
        assert not log or generation >= log[-1]
        log.append(generation)
        assert Sequencer.decode(sequencer).lock_generation == generation

    def pick_handle(self, index: int) -> MHandle | None:
        # Mostly live handles (so that calls get past validation), sometimes
        # closed, stale or expired ones (so that refusals are exercised too).
        live = [mh for mh in self.all_refs if mh.ref.handle_id in self.handles]
        if live and index < 1_000:
            return live[index % len(live)]
        return self.all_refs[index % len(self.all_refs)] if self.all_refs else None

    def pick_session(self, index: int) -> int | None:
        live = sorted(self.sessions)
        if live and index < 1_000:
            return live[index % len(live)]
        every = live + self.ended
        return every[index % len(every)] if every else None

    def handle_code(self, mh: MHandle, allow_stale: bool = False) -> ErrorCode | None:
        if mh.sid not in self.sessions:
            return ErrorCode.SESSION_EXPIRED
        if mh.ref.handle_id not in self.handles:
            return ErrorCode.BAD_HANDLE
        if mh.stale and not allow_stale:
            return ErrorCode.STALE_HANDLE
        return None

    def call(self, cls, mh: MHandle, **fields):
        return cls(now_ms=self.now, session_id=mh.sid, principal="root", handle=mh.ref, **fields)

    # ------------------------------------------------------------ rules

    @initialize()
    def start(self) -> None:
        for _ in range(3):
            self.new_session(4_000)
        self.open(0, "a", True, False, 700)
        self.open(1, "d", True, False, 0)

    @rule(lease_ms=st.sampled_from([1_000, 3_000, 8_000]))
    def new_session(self, lease_ms: int) -> None:
        if len(self.sessions) >= 4:  # a few sessions contend more than many
            return
        self.advance(self.now)
        sid = self.h.next_session_id
        self.h.next_session_id += 1
        self.apply(CreateSession(now_ms=self.now, session_id=sid, lease_end_ms=self.now + lease_ms),
                   ErrorCode.OK)
        self.sessions[sid] = self.now + lease_ms

    @rule(which=SESSION_PICK, extra_ms=st.sampled_from([0, 500, 3_000]))
    def extend(self, which: int, extra_ms: int) -> None:
        sid = self.pick_session(which)
        if sid is None:
            return
        self.advance(self.now)
        self.apply(ExtendLeases(now_ms=self.now, leases={sid: self.now + extra_ms}), ErrorCode.OK)
        if sid in self.sessions:
            self.sessions[sid] = max(self.sessions[sid], self.now + extra_ms)

    @rule(which=SESSION_PICK)
    def end_session_explicitly(self, which: int) -> None:
        sid = self.pick_session(which)
        if sid is None:
            return
        self.advance(self.now)
        if sid in self.sessions:
            self.end_sessions([sid])
            self.apply(EndSession(now_ms=self.now, session_id=sid), ErrorCode.OK)
        else:
            self.apply(EndSession(now_ms=self.now, session_id=sid), ErrorCode.SESSION_EXPIRED)

    @rule(delta_ms=st.sampled_from([0, 100, 400, 1_000, 2_500]))
    def tick(self, delta_ms: int) -> None:
        self.advance(self.now + delta_ms)
        self.apply(Tick(now_ms=self.now), ErrorCode.OK)

    @rule(which=SESSION_PICK, path=st.sampled_from(PATHS),
          create=st.sampled_from([True, True, False]),
          ephemeral=st.booleans(), delay_ms=st.sampled_from([0, 700, 2_000]))
    def open(self, which: int, path: str, create: bool, ephemeral: bool, delay_ms: int) -> None:
        sid = self.pick_session(which)
        if sid is None:
            return
        is_dir = path == "d"
        ephemeral = ephemeral and not is_dir
        mode = (CreateMode.DIRECTORY if is_dir else CreateMode.FILE) if create else CreateMode.NONE
        self.advance(self.now)
        cmd = Open(now_ms=self.now, session_id=sid, principal="root", epoch=1, path=p(path),
                   intent=int(ALL_INTENTS), create=mode, ephemeral=ephemeral,
                   lock_delay_ms=delay_ms)
        if sid not in self.sessions:
            self.apply(cmd, ErrorCode.SESSION_EXPIRED)
            return
        node = self.nodes.get(path)
        created = False
        if node is None:
            parent_missing = path == "d/x" and "d" not in self.nodes
            if not create or parent_missing:
                self.apply(cmd, ErrorCode.NOT_FOUND)
                return
            generation = self.take()
            node = MNode(self.next_instance, path, is_dir, ephemeral, b"", generation)
            self.next_instance += 1
            self.nodes[path] = node
            lock = self.locks[node.instance] = MLock()
            inherited = self.path_delays.pop(path, 0)
            if inherited > self.now:
                lock.delay_until_ms = inherited
            created = True
        result = self.apply(cmd, ErrorCode.OK)
        assert result.value.created == created
        assert result.value.stat.instance == node.instance
        assert result.value.stat.content_generation == node.generation
        mh = MHandle(sid, result.value.handle, node.instance, delay_ms)
        self.handles[mh.ref.handle_id] = mh
        self.all_refs.append(mh)
        self.instance_of[mh.ref.handle_id] = mh.instance

    @rule(which=HANDLE_PICK)
    def close(self, which: int) -> None:
        mh = self.pick_handle(which)
        if mh is None:
            return
        self.advance(self.now)
        code = self.handle_code(mh, allow_stale=True)
        if code is None:
            inst = self.close_handle(mh.ref.handle_id, ending=False)
            if inst is not None:
                self.regrant(inst)
                self.collect(inst)
        self.apply(self.call(Close, mh), code or ErrorCode.OK)

    @rule(which=HANDLE_PICK)
    def read(self, which: int) -> None:
        mh = self.pick_handle(which)
        if mh is None:
            return
        self.advance(self.now)
        code = self.handle_code(mh)
        node = None if code else self.node_of(mh.instance)
        if node is not None and node.is_directory:
            code = ErrorCode.IS_A_DIRECTORY
        result = self.apply(self.call(GetContentsAndStat, mh), code or ErrorCode.OK)
        if code is None:
            assert result.value.contents == node.contents
            assert result.value.stat.content_generation == node.generation

    @rule(which=HANDLE_PICK, contents=st.binary(max_size=8),
          cas=st.sampled_from([None, "current", "stale"]))
    def write(self, which: int, contents: bytes, cas: str | None) -> None:
        mh = self.pick_handle(which)
        if mh is None:
            return
        self.advance(self.now)
        code = self.handle_code(mh)
        node = None if code else self.node_of(mh.instance)
        expected = None
        if node is not None:
            if node.is_directory:
                code = ErrorCode.IS_A_DIRECTORY
            elif cas is not None:
                expected = node.generation if cas == "current" else node.generation - 1
                if cas == "stale":
                    code = ErrorCode.CAS_MISMATCH
        self.apply(self.call(SetContents, mh, contents=contents, expected_generation=expected),
                   code or ErrorCode.OK)
        if code is None:
            node.contents = contents
            node.generation = self.take()

    @rule(which=HANDLE_PICK)
    def delete(self, which: int) -> None:
        mh = self.pick_handle(which)
        if mh is None or which % 4 != 3:  # rarer than the other calls: it ends lock state
            return
        self.advance(self.now)
        code = self.handle_code(mh)
        node = None if code else self.node_of(mh.instance)
        if node is not None and node.is_directory and "d/x" in self.nodes:
            code = ErrorCode.NOT_EMPTY
        if code is None:
            self.remove_node(node)
        self.apply(self.call(Delete, mh), code or ErrorCode.OK)

    @rule(which=HANDLE_PICK, mode=st.sampled_from([X, S]), blocking=st.booleans())
    def acquire(self, which: int, mode: LockMode, blocking: bool) -> None:
        mh = self.pick_handle(which)
        if mh is None:
            return
        self.advance(self.now)
        code = self.handle_code(mh)
        cls = Acquire if blocking else TryAcquire
        if code is not None:
            self.apply(self.call(cls, mh, mode=mode), code)
            return
        lock = self.locks[mh.instance]
        hid = mh.ref.handle_id
        if hid in lock.holders:
            if lock.holders[hid] == mode:  # a retry answers as the grant did
                result = self.apply(self.call(cls, mh, mode=mode), ErrorCode.OK)
                assert result.value.granted
            else:
                self.apply(self.call(cls, mh, mode=mode), ErrorCode.LOCK_HELD)
            return
        if any(w == hid for w, _ in lock.waiters):
            if blocking and (hid, mode) in lock.waiters:  # a retry re-attaches
                assert self.apply(self.call(cls, mh, mode=mode), ErrorCode.OK).value == \
                    LockResult(False)
            else:
                self.apply(self.call(cls, mh, mode=mode), ErrorCode.INVALID_ARGUMENT)
            return
        if not lock.waiters and not self.in_delay(lock) and self.compatible(lock, mode):
            generation = self.grant(mh.instance, hid, mode)
            result = self.apply(self.call(cls, mh, mode=mode), ErrorCode.OK)
            assert result.value.granted and result.value.lock_generation == generation
            self.check_grant(mh.instance, generation, result.value.sequencer)
        elif blocking:
            lock.waiters.append((hid, mode))
            assert self.apply(self.call(cls, mh, mode=mode), ErrorCode.OK).value == \
                LockResult(False)
        else:
            self.apply(self.call(cls, mh, mode=mode), ErrorCode.LOCK_HELD)

    @rule(which=HANDLE_PICK, mode=st.sampled_from([X, S]), blocking=st.booleans())
    def acquire_again(self, which: int, mode: LockMode, blocking: bool) -> None:
        self.acquire(which, mode, blocking)  # locks are the point: run them more often

    @rule(which=HANDLE_PICK, mode=st.sampled_from([X, S]), blocking=st.booleans())
    def acquire_once_more(self, which: int, mode: LockMode, blocking: bool) -> None:
        self.acquire(which, mode, blocking)

    @rule(which=HANDLE_PICK)
    def release(self, which: int) -> None:
        mh = self.pick_handle(which)
        if mh is None:
            return
        self.advance(self.now)
        code = self.handle_code(mh)
        if code is None:
            lock = self.locks[mh.instance]
            hid = mh.ref.handle_id
            if hid in lock.holders:
                del lock.holders[hid]
                self.regrant(mh.instance)
            elif any(w == hid for w, _ in lock.waiters):
                lock.waiters = [(w, m) for w, m in lock.waiters if w != hid]
                self.wakeups.append((mh.sid, hid, ErrorCode.CANCELLED, 0))
                self.regrant(mh.instance)
            else:
                code = ErrorCode.LOCK_NOT_HELD
        self.apply(self.call(Release, mh), code or ErrorCode.OK)

    # ------------------------------------------------------------ invariants

    @invariant()
    def state_matches_model_and_properties_hold(self) -> None:
        sm = self.h.sm
        sm.assert_invariants()
        assert sorted(sm.sessions) == sorted(self.sessions)
        assert {path: n.instance for path, n in self.nodes.items()} == {
            path[len(p()) + 1:]: inst for path, inst in sm.by_path.items()
            if not path.startswith(p("acl")) and path != p()}
        for node in self.nodes.values():
            real = sm.nodes[node.instance]
            assert real.contents == node.contents and real.content_generation == node.generation
            lock, model = real.lock, self.locks[node.instance]
            # P1
            modes = list(lock.holders.values())
            assert modes.count(X) <= 1 and not (X in modes and S in modes)
            assert lock.holders == model.holders
            assert list(lock.waiters) == model.waiters
            assert lock.generation == model.generation
            assert lock.delay_until_ms == model.delay_until_ms
        # P6: nothing is owned by an ended session.
        for handle in sm.handles.values():
            assert handle.session_id in self.sessions
        for sid in self.ended:
            assert sid not in sm.sessions and not sm.session_handle_ids(sid)
        assert sorted(sm.handles) == sorted(self.handles)


CellModel.TestCase.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCellModel = CellModel.TestCase
