"""ReadIndex bookkeeping (Raft thesis §6.4): reads confirmed by a heartbeat round.

The leader records its commit index with each request and piggybacks the
request's context on a heartbeat. Once a quorum has answered a heartbeat
carrying that context, the leader knew it was still leader when it recorded
the index, so the read may be served once that index is applied. A quorum
answer for a context also confirms every earlier request, so requests are
released in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class ReadIndexStatus:
    index: int
    request_ctx: bytes
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: deque[bytes] = deque()

    def add_request(self, index: int, request_ctx: bytes) -> ReadIndexStatus | None:
        """Register a request; None if its context is already pending."""
        if request_ctx in self.pending:
            return None
        status = ReadIndexStatus(index, request_ctx)
        self.pending[request_ctx] = status
        self.queue.append(request_ctx)
        return status

    def recv_ack(self, frm: int, request_ctx: bytes) -> set[int] | None:
        status = self.pending.get(request_ctx)
        if status is None:
            return None
        status.acks.add(frm)
        return status.acks

    def advance(self, request_ctx: bytes) -> list[ReadIndexStatus]:
        """Release `request_ctx` and every request queued before it."""
        if request_ctx not in self.pending:
            return []
        released: list[ReadIndexStatus] = []
        while self.queue:
            ctx = self.queue.popleft()
            released.append(self.pending.pop(ctx))
            if ctx == request_ctx:
                break
        return released

    def last_pending_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""

    def count(self) -> int:
        return len(self.queue)

    def reset(self) -> None:
        self.pending.clear()
        self.queue.clear()

    def assert_invariants(self) -> None:
        assert len(self.pending) == len(self.queue)
        assert set(self.queue) == set(self.pending)
        indexes = [self.pending[c].index for c in self.queue]
        assert indexes == sorted(indexes), indexes
