"""Which sites take part in a round: one seeded draw per (seed, round, draw), shared by the networked
aggregator and the simulator, so a study's sampled federation picks the sites `serve` would pick."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence


def sites_per_round(
    available: int, fraction: float = 1.0, at_least: int = 1, exactly: int | None = None
) -> int:
    """How many of `available` sites a round takes: `exactly`, else ceil(fraction x available), never fewer
    than `at_least` and never more than there are."""
    wanted = exactly if exactly is not None else max(at_least, math.ceil(fraction * available))
    return min(available, wanted)


def sample_sites(
    candidates: Sequence[str], k: int, seed: int, round_: int, draw: int = 0, keep: Iterable[str] = ()
) -> list[str]:
    """`k` sites of `candidates` (those in `keep` always among them), sorted; the same arguments always
    give the same sites. `draw` > 0: a new draw for the same round (a restart)."""
    kept = set(keep)
    others = [s for s in candidates if s not in kept]
    rng = random.Random(seed * 100_003 + round_ + 7919 * draw)
    return sorted(kept | set(rng.sample(others, max(0, min(len(others), k - len(kept))))))
