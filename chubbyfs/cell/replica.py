"""One replica process: `chubbyfs cell start --config FILE --id N`.

Composes the pieces: durable storage in the replica's data directory, the
Raft node, the TCP transport to its peers, the service that answers clients
(the Chubby master of `cell/master.py`, or for Raft-level tests and
benchmarks the key/value register of `cell/kv.py`), and one listener that
accepts both replica-to-replica (`kind: raft`) and client (`kind: client`)
connections.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
import os
import random
from functools import partial
from pathlib import Path
from typing import Any

import trio

from chubbyfs.raft.node import ProposalLostError, ProposalOutcomeUnknownError, RaftNode, bootstrap_storage
from chubbyfs.raft.rawnode import Config, NotLeaderError, ProposalDroppedError
from chubbyfs.raft.tcp_transport import TcpTransport
from chubbyfs.storage.fs import RealFS
from chubbyfs.storage.raft_storage import DiskStorage
from chubbyfs.wire.framing import PROTOCOL_VERSION, FrameError, check_handshake
from chubbyfs.wire.stream import FramedStream, parse_address

from . import kv
from .config import CellConfig
from .master import CellService, ObservedStateMachine, raft_error_reply
from .state_machine import CellStateMachine

log = logging.getLogger(__name__)

CLIENT_MAX_FRAME_BYTES = 1024 * 1024
RAFT_MAX_FRAME_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 5.0
# A client that sends requests but does not read the replies is cut off once
# this much is waiting for it (beyond what the kernel buffers), rather than
# let it grow the replica's memory without bound.
MAX_UNREAD_REPLY_BYTES = 16 * 1024 * 1024
PROPOSAL_TIMEOUT_S = 5.0
# Requests a connection's read loop answers inline (KeepAlives, lease reads)
# before it lets other tasks run: a burst of them arrives in one read.
INLINE_BURST = 64
# CPython's default collector thresholds (700, 10, 10) make full collections
# frequent, and with 10,000 sessions (their held KeepAlives alone are some
# 200,000 objects) each took 100-640 ms here: longer than the election
# timeout, so the cell kept changing masters. Young collections every 10,000
# allocations and rare full ones keep pauses short; cycles are freed later.
SERVING_GC_THRESHOLDS = (10_000, 50, 1_000)


class Replica:
    def __init__(self, cell: CellConfig, replica_id: int, *, join: bool = False) -> None:
        self.cell = cell
        self.me = cell.replica(replica_id)
        self.data_dir = self.me.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = DiskStorage.open(RealFS(), str(self.data_dir / "raft"))
        if not join:
            bootstrap_storage(self.storage, [r.id for r in cell.replicas])
        if cell.state_machine == "kv":
            self.state_machine: Any = kv.KVStateMachine()
        else:
            self.state_machine = ObservedStateMachine(CellStateMachine())
        self.transport = TcpTransport(replica_id, cell.name, cell.addresses())
        self.node = RaftNode(
            config=Config(id=replica_id, election_tick=cell.election_tick, heartbeat_tick=cell.heartbeat_tick),
            storage=self.storage,
            transport=self.transport,
            state_machine=self.state_machine,
            rng=random.Random(),
            tick_seconds=cell.tick_ms / 1000,
            snapshot_every=cell.snapshot_every,
            snapshot_keep_entries=cell.snapshot_keep_entries,
            snapshot_log_ratio=cell.snapshot_log_ratio,
            after_ready=self._write_replies,
        )
        # Client connections with replies waiting to be written.
        self._unwritten: set[_ReplyOutbox] = set()
        self.transport.deliver = self.node.deliver_now
        self.transport.on_unreachable = self.node.raw.report_unreachable
        self.service: CellService | None = None
        if cell.state_machine == "chubby":
            self.service = CellService(self.node, self.state_machine, cell_name=cell.name, admins=cell.admins,
                                       session_lease_ms=cell.session_lease_ms)
            self.service.flush_replies = self._write_replies
        self.listen_port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        # This process serves a cell (see SERVING_GC_THRESHOLDS), and never
        # needs to scan what startup (the restored state) built.
        gc.set_threshold(*SERVING_GC_THRESHOLDS)
        gc.freeze()
        host, port = parse_address(self.me.address)
        (self.data_dir / "pid").write_text(f"{os.getpid()}\n")
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            nursery.start_soon(self.transport.run)
            if self.service is not None:
                await nursery.start(self.service.run)
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle_connection, port, host=host))
            self.listen_port = listeners[0].socket.getsockname()[1]
            log.info("replica %d of cell %s serving on %s:%d", self.me.id, self.cell.name, host, self.listen_port)
            task_status.started(self.listen_port)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        framed = FramedStream.over_tcp(stream, RAFT_MAX_FRAME_BYTES)
        stream = framed.stream
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                hello = await framed.receive()
            kind = hello.get("kind") if isinstance(hello, dict) else None
            hello = check_handshake(hello, kind if kind in ("raft", "client") else "client")
            if hello.get("cell") not in (None, self.cell.name):
                await framed.send({"v": PROTOCOL_VERSION, "kind": kind,
                                   "error": f"this replica serves cell {self.cell.name!r}, not {hello.get('cell')!r}"})
                return
            await framed.send({"v": PROTOCOL_VERSION, "kind": kind, "id": self.me.id, "cell": self.cell.name})
            if kind == "raft":
                await self.transport.serve_inbound(framed, hello)
            else:
                framed.set_max_frame_bytes(CLIENT_MAX_FRAME_BYTES)
                principal = hello.get("principal")
                # Identity is the configured trusted one the client names
                # (TLS client certificates replace this later).
                await self._serve_client(framed, principal if isinstance(principal, str) and principal else "anonymous")
        except (EOFError, FrameError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            log.debug("connection ended: %s", exc)
        except Exception:
            # One connection's failure must never take the replica down
            # (trio.serve_tcp would end on an escaping exception).
            log.exception("connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_client(self, framed: FramedStream, principal: str) -> None:
        """Requests on one connection run concurrently; each reply carries the
        request's id so the client can match them. Replies that become ready
        together (one Raft apply answers many) leave in one write, made from
        the Raft loop itself right after the apply (`_write_replies`)."""
        outbox = _ReplyOutbox(framed, self._unwritten)

        async def answer(request: Any) -> None:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                reply: dict = {"error": "bad_request", "message": "a request is a map with an 'op' string"}
            else:
                reply = await self.handle(request, principal)
            outbox.put(reply, request.get("id") if isinstance(request, dict) else None)
            outbox.write_nowait()

        inline = 0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.write_backlog)
                while True:
                    try:
                        request = await framed.receive()
                    except (EOFError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError,
                            OSError) as exc:
                        log.debug("client connection ended: %s", exc)
                        break
                    if (self._answer_kv_inline(request, outbox.put) if self.service is None
                            else self._answer_call_inline(request, principal, outbox)):
                        # Answered at once (a lease read, a refusal), or later
                        # from the apply step or the master's KeepAlive timer:
                        # no task. Written once the frames read together are done.
                        if not framed.has_buffered_frames:
                            self._write_replies()
                        inline += 1
                        if inline % INLINE_BURST == 0:
                            await trio.lowlevel.checkpoint()
                    else:
                        nursery.start_soon(answer, request)
                # The client is gone: nobody is left to answer, so stop
                # waiting (a blocked Acquire, say) on its behalf.
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("client went away before its replies were written")
        finally:
            outbox.closed = True  # KeepAlives answered later have nowhere to go
            self._unwritten.discard(outbox)

    def _write_replies(self) -> None:
        """After a round of applies: write every connection's replies."""
        while self._unwritten:
            self._unwritten.pop().write_nowait()

    async def handle(self, request: dict, principal: str = "anonymous") -> dict:
        op = request["op"]
        try:
            if op == "status":
                return {"ok": True, "status": self.status()}
            if op == "ping":  # answered at once: a client uses it to wake its reading call
                return {"ok": True}
            if op in ("transfer_leadership", "add_voter", "remove_voter"):
                return await self._admin(op, request)
            if self.service is not None:
                return await self.service.handle(request, principal)
            return await self._handle_kv(op, request)
        except (NotLeaderError, ProposalLostError, ProposalDroppedError, ProposalOutcomeUnknownError,
                KeyError, ValueError, TypeError) as exc:
            return _error_reply(self.cell, exc)

    def _answer_call_inline(self, request: Any, principal: str, outbox: _ReplyOutbox) -> bool:
        """A KeepAlive, write or lock call the master can take without a task
        of its own (`CellService.keep_alive_nowait`, `handle_nowait`); False:
        the general path answers it."""
        if not isinstance(request, dict):
            return False
        assert self.service is not None
        request_id = request.get("id")

        def reply_to(reply: dict | None, error: BaseException | None) -> None:
            outbox.put(reply if error is None else _error_reply(self.cell, error), request_id)

        if request.get("op") == "keep_alive":
            return self.service.keep_alive_nowait(request, reply_to, outbox)
        return self.service.handle_nowait(request, principal, reply_to)

    def _answer_kv_inline(self, request: Any, deliver: Callable[[dict, Any], None]) -> bool:
        """The register's hot path, without a task per request: a lease read
        is answered at once, a write from the apply step that commits it.
        False: not handled here (the general path answers it)."""
        if not isinstance(request, dict):
            return False
        op, request_id = request.get("op"), request.get("id")
        try:
            if op == "get":
                answered, answer = self.node.read_nowait(("get", _key(request)))
                if answered:
                    deliver({"ok": True, **answer}, request_id)
                return answered
            if op not in ("put", "cas"):
                return False
            command = (kv.encode_put(_key(request), _bytes(request, "value")) if op == "put"
                       else kv.encode_cas(_key(request), request.get("expected"), _bytes(request, "value")))

            def done(result: Any, error: BaseException | None) -> None:
                deliver(result if error is None else _error_reply(self.cell, error), request_id)

            self.node.propose_nowait(command, done)
            return True
        except (NotLeaderError, ProposalDroppedError, ValueError) as exc:
            deliver(_error_reply(self.cell, exc), request_id)
            return True

    async def _handle_kv(self, op: str, request: dict) -> dict:
        if op == "get":
            return {"ok": True, **await self.node.read(("get", _key(request)))}
        if op in ("put", "cas"):
            command = (kv.encode_put(_key(request), _bytes(request, "value")) if op == "put"
                       else kv.encode_cas(_key(request), request.get("expected"), _bytes(request, "value")))
            with trio.move_on_after(PROPOSAL_TIMEOUT_S):
                return await self.node.propose(command)
            return {"error": "timeout", "message": "not committed in time; outcome unknown"}
        return {"error": "bad_request", "message": f"unknown op {op!r}"}

    async def _admin(self, op: str, request: dict) -> dict:
        if op == "transfer_leadership":
            await self.node.transfer_leadership(int(request["target"]))
            return {"ok": True}
        target = int(request["replica"])
        self.cell.replica(target)  # only replicas named in the config
        with trio.move_on_after(PROPOSAL_TIMEOUT_S):
            if op == "add_voter":
                await self.node.add_voter(target)
            else:
                await self.node.remove_voter(target)
            return {"ok": True}
        return {"error": "timeout", "message": "membership change not committed in time"}

    def status(self) -> dict:
        st = self.node.status()
        st.update({"address": self.me.address, "pid": os.getpid(), "cell": self.cell.name,
                   "leader_address": self.cell.addresses().get(st["leader"])})
        if self.service is not None:
            st["master"] = self.service.statistics()
        return st


