"""Admission caps: what one site's claims can do to the global model (pure functions over scalars).

A site reports its own ``n_samples`` and CDW distance, and its delta can have any finite norm. The
networked aggregator decides the weights from those claims within server-side bounds, once every
update of the round has been validated (the fold happens at close, see cloud/server.py):

1. ``n_samples`` is capped by a server-side value: per site (``site_samples``, e.g. from provisioning)
   or for every site (``max_samples``).
2. Each delta is clipped to ``norm_bound_factor`` x the median delta norm of the round (with the
   previous round's median as one more value, so the bound holds also with fewer than 3 updates).
3. No site's share of the weight exceeds ``max_share_factor`` / K (K = updates aggregated), found by
   water-filling: capped sites sit at the cap, the rest keep their proportions.

With honest sites of similar size and step, nothing binds. The in-process simulator's sites are trusted
and fold as they come, without these caps (docs/security.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


class AdmissionConfig(BaseModel):
    """Server-side bounds on what a site's update can weigh (cloud.toml ``[admission]``)."""

    model_config = ConfigDict(extra="forbid")

    max_share_factor: float | None = Field(
        2.0, ge=1.0, description="no site's weight share above this x 1/K; None: off"
    )
    norm_bound_factor: float | None = Field(
        3.0, gt=0, description="clip each delta to this x the round's median delta norm; None: off"
    )
    max_samples: int | None = Field(None, ge=1, description="cap on every site's n_samples claim")
    site_samples: dict[str, int] = Field(default_factory=dict, description="per-site n_samples caps")


def capped_samples(site: str, claimed: int, config: AdmissionConfig) -> int:
    """The n_samples the aggregator uses for a site's claim."""
    caps = [c for c in (config.site_samples.get(site), config.max_samples) if c is not None]
    return min([claimed, *caps])


def norm_bound(
    norms: Mapping[str, float], config: AdmissionConfig, reference: float | None = None
) -> float | None:
    """The L2 bound for this round's deltas (None: no bound), from their median (+ a reference)."""
    if config.norm_bound_factor is None or not norms:
        return None
    values = [*norms.values(), *([reference] if reference is not None and reference > 0 else [])]
    median = statistics.median(values)
    return config.norm_bound_factor * median if median > 0 else None


def clip_scales(norms: Mapping[str, float], bound: float | None) -> dict[str, float]:
    """Per site, the factor that brings its delta within the bound (1.0 when it is within)."""
    return {s: (bound / n if bound is not None and n > bound else 1.0) for s, n in norms.items()}


def share_capped(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Normalised weights with no share above `max_share` (water-filling; >= 1/K always holds).

    Sites over the cap are set to it, the remaining mass is shared by the others in proportion to their
    weights, repeated until nobody is over. All-zero weights stay zero (the round changes nothing).
    """
    total = sum(weights.values())
    if total <= 0 or not math.isfinite(total):
        return dict(weights)
    cap = max(max_share, 1.0 / len(weights))
    capped: dict[str, float] = {}
    free = dict(weights)
    while True:
        mass = 1.0 - cap * len(capped)
        free_total = sum(free.values())
        over = {s for s, w in free.items() if free_total > 0 and w / free_total * mass > cap * (1 + 1e-12)}
        if not over:
            break
        for s in over:
            capped[s] = cap
            del free[s]
    mass = 1.0 - cap * len(capped)
    free_total = sum(free.values())
    shares = {s: (w / free_total * mass if free_total > 0 else 0.0) for s, w in free.items()}
    return {s: capped.get(s, shares.get(s, 0.0)) for s in weights}


def max_share(config: AdmissionConfig, updates: int) -> float:
    """The largest weight share one site may have in a round with `updates` aggregated updates."""
    if config.max_share_factor is None or updates == 0:
        return 1.0
    return min(1.0, config.max_share_factor / updates)
