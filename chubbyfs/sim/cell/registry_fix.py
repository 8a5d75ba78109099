"""The fix this simulation proposes for `cell/cache_registry.py` (finding 3
in docs/simulation.md), applied only when `CellSimConfig.registry_fix` is
set, so that sweeps can show the fix closes the hole and look past it.

The bug: a session stops being recorded as a cacher of a path the moment
its invalidation is queued (by a modification's `begin`, or after the fact
by `invalidate_now`), and `begin` waits only for the cachers it invalidates
itself. A change of a path begun while an earlier invalidation of it is
still unacknowledged therefore waits for nobody: it is proposed and
acknowledged while that session may still serve the old state.

The fix: remember, per path, the sessions whose invalidation of it is still
in their outbox, and make a new modification of the path wait for them too
(until they acknowledge it or their lease ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ...cell.cache_registry import DEFAULT_MAX_OUTBOX, CacheRegistry, _Wait


class FixedCacheRegistry(CacheRegistry):
    def __init__(self, *, max_outbox: int = DEFAULT_MAX_OUTBOX) -> None:
        super().__init__(max_outbox=max_outbox)
        self._unacked: dict[str, dict[int, int]] = {}  # path -> session -> seq of its invalidation

    def _invalidate_cachers(self, path: str) -> dict[int, int]:
        sent = super()._invalidate_cachers(path)
        if sent:
            self._unacked.setdefault(path, {}).update(sent)
        return sent

    def _still_owed(self, path: str) -> dict[int, int]:
        """Sessions whose invalidation of `path` is not acknowledged yet."""
        owed = self._unacked.get(path, {})
        for session_id, seq in list(owed.items()):
            if not any(item.seq == seq for item in self._outbox.get(session_id, ())):
                del owed[session_id]  # acknowledged, or the session is gone
        return owed

    def begin(self, paths: Iterable[str], lease_end_of: Callable[[int], int | None],
              prefixes: Iterable[str] = ()) -> tuple[int, set[int]]:
        mod_id, woken = super().begin(paths, lease_end_of, prefixes)
        mod = self._mods[mod_id]
        for path in mod.paths:
            for session_id, seq in self._still_owed(path).items():
                lease_end = lease_end_of(session_id)
                if lease_end is None:
                    continue
                wait = mod.waiting.setdefault(session_id, _Wait(seq, lease_end))
                wait.seq = max(wait.seq, seq)
                self._mods_of.setdefault(session_id, set()).add(mod_id)
        return mod_id, woken
