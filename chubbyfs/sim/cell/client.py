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

from ...client.cache_core import ABSENT, DirEntry
from ...client.events import EventKind
from ...wire.cell_protocol import NUMBERED_OPS, Stat
from ..checkers.fencing import FencingError

from .cluster import CELL_ROOT, SIM_BUILT_AT, SIM_LEASE_END
from .rpc import CLIENT_ENDPOINT_BASE
from .session import SimSession

if TYPE_CHECKING:
    from .cluster import CellSimCluster

INTENT_READ, INTENT_WRITE, INTENT_LOCK = 1, 2, 4
CREATE_FILE = 1
# Event subscriptions (EventKind bits): data files, lock files, the watched cell root.
DATA_EVENTS = int(EventKind.CONTENTS_MODIFIED | EventKind.HANDLE_INVALID)
LOCK_EVENTS = int(EventKind.LOCK_ACQUIRED | EventKind.CONFLICTING_LOCK | EventKind.HANDLE_INVALID)
WATCH_EVENTS = int(EventKind.CHILD_ADDED | EventKind.CHILD_REMOVED | EventKind.CHILD_MODIFIED)
# Errors after which the request certainly was not applied: try again.
_RETRY_CODES = ("retry", "lost")
# Errors that leave the outcome unknown. (`stale_request` answers a call of
# ours only if the cell forgot its number, which it does only for a client
# with too many calls in flight: applied or not, we cannot tell.)
_UNKNOWN_CODES = ("unavailable", "timeout", "internal", "stale_request")
# A refusal a retry can get whatever became of an earlier attempt: the
# session ended, and its request records with it.
_RECORD_LOST_CODES = frozenset({"session_expired"})


