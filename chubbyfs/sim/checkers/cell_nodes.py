"""A WGL model of one cell file, for checking node operations (P8).

Clients act on a file through handles, and a handle names a node *instance*
(deleting and re-creating a path makes a new instance; old handles go
stale). So the model's state for a path is (instance, contents,
content_generation), instance None while the path does not exist, plus the
highest instance seen (a re-created node always gets a larger one).

Inputs are `(f, path, args)`; outputs are tuples (or UNKNOWN_OUTPUT for an
`info` op):

| f | args | outputs |
|---|---|---|
| open | create (bool) | ("ok", created, instance, generation), ("not_found",) |
| read | instance | ("ok", contents, generation), ("stale",) |
| write | (instance, contents) | ("ok", generation), ("stale",) |
| cas | (instance, expected_generation, contents) | ("ok", generation), ("mismatch",), ("stale",) |
| delete | instance | ("ok",), ("stale",) |

Generations come from a cell-wide counter, so the model cannot predict
them: a successful write must return a generation above the current one,
and from then on that is the file's generation. An op with an unknown
output may leave a value unknown (`ANY`); the state is therefore a set of
possible concrete states (nondeterminism by powerset), and a later
observation pins the unknown down. Created files start empty.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Any

from .wgl import UNKNOWN_OUTPUT, Operation


class _Any:
    """A value the history has not pinned down yet."""

    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"


ANY = _Any()

# (instance | None | ANY, contents, generation | ANY, max_instance_seen)
_State = tuple[Any, bytes, Any, int]


def _same(known: Any, observed: Any) -> bool:
    return known is ANY or known == observed


def _above(known: Any, observed: Any) -> bool:
    return known is ANY or observed > known


class CellFileModel:
    def init(self) -> Hashable:
        return frozenset({(None, b"", 0, 0)})

    def step(self, state: Hashable, input: Any, output: Any) -> tuple[bool, Hashable]:
        nxt: set[_State] = set()
        for concrete in state:  # type: ignore[attr-defined]
            nxt.update(self._step_one(concrete, input, output))
        return bool(nxt), frozenset(nxt)

    def _step_one(self, s: _State, input: Any, out: Any) -> list[_State]:
        f, _path, args = input
        instance, contents, generation, top = s
        unknown = out is UNKNOWN_OUTPUT
        exists = instance is not None
        if f == "open":
            if not exists:
                if not args:  # open without create
                    return [s] if unknown or out == ("not_found",) else []
                if unknown:
                    return [(ANY, b"", ANY, top)]
                if out[0] != "ok" or not out[1] or out[2] <= top:
                    return []
                return [(out[2], b"", out[3], out[2])]
            if unknown:
                return [s]
            if out[0] != "ok" or out[1] or not _same(instance, out[2]) or not _same(generation, out[3]):
                return []
            return [(out[2], contents, out[3], max(top, out[2]))]
        target = args if f in ("read", "delete") else args[0]
        # Which concrete states say the handle is current or stale:
        current: list[_State] = []
        stale: list[_State] = []
        if exists and _same(instance, target):
            current.append((target, contents, generation, max(top, target)))
        if not exists or instance is ANY or instance != target:
            stale.append(s)
        results: list[_State] = []
        if unknown or out == ("stale",):
            results += stale
        for c in current:
            results += self._apply(c, f, args, out)
        return results

    @staticmethod
    def _apply(s: _State, f: str, args: Any, out: Any) -> list[_State]:
        instance, contents, generation, top = s
        unknown = out is UNKNOWN_OUTPUT
        if f == "read":
            if unknown:
                return [s]
            if out[0] == "ok" and out[1] == contents and _same(generation, out[2]):
                return [(instance, contents, out[2], top)]
            return []
        if f == "delete":
            return [(None, b"", 0, top)] if unknown or out == ("ok",) else []
        if f == "write":
            if unknown:
                return [(instance, args[1], ANY, top)]
            if out[0] == "ok" and _above(generation, out[1]):
                return [(instance, args[1], out[1], top)]
            return []
        if f == "cas":
            _, expected, new = args
            matches = [] if generation is not ANY and generation != expected else [True]
            differs = [] if generation is not ANY and generation == expected else [True]
            if unknown:
                return ([(instance, new, ANY, top)] if matches else []) + ([s] if differs else [])
            if out == ("mismatch",):
                return [s] if differs else []
            if out[0] == "ok" and matches and out[1] > expected:
                return [(instance, new, out[1], top)]
            return []
        raise ValueError(f"CellFileModel: unknown operation {f!r}")

    def partition(self, ops: list[Operation]) -> list[list[Operation]]:
        by_path: dict[Any, list[Operation]] = defaultdict(list)
        for op in ops:
            by_path[op.input[1]].append(op)
        return [by_path[k] for k in sorted(by_path)]