class _ReplyOutbox:
    """One client connection's replies on their way out: gathered (from the
    apply step, request tasks, inline reads), then written without waiting;
    what the socket does not take at once is written by `write_backlog`."""

    def __init__(self, framed: FramedStream, unwritten: set[_ReplyOutbox]) -> None:
        self.framed = framed
        self._replies: list[dict] = []
        self._unwritten = unwritten
        self._backlog = trio.Event()
        self.closed = False

    def put(self, reply: dict, request_id: Any) -> None:
        if self.closed:
            return
        reply["id"] = request_id
        self._replies.append(reply)
        self._unwritten.add(self)

    def write_nowait(self) -> None:
        self._unwritten.discard(self)
        if self._replies:
            replies, self._replies = self._replies, []
            if not self.framed.send_nowait(replies):
                if self.framed.backlog_bytes > MAX_UNREAD_REPLY_BYTES:
                    log.warning("a client reads none of its replies (%d bytes waiting): dropping it",
                                self.framed.backlog_bytes)
                    self.framed.stream.socket.close()  # its reader and writer end at once
                    return
                self._backlog.set()

    async def write_backlog(self) -> None:
        while True:
            await self._backlog.wait()
            self._backlog = trio.Event()
            await self.framed.flush()


def _error_reply(cell: CellConfig, exc: BaseException) -> dict:
    """The wire answer for an exception from the Raft layer or a bad request."""
    leader = exc.leader if isinstance(exc, NotLeaderError) else None
    reply = raft_error_reply(exc, cell.addresses().get(leader) if leader else None)
    return reply if reply is not None else {"error": "bad_request", "message": f"{type(exc).__name__}: {exc}"}


def _key(request: dict) -> str:
    key = request.get("key")
    if not isinstance(key, str) or not key:
        raise ValueError("'key' must be a non-empty string")
    return key


def _bytes(request: dict, field: str) -> bytes:
    value = request.get(field)
    if isinstance(value, str):
        return value.encode()
    if not isinstance(value, bytes):
        raise ValueError(f"{field!r} must be bytes or a string")
    return value


async def run_replica(cell: CellConfig, replica_id: int, *, join: bool = False) -> None:
    replica = Replica(cell, replica_id, join=join)
    await replica.run()


def data_dir_of(cell: CellConfig, replica_id: int) -> Path:
    return cell.replica(replica_id).data_dir
