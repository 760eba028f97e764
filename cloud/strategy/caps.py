"""Admission caps: what one site's claims can do to the global model (pure functions over scalars).

A site reports its own ``n_samples`` and CDW distance, and its delta can have any finite norm. The
networked aggregator decides the weights from those claims within server-side bounds, once every
update of the round has been validated (the fold happens at close, see cloud/server.py):

1. ``n_samples`` is capped by a server-side value: per site (``site_samples``, e.g. from provisioning)
   or for every site (``max_samples``). Under fednova the path length a delta is divided by, and the
   round's step is taken back to (their weighted mean), comes from the claim too: a claim nobody vouched
   for counts there as at most the round's lower median claim (`path_claims`), or one insider could
   lengthen every site's step as far as it liked.
2. Each delta is clipped to ``norm_bound_factor`` x the lower median delta norm of the round, with the
   previous round's as one more value (kept across restarts, from metrics.jsonl). The lower median of
   an even count is the smaller middle value, so one outsized delta never sets its own bound: with one
   update and the reference, the bound comes from the smaller of the two; with two updates and none,
   from the smaller delta. Only the run's first round with a single update has nothing to compare to.
3. No site's share of the weight exceeds ``max_share_factor`` / K (K = updates aggregated), found by
   water-filling: capped sites sit at the cap, the rest keep their proportions.

A site's size is a claim unless the operator vouches for it (``site_samples``, e.g. from provisioning).
A vouched site m times the round's median size (m > 1) has m times the norm bound and m times the share
cap (`allowances`): an honest large site takes more and longer steps than a median one (one epoch of
800 images moves the model about 8 times as far as one of 176), and clipping it to the median's step
would take its data out of the model. A stolen key of that site can do no more than the size the
operator vouched for.

With honest sites of similar size and step, nothing binds. The in-process simulator's sites are trusted
and fold as they come, without these caps (docs/security.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


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
    site_samples: dict[str, PositiveInt] = Field(
        default_factory=dict, description="per-site n_samples, vouched for: caps the claim, scales the bounds"
    )


def capped_samples(site: str, claimed: int, config: AdmissionConfig) -> int:
    """The n_samples the aggregator uses for a site's claim."""
    caps = [c for c in (config.site_samples.get(site), config.max_samples) if c is not None]
    return min([claimed, *caps])


def path_claims(samples: Mapping[str, int], config: AdmissionConfig) -> dict[str, int]:
    """The sizes fednova's path lengths come from: a vouched site's (capped) claim; any other at most the
    round's lower median claim (the lower: with two sites, the other one's). The norm bound's view of a
    site nobody vouched for (allowance 1): an honest larger site's longer step is clipped unless vouched."""
    if not samples:
        return {}
    median = statistics.median_low(samples.values())
    return {s: n if s in config.site_samples else min(n, median) for s, n in samples.items()}


def norm_bound(
    norms: Mapping[str, float], config: AdmissionConfig, reference: float | None = None
) -> float | None:
    """The L2 bound for this round's deltas (None: no bound), from their lower median (+ a reference)."""
    if config.norm_bound_factor is None or not norms:
        return None
    values = [*norms.values(), *([reference] if reference is not None and reference > 0 else [])]
    median = statistics.median_low(values)
    return config.norm_bound_factor * median if median > 0 else None


def allowances(samples: Mapping[str, int], config: AdmissionConfig) -> dict[str, float]:
    """Per site, the multiple of the norm bound and share cap it gets: its vouched size over the round's
    median size when that is above 1 (only for sites in ``site_samples``), else 1."""
    median = statistics.median(samples.values()) if samples else 0
    vouched = config.site_samples
    return {s: max(1.0, n / median) if s in vouched and median > 0 else 1.0 for s, n in samples.items()}


def clip_scales(
    norms: Mapping[str, float], bound: float | None, allowance: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per site, the factor that brings its delta within its bound (the bound x its allowance; 1.0 when
    it is within)."""
    if bound is None:
        return dict.fromkeys(norms, 1.0)
    limits = {s: bound * (allowance or {}).get(s, 1.0) for s in norms}
    return {s: (limits[s] / n if n > limits[s] else 1.0) for s, n in norms.items()}


def share_capped(
    weights: Mapping[str, float], max_share: float, allowance: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Normalised weights with no share above its cap, `max_share` x the site's allowance (water-filling;
    a cap is never below 1/K, so the caps always hold).

    Sites over their cap are set to it, the remaining mass is shared by the others in proportion to their
    weights, repeated until nobody is over. All-zero weights stay zero (the round changes nothing).
    """
    total = sum(weights.values())
    if total <= 0 or not math.isfinite(total):
        return dict(weights)
    caps = {s: min(1.0, max(max_share, 1.0 / len(weights)) * (allowance or {}).get(s, 1.0)) for s in weights}
    capped: dict[str, float] = {}
    free = dict(weights)
    while True:
        mass = 1.0 - sum(capped.values())
        free_total = sum(free.values())
        over = {
            s for s, w in free.items() if free_total > 0 and w / free_total * mass > caps[s] * (1 + 1e-12)
        }
        if not over:
            break
        for s in over:
            capped[s] = caps[s]
            del free[s]
    mass = 1.0 - sum(capped.values())
    free_total = sum(free.values())
    shares = {s: (w / free_total * mass if free_total > 0 else 0.0) for s, w in free.items()}
    return {s: capped.get(s, shares.get(s, 0.0)) for s in weights}


def max_share(config: AdmissionConfig, updates: int) -> float:
    """The largest weight share one site may have in a round with `updates` aggregated updates."""
    if config.max_share_factor is None or updates == 0:
        return 1.0
    return min(1.0, config.max_share_factor / updates)
