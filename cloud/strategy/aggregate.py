"""FedPav aggregation with CDW weights, BatchNorm policies and robust options, as a streaming fold.

Updates arrive one at a time as deltas against the round's base (trained shared state - base), as flat
buffers (`add_flat`, what the wire codec decodes) or state dicts (`add`). Up to `GROUP` pending updates
are folded together into one running weighted sum, block by block while the blocks are in cache, so the
sum is read and written once per group and memory is O(1 model) whatever the number of sites. At the end

    new = base + (sum_k a_k * delta_k) / (sum_k a_k)

which equals the batch formula sum_k (a_k / sum_j a_j) * state_k exactly up to float rounding, also when
the weights are only normalised at the end (CDW).

Weights a_k: ``fedpav`` = training images n_k; ``cdw`` = the site's cosine distance d_k (replaces the
sizes, as the original); ``cdw_x_size`` = n_k * d_k (our extension).

``fednova`` (normalised averaging, Wang et al. 2020; our addition, not in FedReID): a site of n_k images
takes about n_k / batch local steps, and with momentum the distance it moves grows faster still, so under
plain averaging a large site counts once by its weight and again by the length of its step. Each delta
is divided by its path length tau_k (`reid.train.sgd_path_length`, given by the caller with the update)
and the average is taken back to the weighted mean path length:

    new = base + (sum_k a_k tau_k / sum_k a_k) * (sum_k a_k * delta_k / tau_k) / (sum_k a_k)

so every site moves the model by its weight's share of one common step length.

BatchNorm policy: ``first`` (the original code) copies the BN running statistics of the first accepted
update of the round and averages everything else; ``average`` averages running mean/var too; ``local``
(FedBN-style) keeps whole BN layers (affine + statistics) at the sites: the global copy is taken from
the first update, and sites do not overwrite their own BN layers when they load the global model.
Integer buffers (``num_batches_tracked``, counts of batches) move by the smallest count any update of the
round reports (never below 0): no site can raise them beyond what every other site trained.

Robust options (off by default): clip each delta to an L2 norm; reject updates whose delta norm or CDW
is an outlier by the median-absolute-deviation rule; coordinate-wise median or trimmed mean instead of
the weighted mean (unweighted, as usual for these estimators). The options that need to see all updates
(outlier rejection, median, trimmed mean) hold the round's deltas in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud.strategy.flat import FlatLayout, LayoutError, l2_norm
from reid.choices import BNPolicy, Estimator, OutlierRule, Weighting
from reid.model import batchnorm_keys, is_bn_buffer

log = logging.getLogger(__name__)

MAX_COUNT = 2**31 - 1  # a counter moves by at most this per round: no claim can wrap the int64


class StrategyConfig(BaseModel):
    """How a round's updates become the next global shared state."""

    model_config = ConfigDict(extra="forbid")

    weighting: Weighting = Field(
        "fedpav", description="fedpav (n_k), cdw (cosine distance d_k) or cdw_x_size (n_k d_k)"
    )
    bn: BNPolicy = Field(
        "local",
        description="BatchNorm layers: local (never sent; each site trains and serves deployments with its "
        "own), average, or first (copy one site's)",
    )
    estimator: Estimator = Field("mean", description="mean, median or trimmed_mean of the deltas")
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="per side, for trimmed_mean")
    clip_norm: float | None = Field(None, gt=0, description="clip each delta to this L2 norm")
    outlier_rule: OutlierRule = Field(
        "none", description="none, norm, cdw or norm_or_cdw (MAD rule on the round's updates)"
    )
    mad_threshold: float = Field(3.5, gt=0, description="robust z-score above which an update is rejected")
    fednova: bool = Field(
        False,
        description="normalised averaging: each delta divided by its site's local path length (steps, "
        "momentum), the average taken back to the mean path length (FedNova)",
    )

    @model_validator(mode="after")
    def _fednova_averages(self) -> StrategyConfig:
        if self.fednova and self.estimator != "mean":
            raise ValueError("fednova normalises a weighted mean: it needs estimator = mean")
        return self

    @property
    def needs_all_updates(self) -> bool:
        return self.estimator != "mean" or self.outlier_rule != "none"


