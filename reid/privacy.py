"""Differential privacy at the site: clip the round's delta to L2 norm C, add Gaussian noise of standard
deviation sigma * C, and account the privacy spent with an RDP accountant (opacus).

The Gaussian mechanism runs once per round the site takes part in, on the whole delta (every float
tensor of the shared state, BatchNorm statistics included: they are computed from the site's images
too; a site that keeps its BatchNorm layers sends their deltas as zeros, which carry nothing of its
data and stay zeros), with sampling rate 1: the delta depends on the site's entire data set. Epsilon
is reported at `delta` for the rounds spent so far. This bounds what the cloud (or anyone who sees
the updates) can learn about the site's data set as a whole from its deltas -- site-level DP in the
sense of the bound, at the price of accuracy (docs/security.md has the measured cost). Off by default.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from pydantic import BaseModel, ConfigDict, Field


class DPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="clip and add Gaussian noise to each uploaded delta")
    clip_norm: float = Field(1.0, gt=0, description="C: the delta's L2 norm is clipped to this")
    noise_multiplier: float = Field(1.0, gt=0, description="sigma: noise std is sigma * C")
    delta: float = Field(1e-5, gt=0, lt=1, description="epsilon is reported at this delta")


def privatize(
    delta: dict[str, torch.Tensor],
    cfg: DPConfig,
    generator: torch.Generator | None = None,
    unchanged: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor], float]:
    """(clipped + noised delta, its L2 norm before clipping); integer buffers and the `unchanged` keys
    (constants that depend on no data: the zero BatchNorm deltas of a site that keeps its layers) pass
    as they are."""
    floats = [k for k, v in delta.items() if v.is_floating_point() and k not in unchanged]
    norm = math.sqrt(sum(float(delta[k].double().pow(2).sum()) for k in floats))
    scale = min(1.0, cfg.clip_norm / norm) if norm > 0 else 1.0
    std = cfg.noise_multiplier * cfg.clip_norm
    out = dict(delta)
    for k in floats:
        noise = torch.randn(delta[k].shape, generator=generator, dtype=torch.float32) * std
        out[k] = (delta[k].float() * scale + noise).to(delta[k].dtype)
    return out, norm


class PrivacyLedger:
    """The privacy a site has spent: one Gaussian mechanism (sampling rate 1) per round it took part in."""

    def __init__(self, cfg: DPConfig, rounds: int = 0) -> None:
        self.cfg = cfg
        self.rounds = rounds

    def spend(self) -> float:
        self.rounds += 1
        return self.epsilon()

    def epsilon(self) -> float:
        if self.rounds == 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.cfg.noise_multiplier, 1.0, self.rounds)]
        return float(accountant.get_epsilon(delta=self.cfg.delta))
