"""White-box checks of the consistent cache, events and sessions (testing
anchors P9, P10; issue 4's simulation checks). Cache hits themselves are
checked for linearizability by WGL (`cell_nodes.py`): a hit is recorded as
an instantaneous read.

- *Write acknowledgement* (`on_write_ack`): when a master answers a write
  (set_contents, delete), no session may still hold the old state of that
  node in its cache unless it lost its lease. "Lost" is judged in the
  master's terms: the lease end (stamped by a master) that the master had
  granted when it sent the last KeepAlive reply the client has *processed*,
  against the answering master's clock. A lease granted later came with the
  invalidation, so a client can only use it after dropping the entry. The
  holder must also have stopped trusting its cache: a client whose local
  lease outlives the master's view is a violation too.
- *Jeopardy* (`on_hit`): a hit is served only before the local lease end
  implied by the session's successful KeepAlives (recorded independently of
  the client's lease core) and only while the session is SAFE.
- *Events* (`check_events`): the serving master's queued items are mapped,
  as they are queued, to the log index and position of the apply event they
  carry. Per session, delivered events must follow strictly increasing
  (index, position): apply order, no duplicates. Per handle, between two
  deliveries with no fail-over (or epoch change) in between, no event of that
  handle may be missing; before the first fail-over, none may be missing
  from the handle's first event on. And at the tail: every event a master
  queued for the session before it built the last KeepAlive reply (of that
  epoch) the session processed must have been delivered, since a reply
  carries every unacknowledged item.
- *Lock keeping* (`on_renewed`): a session a master just renewed still holds
  every lock its client believes it holds.

Pure: no trio, no clock; the callers pass times and state in.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ...wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_INVALIDATE, ITEM_MASTER_FAILOVER

_FLUSH_KINDS = (ITEM_MASTER_FAILOVER, ITEM_EVENTS_LOST)


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """An apply's event as a master queued it for a session."""

    index: int
    position: int  # among the apply's events
    queued_at: float  # virtual seconds
    kind: int
    handle_id: int
    path: str
    name: str


