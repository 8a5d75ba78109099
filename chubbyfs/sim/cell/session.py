"""A simulated client's session, built from the real client's pure cores:
`SessionLeaseCore` (the local lease: safe / jeopardy / expired, grace
period), `ClientCache` (the consistent cache) and `RequestNumbers` (the
numbers of its mutating calls), driven the way
`client/session.py` drives them. KeepAlive replies' items are processed
(invalidations drop entries, events are recorded) before the next KeepAlive
acknowledges them; the cache is emptied when the session leaves SAFE.

Besides the cores it keeps what the checkers need: every item delivered, and
an independent record of the local lease (from the KeepAlive send times and
granted leases, not from the core), against which every cache hit is
checked.

`unsafe_cache` switches on a deliberate bug for the negative controls:
`skip_invalidations` acknowledges invalidations without dropping anything;
`jeopardy_reads` keeps serving (and keeps its cache) after the local lease
ran out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...client.cache_core import ClientCache
from ...client.session_core import (
    DEFAULT_DRIFT_FRACTION, RequestNumbers, SessionLeaseCore, SessionState, StateChange,
)
from ...wire.cell_protocol import ITEM_INVALIDATE, Stat

UNSAFE_CACHE_MODES = ("", "skip_invalidations", "jeopardy_reads")


@dataclass(frozen=True, slots=True)
class Delivered:
    """One item as the session processed it (invalidations are not kept)."""

    epoch: int
    seq: int
    kind: int
    handle_id: int
    path: str
    name: str
    at_seconds: float


class SimSession:
    def __init__(self, session_id: int, lease_ms: int, *, sent_at: float, epoch: int, grace_ms: int,
                 master_lease_end_ms: int = 0, unsafe_cache: str = "") -> None:
        if unsafe_cache not in UNSAFE_CACHE_MODES:
            raise ValueError(f"unknown unsafe_cache mode {unsafe_cache!r}")
        self.id = session_id
        self.lease_ms = lease_ms
        self.unsafe_cache = unsafe_cache
        self.core = SessionLeaseCore(now_ms=sent_at * 1000, lease_ms=lease_ms, grace_ms=grace_ms)
        self.cache = ClientCache()
        self.cache.start_epoch(epoch)
        self.delivered: list[Delivered] = []
        self.changes: list[StateChange] = []
        # Independent of the core, for the jeopardy check: the local lease
        # end implied by the KeepAlives that succeeded (virtual seconds).
        self.checked_lease_end = self._lease_end(sent_at, lease_ms)
        self.renewals = 0
        # The lease end, in a master's stamped time, of the last grant this
        # session processed (creation or KeepAlive reply).
        self.master_lease_end_ms = master_lease_end_ms
        # epoch -> when its master built the last KeepAlive reply processed
        # (white-box, from the harness; for the event tail check).
        self.last_reply_built: dict[int, float] = {}
        self.ending = False  # EndSession sent: nothing more from the cache
        self.requests = RequestNumbers()  # as the real session numbers its mutating calls

    @staticmethod
    def _lease_end(sent_at: float, lease_ms: int) -> float:
        return sent_at + lease_ms / 1000 * (1 - DEFAULT_DRIFT_FRACTION)

    # ---- state -------------------------------------------------------------------------

    @property
    def expired(self) -> bool:
        return self.core.state == SessionState.EXPIRED

    def tick(self, now: float) -> None:
        self.core.tick(now * 1000)
        self._publish()

    def _publish(self) -> None:
        changes = self.core.take_changes()
        if changes and self.core.state != SessionState.SAFE and self.unsafe_cache != "jeopardy_reads":
            self.cache.clear()  # jeopardy: nothing may be served from cache
        self.changes.extend(changes)

    def safe(self, now: float) -> bool:
        """May the session act (touch a lock's resource, serve from cache)?"""
        self.tick(now)
        return self.core.cache_usable(now * 1000)

    def begin_end(self) -> None:
        """The client is ending the session: like the real `Session.close`,
        it drops its cache and serves nothing more from it, because the
        master stops counting it as a cacher once EndSession applies."""
        self.ending = True
        self.cache.clear()

    def cache_usable(self, now: float) -> bool:
        if self.ending:
            return False
        if self.unsafe_cache == "jeopardy_reads":
            return not self.expired
        return self.safe(now)

    def renewed(self, *, sent_at: float, lease_ms: int, now: float, master_lease_end_ms: int) -> None:
        """A KeepAlive sent at `sent_at` was answered with `lease_ms` (held
        time included): extend, maybe back from jeopardy to safe.
        `master_lease_end_ms` is what the master had granted when it
        replied (white-box, from the harness)."""
        self.core.keep_alive_succeeded(sent_at_ms=sent_at * 1000, lease_ms=lease_ms, now_ms=now * 1000)
        self._publish()
        self.master_lease_end_ms = max(self.master_lease_end_ms, master_lease_end_ms)
        if not self.expired:
            self.renewals += 1
            self.checked_lease_end = max(self.checked_lease_end, self._lease_end(sent_at, lease_ms))

    # ---- items ---------------------------------------------------------------------------

    def process_items(self, epoch: int, items: Any, now: float, built_at: float | None = None) -> None:
        """A KeepAlive reply's items, in order, each once (`_process_items`
        of the real client, minus the hooks)."""
        if built_at is not None:
            self.last_reply_built[epoch] = max(built_at, self.last_reply_built.get(epoch, built_at))
        self.cache.start_epoch(epoch)
        for seq, kind, handle_id, path, name in items:
            if not self.cache.is_new(seq):
                continue  # a reply re-sent after a lost one
            if kind == ITEM_INVALIDATE and self.unsafe_cache == "skip_invalidations":
                self.cache.last_seq = seq  # the bug: acknowledged, not dropped
                continue
            self.cache.apply_item(seq, kind, path)
            if kind != ITEM_INVALIDATE:
                self.delivered.append(Delivered(epoch, seq, kind, handle_id, path, name, now))

    def install_contents(self, reply_fields: dict, contents: bytes, stat: Stat, now: float) -> bool:
        """A read reply: cache it if the master said so and we still may."""
        if reply_fields.get("cacheable") is not True or not self.cache_usable(now):
            return False
        return self.cache.put_contents(reply_fields["cache_path"], contents, stat, epoch=reply_fields["epoch"],
                                       seq=reply_fields["seq"])

    def cached_contents(self, path: str, instance: int, now: float) -> tuple[bytes, Stat] | None:
        if not self.cache_usable(now):
            return None
        return self.cache.get_contents(path, instance)

    def cached_entries(self) -> list[tuple[str, Stat]]:
        """Every stat the cache holds (contents, stats, listing entries), for
        the white-box write-acknowledgement check."""
        entries = [(path, stat) for path, (_contents, stat) in self.cache.contents.items()]
        entries += list(self.cache.stats.items())
        for directory, (_instance, listing) in self.cache.listings.items():
            entries += [(f"{directory}/{entry.name}", entry.stat) for entry in listing]
        return entries

    def assert_invariants(self) -> None:
        self.core.assert_invariants()
        self.cache.assert_invariants()
        if (self.core.state != SessionState.SAFE and self.unsafe_cache != "jeopardy_reads") or self.ending:
            assert not (self.cache.contents or self.cache.stats or self.cache.listings), \
                "cache kept outside SAFE"
