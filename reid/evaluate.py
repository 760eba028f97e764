"""Retrieval evaluation: feature extraction and the Market-1501 protocol (CMC, mAP, mINP).

Protocol (docs/evaluation.md): for each query, rank the gallery by distance with a *stable* sort (ties
go to the lower gallery index), remove gallery entries with the same pid **and** the same camera
(junk), and skip queries with no remaining true match. CMC@k is 1 when the first match is at a
position <= k, so the CMC always has `max_rank` entries even for a tiny gallery. AP is the
non-interpolated mean of precision at each hit (as torchreid and fast-reid); mINP = m / p_m.

`ap="trapezoid"` and `denominator="all"` reproduce the original FedReID evaluator (trapezoid AP, CMC
and mAP divided by *all* queries, including those without a valid match).

Work is done in row chunks, so a 20,000 x 20,000 evaluation never holds more than a few hundred MB
of temporaries; `evaluate_features` never builds the full distance matrix at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from reid.model import ReIDModel

ChunkElements = 1 << 22  # distance entries processed at once (~4M: a few hundred MB of temporaries)


@dataclass
class Metrics:
    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_query: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rank1(self) -> float:
        return float(self.cmc[0])

    def rank(self, k: int) -> float:
        return float(self.cmc[k - 1])

    def summary(self) -> dict[str, float]:
        """rank-1/5/10, mAP and mINP in percent, plus the valid-query count (only the count when no query
        has a true match on another camera: there is nothing to score, which is not a score of 0)."""
        if self.num_valid == 0:
            return {"valid_queries": 0.0}
        out = {f"rank{k}": 100 * self.rank(k) for k in (1, 5, 10) if k <= len(self.cmc)}
        out.update(mAP=100 * self.mAP, mINP=100 * self.mINP, valid_queries=float(self.num_valid))
        return out


class _Accumulator:
    def __init__(self, max_rank: int, ap: str) -> None:
        self.max_rank = max_rank
        self.ap = ap
        self.first_hits: list[np.ndarray] = []
        self.aps: list[np.ndarray] = []
        self.inps: list[np.ndarray] = []

    def add(self, dist: np.ndarray, q_pids, g_pids, q_camids, g_camids) -> None:
        order = np.argsort(dist, axis=1, kind="stable")
        match = g_pids[order] == q_pids[:, None]
        junk = match & (g_camids[order] == q_camids[:, None])
        keep = ~junk
        position = np.cumsum(keep, axis=1)  # 1-based position in the junk-free ranking
        good = match & keep
        n_good = good.sum(axis=1)
        valid = n_good > 0
        if not valid.any():
            return
        good, position, n_good = good[valid], position[valid], n_good[valid]
        big = np.iinfo(position.dtype).max
        self.first_hits.append(np.where(good, position, big).min(axis=1))
        hit_index = np.cumsum(good, axis=1)  # t: 1-based index of each hit among the hits
        if self.ap == "standard":
            precision = np.where(good, hit_index / np.maximum(position, 1), 0.0)
        else:  # the original FedReID code: trapezoid between the precision before and at the hit
            prev = np.where(position > 1, (hit_index - 1) / np.maximum(position - 1, 1), 1.0)
            precision = np.where(good, (prev + hit_index / np.maximum(position, 1)) / 2, 0.0)
        self.aps.append(precision.sum(axis=1) / n_good)
        self.inps.append(n_good / np.where(good, position, 0).max(axis=1))

    def result(self, num_query: int, denominator: str) -> Metrics:
        if not self.first_hits:  # e.g. a site split by camera: no cross-camera match to find
            nan = float("nan")
            return Metrics(np.full(self.max_rank, nan), nan, nan, 0, num_query)
        first = np.concatenate(self.first_hits)
        counts = np.bincount(np.minimum(first, self.max_rank + 1) - 1, minlength=self.max_rank + 1)
        num_valid = len(first)
        denom = num_valid if denominator == "valid" else num_query
        cmc = np.cumsum(counts[: self.max_rank]) / denom
        aps, inps = np.concatenate(self.aps), np.concatenate(self.inps)
        return Metrics(cmc, float(aps.sum() / denom), float(inps.mean()), num_valid, num_query)


def _evaluate_chunks(
    distances: Callable[[slice], np.ndarray],
    shape: tuple[int, int],
    pids_cams: tuple,
    max_rank: int,
    ap: str,
    denominator: str,
) -> Metrics:
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in pids_cams)
    n_q, n_g = shape
    if n_q == 0 or n_g == 0:
        raise ValueError(f"empty query ({n_q}) or gallery ({n_g})")
    if len(q_pids) != n_q or len(q_camids) != n_q or len(g_pids) != n_g or len(g_camids) != n_g:
        raise ValueError("pid/camera arrays do not match the distance matrix shape")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    acc = _Accumulator(max_rank, ap)
    step = max(1, ChunkElements // n_g)
    for s in range(0, n_q, step):
        rows = slice(s, s + step)
        acc.add(distances(rows), q_pids[rows], g_pids, q_camids[rows], g_camids)
    return acc.result(n_q, denominator)


def evaluate(
    distmat: np.ndarray,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    ap: Literal["standard", "trapezoid"] = "standard",
    denominator: Literal["valid", "all"] = "valid",
) -> Metrics:
    """Market-1501 protocol on a (num_query, num_gallery) distance matrix (smaller = more similar)."""
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {distmat.shape}")
    if not np.isfinite(distmat).all():
        raise ValueError("distmat contains NaN or Inf")
    pids_cams = (q_pids, g_pids, q_camids, g_camids)
    return _evaluate_chunks(lambda rows: distmat[rows], distmat.shape, pids_cams, max_rank, ap, denominator)


def evaluate_features(
    q_feats: torch.Tensor,
    g_feats: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    ap: Literal["standard", "trapezoid"] = "standard",
    denominator: Literal["valid", "all"] = "valid",
) -> Metrics:
    """Cosine-distance evaluation of L2-normalised features, one chunk of queries at a time."""
    g_t = g_feats.float().t()

    def distances(rows: slice) -> np.ndarray:
        return (1.0 - q_feats[rows].float() @ g_t).numpy()

    shape = (q_feats.shape[0], g_feats.shape[0])
    return _evaluate_chunks(distances, shape, (q_pids, g_pids, q_camids, g_camids), max_rank, ap, denominator)


@torch.no_grad()
def extract_features(
    model: ReIDModel,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    flip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """L2-normalised embeddings (with `flip`: of the sum of the normalised features of the image and its
    mirror, exactly what `edge-agent extract --flip` computes with the exported model), eval mode, on CPU.

    Returns the features and the dataset indices they belong to (corrupt images are skipped).
    """
    was_training = model.training
    model.eval()
    feats, indices = [], []
    device = torch.device(device)
    for batch in loader:
        if on_batch is not None:
            on_batch(1)
        if len(batch) == 0:
            continue
        x = batch.images.to(device, non_blocking=True)
        f = torch.nn.functional.normalize(model.embed(x).float(), dim=1)
        if flip:  # as the exported model at the camera: normalised features of both, summed
            f = f + torch.nn.functional.normalize(model.embed(torch.flip(x, dims=[3])).float(), dim=1)
        feats.append(torch.nn.functional.normalize(f, dim=1).cpu())
        indices.append(batch.indices.numpy())
    model.train(was_training)
    if not feats:
        raise ValueError("no readable image to extract features from")
    return torch.cat(feats), np.concatenate(indices)


@dataclass
class Embedded:
    """Query and gallery crops of one site (or of some of its cameras) embedded, with their identities and
    cameras. Per-camera scoring embeds each camera's crops with that camera's model and scores the union
    (`union(...).score()`), as cameras that each serve their own model would match across each other."""

    query: torch.Tensor
    query_pids: np.ndarray
    query_cams: np.ndarray
    gallery: torch.Tensor
    gallery_pids: np.ndarray
    gallery_cams: np.ndarray

    @classmethod
    def union(cls, parts: Sequence[Embedded]) -> Embedded:
        """The crops of all `parts` (of one site, embedded by the models of its cameras) as one set."""
        joined = []
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts if len(getattr(p, f.name))]
            if not values:
                joined.append(getattr(parts[0], f.name))
            elif isinstance(values[0], torch.Tensor):
                joined.append(torch.cat(values))
            else:
                joined.append(np.concatenate(values))
        return cls(*joined)

    def score(self, max_rank: int = 50) -> Metrics:
        """The Market-1501 protocol on these query and gallery crops."""
        return evaluate_features(
            self.query,
            self.gallery,
            self.query_pids,
            self.gallery_pids,
            self.query_cams,
            self.gallery_cams,
            max_rank=max_rank,
        )

    @property
    def nbytes(self) -> int:
        return sum(
            v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes
            for v in (getattr(self, f.name) for f in fields(self))
        )