class CacheChecker:
    def __init__(self, max_violations: int = 50) -> None:
        self.violations: list[str] = []
        self.max_violations = max_violations
        # (epoch, session, seq) -> the apply event it carries
        self.queued: dict[tuple[int, int, int], QueuedEvent] = {}
        # (session, handle) -> [(index, position)], from the first replica to apply each index
        self._expected: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        self._expected_indexes: set[int] = set()
        self.hits_checked = 0
        self.acks_checked = 0
        self.renewals_checked = 0
        self.events_checked = 0
        self.tail_checked = 0  # queued events that a processed reply must have carried

    def _violate(self, message: str) -> None:
        if len(self.violations) < self.max_violations:
            self.violations.append(message)

    # ---- the apply streams ------------------------------------------------------------

    def on_apply(self, index: int, events: Iterable[Any]) -> None:
        """Any replica applied `index`: the events it produced (the same on
        every replica, which state machine safety checks)."""
        if index in self._expected_indexes:
            return
        self._expected_indexes.add(index)
        for position, event in enumerate(events):
            self._expected[(event.session_id, event.handle_id)].append((index, position))

    def on_master_queued(self, epoch: int, index: int, events: Iterable[Any],
                         pending_of: Callable[[int], tuple[Any, ...]], now: float) -> None:
        """The master of `epoch` just queued this apply's events: the newest
        event items in each session's outbox are these events, in order."""
        per_session: dict[int, list[tuple[int, Any]]] = defaultdict(list)
        for position, event in enumerate(events):
            per_session[event.session_id].append((position, event))
        for session_id, mine in per_session.items():
            items = [item for item in pending_of(session_id)
                     if item.kind not in (ITEM_INVALIDATE, *_FLUSH_KINDS)][-len(mine):]
            if len(items) != len(mine):
                continue  # the session ended in this apply: nothing will be delivered
            for item, (position, event) in zip(items, mine):
                self.queued[(epoch, session_id, item.seq)] = QueuedEvent(
                    index, position, now, int(event.kind), event.handle_id, event.path, event.name)

    # ---- sessions -----------------------------------------------------------------------

    def check_events(self, session_id: int, delivered: Iterable[Any], who: str,
                     last_reply_built: dict[int, float] | None = None) -> None:
        """Apply order, no duplicates, no gaps (see the module docstring).
        `last_reply_built`: epoch -> when that epoch's master built the last
        KeepAlive reply the session processed."""
        delivered = list(delivered)
        self._check_tail(session_id, delivered, who, last_reply_built or {})
        previous: tuple[int, int] | None = None
        segment = 0
        epoch = None
        last_of_handle: dict[int, tuple[tuple[int, int], int]] = {}
        for item in delivered:
            if epoch is not None and item.epoch != epoch:
                segment += 1
            epoch = item.epoch
            if item.kind in _FLUSH_KINDS:
                segment += 1
                continue
            self.events_checked += 1
            where = f"P10 events of session {session_id} ({who}), epoch {item.epoch} seq {item.seq}"
            queued = self.queued.get((item.epoch, session_id, item.seq))
            if queued is None:
                self._violate(f"{where}: delivered, but no master queued such an event")
                continue
            if (queued.kind, queued.handle_id, queued.path, queued.name) != (
                    item.kind, item.handle_id, item.path, item.name):
                self._violate(f"{where}: delivered as {(item.kind, item.handle_id, item.path, item.name)}, "
                              f"queued as {queued}")
            key = (queued.index, queued.position)
            if previous is not None and key <= previous:
                what = "a duplicate" if key == previous else "out of apply order"
                self._violate(f"{where}: {what}: apply {key} after apply {previous}")
                continue
            previous = key
            expected = self._expected.get((session_id, item.handle_id), [])
            last = last_of_handle.get(item.handle_id)
            if last is None and segment == 0:
                missed = expected[:bisect_left(expected, key)]
            elif last is not None and last[1] == segment:
                missed = expected[bisect_right(expected, last[0]):bisect_left(expected, key)]
            else:
                missed = []
            if missed:
                self._violate(f"{where}: handle {item.handle_id} missed the events of applies {missed[:5]} "
                              f"before the one of apply {key}")
            last_of_handle[item.handle_id] = (key, segment)

    def _check_tail(self, session_id: int, delivered: list[Any], who: str,
                    last_reply_built: dict[int, float]) -> None:
        got = {(item.epoch, item.seq) for item in delivered}
        for (epoch, sid, seq), queued in sorted(self.queued.items()):
            built = last_reply_built.get(epoch)
            if sid != session_id or built is None or queued.queued_at >= built:
                continue
            self.tail_checked += 1
            if (epoch, seq) not in got:
                self._violate(f"P10 events of session {session_id} ({who}): epoch {epoch} seq {seq} (apply "
                              f"{queued.index}) was queued at {queued.queued_at:.4f}s but never delivered, "
                              f"though the session processed a reply built at {built:.4f}s")

    def on_hit(self, who: str, now: float, checked_lease_end: float, safe: bool) -> None:
        """A read was served from the cache at `now` (virtual seconds)."""
        self.hits_checked += 1
        if not safe or now >= checked_lease_end:
            self._violate(f"P9 jeopardy: {who} served a read from its cache at {now:.4f}s, "
                          f"{'outside SAFE' if not safe else ''} with its local lease over at "
                          f"{checked_lease_end:.4f}s")

    def on_write_ack(self, where: str, instance: int, generation: int | None, master_now_ms: int,
                     cachers: Iterable[tuple[str, int, list[tuple[str, Any]], bool, int]]) -> None:
        """A master answers a write of node `instance` (content generation
        `generation`, None for a delete). `cachers`: (client, session id,
        cached (path, stat) entries, may the client use its cache now, the
        master-stamped lease end of the last renewal it processed)."""
        self.acks_checked += 1
        for who, session_id, entries, usable, lease_end in cachers:
            stale = [path for path, stat in entries if stat.instance == instance
                     and (generation is None or stat.content_generation < generation)]
            if not stale:
                continue
            live = lease_end > master_now_ms
            if live or usable:
                why = (f"its lease runs to {lease_end} ms at the master (now {master_now_ms} ms)" if live else
                       f"its lease ended at the master ({lease_end} ms <= {master_now_ms} ms) but the client "
                       "still trusts its cache")
                self._violate(f"P9 write acknowledged by {where} while session {session_id} ({who}) still caches "
                              f"the old {stale[0]} (instance {instance}): {why}")

    def on_renewed(self, who: str, session_id: int, where: str, held: Iterable[tuple[str, int]],
                   holders_of: Callable[[str], Iterable[int] | None]) -> None:
        """A master renewed the session: every lock the client believes it
        holds (path, handle id) is still held by that handle there."""
        self.renewals_checked += 1
        for path, handle_id in held:
            holders = holders_of(path)
            if holders is None or handle_id not in holders:
                self._violate(f"P5 lock kept: {where} renewed session {session_id} ({who}), but its handle "
                              f"{handle_id} no longer holds {path}")
