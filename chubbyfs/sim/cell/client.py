"""Simulated Chubby clients: sessions kept alive by KeepAlive calls, handles,
locks, a fenced resource, and a random workload whose node operations are
recorded in a Knossos history for the P8 check.

A client reaches the cell only through the simulated links: requests go to
the replica it believes is the master, `not_leader` redirects it, and a lost
request or reply is a timeout. It follows the real client's rules
(`client/session.py`): the lease counts from when the KeepAlive was sent,
and a lock is believed held only while the local lease has not run out.
A holder checks that belief before it touches the fenced resource, but a
pause (GC, SIGSTOP: the `pause_holder` fault) between the check and the
write is exactly what fencing has to survive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..checkers.fencing import FencingError

from .rpc import CLIENT_ENDPOINT_BASE

if TYPE_CHECKING:
    from .cluster import CellSimCluster

INTENT_READ, INTENT_WRITE, INTENT_LOCK = 1, 2, 4
CREATE_FILE = 1
# Errors after which the request certainly was not applied: try again.
_RETRY_CODES = ("retry", "lost")
# Errors that leave the outcome unknown.
_UNKNOWN_CODES = ("unavailable", "timeout", "internal")


@dataclass(frozen=True, slots=True)
class Reply:
    kind: str  # ok | error (a definite answer from the cell) | unknown | gave_up (certainly not applied)
    value: Any = None
    code: str = ""
    node: int = 0  # the replica that answered


@dataclass
class Holding:
    path: str
    ref: list
    sequencer: str
    generation: int
    mode: str
    rounds_left: int


class ChubbyClient:
    def __init__(self, cluster: CellSimCluster, index: int) -> None:
        self.cluster = cluster
        self.cfg = cluster.cell_config
        self.index = index
        self.endpoint = CLIENT_ENDPOINT_BASE + index
        cluster.links.attach_client(self.endpoint)
        self.rng = cluster.rng.stream(f"chubby-client-{index}")
        self.leader_guess = cluster.node_ids[index % len(cluster.node_ids)]
        self.session_id: int | None = None
        self.lease_ms = self.cfg.session_lease_ms
        self.lease_deadline = 0.0
        self.data_handles: dict[str, tuple[list, int, int]] = {}  # path -> (ref, instance, last generation)
        self.lock_handles: dict[str, list] = {}
        self.ephemeral_handles: dict[str, list] = {}
        self.holding: Holding | None = None
        self.last_sequencer = ""
        self.process = cluster.cell_history.new_process()
        self.frozen_until = 0.0
        self.pause_at_write_seconds = 0.0  # set by the pause_holder fault
        self.writes = 0
        self.stats: Counter[str] = Counter()

    # ---- plumbing ------------------------------------------------------------------

    def log(self, text: str) -> None:
        self.cluster.log(f"c{self.index} {text}")

    async def gate(self) -> None:
        """A paused client (the whole process) stops here until it resumes."""
        while trio.current_time() < self.frozen_until:
            await trio.sleep_until(self.frozen_until)

    def freeze(self, seconds: float) -> None:
        self.frozen_until = max(self.frozen_until, trio.current_time() + seconds)
        self.log(f"paused for {seconds:.3f}s")

    def _redirect(self, hint: Any) -> None:
        ids = self.cluster.node_ids
        if isinstance(hint, int) and hint in self.cluster.nodes and hint != self.leader_guess:
            self.leader_guess = hint
        else:
            self.leader_guess = ids[self.rng.randrange(len(ids))]

    async def call(self, op: str, *, mutating: bool, retry_unknown: bool = False, timeout: float | None = None,
                   attempt: float | None = None, **fields: Any) -> Reply:
        """One operation, retried across replicas while that is safe: always
        for reads, after an unknown outcome only if `retry_unknown` (the op
        is idempotent), never after the cell gave a definite answer."""
        cfg = self.cfg
        links = self.cluster.links
        body = {"op": op, **fields}
        deadline = trio.current_time() + (timeout or cfg.request_timeout_seconds)
        attempt = attempt or cfg.attempt_timeout_seconds
        uncertain = False
        while True:
            await self.gate()
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return Reply("unknown" if uncertain else "gave_up", code="deadline")
            target = self.leader_guess
            reply = await links.call(self.endpoint, target, body, min(attempt, remaining))
            code = None if reply is None else reply.get("error")
            if reply is not None and code is None:
                return Reply("ok", reply.get("value"), node=target)
            if reply is None or code in _UNKNOWN_CODES:
                if mutating:
                    uncertain = True
                    if not retry_unknown:
                        return Reply("unknown", code=code or "timeout", node=target)
                self._redirect(None)
                continue
            if code == "not_leader":
                self._redirect(reply.get("leader"))
                await trio.sleep(0.01)
                continue
            if code in _RETRY_CODES:
                await trio.sleep(0.02)
                continue
            return Reply("error", reply, code=code, node=target)

    # ---- sessions ------------------------------------------------------------------------

    def believes_session(self) -> bool:
        return self.session_id is not None and trio.current_time() < self.lease_deadline

    async def ensure_session(self) -> bool:
        if self.session_id is not None:
            return True
        sent = trio.current_time()
        reply = await self.call("create_session", mutating=True)
        if reply.kind != "ok":
            return False
        self.session_id = reply.value["session_id"]
        self.lease_ms = reply.value["lease_ms"]
        self.lease_deadline = sent + self.lease_ms / 1000
        self.stats["sessions"] += 1
        self.log(f"session {self.session_id} created via n{reply.node}")
        return True

    def lose_session(self, why: str) -> None:
        if self.session_id is not None:
            self.log(f"session {self.session_id} lost: {why}")
        self.session_id = None
        self.data_handles.clear()
        self.lock_handles.clear()
        self.ephemeral_handles.clear()
        self.holding = None

    def _session_expired(self, session_id: int, reply: Reply) -> None:
        """The cell said the session ended. Cross-check white-box: it must have
        ended in the cell, or be past its lease by the answering master's time."""
        cluster = self.cluster
        if not cluster.session_ended_in_cell(session_id):
            node = cluster.nodes[reply.node]
            master_now = node.clock_ms()
            if node.raft is not None:
                master_now = max(master_now, node.raft.state_machine.sm.now_ms)
            live = [n.id for n in cluster.nodes.values() if n.raft is not None
                    and session_id in n.raft.state_machine.sm.sessions
                    and n.raft.state_machine.sm.sessions[session_id].lease_end_ms > master_now]
            if live:
                cluster.false_expiries.append(
                    f"P6 false session expiry: n{reply.node} answered session_expired for session {session_id} "
                    f"(c{self.index}) at {trio.current_time():.4f}s, but it is live on replicas {live} with "
                    f"its lease beyond n{reply.node}'s time {master_now} ms")
        self.lose_session(f"cell says expired (n{reply.node})")

    async def keep_alive_loop(self) -> None:
        while True:
            await trio.sleep(self.lease_ms / 3000)
            await self.gate()
            session_id = self.session_id
            if session_id is None:
                continue
            if trio.current_time() >= self.lease_deadline:
                self.lose_session("lease ran out locally")
                continue
            sent = trio.current_time()
            reply = await self.call("keep_alive", mutating=False, timeout=max(0.05, self.lease_deadline - sent),
                                    session_id=session_id)
            if self.session_id != session_id:
                continue
            if reply.kind == "ok":
                self.lease_deadline = max(self.lease_deadline, sent + reply.value["lease_ms"] / 1000)
            elif reply.kind == "error" and reply.code == "session_expired":
                self._session_expired(session_id, reply)
            elif trio.current_time() >= self.lease_deadline:
                self.lose_session("keep-alive failed until the lease ran out")

    def _handle_error(self, reply: Reply, session_id: int) -> None:
        if reply.kind == "error" and reply.code == "session_expired" and self.session_id == session_id:
            self._session_expired(session_id, reply)

    # ---- workload ---------------------------------------------------------------------------

    async def run_workload(self, stop: trio.Event) -> None:
        think = self.cfg.think_seconds
        while not stop.is_set():
            await self.gate()
            if not await self.ensure_session():
                await trio.sleep(0.05)
                continue
            if self.holding is not None:
                await self._critical_step()
            else:
                roll = self.rng.random()
                if roll < 0.45:
                    await self._data_op()
                elif roll < 0.80:
                    await self._lock_op()
                elif roll < 0.90:
                    await self._ephemeral_op()
                elif roll < 0.97:
                    await self._check_sequencer()
                else:
                    await self._end_session()
            if think:
                await trio.sleep(self.rng.expovariate(1.0 / think))

    async def _open(self, path: str, *, create: bool, intent: int, ephemeral: bool = False,
                    lock_delay_ms: int | None = None) -> Reply:
        fields: dict[str, Any] = {"path": path, "intent": intent, "create": CREATE_FILE if create else 0,
                                  "ephemeral": ephemeral}
        if lock_delay_ms is not None:
            fields["lock_delay_ms"] = lock_delay_ms
        return await self.call("open", mutating=create, session_id=self.session_id, **fields)

    # -- node operations (recorded for P8) --

    def _invoke(self, f: str, path: str, args: Any) -> None:
        self.cluster.cell_history.invoke(self.process, f, path, args, trio.current_time())

    def _complete(self, reply: Reply, output: Any) -> None:
        """ok: the cell answered (output is what it said); fail: certainly no
        effect on the node; info: unknown (the process is then retired)."""
        history = self.cluster.cell_history
        now = trio.current_time()
        if reply.kind == "unknown":
            history.info(self.process, reply.code, now)
            self.process = history.new_process()
        elif output is None:
            history.fail(self.process, reply.code or reply.kind, now)
        else:
            history.ok(self.process, output, now)

    async def _data_op(self) -> None:
        cfg = self.cfg
        path = cfg.data_paths[self.rng.randrange(len(cfg.data_paths))]
        session_id = self.session_id
        assert session_id is not None
        held = self.data_handles.get(path)
        if held is None:
            create = self.rng.random() < 0.8
            self._invoke("open", path, create)
            reply = await self._open(path, create=create, intent=INTENT_READ | INTENT_WRITE)
            output = None
            if reply.kind == "ok":
                stat = reply.value["stat"]
                output = ("ok", reply.value["created"], stat["instance"], stat["content_generation"])
                if self.session_id == session_id:
                    self.data_handles[path] = (reply.value["handle"], stat["instance"], stat["content_generation"])
            elif reply.code == "not_found":
                output = ("not_found",)
            self._complete(reply, output)
            self._handle_error(reply, session_id)
            return
        ref, instance, generation = held
        roll = self.rng.random()
        if roll < 0.35:
            f, args, op, fields = "read", instance, "get_contents_and_stat", {}
        elif roll < 0.6:
            contents = self._next_value()
            f, args, op, fields = "write", (instance, contents), "set_contents", {"contents": contents}
        elif roll < 0.85:
            contents = self._next_value()
            f, args, op = "cas", (instance, generation, contents), "set_contents"
            fields = {"contents": contents, "expected_generation": generation}
        elif roll < 0.93:
            f, args, op, fields = "delete", instance, "delete", {}
        else:
            await self._close_handle(ref)
            self.data_handles.pop(path, None)
            return
        self._invoke(f, path, args)
        reply = await self.call(op, mutating=f != "read", session_id=session_id, handle=ref, **fields)
        output = None
        if reply.kind == "ok":
            if f == "read":
                output = ("ok", reply.value["contents"], reply.value["stat"]["content_generation"])
                generation = output[2]
            elif f == "delete":
                output = ("ok",)
            else:
                output = ("ok", reply.value["content_generation"])
                generation = output[1]
        elif reply.code == "stale_handle":
            output = ("stale",)
        elif reply.code == "cas_mismatch":
            output = ("mismatch",)
        self._complete(reply, output)
        self._handle_error(reply, session_id)
        if self.session_id != session_id:
            return
        if output is None or output[0] != "ok" or f == "delete":
            self.data_handles.pop(path, None)
        else:
            self.data_handles[path] = (ref, instance, generation)

    def _next_value(self) -> bytes:
        self.writes += 1
        return f"c{self.index}-{self.writes}".encode()

    async def _close_handle(self, ref: list) -> None:
        await self.call("close", mutating=True, retry_unknown=True, session_id=self.session_id, handle=ref)

    # -- locks and the fenced resource --

    async def _lock_op(self) -> None:
        cfg = self.cfg
        session_id = self.session_id
        path = cfg.lock_paths[self.rng.randrange(len(cfg.lock_paths))]
        ref = self.lock_handles.get(path)
        if ref is None:
            # The last lock file is ephemeral: it goes with its last handle,
            # and a re-created one must still honour a pending lock-delay.
            ephemeral = len(cfg.lock_paths) > 1 and path == cfg.lock_paths[-1]
            reply = await self._open(path, create=True, intent=INTENT_READ | INTENT_WRITE | INTENT_LOCK,
                                     ephemeral=ephemeral, lock_delay_ms=cfg.lock_delay_ms)
            if reply.kind != "ok":
                self._handle_error(reply, session_id)
                return
            ref = reply.value["handle"]
            self.lock_handles[path] = ref
        mode = "shared" if self.rng.random() < 0.2 else "exclusive"
        op = "acquire" if self.rng.random() < 0.6 else "try_acquire"
        timeout = 2 * cfg.acquire_attempt_seconds if op == "acquire" else None
        reply = await self.call(op, mutating=True, retry_unknown=True, timeout=timeout,
                                attempt=cfg.acquire_attempt_seconds if op == "acquire" else None,
                                session_id=session_id, handle=ref, mode=mode)
        if self.session_id != session_id:
            return
        if reply.kind == "ok" and reply.value["granted"]:
            self.stats["grants"] += 1
            self.holding = Holding(path, ref, reply.value["sequencer"], reply.value["lock_generation"], mode,
                                   self.rng.randint(1, 4))
            self.last_sequencer = reply.value["sequencer"]
            self.log(f"holds {path} {mode} generation {reply.value['lock_generation']}")
        elif reply.kind in ("unknown", "gave_up"):
            # It may still be queued, or granted later: give the handle up
            # (Close cancels a queued Acquire and releases a held lock).
            await self._close_handle(ref)
            self.lock_handles.pop(path, None)
        elif reply.kind == "error":
            if reply.code in ("stale_handle", "bad_handle", "cancelled"):
                self.lock_handles.pop(path, None)
            self._handle_error(reply, session_id)

    async def _fenced(self, action: str, holding: Holding, *args: Any) -> Any:
        """A round trip to the fenced resource (direct, with network-like delays)."""
        resource = self.cluster.resource
        await trio.sleep(0.001 + self.rng.expovariate(1 / 0.003))
        try:
            if action == "read":
                result = resource.read(holding.sequencer)
            else:
                result = resource.write(holding.sequencer, *args)
        except FencingError as exc:
            self.stats["fenced_rejections"] += 1
            self.log(f"resource refused {action} on {holding.path} generation {holding.generation}: {exc}")
            return None
        await trio.sleep(0.001 + self.rng.expovariate(1 / 0.003))
        return result

    async def _critical_step(self) -> None:
        holding = self.holding
        assert holding is not None
        if not self.believes_session():
            self.holding = None  # the keep-alive loop decides what happens to the session
            return
        if holding.rounds_left <= 0:
            await self._leave_critical(holding)
            return
        holding.rounds_left -= 1
        read = await self._fenced("read", holding)
        if read is None:
            await self._leave_critical(holding)
            return
        if holding.mode != "exclusive":
            return
        version, elements = read
        await trio.sleep(self.rng.expovariate(1 / 0.01))
        if not self.believes_session() or self.holding is not holding:
            return
        # Checked; now act. A pause right here is the classic lock-safety trap.
        if self.pause_at_write_seconds:
            self.freeze(self.pause_at_write_seconds)
            self.pause_at_write_seconds = 0.0
            await self.gate()
        element = f"c{self.index}-g{holding.generation}-{self.writes}"
        self.writes += 1
        if await self._fenced("write", holding, version, elements + (element,)) is None:
            await self._leave_critical(holding)

    async def _leave_critical(self, holding: Holding) -> None:
        self.holding = None
        roll = self.rng.random()
        if roll < 0.7:
            await self.call("release", mutating=True, retry_unknown=True, session_id=self.session_id,
                            handle=holding.ref)
        elif roll < 0.9:
            await self._close_handle(holding.ref)
            self.lock_handles.pop(holding.path, None)
        else:
            # Leave with the lock held: the cell must apply lock-delay.
            await self._end_session()

    # -- ephemerals, sequencer checks, session end --

    async def _ephemeral_op(self) -> None:
        path = self.cfg.ephemeral_paths[self.rng.randrange(len(self.cfg.ephemeral_paths))]
        ref = self.ephemeral_handles.pop(path, None)
        if ref is not None:
            await self._close_handle(ref)
            return
        session_id = self.session_id
        reply = await self._open(path, create=True, intent=INTENT_READ, ephemeral=True)
        if reply.kind == "ok" and self.session_id == session_id:
            self.ephemeral_handles[path] = reply.value["handle"]
        else:
            self._handle_error(reply, session_id)

    async def _check_sequencer(self) -> None:
        if not self.last_sequencer:
            return
        reply = await self.call("check_sequencer", mutating=False, sequencer=self.last_sequencer)
        if reply.kind == "ok":
            self.stats["sequencer_valid" if reply.value["valid"] else "sequencer_invalid"] += 1
            if reply.value["valid"]:
                from ...locks import Sequencer

                seq = Sequencer.decode(self.last_sequencer)
                if not self.cluster.lock_checker.granted(seq.path, seq.lock_generation, int(seq.mode)):
                    self.cluster.violations.append(
                        f"P2: check_sequencer called {self.last_sequencer!r} valid, but it was never granted")

    async def _end_session(self) -> None:
        session_id = self.session_id
        if session_id is None:
            return
        await self.call("end_session", mutating=True, retry_unknown=True, session_id=session_id)
        if self.session_id == session_id:
            self.lose_session("ended by the client")
