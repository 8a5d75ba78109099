"""The master's cache and event bookkeeping, as a pure core (no trio, no clock).

Chubby's consistent cache (paper §2.7): the master remembers which sessions
may cache which paths; before a change to a path is proposed it marks the
path uncachable, sends an invalidation to every session caching it, and
waits until each has acknowledged it or its lease has run out. Events ride
the same per-session stream: one sequence number per session, so a single
`ack` (the last sequence the client processed) settles both, a lost reply is
simply re-sent, and the client drops anything at or below what it has seen.

Nothing here is replicated: a new master starts empty and instead sends
every session a fail-over item, treating each session as a possible cacher
of everything until it acknowledges that item (or its lease ends).

The shell (`master.py`) feeds in reads, applies, acks and the time, and acts
on what comes out: which sessions' held KeepAlives to wake, and when a
waiting modification may be proposed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chubbyfs.wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_INVALIDATE, ITEM_MASTER_FAILOVER

DEFAULT_MAX_OUTBOX = 10_000


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to deliver to a session: an invalidation (kind 0) or an event."""

    seq: int
    kind: int  # ITEM_INVALIDATE, an EventKind bit, ITEM_MASTER_FAILOVER or ITEM_EVENTS_LOST
    handle_id: int = 0
    path: str = ""
    name: str = ""

    def to_wire(self) -> list:
        return [self.seq, self.kind, self.handle_id, self.path, self.name]


@dataclass(slots=True)
class _Wait:
    """What one session still owes: an ack of `seq`, or its lease to end."""

    seq: int
    deadline_ms: int


class _Modification:
    __slots__ = ("paths", "prefixes", "waiting")

    def __init__(self, paths: tuple[str, ...], prefixes: tuple[str, ...]) -> None:
        self.paths = paths
        self.prefixes = prefixes
        self.waiting: dict[int, _Wait] = {}


