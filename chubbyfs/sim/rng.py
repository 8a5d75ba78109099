"""One seed, many independent named random streams.

Each consumer (network, disk, nemesis, workload, node-1, ...) draws from its
own `random.Random`, derived from (root seed, name) through SHA-256 rather
than `hash()` (which is salted per process for str). Adding draws to one
stream therefore never shifts the numbers another stream sees.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class SimRandom:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def stream(self, name: str) -> random.Random:
        """The stream called `name`; the same object on every call."""
        rng = self._streams.get(name)
        if rng is None:
            rng = random.Random(derive_seed(self.seed, name))
            self._streams[name] = rng
        return rng

    def fresh(self, name: str) -> random.Random:
        """A new stream for `name`, independent of earlier calls (e.g. one per restart)."""
        return random.Random(derive_seed(self.seed, name))