class NoUpdatesError(RuntimeError):
    """A round ended without a single accepted update."""


@dataclass
class Update:
    site: str
    delta: Mapping[str, torch.Tensor]  # trained shared state - the round's base
    n_samples: int
    cdw: float | None = None
    steps: float | None = None  # its path length this round (`reid.train.sgd_path_length`): fednova


@dataclass
class _Pending:
    """An accepted update waiting to be folded: its delta buffers, its weight, its clip scale and its path
    length (1 unless fednova)."""

    site: str
    floats: torch.Tensor
    ints: torch.Tensor
    weight: float
    scale: float
    steps: float = 1.0

    @property
    def alpha(self) -> float:
        return self.weight * self.scale / self.steps


@dataclass
class Rejection:
    site: str
    reason: str


@dataclass
class RoundAggregate:
    state: dict[str, torch.Tensor]
    flat: tuple[torch.Tensor, torch.Tensor]  # the (float, int) buffers that `state` views: keep, not copy
    weights: dict[str, float]  # normalised, of the sites that made it into the average
    norms: dict[str, float]
    path_length: float | None = None  # fednova: the weighted mean path length the average was taken to
    clipped: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def bn_policy_keys(keys: Sequence[str], bn: BNPolicy) -> set[str]:
    """Float keys copied from the first update instead of averaged, under a BN policy."""
    if bn == "first":
        return {k for k in keys if is_bn_buffer(k)}
    if bn == "local":
        return batchnorm_keys(keys)
    return set()


def _mad_outliers(values: Mapping[str, float], threshold: float) -> set[str]:
    """Sites whose value is further than `threshold` robust standard deviations from the median."""
    if len(values) < 3:
        return set()
    x = torch.tensor(list(values.values()), dtype=torch.float64)
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    if mad == 0:
        spread = (x - med).abs()
        return {
            s for s, d in zip(values, spread.tolist(), strict=True) if d > 1e-12 * max(1.0, abs(float(med)))
        }
    z = (x - med).abs() / mad
    return {s for s, zi in zip(values, z.tolist(), strict=True) if zi > threshold}


