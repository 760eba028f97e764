"""Differential privacy at the site: clipping, noise scale, and the accountant's epsilon."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from reid.privacy import DPConfig, PrivacyLedger, privatize


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
