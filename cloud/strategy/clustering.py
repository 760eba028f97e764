"""Client clustering: sites grouped by the similarity of their updates, each group aggregated on its own
(the remedy for sites whose data differ, from the extended FedReID study, Zhuang et al. 2022).

How (ours; the paper names the idea, not an algorithm):

- **Sketch.** An update's delta read at a fixed, seeded sample of `sketch_size` coordinates of the flat
  float buffer (the same coordinates for every site and round). The cosine of two sketches estimates
  the cosine of the two deltas, at `sketch_size` floats per site instead of a model per site.
- **Grouping.** After `after` rounds of one global model, the sketches of the last of them are grouped
  by spherical k-means (k-means++ seeding from the run's seed, Lloyd steps until nothing moves), into
  `groups` groups numbered by their first site: deterministic. From then on each group has its own
  model, started from the global one, and a site trains from and is folded into its group's model
  only (one streaming fold per group: memory is `groups` models, not one per site). A site that had
  not taken part yet (client sampling) is put into the group whose centroid its first update is
  closest to.
- **The global model** (what evaluation scores as "global", and what is exported) is the average of
  the group models weighted by their sites' training images: the FedPav average of every site's model
  at the end of the round. Each site is also scored with its group's model ("group").
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from cloud.strategy.aggregate import (
    NoUpdatesError,
    Rejection,
    StrategyConfig,
    StreamingAggregator,
    Update,
    weighted_average,
)
from cloud.strategy.flat import FlatLayout

State = dict[str, torch.Tensor]


class ClusterConfig(BaseModel):
    """Client clustering (algorithm ``cluster``)."""

    model_config = ConfigDict(extra="forbid")

    groups: int = Field(2, ge=2, le=64, description="groups of sites, each with its own model")
    after: int = Field(1, ge=1, description="rounds of one global model before the sites are grouped")
    sketch_size: int = Field(65536, ge=16, description="coordinates of each update compared")


def sketch_index(numel: int, size: int, seed: int) -> torch.Tensor:
    """The sampled coordinates (sorted, for cache-friendly reads), the same for a given seed."""
    if size >= numel:
        return torch.arange(numel)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (size,), generator=generator).sort().values


def sketch(floats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """An update's unit-length sketch (float64; zero stays zero)."""
    s = floats.index_select(0, index).double()
    norm = s.norm()
    return s / norm if norm > 0 else s


def spherical_kmeans(x: torch.Tensor, k: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """Group the unit rows of `x` into at most k groups by cosine; returns (group per row, centroids).

    Groups are renumbered by their first row, so the result does not depend on the order centroids were
    found in; a group that empties keeps its centroid.
    """
    n = len(x)
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(0, n, (1,), generator=generator))]
    while len(chosen) < k:  # k-means++: the next centre far (in cosine) from the chosen ones
        gap = (1 - (x @ x[chosen].T).max(dim=1).values).clamp(min=0)
        gap[chosen] = 0
        if float(gap.sum()) <= 0:
            break
        chosen.append(int(torch.multinomial(gap, 1, generator=generator)))
    centroids = x[chosen].clone()
    assign = (x @ centroids.T).argmax(dim=1)
    for _ in range(100):
        for j in range(len(centroids)):
            members = x[assign == j]
            if len(members):
                total = members.sum(dim=0)
                centroids[j] = total / total.norm() if total.norm() > 0 else centroids[j]
        moved = (x @ centroids.T).argmax(dim=1)
        if torch.equal(moved, assign):
            break
        assign = moved
    order: list[int] = []
    for g in assign.tolist():
        if g not in order:
            order.append(g)
    order += [g for g in range(len(centroids)) if g not in order]
    relabel = {old: new for new, old in enumerate(order)}
    return [relabel[g] for g in assign.tolist()], centroids[order]


def nearest(s: torch.Tensor, centroids: torch.Tensor) -> int:
    """The group whose centroid is closest (in cosine) to the sketch `s`."""
    return int((centroids @ s).argmax())


