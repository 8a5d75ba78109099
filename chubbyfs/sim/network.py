"""The simulated network: every message between replicas goes through here.

One trio task drains a heap of `(deliver_at, seq, ...)`; `seq` breaks ties
deterministically. Per message: a delay of floor + exponential (reordering
falls out of independent delays), a loss and a duplication probability, and
a bounded number of messages in flight per directed path (drop when full,
like a full socket buffer). Faults layered on top:

- blocked directed links (partitions, symmetric or one-way): checked both when
  a message is sent and when it would be delivered, so a partition also
  kills what was already in flight;
- clogged links: messages are held until the clog ends (FoundationDB);
- detached nodes (crashed): messages to them vanish.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from ..raft.types import Message

DeliverFn = Callable[[Message], None]


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    delay_floor_seconds: float = 0.001
    delay_mean_seconds: float = 0.002  # mean of the exponential part
    loss_probability: float = 0.0
    duplicate_probability: float = 0.0
    path_capacity: int = 256

    def __post_init__(self) -> None:
        if self.delay_floor_seconds < 0 or self.delay_mean_seconds < 0:
            raise ValueError("network delays must be non-negative")
        for name in ("loss_probability", "duplicate_probability"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {p}")
        if self.path_capacity < 1:
            raise ValueError("path_capacity must be at least 1")


class SimTransport:
    """What one replica sees of the network: `send`, which hands the message
    to the simulated links at once (so `flush` has nothing left to do)."""

    def __init__(self, network: SimNetwork, node_id: int) -> None:
        self._network = network
        self.node_id = node_id

    def send(self, msg: Message) -> None:
        self._network.send(self.node_id, msg)

    def flush(self) -> None:
        pass


class SimNetwork:
    def __init__(
        self,
        config: NetworkConfig,
        rng: random.Random,
        *,
        on_deliver: Callable[[float, int, int, Message], None] | None = None,
    ) -> None:
        self.config = config
        self._rng = rng
        self._on_deliver = on_deliver
        self._heap: list[tuple[float, int, int, int, Message]] = []
        self._seq = itertools.count()
        self._endpoints: dict[int, DeliverFn] = {}
        self._blocked: set[tuple[int, int]] = set()
        self._clogged_until: dict[tuple[int, int], float] = {}
        self._in_flight: Counter[tuple[int, int]] = Counter()
        self._wakeup = trio.Event()
        self.stats: Counter[str] = Counter()
        self._drop_filters: list[Callable[[int, int, Message], bool]] = []

    # ---- endpoints -----------------------------------------------------------

    def transport(self, node_id: int) -> SimTransport:
        return SimTransport(self, node_id)

    def attach(self, node_id: int, deliver: DeliverFn) -> None:
        """Route messages for `node_id` to `deliver` (a new one after a restart)."""
        self._endpoints[node_id] = deliver

    def detach(self, node_id: int) -> None:
        """The node is down: messages to it are lost."""
        self._endpoints.pop(node_id, None)

    # ---- faults --------------------------------------------------------------

    def block(self, frm: int, to: int) -> None:
        """Cut the one-way link frm -> to."""
        self._blocked.add((frm, to))

    def unblock(self, frm: int, to: int) -> None:
        self._blocked.discard((frm, to))

    def partition(self, *groups: Iterable[int], nodes: Iterable[int]) -> None:
        """Symmetric partition: nodes in different groups cannot talk. Nodes of
        `nodes` that are in no group are isolated alone. Replaces any earlier
        partition."""
        group_of: dict[int, int] = {}
        for g, members in enumerate(groups):
            for n in members:
                if n in group_of:
                    raise ValueError(f"node {n} is in two partition groups")
                group_of[n] = g
        all_nodes = sorted(set(nodes) | set(group_of))
        singleton = itertools.count(len(group_of) + 1000)
        for n in all_nodes:
            if n not in group_of:
                group_of[n] = next(singleton)
        self._blocked = {(a, b) for a in all_nodes for b in all_nodes if a != b and group_of[a] != group_of[b]}

    def set_blocked(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Replace the set of cut one-way links (ring and asymmetric shapes)."""
        self._blocked = set(pairs)

    def clog(self, frm: int, to: int, until_seconds: float) -> None:
        """Hold messages on frm -> to until the given virtual time."""
        self._clogged_until[(frm, to)] = max(self._clogged_until.get((frm, to), 0.0), until_seconds)

    def add_drop_filter(self, predicate: Callable[[int, int, Message], bool]) -> Callable[[], None]:
        """Drop every message for which predicate(frm, to, msg) is true, at
        send time (etcd rafttest's drop filters, for scripted schedules).
        Returns a function that removes the filter."""
        self._drop_filters.append(predicate)
        return lambda: self._drop_filters.remove(predicate)

    def heal(self) -> None:
        """Remove every partition and clog (node crashes are not network faults)."""
        self._blocked.clear()
        self._clogged_until.clear()
        self._wakeup.set()

    def blocked(self) -> frozenset[tuple[int, int]]:
        return frozenset(self._blocked)

    def can_reach(self, frm: int, to: int) -> bool:
        return (frm, to) not in self._blocked

    # ---- traffic -------------------------------------------------------------

    def send(self, frm: int, msg: Message) -> None:
        to = msg.to
        self.stats["sent"] += 1
        if (frm, to) in self._blocked:
            self.stats["dropped_partition"] += 1
            return
        if self._drop_filters and any(f(frm, to, msg) for f in self._drop_filters):
            self.stats["dropped_filter"] += 1
            return
        cfg = self.config
        rng = self._rng
        if cfg.loss_probability and rng.random() < cfg.loss_probability:
            self.stats["dropped_loss"] += 1
            return
        copies = 2 if cfg.duplicate_probability and rng.random() < cfg.duplicate_probability else 1
        now = trio.current_time()
        for _ in range(copies):
            if self._in_flight[(frm, to)] >= cfg.path_capacity:
                self.stats["dropped_capacity"] += 1
                return
            delay = cfg.delay_floor_seconds
            if cfg.delay_mean_seconds:
                delay += rng.expovariate(1.0 / cfg.delay_mean_seconds)
            deliver_at = max(now + delay, self._clogged_until.get((frm, to), 0.0))
            self._in_flight[(frm, to)] += 1
            heapq.heappush(self._heap, (deliver_at, next(self._seq), frm, to, msg))
        if copies == 2:
            self.stats["duplicated"] += 1
        self._wakeup.set()

    def in_flight(self) -> int:
        return len(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver messages when due, forever (cancel to stop)."""
        task_status.started()
        heap = self._heap
        while True:
            if not heap:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            now = trio.current_time()
            if heap[0][0] > now:
                with trio.move_on_at(heap[0][0]):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            while heap and heap[0][0] <= now:
                deliver_at, _, frm, to, msg = heapq.heappop(heap)
                clogged_until = self._clogged_until.get((frm, to), 0.0)
                if clogged_until > now:
                    heapq.heappush(heap, (clogged_until, next(self._seq), frm, to, msg))
                    continue
                self._in_flight[(frm, to)] -= 1
                if (frm, to) in self._blocked:
                    self.stats["dropped_partition"] += 1
                    continue
                deliver = self._endpoints.get(to)
                if deliver is None:
                    self.stats["dropped_down"] += 1
                    continue
                self.stats["delivered"] += 1
                if self._on_deliver is not None:
                    self._on_deliver(now, frm, to, msg)
                deliver(msg)
            # Let receivers run before the next batch.
            await trio.lowlevel.checkpoint()
