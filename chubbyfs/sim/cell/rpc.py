"""Simulated client <-> replica links: request/reply packets over a second
`SimNetwork` (its own delays, loss and cuts; no duplication, as over TCP).

Replicas are endpoints 1..N, clients `CLIENT_ENDPOINT_BASE + i`. A client's
`call` sends one request and waits for the matching reply or a timeout
(`None`: the request or the reply was lost, or the replica is down, paused
or slow — the caller cannot tell which).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..network import NetworkConfig, SimNetwork

CLIENT_ENDPOINT_BASE = 1000


@dataclass(frozen=True, slots=True)
class RpcPacket:
    frm: int
    to: int
    call_id: int
    body: dict


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: dict | None = None


class ClientLinks:
    def __init__(self, config: NetworkConfig, rng: random.Random,
                 on_deliver: Callable[[float, RpcPacket], None] | None = None) -> None:
        if config.duplicate_probability:
            raise ValueError("client links model TCP connections: duplicate_probability must be 0")
        self._on_deliver = on_deliver
        self.network = SimNetwork(config, rng, on_deliver=self._delivered)
        self._pending: dict[int, _Pending] = {}
        self._call_ids = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.network.run(task_status=task_status)

    def _delivered(self, now: float, frm: int, to: int, packet: Any) -> None:
        if self._on_deliver is not None:
            self._on_deliver(now, packet)

    # ---- endpoints -------------------------------------------------------------------

    def attach_server(self, node_id: int, handler: Callable[[RpcPacket], None]) -> None:
        self.network.attach(node_id, handler)

    def detach_server(self, node_id: int) -> None:
        self.network.detach(node_id)

    def attach_client(self, endpoint: int) -> None:
        self.network.attach(endpoint, self._on_reply)

    def _on_reply(self, packet: RpcPacket) -> None:
        pending = self._pending.get(packet.call_id)
        if pending is not None and pending.reply is None:
            pending.reply = packet.body
            pending.event.set()

    # ---- traffic ----------------------------------------------------------------------

    def reply(self, frm: int, request: RpcPacket, body: dict) -> None:
        self.network.send(frm, RpcPacket(frm, request.frm, request.call_id, body))  # type: ignore[arg-type]

    async def call(self, frm: int, to: int, body: dict, timeout_seconds: float) -> dict | None:
        call_id = next(self._call_ids)
        pending = _Pending()
        self._pending[call_id] = pending
        try:
            self.network.send(frm, RpcPacket(frm, to, call_id, body))  # type: ignore[arg-type]
            with trio.move_on_after(timeout_seconds):
                await pending.event.wait()
            return pending.reply
        finally:
            del self._pending[call_id]

    def cut(self, a: int, b: int) -> None:
        """Cut both directions between endpoints a and b."""
        self.network.block(a, b)
        self.network.block(b, a)

    def mend(self, a: int, b: int) -> None:
        self.network.unblock(a, b)
        self.network.unblock(b, a)

    def heal(self) -> None:
        self.network.heal()
