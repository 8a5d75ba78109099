"""The client's consistent cache, as a pure core (no trio, no clock).

It holds what this session read with caching on: file contents with their
stat, node stats, directory listings, and through those listings the
absence of names (a name missing from a cached listing of its directory does
not exist: any child added would have invalidated the listing). Entries are
keyed by the node's path at the master.

Consistency comes from the master (see `cell/cache_registry.py`): it
records who caches what and, before any change, waits until every cacher
has dropped the entry. Two rules on this side keep that promise:

- an item (invalidation or event) is processed, and the entries dropped,
  before the session acknowledges it;
- a read reply is installed only if it comes from the current master epoch
  and nothing newer than it has been processed: the reply names the last
  sequence number the master had given the session when it served the read,
  so an invalidation that overtook the reply (it has a later number) makes
  the reply uncachable here.

The session shell empties the cache when its lease runs out (jeopardy) and
asks `cache_usable` of the lease core before every lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

from chubbyfs.wire.cell_protocol import ITEM_EVENTS_LOST, ITEM_INVALIDATE, ITEM_MASTER_FAILOVER, Stat


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    stat: Stat


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # a cached answer: the name does not exist


class ClientCache:
    def __init__(self) -> None:
        self.epoch = 0  # master epoch the entries and sequence numbers belong to
        self.last_seq = 0  # last item processed in this epoch (what the next KeepAlive acks)
        self.contents: dict[str, tuple[bytes, Stat]] = {}
        self.stats: dict[str, Stat] = {}
        self.listings: dict[str, tuple[int, tuple[DirEntry, ...]]] = {}  # path -> (instance, entries)
        # Each listing's stats by name: `lookup` answers from a directory of
        # thousands of names without a scan (it runs for every cached open).
        self._listed: dict[str, dict[str, Stat]] = {}
        self.hits = 0
        self.misses = 0

    # ---- installing read replies ----------------------------------------------------------

    def may_install(self, epoch: int, seq: int) -> bool:
        return epoch == self.epoch and epoch != 0 and self.last_seq <= seq

    def put_contents(self, path: str, contents: bytes, stat: Stat, *, epoch: int, seq: int) -> bool:
        if not self.may_install(epoch, seq):
            return False
        self.contents[path] = (contents, stat)
        self.stats[path] = stat
        return True

    def put_stat(self, path: str, stat: Stat, *, epoch: int, seq: int) -> bool:
        if not self.may_install(epoch, seq):
            return False
        self.stats[path] = stat
        cached = self.contents.get(path)
        if cached is not None and cached[1] != stat:
            del self.contents[path]  # cannot happen unless invalidated; stay safe
        return True

    def put_listing(self, path: str, instance: int, entries: tuple[DirEntry, ...], *, epoch: int,
                    seq: int) -> bool:
        if not self.may_install(epoch, seq):
            return False
        self.listings[path] = (instance, tuple(entries))
        self._listed[path] = {entry.name: entry.stat for entry in entries}
        return True

    # ---- lookups -------------------------------------------------------------------------------

    def get_contents(self, path: str, instance: int | None = None) -> tuple[bytes, Stat] | None:
        hit = self.contents.get(path)
        if hit is not None and instance is not None and hit[1].instance != instance:
            hit = None
        self._count(hit)
        return hit

    def get_stat(self, path: str, instance: int | None = None) -> Stat | None:
        found = self.lookup(path)
        stat = found if isinstance(found, Stat) else None
        if stat is not None and instance is not None and stat.instance != instance:
            stat = None
        self._count(stat)
        return stat

    def get_listing(self, path: str, instance: int | None = None) -> tuple[DirEntry, ...] | None:
        found = self.listings.get(path)
        listing = None
        if found is not None and (instance is None or found[0] == instance):
            listing = found[1]
        self._count(listing)
        return listing

    def lookup(self, path: str) -> Stat | _Absent | None:
        """A node's stat, ABSENT if it is known not to exist, None if unknown."""
        stat = self.stats.get(path)
        if stat is not None:
            return stat
        parent, _, name = path.rpartition("/")
        listed = self._listed.get(parent)
        if listed is None:
            return None
        return listed.get(name, ABSENT)

    def _count(self, hit: object) -> None:
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1

    # ---- invalidation ----------------------------------------------------------------------------

    def invalidate(self, path: str) -> None:
        self.contents.pop(path, None)
        self.stats.pop(path, None)
        self.listings.pop(path, None)
        self._listed.pop(path, None)

    def clear(self) -> None:
        self.contents.clear()
        self.stats.clear()
        self.listings.clear()
        self._listed.clear()

    def start_epoch(self, epoch: int) -> bool:
        """A reply from master epoch `epoch`. A new master knows nothing of
        our cache and numbers items afresh: drop both. True if it changed.
        An older epoch changes nothing: a deposed master's late reply must not
        take us back (its items are stale; the caller drops them)."""
        if epoch <= self.epoch:
            return False
        self.epoch = epoch
        self.last_seq = 0
        self.clear()
        return True

    def is_new(self, seq: int) -> bool:
        """False for an item already processed (a re-sent reply)."""
        return seq > self.last_seq

    def apply_item(self, seq: int, kind: int, path: str) -> None:
        """Process one new item's effect on the cache (events other than
        fail-over leave it alone: their invalidations come separately)."""
        if not self.is_new(seq):
            raise ValueError(f"item {seq} was already processed (last {self.last_seq})")
        if kind == ITEM_INVALIDATE:
            self.invalidate(path)
        elif kind in (ITEM_MASTER_FAILOVER, ITEM_EVENTS_LOST):
            self.clear()
        self.last_seq = seq

    def assert_invariants(self) -> None:
        for path, (contents, stat) in self.contents.items():
            assert stat.path == path, (path, stat.path)
            assert stat.size == len(contents), path
            assert self.stats.get(path) == stat, f"stat of {path} disagrees with its contents entry"
        for path, stat in self.stats.items():
            assert stat.path == path, (path, stat.path)
        for path, (_instance, listing) in self.listings.items():
            names = [entry.name for entry in listing]
            assert names == sorted(set(names)), f"listing of {path} not sorted or has duplicates"
            assert self._listed.get(path) == {e.name: e.stat for e in listing}, f"index of {path} is stale"
        assert self._listed.keys() == self.listings.keys(), "an index without its listing"
        if self.epoch == 0:
            assert not (self.contents or self.stats or self.listings), "entries without an epoch"