@dataclass(frozen=True, slots=True)
class Reply:
    kind: str  # ok | error (a definite answer from the cell) | unknown | gave_up (certainly not applied)
    value: Any = None
    code: str = ""
    node: int = 0  # the replica that answered
    fields: dict | None = None  # the whole reply (a cacheable read's `cacheable`, `seq`, ... beside `value`)


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
        # CreateSession nonces, from a stream of their own: drawing them
        # shifts no other choice of the client.
        self.nonces = cluster.rng.stream(f"chubby-client-{index}-nonces")
        self.leader_guess = cluster.node_ids[index % len(cluster.node_ids)]
        self.session: SimSession | None = None
        self.sessions: list[SimSession] = []  # every session this client had, for the event check
        self.lease_ms = self.cfg.session_lease_ms
        self.watch_handle: list | None = None  # the cell root, opened for child events
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
        for reads and for numbered calls (the cell applies each number once,
        as for the real client), after an unknown outcome otherwise only if
        `retry_unknown` (the op is idempotent), never after the cell gave a
        definite answer."""
        session = self._numbering_session(op, fields.get("session_id"))
        if session is None:
            return await self._attempts(op, mutating, retry_unknown, timeout, attempt, fields)
        request_no, answered_below = session.requests.begin()
        try:
            return await self._attempts(op, mutating, True, timeout, attempt,
                                        {**fields, "request_no": request_no, "answered_below": answered_below})
        finally:
            session.requests.end(request_no)

    def _numbering_session(self, op: str, session_id: Any) -> SimSession | None:
        """The session whose numbers a call carries (None: not a numbered op,
        or a session this client no longer has, whose calls the cell refuses)."""
        if op not in NUMBERED_OPS:
            return None
        return next((s for s in reversed(self.sessions) if s.id == session_id), None)

    async def _attempts(self, op: str, mutating: bool, retry_unknown: bool, timeout: float | None,
                        attempt: float | None, fields: dict) -> Reply:
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
                return Reply("ok", reply.get("value"), node=target, fields=reply)
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
            if uncertain and code in _RECORD_LOST_CODES:
                # An earlier attempt may have applied, and its record went
                # with the session: this answer says nothing of its fate.
                return Reply("unknown", code=code, node=target)
            return Reply("error", reply, code=code, node=target)

    # ---- sessions ------------------------------------------------------------------------

    @property
    def session_id(self) -> int | None:
        return None if self.session is None else self.session.id

    def believes_session(self) -> bool:
        """SAFE within the local lease: the client may act on its locks."""
        return self.session is not None and self.session.safe(trio.current_time())

    async def ensure_session(self) -> bool:
        if self.session is not None:
            return True
        sent = trio.current_time()
        # One nonce for every attempt: a retry gets the session its first
        # attempt created, rather than a second one that is left to expire.
        reply = await self.call("create_session", mutating=True, retry_unknown=True,
                                nonce=self.nonces.getrandbits(64) or 1)
        if reply.kind != "ok":
            return False
        self.lease_ms = reply.value["lease_ms"]
        self.session = SimSession(reply.value["session_id"], self.lease_ms, sent_at=sent,
                                  epoch=reply.value["epoch"], grace_ms=self.cfg.grace_ms,
                                  master_lease_end_ms=reply.value["lease_end_ms"],
                                  unsafe_cache=self.cfg.unsafe_cache)
        self.sessions.append(self.session)
        self.stats["sessions"] += 1
        self.log(f"session {self.session_id} created via n{reply.node}")
        return True

    def lose_session(self, why: str) -> None:
        if self.session is not None:
            self.log(f"session {self.session_id} lost: {why}")
        self.session = None
        self.data_handles.clear()
        self.lock_handles.clear()
        self.ephemeral_handles.clear()
        self.watch_handle = None
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

    def _tick(self, session: SimSession) -> bool:
        """Move the local lease on; False (and the session dropped) once expired."""
        session.tick(trio.current_time())
        if session.expired and self.session is session:
            self.lose_session("no master reached within the grace period")
        return not session.expired

    def start_session_tasks(self, nursery: trio.Nursery) -> None:
        """The session's background: the KeepAlive loop and the lease timer."""
        nursery.start_soon(self.keep_alive_loop)
        nursery.start_soon(self.lease_timer)

    async def lease_timer(self) -> None:
        """Jeopardy and expiry happen on time, not only when the client next looks."""
        while True:
            session = self.session
            deadline_ms = None if session is None else session.core.next_deadline_ms()
            if session is None or deadline_ms is None:
                await trio.sleep(0.02)
                continue
            await trio.sleep_until(max(trio.current_time(), deadline_ms / 1000 + 1e-6))
            await self.gate()
            if self.session is session:
                self._tick(session)

    async def keep_alive_loop(self) -> None:
        """One long-poll KeepAlive outstanding at a time, acknowledging every
        item processed so far (as `Session.keep_alive_forever` does). Each
        attempt is bounded by the local lease (a quarter lease in jeopardy)."""
        while True:
            await self.gate()
            session = self.session
            if session is None or not self._tick(session):
                await trio.sleep(0.02)
                continue
            sent = trio.current_time()
            safe = session.safe(sent)
            if safe:
                attempt = max(0.05, session.core.local_lease_end_ms / 1000 - sent)
            else:
                attempt = max(0.05, session.lease_ms / 4000)
            reply = await self.call("keep_alive", mutating=False, timeout=attempt, attempt=attempt,
                                    session_id=session.id, hold=safe, ack=session.cache.last_seq,
                                    ack_epoch=session.cache.epoch)
            await self.gate()  # a paused process handles the reply when it resumes
            if self.session is not session:
                continue
            if reply.kind == "ok":
                value = reply.value
                now = trio.current_time()
                if value.get("items"):
                    self.log(f"keep-alive from n{reply.node} epoch {value.get('epoch')} items "
                             f"{[tuple(item[:4]) for item in value['items']]}")
                session.process_items(value.get("epoch", 0), value.get("items", ()), now,
                                      (reply.fields or {}).get(SIM_BUILT_AT))
                session.renewed(sent_at=sent, lease_ms=value["held_ms"] + value["lease_ms"], now=now,
                                master_lease_end_ms=(reply.fields or {}).get(SIM_LEASE_END, 0))
                self.stats["keep_alives"] += 1
                if session.expired:
                    self.lose_session("renewed only after the grace period")
            elif reply.kind == "error" and reply.code == "session_expired":
                self._session_expired(session.id, reply)
            else:
                await trio.sleep(0.02)  # no master yet; the lease timer decides our fate

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
            session = self.session
            assert session is not None
            if not session.cache_usable(trio.current_time()):
                # Jeopardy: calls wait until a master renews the session or
                # the grace period ends (Chubby §2.8).
                await trio.sleep(0.01)
                continue
            if self.holding is not None:
                await self._critical_step()
            else:
                roll = self.rng.random()
                if roll < 0.45:
                    await self._data_op()
                elif roll < 0.75:
                    await self._lock_op()
                elif roll < 0.83:
                    await self._ephemeral_op()
                elif roll < 0.91:
                    await self._watch_op()
                elif roll < 0.97:
                    await self._check_sequencer()
                else:
                    await self._end_session()
            if think:
                await trio.sleep(self.rng.expovariate(1.0 / think))

    async def _open(self, path: str, *, create: bool, intent: int, ephemeral: bool = False,
                    lock_delay_ms: int | None = None, events: int = 0) -> Reply:
        fields: dict[str, Any] = {"path": path, "intent": intent, "create": CREATE_FILE if create else 0,
                                  "ephemeral": ephemeral, "events": events}
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
            # Half the opens of a name the cache knows to be absent try it
            # without create: answered from the negative entry.
            create = self.rng.random() < (0.5 if self._known_absent(path) else 0.8)
            if not create and self._cached_absence(path):
                return
            self._invoke("open", path, create)
            reply = await self._open(path, create=create, intent=INTENT_READ | INTENT_WRITE, events=DATA_EVENTS)
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
        # Read-mostly, as Chubby's clients are: reads are what the cache serves.
        if roll < 0.55:
            # A burst of reads: the first may fill the cache, the rest hit it.
            for _ in range(self.rng.choice((1, 1, 2, 3))):
                if not await self._read(path, ref, instance, session_id):
                    return
                await trio.sleep(self.rng.expovariate(1.0 / (self.cfg.think_seconds or 0.01)))
                await self.gate()
            return
        if roll < 0.7:
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
        reply = await self.call(op, mutating=True, session_id=session_id, handle=ref, **fields)
        output = None
        if reply.kind == "ok":
            output = ("ok",) if f == "delete" else ("ok", reply.value["content_generation"])
        self._after_data_op(path, ref, instance, session_id, reply, output)

    def _after_data_op(self, path: str, ref: list, instance: int, session_id: int, reply: Reply,
                       output: tuple | None) -> bool:
        """Record a data op's outcome and keep the handle table; True if the
        handle is still good for more."""
        if reply.kind != "ok":
            output = {"stale_handle": ("stale",), "cas_mismatch": ("mismatch",)}.get(reply.code)
        self._complete(reply, output)
        self._handle_error(reply, session_id)
        if self.session_id != session_id:
            return False
        if output is None or output[0] != "ok" or output == ("ok",):
            self.data_handles.pop(path, None)
            return False
        self.data_handles[path] = (ref, instance, output[-1])
        return True

    async def _read(self, path: str, ref: list, instance: int, session_id: int) -> bool:
        """One read: from the cache when it can be, else from the master with
        `cache: true`, installing the reply if the master allows."""
        if self._cached_read(path, instance, session_id):
            return True
        self._invoke("read", path, instance)
        reply = await self.call("get_contents_and_stat", mutating=False, session_id=session_id, handle=ref,
                                cache=True)
        output = None
        if reply.kind == "ok":
            output = ("ok", reply.value["contents"], reply.value["stat"]["content_generation"])
            session = self.session
            if session is not None and session.id == session_id and reply.fields is not None:
                if session.install_contents(reply.fields, output[1], Stat.from_wire(reply.value["stat"]),
                                            trio.current_time()):
                    self.log(f"caches {path} generation {output[2]} (seq {reply.fields['seq']} "
                             f"epoch {reply.fields['epoch']} from n{reply.node})")
        return self._after_data_op(path, ref, instance, session_id, reply, output)

    def _cached_read(self, path: str, instance: int, session_id: int) -> bool:
        """Serve a read from the cache if it can be: recorded as an
        instantaneous read for WGL, and checked against the local lease.
        Never once the session it was asked under is gone (lost during a
        burst of reads, say)."""
        session = self.session
        if session is None or session.id != session_id:
            return False
        now = trio.current_time()
        hit = session.cached_contents(path, instance, now)
        if hit is None:
            return False
        contents, stat = hit
        self._cache_hit(session, now, "cache_hits")
        self._invoke("read", path, instance)
        self.cluster.cell_history.ok(self.process, ("ok", contents, stat.content_generation), now)
        held = self.data_handles.get(path)
        if held is not None:
            self.data_handles[path] = (held[0], held[1], stat.content_generation)
        return True

    def _cache_hit(self, session: SimSession, now: float, what: str) -> None:
        self.cluster.cache_checker.on_hit(f"c{self.index} session {session.id}", now, session.checked_lease_end,
                                          session.safe(now))
        self.stats[what] += 1

    def _known_absent(self, path: str) -> bool:
        session = self.session
        return (session is not None and session.cache_usable(trio.current_time())
                and session.cache.lookup(path) is ABSENT)

    def _cached_absence(self, path: str) -> bool:
        """Opening a name the cache knows to be absent fails at once (a
        negative entry, from a cached listing): recorded like a read."""
        session = self.session
        assert session is not None
        now = trio.current_time()
        if not self._known_absent(path):
            return False
        self._cache_hit(session, now, "negative_hits")
        self._invoke("open", path, False)
        self.cluster.cell_history.ok(self.process, ("not_found",), now)
        return True

    async def _watch_op(self) -> None:
        """Open the cell root for child events, or list it through the cache
        (the listing is where negative entries come from)."""
        session = self.session
        assert session is not None
        if self.watch_handle is None:
            reply = await self._open(CELL_ROOT, create=False, intent=INTENT_READ, events=WATCH_EVENTS)
            if reply.kind == "ok" and self.session is session:
                self.watch_handle = reply.value["handle"]
            else:
                self._handle_error(reply, session.id)
            return
        ref = self.watch_handle
        now = trio.current_time()
        if session.cache_usable(now) and session.cache.get_listing(CELL_ROOT, ref[2]) is not None:
            self._cache_hit(session, now, "listing_hits")
            return
        reply = await self.call("read_dir", mutating=False, session_id=session.id, handle=ref, cache=True)
        if reply.kind == "ok" and self.session is session and reply.fields is not None:
            fields = reply.fields
            entries = tuple(DirEntry(e["name"], Stat.from_wire(e["stat"])) for e in reply.value["entries"])
            if fields.get("cacheable") is True and session.cache_usable(trio.current_time()):
                session.cache.put_listing(fields["cache_path"], ref[2], entries, epoch=fields["epoch"],
                                          seq=fields["seq"])
        else:
            self._handle_error(reply, session.id)

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
                                     ephemeral=ephemeral, lock_delay_ms=cfg.lock_delay_ms, events=LOCK_EVENTS)
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
            return  # jeopardy: wait; the lease timer and KeepAlives decide the session's fate
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
            # Numbered: an attempt held at a master while a retry went
            # through is never applied later, so the handle may be used to
            # acquire again (finding 5).
            reply = await self.call("release", mutating=True, session_id=self.session_id, handle=holding.ref)
            if reply.kind != "ok":
                await self._close_handle(holding.ref)
                self.lock_handles.pop(holding.path, None)
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
        if session_id is None or self.session is None:
            return
        self.session.begin_end()
        await self.call("end_session", mutating=True, retry_unknown=True, session_id=session_id)
        if self.session_id == session_id:
            self.lose_session("ended by the client")
