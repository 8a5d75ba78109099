"""Raft messages between replicas over TCP.

One outbound connection per peer with a bounded queue (a slow or dead peer
can cost at most `queue_limit` messages of memory). `flush()`, called by the
node once per Ready, writes each peer's queued messages straight into the
socket when the kernel takes them; only what it does not take (and
connecting, with exponential back-off) is left to the peer's task. Inbound
connections are accepted by the replica's listener and handed to
`serve_inbound`. Raft tolerates loss, so everything here drops rather than
blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from chubbyfs.wire.framing import FrameError
from chubbyfs.wire.raft_codec import message_from_wire, message_to_wire
from chubbyfs.wire.stream import FramedStream, open_framed, parse_address

from .types import Message

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.02
BACKOFF_MAX_S = 1.0


class _Peer:
    def __init__(self, peer_id: int, address: str) -> None:
        self.id = peer_id
        self.address = address
        self.queue: deque[Message] = deque()
        self.framed: FramedStream | None = None  # while connected
        self.wakeup = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.dropped = 0


class TcpTransport:
    def __init__(
        self,
        node_id: int,
        cell: str,
        peers: dict[int, str],
        *,
        queue_limit: int = 4_096,
        on_unreachable: Callable[[int], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.cell = cell
        self.queue_limit = queue_limit
        self.on_unreachable = on_unreachable or (lambda peer: None)
        # Gets each batch of messages that arrived together (RaftNode.deliver_now).
        self.deliver: Callable[[list[Message]], None] = lambda msgs: None
        self._peers = {pid: _Peer(pid, addr) for pid, addr in peers.items() if pid != node_id}
        self._nursery: trio.Nursery | None = None

    def send(self, msg: Message) -> None:
        peer = self._peers.get(msg.to)
        if peer is None:
            return
        if len(peer.queue) >= self.queue_limit:
            # A message lost while the link stays up: tell Raft, so that it
            # re-probes rather than wait for the heartbeat check to notice.
            peer.dropped += 1
            self.on_unreachable(peer.id)
            return
        peer.queue.append(msg)

    def flush(self) -> None:
        """Put what `send` queued on the wire, without waiting: what the
        kernel does not take at once goes to the peer's task."""
        for peer in self._peers.values():
            if not peer.queue:
                continue
            framed = peer.framed
            if framed is None or framed.busy:
                # Not connected (its task connects and sends), or the peer is
                # not reading: the messages stay in the bounded queue rather
                # than pile up unbounded behind the socket.
                peer.wakeup.set()
                continue
            batch = [message_to_wire(m) for m in peer.queue]
            peer.queue.clear()
            if not framed.send_nowait(batch):
                peer.wakeup.set()

    def set_peers(self, peers: dict[int, str]) -> None:
        """Follow a membership change: start links to new peers, stop old ones."""
        for pid in list(self._peers):
            if pid not in peers:
                self._peers.pop(pid).cancel_scope.cancel()
        for pid, addr in peers.items():
            if pid == self.node_id:
                continue
            current = self._peers.get(pid)
            if current is not None and current.address == addr:
                continue
            if current is not None:
                current.cancel_scope.cancel()
            peer = self._peers[pid] = _Peer(pid, addr)
            if self._nursery is not None:
                self._nursery.start_soon(self._run_peer, peer)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self._peers.values():
                nursery.start_soon(self._run_peer, peer)

    async def _run_peer(self, peer: _Peer) -> None:
        backoff = BACKOFF_MIN_S
        host, port = parse_address(peer.address)
        with peer.cancel_scope:
            while True:
                try:
                    framed, _ = await open_framed(
                        host, port, {"kind": "raft", "from": self.node_id, "cell": self.cell})
                except (OSError, trio.TooSlowError, EOFError, FrameError, ConnectionRefusedError):
                    peer.queue.clear()
                    self.on_unreachable(peer.id)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                backoff = BACKOFF_MIN_S
                peer.framed = framed
                try:
                    await self._pump(peer, framed)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.on_unreachable(peer.id)
                finally:
                    peer.framed = None
                    await trio.aclose_forcefully(framed.stream)

    @staticmethod
    async def _pump(peer: _Peer, framed: FramedStream) -> None:
        """Write what `flush` could not, and what was queued while we were
        not connected."""
        while True:
            if not peer.queue and not framed.has_backlog:
                peer.wakeup = trio.Event()
                await peer.wakeup.wait()
            batch = [message_to_wire(m) for m in peer.queue]
            peer.queue.clear()
            await framed.send_many(batch)

    async def serve_inbound(self, framed: FramedStream, handshake: dict) -> None:
        """Read a peer's messages until it disconnects (called by the listener)."""
        batch: list[Message] = []
        while True:
            try:
                obj = await framed.receive()
            except EOFError:
                return
            try:
                msg = message_from_wire(obj)
            except FrameError as exc:
                log.warning("replica %s sent a malformed message: %s", handshake.get("from"), exc)
                return
            if msg.to == self.node_id:
                batch.append(msg)
            if batch and not framed.has_buffered_frames:
                self.deliver(batch)
                batch = []

    def statistics(self) -> dict:
        return {pid: {"queued": len(p.queue), "dropped": p.dropped} for pid, p in self._peers.items()}
