"""The fix this simulation proposes for `cell/cache_registry.py` (finding 3
in docs/simulation.md), applied only when `CellSimConfig.registry_fix` is
set, so that sweeps can show the fix closes the hole and look past it.

The bug: `CacheRegistry.begin` waits only for the sessions it invalidates
now, and a session stops being a cacher the moment its invalidation is
queued. A second change of the same path, begun while the first still waits
for a cacher's acknowledgement, therefore waits for nobody: it is proposed
and acknowledged while that cacher may still serve the old contents.

The fix: a new modification also waits for every session that an earlier,
unfinished modification of an overlapping path is still waiting on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ...cell.cache_registry import CacheRegistry, _Wait


class FixedCacheRegistry(CacheRegistry):
    def begin(self, paths: Iterable[str], lease_end_of: Callable[[int], int | None],
              prefixes: Iterable[str] = ()) -> tuple[int, set[int]]:
        mod_id, woken = super().begin(paths, lease_end_of, prefixes)
        mod = self._mods[mod_id]
        touched = set(mod.paths)
        for other_id, other in self._mods.items():
            if other_id == mod_id or not touched.intersection(other.paths):
                continue
            for session_id, wait in other.waiting.items():
                mine = mod.waiting.setdefault(session_id, _Wait(wait.seq, wait.deadline_ms))
                mine.seq, mine.deadline_ms = max(mine.seq, wait.seq), max(mine.deadline_ms, wait.deadline_ms)
                self._mods_of.setdefault(session_id, set()).add(mod_id)
        return mod_id, woken