class CacheRegistry:
    def __init__(self, *, max_outbox: int = DEFAULT_MAX_OUTBOX) -> None:
        if max_outbox < 2:
            raise ValueError("max_outbox must be at least 2")
        self.max_outbox = max_outbox
        self._cachers: dict[str, set[int]] = {}  # path -> sessions that may cache it
        self._cached_by: dict[int, set[str]] = {}  # the reverse
        self._uncachable: dict[str, int] = {}  # path -> modifications in flight
        self._uncachable_prefixes: dict[str, int] = {}  # directory renames in flight
        self._outbox: dict[int, deque[Item]] = {}
        self._last_seq: dict[int, int] = {}
        self._mods: dict[int, _Modification] = {}
        self._mods_of: dict[int, set[int]] = {}  # session -> modifications waiting on it
        self._failover: dict[int, _Wait] = {}  # sessions yet to ack the fail-over item
        # Invalidations sent but not yet acknowledged: path -> session -> item
        # seq, and the reverse. A session stops being a cacher when its
        # invalidation is queued, but it may serve the old value until it acks:
        # every later change of the path waits for it too (found by the cell
        # simulation: a second write was acknowledged over such a cacher).
        self._unacked: dict[str, dict[int, int]] = {}
        self._unacked_by: dict[int, dict[str, int]] = {}
        self._next_mod = 1

    # ---- reads ---------------------------------------------------------------------------

    def may_cache(self, session_id: int, path: str) -> bool:
        """A read of `path` by the session was just served: may the reply say
        `cacheable`? If so, the session is recorded as caching the path."""
        if self._uncachable.get(path) or any(path.startswith(p) for p in self._uncachable_prefixes):
            return False
        self._cachers.setdefault(path, set()).add(session_id)
        self._cached_by.setdefault(session_id, set()).add(path)
        return True

    def last_seq(self, session_id: int) -> int:
        """The last sequence number given to the session (a read reply carries
        it: the client must not install the value if it has already processed
        a later item, which may be this path's invalidation)."""
        return self._last_seq.get(session_id, 0)

    def pending(self, session_id: int) -> tuple[Item, ...]:
        """Everything not yet acknowledged, in order."""
        return tuple(self._outbox.get(session_id, ()))

    def has_pending(self, session_id: int) -> bool:
        return bool(self._outbox.get(session_id))

    def is_caching(self, session_id: int, path: str) -> bool:
        return session_id in self._cachers.get(path, ())

    # ---- deliveries ------------------------------------------------------------------------

    def _queue(self, session_id: int, kind: int, handle_id: int = 0, path: str = "",
               name: str = "") -> int:
        seq = self._last_seq.get(session_id, 0) + 1
        self._last_seq[session_id] = seq
        box = self._outbox.setdefault(session_id, deque())
        if len(box) >= self.max_outbox - 1:
            # A session that stopped acking must not grow the master without
            # bound: replace the backlog by one item that makes the client
            # drop its whole cache and warns that events were lost.
            box.clear()
            box.append(Item(seq, ITEM_EVENTS_LOST))
            seq += 1
            self._last_seq[session_id] = seq
        box.append(Item(seq, kind, handle_id, path, name))
        # A wait on an item that was folded into the backlog marker is
        # settled only by the ack of a later one.
        for mod_id in self._mods_of.get(session_id, ()):
            wait = self._mods[mod_id].waiting[session_id]
            if wait.seq < box[0].seq:
                wait.seq = box[0].seq
        failover = self._failover.get(session_id)
        if failover is not None and failover.seq < box[0].seq:
            failover.seq = box[0].seq
        return seq

    def queue_events(self, events: Iterable[tuple[int, int, int, str, str]]) -> set[int]:
        """Queue applied events (session, kind, handle, path, name) in apply
        order; returns the sessions to wake."""
        woken = set()
        for session_id, kind, handle_id, path, name in events:
            self._queue(session_id, kind, handle_id, path, name)
            woken.add(session_id)
        return woken

    def _invalidate_cachers(self, path: str) -> dict[int, int]:
        """Send `path`'s invalidation to its cachers, who stop being cachers
        (they flush it before acking); returns session -> item seq."""
        sent = {}
        for session_id in sorted(self._cachers.pop(path, ())):
            self._cached_by[session_id].discard(path)
            seq = sent[session_id] = self._queue(session_id, ITEM_INVALIDATE, path=path)
            self._unacked.setdefault(path, {})[session_id] = seq
            self._unacked_by.setdefault(session_id, {})[path] = seq
        return sent

    def _forget_unacked(self, session_id: int, up_to_seq: int | None = None) -> None:
        """The session acknowledged everything up to `up_to_seq` (None: it is gone)."""
        by_path = self._unacked_by.get(session_id)
        if not by_path:
            return
        for path, seq in list(by_path.items()):
            if up_to_seq is None or seq <= up_to_seq:
                del by_path[path]
                owed = self._unacked[path]
                del owed[session_id]
                if not owed:
                    del self._unacked[path]
        if not by_path:
            del self._unacked_by[session_id]

    def invalidate_now(self, paths: Iterable[str]) -> set[int]:
        """Changes that were not announced before they were applied (lock
        grants, expiries during a command): invalidate without waiting."""
        woken: set[int] = set()
        for path in paths:
            woken.update(self._invalidate_cachers(path))
        return woken

    # ---- modifications -----------------------------------------------------------------------

    def must_wait(self, paths: Iterable[str]) -> bool:
        """Whether a modification of `paths` (no directory prefixes) might
        have to wait for acknowledgements if begun now (conservative: True
        may still turn out to need no wait)."""
        if self._failover:
            return True
        return any(path in self._cachers or path in self._unacked for path in paths)

    def begin(self, paths: Iterable[str], lease_end_of: Callable[[int], int | None],
              prefixes: Iterable[str] = ()) -> tuple[int, set[int]]:
        """A modification of `paths` (and of everything under each directory
        prefix) is about to be proposed: mark them uncachable, invalidate their
        cachers. Returns (modification id, sessions to wake); the shell waits
        until `is_done` before proposing and calls `finish` afterwards."""
        mod_id = self._next_mod
        self._next_mod += 1
        unique_paths = tuple(sorted(set(paths)))
        dir_prefixes = tuple(sorted({p.rstrip("/") + "/" for p in prefixes}))
        mod = _Modification(unique_paths, dir_prefixes)
        self._mods[mod_id] = mod
        for path in unique_paths:
            self._uncachable[path] = self._uncachable.get(path, 0) + 1
        for prefix in dir_prefixes:
            self._uncachable_prefixes[prefix] = self._uncachable_prefixes.get(prefix, 0) + 1
        targets = list(unique_paths)
        if dir_prefixes:
            under = set(self._cachers) | set(self._unacked)
            targets += [p for p in under if any(p.startswith(d) for d in dir_prefixes)]
        woken: set[int] = set()
        for path in targets:
            woken.update(self._invalidate_cachers(path))
            # Wait for every session that may still serve the path's old
            # state: those just invalidated, and those whose invalidation by
            # an earlier change is still unacknowledged.
            for session_id, seq in self._unacked.get(path, {}).items():
                lease_end = lease_end_of(session_id)
                if lease_end is None:
                    continue  # already gone: it caches nothing
                wait = mod.waiting.get(session_id)
                if wait is None:
                    mod.waiting[session_id] = _Wait(seq, lease_end)
                    self._mods_of.setdefault(session_id, set()).add(mod_id)
                else:
                    wait.seq = max(wait.seq, seq)
        # After a fail-over nobody knows who caches what: every session that
        # has not yet acknowledged the fail-over item may cache anything.
        for session_id, failover in self._failover.items():
            wait = mod.waiting.get(session_id)
            if wait is None:
                mod.waiting[session_id] = _Wait(failover.seq, failover.deadline_ms)
                self._mods_of.setdefault(session_id, set()).add(mod_id)
            else:
                wait.seq = max(wait.seq, failover.seq)
        return mod_id, woken

    def is_done(self, mod_id: int) -> bool:
        mod = self._mods.get(mod_id)
        return mod is None or not mod.waiting

    def waiting_on(self, mod_id: int) -> tuple[int, ...]:
        mod = self._mods.get(mod_id)
        return () if mod is None else tuple(sorted(mod.waiting))

    def finish(self, mod_id: int) -> None:
        """The modification was applied (or given up): its paths are cachable again."""
        mod = self._mods.pop(mod_id, None)
        if mod is None:
            return
        for session_id in mod.waiting:
            self._drop_mod_of(session_id, mod_id)
        for path in mod.paths:
            self._decrement(self._uncachable, path)
        for prefix in mod.prefixes:
            self._decrement(self._uncachable_prefixes, prefix)

    @staticmethod
    def _decrement(counts: dict[str, int], key: str) -> None:
        if counts[key] <= 1:
            del counts[key]
        else:
            counts[key] -= 1

    def _drop_mod_of(self, session_id: int, mod_id: int) -> None:
        mods = self._mods_of.get(session_id)
        if mods is not None:
            mods.discard(mod_id)
            if not mods:
                del self._mods_of[session_id]

    def _settle(self, session_id: int, mod_id: int) -> bool:
        """The session owes this modification nothing more; True if it is now done."""
        mod = self._mods[mod_id]
        del mod.waiting[session_id]
        self._drop_mod_of(session_id, mod_id)
        return not mod.waiting

    # ---- acks, time, session end, fail-over ---------------------------------------------------

    def ack(self, session_id: int, seq: int) -> set[int]:
        """The client processed everything up to `seq`. Returns the
        modifications that no longer wait on anyone."""
        box = self._outbox.get(session_id)
        if box is not None:
            while box and box[0].seq <= seq:
                box.popleft()
            if not box:
                del self._outbox[session_id]
        failover = self._failover.get(session_id)
        if failover is not None and failover.seq <= seq:
            del self._failover[session_id]
        self._forget_unacked(session_id, seq)
        done = set()
        for mod_id in sorted(self._mods_of.get(session_id, ())):
            if self._mods[mod_id].waiting[session_id].seq <= seq and self._settle(session_id, mod_id):
                done.add(mod_id)
        return done

    def expire(self, now_ms: int) -> set[int]:
        """Sessions whose lease (as promised when the item was sent) has run
        out can no longer serve from their cache. Returns finished waits."""
        for session_id in [s for s, w in self._failover.items() if w.deadline_ms <= now_ms]:
            del self._failover[session_id]
        done = set()
        for mod_id in sorted(self._mods):
            mod = self._mods[mod_id]
            for session_id in [s for s, w in mod.waiting.items() if w.deadline_ms <= now_ms]:
                if self._settle(session_id, mod_id):
                    done.add(mod_id)
        return done

    def next_deadline_ms(self) -> int | None:
        deadlines = [w.deadline_ms for mod in self._mods.values() for w in mod.waiting.values()]
        deadlines += [w.deadline_ms for w in self._failover.values()]
        return min(deadlines) if deadlines else None

    def session_ended(self, session_id: int) -> set[int]:
        """Forget the session; returns the modifications no longer waiting."""
        for path in self._cached_by.pop(session_id, ()):
            cachers = self._cachers[path]
            cachers.discard(session_id)
            if not cachers:
                del self._cachers[path]
        self._outbox.pop(session_id, None)
        self._last_seq.pop(session_id, None)
        self._failover.pop(session_id, None)
        self._forget_unacked(session_id)
        done = set()
        for mod_id in sorted(self._mods_of.get(session_id, ())):
            if self._settle(session_id, mod_id):
                done.add(mod_id)
        return done

    def fail_over(self, lease_ends: dict[int, int]) -> set[int]:
        """A new master: every live session gets a fail-over item and counts
        as caching everything until it acknowledges it or its lease ends."""
        for session_id in sorted(lease_ends):
            seq = self._queue(session_id, ITEM_MASTER_FAILOVER)
            self._failover[session_id] = _Wait(seq, lease_ends[session_id])
        return set(lease_ends)

    def failover_pending(self, session_id: int) -> bool:
        return session_id in self._failover

    def reset(self) -> set[int]:
        """This replica stopped being master: forget everything. Returns the
        modifications that were waiting (their proposals will fail anyway)."""
        mods = set(self._mods)
        self.__init__(max_outbox=self.max_outbox)  # type: ignore[misc]
        return mods

    def statistics(self) -> dict:
        return {"cached_paths": len(self._cachers), "modifications": len(self._mods),
                "queued_items": sum(len(b) for b in self._outbox.values()),
                "failover_pending": len(self._failover)}

    def assert_invariants(self) -> None:
        for path, sessions in self._cachers.items():
            assert sessions, f"empty cacher set for {path}"
            for session_id in sessions:
                assert path in self._cached_by.get(session_id, ()), (path, session_id)
        for session_id, paths in self._cached_by.items():
            for path in paths:
                assert session_id in self._cachers.get(path, ()), (path, session_id)
        for path in self._cachers:
            # Nobody is recorded caching a path while it is being modified.
            assert not self._uncachable.get(path), f"{path} is uncachable yet cached"
        for session_id, box in self._outbox.items():
            assert box, f"empty outbox kept for {session_id}"
            seqs = [item.seq for item in box]
            assert seqs == sorted(set(seqs)), f"outbox of {session_id} out of order"
            assert seqs[-1] <= self._last_seq[session_id]
            assert len(box) <= self.max_outbox
        expected: dict[int, set[int]] = {}
        for mod_id, mod in self._mods.items():
            for session_id in mod.waiting:
                expected.setdefault(session_id, set()).add(mod_id)
            for path in mod.paths:
                assert self._uncachable.get(path, 0) >= 1, path
        assert expected == self._mods_of, "modification wait index is inconsistent"
        total: dict[str, int] = {}
        for mod in self._mods.values():
            for path in mod.paths:
                total[path] = total.get(path, 0) + 1
        assert total == self._uncachable, "uncachable counts do not match modifications"
        mirrored = {(p, s, q) for p, owed in self._unacked.items() for s, q in owed.items()}
        assert mirrored == {(p, s, q) for s, by in self._unacked_by.items() for p, q in by.items()}, \
            "unacknowledged-invalidation index is inconsistent"
        for path, owed in self._unacked.items():
            assert owed, f"empty unacknowledged set kept for {path}"
            for session_id, seq in owed.items():
                assert seq <= self._last_seq.get(session_id, 0), (path, session_id, seq)
