"""The fenced resource (a storage server guarded by a Chubby lock) and its
check (testing-anchors P3).

Lock holders do read-modify-write cycles on a set kept by the resource:
`read(sequencer)` returns (version, elements); `write(sequencer,
base_version, elements)` replaces them. With fencing on, every access
(reads too: a holder must not act on what it read before a newer holder got
in) is accepted only if its sequencer's lock generation is at least the
highest the resource has seen for that lock, which then becomes the highest.

The consequence is what is checked, not the mechanism (Jepsen's lock-set):
an accepted write whose base version is not the current version overwrote
someone else's update — a *lost update*. With fencing on and a correct cell
that must never happen; with fencing off (the negative control), a holder
paused past its lease must produce one. Every accepted access must also
carry a sequencer the cell really granted (checked against the apply
streams at the end).

Pure: no trio, no clock; callers add the network delays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ...locks import LockMode, Sequencer, SequencerError


# (path, generation, mode) -> did the cell ever grant it?
GrantLookup = Callable[[str, int, int], bool]


class FencingError(Exception):
    """An access refused by the resource (stale or malformed sequencer)."""


@dataclass
class _Store:
    highest_generation: int = 0
    version: int = 0
    elements: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Access:
    kind: str  # read | write
    path: str
    generation: int
    mode: int
    accepted: bool
    base_version: int = 0
    version_at_accept: int = 0
    detail: str = ""


@dataclass
class FencedResource:
    fencing: bool = True
    stores: dict[str, _Store] = field(default_factory=dict)
    log: list[Access] = field(default_factory=list)
    lost_updates: list[str] = field(default_factory=list)
    rejected_stale: int = 0

    def _admit(self, kind: str, sequencer: str) -> tuple[Sequencer, _Store]:
        try:
            seq = Sequencer.decode(sequencer)
        except SequencerError as exc:
            raise FencingError(f"malformed sequencer: {exc}") from None
        store = self.stores.setdefault(seq.path, _Store())
        if self.fencing:
            if seq.lock_generation < store.highest_generation:
                self.rejected_stale += 1
                self.log.append(Access(kind, seq.path, seq.lock_generation, int(seq.mode), False,
                                       detail=f"stale: highest {store.highest_generation}"))
                raise FencingError(f"stale sequencer: generation {seq.lock_generation} < "
                                   f"{store.highest_generation}")
            store.highest_generation = seq.lock_generation
        return seq, store

    def read(self, sequencer: str) -> tuple[int, tuple[str, ...]]:
        seq, store = self._admit("read", sequencer)
        self.log.append(Access("read", seq.path, seq.lock_generation, int(seq.mode), True,
                               version_at_accept=store.version))
        return store.version, store.elements

    def write(self, sequencer: str, base_version: int, elements: tuple[str, ...]) -> int:
        seq, store = self._admit("write", sequencer)
        if seq.mode != LockMode.EXCLUSIVE:
            raise FencingError("writes need an exclusive lock")
        if base_version != store.version:
            lost = sorted(set(store.elements) - set(elements))
            self.lost_updates.append(
                f"P3 lost update on {seq.path}: write by generation {seq.lock_generation} based on version "
                f"{base_version} accepted at version {store.version} (highest generation seen "
                f"{store.highest_generation}); lost elements {lost}")
        self.log.append(Access("write", seq.path, seq.lock_generation, int(seq.mode), True,
                               base_version=base_version, version_at_accept=store.version))
        store.version += 1
        store.elements = elements
        return store.version

    def check(self, granted: GrantLookup) -> list[str]:
        """Lost updates, and accepted accesses with sequencers never granted."""
        problems = list(self.lost_updates)
        for access in self.log:
            if access.accepted and not granted(access.path, access.generation, access.mode):
                problems.append(f"P3: {access.kind} on {access.path} accepted with generation "
                                f"{access.generation} (mode {access.mode}), which the cell never granted")
                break
        return problems

    def statistics(self) -> dict[str, int]:
        return {"fenced_reads": sum(a.kind == "read" and a.accepted for a in self.log),
                "fenced_writes": sum(a.kind == "write" and a.accepted for a in self.log),
                "fenced_rejected": self.rejected_stale, "lost_updates": len(self.lost_updates)}