class StreamingAggregator:
    """Folds one round's updates into the next global shared state.

    `base_flat` lets a caller that already holds the base as flat buffers (the previous round's result)
    skip flattening it again; `out` is a float32 buffer of the model's size to reuse for the running sum
    and the result (fresh large allocations page-fault heavily: reuse them across rounds).
    """

    BLOCK = 1 << 20  # floats summed and checked together while they are in cache (4 MB)
    GROUP = 4  # updates folded in one pass over the running sum (1 read + 1 write of it per group)

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        config: StrategyConfig | None = None,
        base_flat: tuple[torch.Tensor, torch.Tensor] | None = None,
        out: torch.Tensor | None = None,
        group: int = GROUP,
    ) -> None:
        self.config = config or StrategyConfig()
        self.group = group  # 1: fold each update as it comes (holds no update after add returns)
        self.base = dict(base)
        self.layout = FlatLayout(self.base)
        self.base_floats, self.base_ints = (
            base_flat if base_flat is not None else self.layout.flatten(self.base)
        )
        self.copy_index = self.layout.positions(bn_policy_keys(self.layout.keys, self.config.bn))
        self.var_index = self.layout.positions(k for k in self.layout.keys if k.endswith(".running_var"))
        self.pool: list[tuple[torch.Tensor, torch.Tensor]] = []  # flat buffers for add() of state dicts
        self.pending: list[_Pending] = []
        self.block_sum = torch.empty(0)
        self.acc: torch.Tensor | None = None
        self.out = out
        self.total_weight = 0.0
        self.total_steps = 0.0  # sum of weight * path length (fednova)
        self.first: torch.Tensor | None = None  # the BN values update 1 sends (copied under bn = first)
        self.fewest: torch.Tensor | None = None  # the smallest count of batches per counter over the updates
        self.held: list[_Pending] = []
        self.raw_weights: dict[str, float] = {}
        self.norms: dict[str, float] = {}
        self.cdws: dict[str, float] = {}
        self.clipped: list[str] = []
        self.rejected: list[Rejection] = []

    @property
    def accepted(self) -> list[str]:
        return list(self.raw_weights)

    def reject(self, site: str, reason: str) -> Rejection:
        rejection = Rejection(site, reason)
        self.rejected.append(rejection)
        log.warning("update from %s rejected: %s", site, reason)
        return rejection

    def add(self, update: Update, weight: float | None = None, scale: float = 1.0) -> Rejection | None:
        """Validate and fold one update given as a state dict (see `add_flat`)."""
        if update.site in self.raw_weights:
            log.info("duplicate update from %s ignored", update.site)
            return None
        slot = len(self.pending)
        while len(self.pool) <= slot:
            self.pool.append(self.layout.empty())
        try:
            floats, ints = self.layout.flatten(update.delta, out=self.pool[slot])
        except LayoutError as err:
            return self.reject(update.site, str(err))
        return self.add_flat(
            update.site, floats, ints, update.n_samples, update.cdw, weight, scale, steps=update.steps
        )

    def add_flat(
        self,
        site: str,
        floats: torch.Tensor,
        ints: torch.Tensor,
        n_samples: int,
        cdw: float | None = None,
        weight: float | None = None,
        scale: float = 1.0,
        steps: float | None = None,
    ) -> Rejection | None:
        """Validate and fold one update given as flat delta buffers (as the wire codec decodes them).

        `weight` replaces the weight of the strategy's weighting, `scale` multiplies the delta (a clip
        decided by the caller), `steps` is the site's path length (needed by fednova, ignored otherwise).
        Returns the rejection (also logged and recorded) or None. A second update from the same site in
        the same round is ignored (idempotent). The buffers are only read.
        """
        if site in self.raw_weights:
            log.info("duplicate update from %s ignored", site)
            return None
        if floats.shape != (self.layout.float_numel,) or floats.dtype != torch.float32:
            return self.reject(
                site, f"float buffer {tuple(floats.shape)} {floats.dtype} does not fit the model"
            )
        if ints.shape != (self.layout.int_numel,) or ints.dtype != torch.int64:
            return self.reject(
                site, f"integer buffer {tuple(ints.shape)} {ints.dtype} does not fit the model"
            )
        if n_samples <= 0:
            return self.reject(site, f"n_samples must be positive, got {n_samples}")
        floats = self._project_variances(site, floats)
        try:
            w = raw_weight(self.config.weighting, n_samples, cdw) if weight is None else float(weight)
        except ValueError as err:
            return self.reject(site, str(err))
        if not math.isfinite(w) or w < 0:
            return self.reject(site, f"invalid weight {w}")
        clip = self.config.clip_norm
        if not (math.isfinite(scale) and 0 < scale <= 1):
            return self.reject(site, f"invalid scale {scale}")
        if not self.config.fednova:
            steps = 1.0
        elif steps is None or not math.isfinite(steps) or steps < 1:
            return self.reject(site, f"fednova needs the update's path length (>= 1), got {steps!r}")
        if self.config.needs_all_updates or clip is not None:
            norm = l2_norm(floats) * scale
            if not math.isfinite(norm):
                return self.reject(site, "delta contains NaN or Inf")
            self.norms[site] = norm
            if clip is not None and norm > clip:
                scale *= clip / norm
                self.clipped.append(site)
                log.info("update from %s clipped from norm %.4g to %.4g", site, norm, clip)
        if cdw is not None:
            self.cdws[site] = float(cdw)
        self.raw_weights[site] = w
        if self.config.needs_all_updates:
            self.held.append(_Pending(site, floats * scale, ints.clone(), w, 1.0, steps))
        else:
            self.pending.append(_Pending(site, floats, ints, w, scale, steps))
            if len(self.pending) >= self.group:
                self._fold_pending()
        return None

    def _project_variances(self, site: str, floats: torch.Tensor) -> torch.Tensor:
        """The delta with every running variance it implies (base + delta) at least 0: no site's BatchNorm
        layer can have a negative one, and one update's share of an averaged (or copied) variance could
        take a whole layer's to 0 (2026-12-05 insider audit). A copy only when something is raised."""
        if not self.var_index.numel():
            return floats
        var = floats.index_select(0, self.var_index)
        floor = self.base_floats.index_select(0, self.var_index).neg_()
        below = int((var < floor).sum())
        if not below:
            return floats
        log.info("update from %s: %d running variances below 0 raised to 0", site, below)
        floats = floats.clone()
        floats.index_copy_(0, self.var_index, torch.maximum(var, floor))
        return floats

    def _sum_block(self, group: list[_Pending], start: int, end: int) -> torch.Tensor:
        out = self.block_sum[: end - start]
        if not group:
            return out.zero_()
        torch.mul(group[0].floats[start:end], group[0].alpha, out=out)
        for p in group[1:]:
            out.add_(p.floats[start:end], alpha=p.alpha)
        return out

    def _fold_pending(self, final: bool = False) -> bool:
        """acc += sum_j alpha_j * delta_j over the pending group, block by block, in one pass over acc.

        Each block's group sum is checked for NaN/Inf while it is in cache; an update found non-finite is
        rejected and its blocks already folded are subtracted again (exact up to one rounding step).
        With `final`, each block is also finished (base + sum / total weight) in the same pass; returns
        whether that happened (not when the total is 0 or an update of this group was rejected).
        """
        group, self.pending = self.pending, []
        if not group:
            return False
        n = self.layout.float_numel
        if self.block_sum.numel() < min(self.BLOCK, n):
            self.block_sum = torch.empty(min(self.BLOCK, n))
        fresh = self.acc is None
        if self.acc is None:
            self.acc = self.out if self.out is not None and self.out.shape == (n,) else torch.empty(n)
        acc, base = self.acc, self.base_floats
        live = list(group)
        total = self.total_weight + sum(p.weight for p in live)
        divisor = self._divisor(total, self.total_steps + sum(p.weight * p.steps for p in live))
        final = final and total > 0
        for start in range(0, n, self.BLOCK):
            end = min(n, start + self.BLOCK)
            block = self._sum_block(live, start, end)
            if not math.isfinite(float(torch.dot(block, block))):
                bad = [
                    p
                    for p in live
                    if not math.isfinite(float(torch.dot(p.floats[start:end], p.floats[start:end])))
                ]
                if final:  # turn the finished prefix back into a plain sum; finish() divides later
                    acc[:start].sub_(base[:start]).mul_(divisor)
                    final = False
                for p in bad:
                    acc[:start].sub_(p.floats[:start], alpha=p.alpha)
                    self.reject(p.site, "delta contains NaN or Inf")
                    self.raw_weights.pop(p.site, None)
                live = [p for p in live if p not in bad]
                block = self._sum_block(live, start, end)
            target = acc[start:end]
            if not fresh:
                block.add_(target)
            if final:
                torch.add(base[start:end], block, alpha=1.0 / divisor, out=target)
            else:
                target.copy_(block)
        for p in live:
            self.total_weight += p.weight
            self.total_steps += p.weight * p.steps
            if self.first is None:
                self.first = p.floats.index_select(0, self.copy_index) * p.scale
            counts = p.ints.clamp(0, MAX_COUNT)
            self.fewest = counts if self.fewest is None else torch.minimum(self.fewest, counts)
        return final

    def _divisor(self, total: float, total_steps: float) -> float:
        """What the weighted sum of (path-normalised) deltas is divided by: the total weight, and under
        fednova the total over the weighted mean path length (total_steps / total)."""
        if not self.config.fednova or total <= 0:
            return total
        return total * total / total_steps

    def _screen_outliers(self) -> None:
        rule = self.config.outlier_rule
        flagged: dict[str, str] = {}
        if rule in ("norm", "norm_or_cdw"):
            for site in _mad_outliers(self.norms, self.config.mad_threshold):
                flagged[site] = f"delta norm {self.norms[site]:.4g} is an outlier (MAD rule)"
        if rule in ("cdw", "norm_or_cdw"):
            for site in _mad_outliers(self.cdws, self.config.mad_threshold):
                flagged.setdefault(site, f"CDW {self.cdws[site]:.4g} is an outlier (MAD rule)")
        for site, reason in flagged.items():
            self.reject(site, reason)
            self.raw_weights.pop(site)
        self.held = [p for p in self.held if p.site not in flagged]

    def finish(self) -> RoundAggregate:
        """The next global shared state (and what happened to each update)."""
        if self.config.needs_all_updates:
            self._screen_outliers()
            if self.config.estimator == "mean":
                for p in self.held:
                    self.pending.append(p)
                    if len(self.pending) >= self.group:
                        self._fold_pending()
            elif self.held:
                self._robust_estimate()
        finished = self._fold_pending(final=self.config.estimator == "mean")
        if self.acc is None or self.first is None:
            why = "; ".join(f"{r.site}: {r.reason}" for r in self.rejected)
            raise NoUpdatesError("no accepted update in this round" + (f" ({why})" if why else ""))
        path_length = None
        if self.config.estimator == "mean":
            total = self.total_weight
            if total <= 0:  # e.g. every CDW is 0: no site's model changed; keep the base
                log.warning("all update weights are zero: the global model stays unchanged this round")
                self.acc.zero_()
                total = 1.0
            elif self.config.fednova:
                path_length = self.total_steps / total
            divisor = self._divisor(total, self.total_steps)
            weights = {s: w / total for s, w in self.raw_weights.items()}
        else:
            divisor = 1.0
            weights = {p.site: 1.0 / len(self.held) for p in self.held}
        new_floats = (
            self.acc if finished else torch.add(self.base_floats, self.acc, alpha=1.0 / divisor, out=self.acc)
        )
        first_floats, counts = self.first, self.fewest
        assert counts is not None
        if self.config.bn == "local":  # the sites' own layers: nothing any update sends changes them
            first_floats, counts = first_floats.zero_(), counts.zero_()
        new_floats.index_copy_(
            0, self.copy_index, self.base_floats.index_select(0, self.copy_index) + first_floats
        )
        new_ints = self.base_ints + counts
        # a variance is never negative (an update can push an averaged or copied one below 0: NaN features)
        new_floats.index_copy_(0, self.var_index, new_floats.index_select(0, self.var_index).clamp_(min=0))
        state = self.layout.unflatten(new_floats, new_ints, like=self.base)
        return RoundAggregate(
            state,
            (new_floats, new_ints),
            weights,
            dict(self.norms),
            clipped=list(self.clipped),
            rejected=list(self.rejected),
            path_length=path_length,
        )

    def _robust_estimate(self) -> None:
        k = len(self.held)
        ordered = torch.stack([p.floats for p in self.held]).sort(dim=0).values
        if self.config.estimator == "median":
            self.acc = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        else:
            cut = int(self.config.trim_fraction * k)
            self.acc = ordered[cut : k - cut].mean(dim=0)
        self.first = self.held[0].floats.index_select(0, self.copy_index)
        self.fewest = torch.stack([p.ints for p in self.held]).amin(dim=0).clamp(0, MAX_COUNT)


