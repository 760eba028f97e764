"""What leaves a site each round: its trained shared state minus the state it received, with the
BatchNorm layers sent as zeros when the site keeps them (FedBN, `bn = "local"`), clipped and noised
under differential privacy (`reid.privacy`). One function for the edge agent and the simulator's sites,
so that what the simulator aggregates is what a real site sends."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from reid.model import batchnorm_keys
from reid.privacy import DPConfig, privatize


def site_delta(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    keep_local_bn: bool,
    dp: DPConfig,
    seed: int,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """(the delta to send, its L2 norm before DP clipping; None without DP). The kept BatchNorm layers'
    zeros depend on no data and stay zeros under DP: nothing of them leaves the site, noise included."""
    delta = {k: trained[k] - received[k] for k in received}
    kept = batchnorm_keys(delta) if keep_local_bn else set()
    for k in kept:
        delta[k] = torch.zeros_like(delta[k])
    if not dp.enabled:
        return delta, None
    return privatize(delta, dp, torch.Generator().manual_seed(seed), unchanged=kept)
