"""Differential privacy at the site: clipping, noise scale, and the accountant's epsilon."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from reid.model import ModelSpec, batchnorm_keys, build_model, shared_state
from reid.privacy import DPConfig, PrivacyLedger, privatize
from reid.site_delta import site_delta


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))


def test_delta_is_clipped_to_the_bound_and_keeps_its_direction():
    delta = {"w": torch.full((100,), 0.5), "b": torch.full((10,), -2.0), "n": torch.tensor(7)}
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1e-9)
    out, norm = privatize(delta, cfg, torch.Generator().manual_seed(0))
    assert norm == pytest.approx(math.sqrt(100 * 0.25 + 10 * 4.0))
    assert _norm(out) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(out["w"] / out["w"].norm(), delta["w"] / delta["w"].norm())
    assert out["n"].item() == 7  # integer buffers are not noised
    small = {"w": torch.full((4,), 0.1)}
    assert torch.allclose(privatize(small, cfg)[0]["w"], small["w"], atol=1e-6)  # below C: unchanged


def test_noise_has_standard_deviation_sigma_times_c():
    delta = {"w": torch.zeros(200_000)}
    cfg = DPConfig(enabled=True, clip_norm=0.5, noise_multiplier=2.0)
    out, _ = privatize(delta, cfg, torch.Generator().manual_seed(1))
    assert out["w"].std().item() == pytest.approx(1.0, rel=0.02) and abs(out["w"].mean().item()) < 0.01
    again, _ = privatize(delta, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out["w"], again["w"])  # seeded: reproducible


def test_kept_batchnorm_zeros_stay_zeros_and_do_not_count_towards_the_norm():
    delta = {"w": torch.full((100,), 0.5), "bn.running_mean": torch.zeros(8), "bn.weight": torch.zeros(8)}
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0)
    kept = {"bn.running_mean", "bn.weight"}
    out, norm = privatize(delta, cfg, torch.Generator().manual_seed(0), unchanged=kept)
    assert norm == pytest.approx(5.0)
    assert all(torch.equal(out[k], delta[k]) for k in kept)
    assert out["w"].std().item() > 0.5  # the rest is noised as before
    noised, _ = privatize(delta, cfg, torch.Generator().manual_seed(0))
    assert noised["bn.weight"].abs().sum().item() > 0  # without `unchanged` every float tensor is noised


def test_epsilon_comes_from_the_rdp_accountant_and_grows_with_rounds():
    cfg = DPConfig(enabled=True, noise_multiplier=1.5, delta=1e-5)
    ledger = PrivacyLedger(cfg)
    spent = [ledger.spend() for _ in range(5)]
    assert spent == sorted(spent) and spent[0] > 0
    reference = RDPAccountant()
    for _ in range(5):
        reference.step(noise_multiplier=1.5, sample_rate=1.0)
    assert spent[-1] == pytest.approx(reference.get_epsilon(delta=1e-5))
    assert PrivacyLedger(cfg.model_copy(update={"noise_multiplier": 3.0}), 5).epsilon() < spent[-1]
    assert PrivacyLedger(cfg, 0).epsilon() == 0.0


@pytest.mark.parametrize("dp_on", [False, True])
def test_what_leaves_a_site_that_keeps_its_batchnorm_layers_is_zero_there_with_or_without_dp(dp_on):
    model = build_model(ModelSpec(arch="resnet18"), 1)
    received = shared_state(model)
    trained = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in received.items()}
    bn = batchnorm_keys(received)
    dp = DPConfig(enabled=dp_on, clip_norm=1.0, noise_multiplier=1.0)
    delta, norm = site_delta(trained, received, True, dp, seed=0)
    assert set(delta) == set(received) and bn
    assert all(not delta[k].any() for k in bn)  # nothing of the kept layers leaves, noise included
    others = [k for k in received if k not in bn and received[k].is_floating_point()]
    if dp_on:  # the norm is of what is sent: the other weights' ones, 1 each
        assert norm == pytest.approx(math.sqrt(sum(received[k].numel() for k in others)), rel=1e-6)
        assert all(not torch.allclose(delta[k], torch.ones_like(delta[k])) for k in others)  # clipped, noised
    else:
        assert norm is None and all(torch.allclose(delta[k], torch.ones_like(delta[k])) for k in others)
    shared, _ = site_delta(trained, received, False, dp, seed=0)
    assert all(shared[k].any() for k in bn)  # shared BatchNorm layers are sent (and noised under DP)