def raw_weight(weighting: Weighting, n_samples: int, cdw: float | None) -> float:
    """An update's weight before normalisation: n_k (fedpav), d_k (cdw) or n_k * d_k (cdw_x_size)."""
    if weighting == "fedpav":
        return float(n_samples)
    if cdw is None or not math.isfinite(cdw) or not 0.0 <= cdw <= 2.0:
        raise ValueError(f"CDW distance missing or outside [0, 2]: {cdw!r}")
    return cdw if weighting == "cdw" else cdw * n_samples


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    bn: BNPolicy = "average",
) -> dict[str, torch.Tensor]:
    """The weighted average of full shared states (weights are normalised inside).

    The same streaming code as the aggregator, with the first state as the base: exact to float rounding.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} states and {len(weights)} weights")
    base = states[0]
    agg = StreamingAggregator(base, StrategyConfig(bn=bn))
    for i, (state, w) in enumerate(zip(states, weights, strict=True)):
        delta = (
            {k: state[k] - base[k] for k in base} if i else {k: torch.zeros_like(v) for k, v in base.items()}
        )
        rejection = agg.add(Update(f"state{i}", delta, n_samples=1), weight=w)
        if rejection is not None:
            raise ValueError(f"state {i}: {rejection.reason}")
    return agg.finish().state