class Clustering:
    """A run's grouping of its sites and the group models, through the rounds (checkpointed with the run).

    Before the grouping round, one global model as usual; in it, `observe` keeps each update's sketch and
    `group` forms the groups after the fold. From then on, `base_of` names the model a site starts from,
    `add` folds each update into its group (an unplaced site first joins the nearest group, its delta
    re-based onto that group's model), and `finish` makes the new group models and their weighted average.
    """

    def __init__(self, config: ClusterConfig, strategy: StrategyConfig, seed: int) -> None:
        # groups fold by plain weights: a site re-based onto its group carries a term that is not a
        # step, which fednova's path normalisation would scale (rounds before grouping use it)
        self.config, self.seed = config, seed
        self.strategy = strategy.model_copy(update={"fednova": False})
        self.groups: dict[str, int] = {}
        self.samples: dict[str, int] = {}  # each placed site's training images, as last reported
        self.centroids: torch.Tensor | None = None
        self.states: dict[int, State] = {}
        self.sketches: dict[str, torch.Tensor] = {}
        self.folds: dict[int, StreamingAggregator] = {}
        self.layout: FlatLayout | None = None
        self.index: torch.Tensor | None = None
        self.rejected: list[Rejection] = []  # the updates the last `finish` left out, and why

    @property
    def active(self) -> bool:
        return bool(self.states)

    def grouping_round(self, round_: int) -> bool:
        return not self.active and round_ == self.config.after - 1

    def base_of(self, site: str) -> str:
        group = self.groups.get(site)
        return "global" if group is None or not self.active else f"group{group}"

    def bases(self) -> dict[str, State]:
        return {f"group{g}": state for g, state in self.states.items()}

    def _layout(self, like: Mapping[str, torch.Tensor]) -> tuple[FlatLayout, torch.Tensor]:
        if self.layout is None or self.index is None:
            self.layout = FlatLayout(like)
            self.index = sketch_index(self.layout.float_numel, self.config.sketch_size, self.seed)
        return self.layout, self.index

    def observe(self, update: Update, global_state: State) -> None:
        """In the grouping round: keep the update's sketch (the global fold takes the update itself)."""
        layout, _ = self._layout(global_state)
        self.observe_flat(update.site, layout.flatten(update.delta)[0], update.n_samples, global_state)

    def observe_flat(self, site: str, floats: torch.Tensor, n_samples: int, global_state: State) -> None:
        """`observe` for a delta given as the flat float buffer (only read)."""
        _, index = self._layout(global_state)
        self.sketches[site] = sketch(floats, index)
        self.samples[site] = n_samples

    def group(self, global_state: State) -> dict[str, int]:
        """After the grouping round's fold: k-means on the sketches; every group starts from the global
        model. Returns the groups."""
        sites = list(self.sketches)
        assign, self.centroids = spherical_kmeans(
            torch.stack([self.sketches[s] for s in sites]), self.config.groups, self.seed
        )
        self.groups = dict(zip(sites, assign, strict=True))
        self.states = {g: {k: v.clone() for k, v in global_state.items()} for g in range(len(self.centroids))}
        self.sketches.clear()
        return dict(self.groups)

    def add(self, update: Update, global_state: State) -> int:
        """Fold an update of a grouped round into its group; returns the group."""
        layout, _ = self._layout(global_state)
        floats, ints = layout.flatten(update.delta)
        return self.add_flat(update.site, floats, ints, update.n_samples, update.cdw, global_state)

    def add_flat(
        self,
        site: str,
        floats: torch.Tensor,
        ints: torch.Tensor,
        n_samples: int,
        cdw: float | None,
        global_state: State,
        weight: float | None = None,
        scale: float = 1.0,
    ) -> int:
        """`add` for a delta given as flat buffers (only read), with the weight and clip the caller
        decided (`StreamingAggregator.add_flat`); returns the group."""
        layout, index = self._layout(global_state)
        group = self.groups.get(site)
        if group is None:  # trained from the global model: join the nearest group, re-based onto it (the
            # clip applied first: dividing the re-basing term by a tiny clip overflowed)
            assert self.centroids is not None
            group = nearest(sketch(floats, index), self.centroids)
            self.groups[site] = group
            base_floats, base_ints = layout.flatten(self.states[group])
            global_floats, global_ints = layout.flatten(global_state)
            floats, scale = floats * scale + (global_floats - base_floats), 1.0
            ints = ints + (global_ints - base_ints)
        self.samples[site] = n_samples
        if group not in self.folds:
            self.folds[group] = StreamingAggregator(self.states[group], self.strategy, group=1)
        self.folds[group].add_flat(site, floats, ints, n_samples, cdw, weight, scale)
        return group

    def finish(self, sizes: Mapping[str, int] | None = None) -> tuple[State, dict[str, float]]:
        """The new group models, and the global model: their average weighted by their sites' training
        images (`sizes`, site -> images, when the caller bounds what sites claimed; the sizes last
        reported otherwise). Returns it with each folded site's weight within its group."""
        weights: dict[str, float] = {}
        self.rejected = []
        for group, fold in sorted(self.folds.items()):
            try:
                aggregate = fold.finish()
            except NoUpdatesError:  # every update of the group was rejected: the group model stays
                self.rejected += fold.rejected
                continue
            self.rejected += aggregate.rejected
            self.states[group] = {k: v.clone() for k, v in aggregate.state.items()}
            weights.update(aggregate.weights)
        self.folds.clear()
        of_site = self.samples if sizes is None else sizes
        total = {g: sum(n for s, n in of_site.items() if self.groups.get(s) == g) for g in self.states}
        groups = [g for g in sorted(self.states) if total[g] > 0]
        if not groups:  # (every site of every group revoked: the groups alike)
            groups, total = sorted(self.states), dict.fromkeys(self.states, 1)
        states = [self.states[g] for g in groups]
        new_global = weighted_average(states, [total[g] for g in groups], self.strategy.bn)
        return new_global, weights

    # -- checkpoints ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"group/{g}/{k}": v for g, state in self.states.items() for k, v in state.items()}
        if self.centroids is not None:
            out["cluster/centroids"] = self.centroids
        return out

    def metadata(self) -> dict[str, str]:
        return {"groups": json.dumps(self.groups), "group_samples": json.dumps(self.samples)}

    def restore(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        self.groups = json.loads(metadata.get("groups", "{}"))
        self.samples = json.loads(metadata.get("group_samples", "{}"))
        self.centroids = tensors.get("cluster/centroids")
        self.states = {}
        for key, value in tensors.items():
            if key.startswith("group/"):
                _, g, name = key.split("/", 2)
                self.states.setdefault(int(g), {})[name] = value
