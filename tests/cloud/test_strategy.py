"""FedPav / CDW / BN policies against the direct formula; streaming == batch; robust options."""

from __future__ import annotations

import pytest
import torch

from cloud.strategy import (
    NoUpdatesError,
    StrategyConfig,
    StreamingAggregator,
    Update,
    bn_policy_keys,
    weighted_average,
)
from reid.model import ModelSpec, build_model, is_bn_buffer, shared_state


def _states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """K random shared states of a small real model (so BN keys and num_batches_tracked are present)."""
    torch.manual_seed(seed)
    ref = shared_state(build_model(ModelSpec(arch="resnet18"), num_classes=3))
    states = []
    for i in range(k):
        state = {}
        for key, v in ref.items():
            if "running_var" in key:  # (a variance is never negative: the aggregator keeps it so)
                state[key] = torch.rand_like(v) + i
            elif v.dtype.is_floating_point:
                state[key] = torch.randn_like(v)
            else:
                state[key] = v + 10 * (i + 1)
        states.append(state)
    return states


def _direct(states, weights, bn):
    total = sum(weights)
    copy = bn_policy_keys(list(states[0]), bn)
    out = {}
    for key in states[0]:
        if key in copy or not states[0][key].dtype.is_floating_point:
            out[key] = states[0][key]
        else:
            out[key] = sum(w / total * s[key].double() for s, w in zip(states, weights, strict=True)).float()
    return out


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("bn", ["first", "average", "local"])
def test_weighted_average_matches_the_direct_formula(k, bn):
    states = _states(k, seed=k)
    weights = [float(w) for w in torch.randint(1, 1000, (k,))]
    got = weighted_average(states, weights, bn=bn)
    want = _direct(states, weights, bn)
    assert set(got) == set(want)
    assert not any(key.startswith("classifier") for key in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
        assert got[key].dtype == states[0][key].dtype


def test_bn_policies_pick_the_right_keys():
    keys = list(_states(1)[0])
    first, local = bn_policy_keys(keys, "first"), bn_policy_keys(keys, "local")
    assert first and all(is_bn_buffer(k) for k in first)
    assert "embedding.bn.running_mean" in first and "embedding.bn.weight" not in first
    assert "embedding.bn.weight" in local and "embedding.bn.running_var" in local
    assert "embedding.linear.weight" not in local
    assert bn_policy_keys(keys, "average") == set()


def test_no_update_moves_the_sites_own_batchnorm_layers_or_makes_a_variance_negative():
    """Under bn=local the global BatchNorm layers are nobody's to change: an update that sends values
    there (honest sites send zeros) changes nothing, whichever site comes first. Under the shared
    policies an update can push a variance below 0 (NaN features); the aggregate keeps it at 0."""
    base = _states(1, seed=5)[0]
    bn_keys = bn_policy_keys(list(base), "local")
    hostile = {
        k: (torch.full_like(v, -1e3) if k in bn_keys else torch.zeros_like(v)) for k, v in base.items()
    }
    honest = {k: torch.zeros_like(v) if k in bn_keys else torch.randn_like(v) * 0.01 for k, v in base.items()}
    agg = StreamingAggregator(base, StrategyConfig(bn="local"))
    assert agg.add(Update("a0", hostile, n_samples=10)) is None and agg.add(Update("b", honest, 10)) is None
    state = agg.finish().state
    for key in bn_keys:
        assert torch.equal(state[key], base[key]), key
    moved = [k for k in base if k not in bn_keys and base[k].dtype.is_floating_point]
    assert any(not torch.equal(state[k], base[k]) for k in moved)  # the rest is averaged as before
    for bn in ("average", "first"):
        agg = StreamingAggregator(base, StrategyConfig(bn=bn))
        assert agg.add(Update("a0", hostile, n_samples=10)) is None
        state = agg.finish().state
        variances = [k for k in base if k.endswith(".running_var")]
        assert all(bool((state[k] >= 0).all()) for k in variances), bn
        assert any(bool((state[k] == 0).any()) for k in variances), bn  # (it did push them below 0)


def test_one_update_cannot_zero_an_averaged_variance_with_its_share():
    """An insider's running_var delta of -3 (a variance of -2 at its site, which no BatchNorm layer can
    have) with a 2/3 share took a whole averaged layer to 0 (clamped from below 0; 2026-12-05 insider
    audit). Each update's implied variance is raised to 0 first: its share moves the average at most to
    (1 - share) of the others'."""
    base = _states(1, seed=7)[0]
    variances = [k for k in base if k.endswith(".running_var")]
    hostile = {
        k: torch.full_like(v, -3.0) if k in variances else torch.zeros_like(v) for k, v in base.items()
    }
    honest = {k: torch.zeros_like(v) for k, v in base.items()}
    agg = StreamingAggregator(base, StrategyConfig(bn="average", fednova=False))
    assert agg.add(Update("evil", hostile, n_samples=20)) is None
    assert agg.add(Update("b", honest, n_samples=10)) is None
    state = agg.finish().state
    for key in variances:  # (the hostile update alone: 0, as the test above shows)
        torch.testing.assert_close(state[key], base[key] / 3, msg=key)
    assert hostile[variances[0]].min() == -3.0  # the caller's buffers are only read


@pytest.mark.parametrize("weighting", ["fedpav", "cdw", "cdw_x_size"])
def test_streaming_deltas_equal_the_batch_result(weighting):
    states = _states(4, seed=3)
    base = _states(1, seed=99)[0]
    sizes, cdws = [100, 20, 3000, 7], [0.1, 0.9, 0.05, 1.3]
    agg = StreamingAggregator(base, StrategyConfig(weighting=weighting, bn="average"))
    for i, s in enumerate(states):
        delta = {key: s[key] - base[key] for key in base}
        assert agg.add(Update(f"site{i}", delta, sizes[i], cdws[i])) is None
    result = agg.finish()
    raw = {"fedpav": sizes, "cdw": cdws, "cdw_x_size": [n * d for n, d in zip(sizes, cdws, strict=True)]}[
        weighting
    ]
    want = _direct(states, raw, "average")
    for key in want:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(result.state[key], states[0][key])
        else:
            torch.testing.assert_close(result.state[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert result.weights["site0"] == pytest.approx(raw[0] / sum(raw))


def test_a_round_whose_every_update_is_rejected_says_why():
    states = _states(2, seed=3)
    base = _states(1, seed=99)[0]
    agg = StreamingAggregator(base, StrategyConfig(weighting="cdw", bn="average"))
    for i, s in enumerate(states):
        delta = {key: s[key] - base[key] for key in base}
        assert agg.add(Update(f"site{i}", delta, 10, float("nan"))) is not None
    with pytest.raises(NoUpdatesError, match=r"site0: CDW distance .*nan; site1: CDW"):
        agg.finish()


@pytest.mark.parametrize("group", [1, 4])
def test_fednova_divides_each_delta_by_its_path_length_and_rescales_to_the_mean_path(group):
    states = _states(5, seed=4)
    base = _states(1, seed=98)[0]
    sizes, paths, clip = [400, 35, 20, 216, 112], [180.0, 4.6, 1.9, 95.2, 42.0], [1.0, 1.0, 0.5, 1.0, 1.0]
    agg = StreamingAggregator(base, StrategyConfig(bn="average", fednova=True), group=group)
    agg.BLOCK = 5000  # several blocks, and a NaN update rolled back from a late one
    for i, s in enumerate(states):
        delta = {key: s[key] - base[key] for key in base}
        assert agg.add(Update(f"site{i}", delta, sizes[i], steps=paths[i]), scale=clip[i]) is None
    nan = {key: torch.full_like(v, float("nan")) if v.is_floating_point() else v for key, v in delta.items()}
    assert agg.add(Update("nan", nan, 50, steps=7.0)) is None
    assert "path length" in agg.add(Update("unsized", delta, 10)).reason
    assert "path length" in agg.add(Update("zero", delta, 10, steps=0.0)).reason
    result = agg.finish()
    assert sorted(r.site for r in result.rejected) == ["nan", "unsized", "zero"]
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    mean_path = float((p * torch.tensor(paths, dtype=torch.float64)).sum())
    assert result.path_length == pytest.approx(mean_path)
    for key in ("embedding.linear.weight", "backbone.trunk.0.weight", "embedding.bn.running_var"):
        want = base[key].double() + mean_path * sum(
            p[i] * clip[i] * (states[i][key].double() - base[key].double()) / paths[i] for i in range(5)
        )
        torch.testing.assert_close(result.state[key], want.float(), rtol=1e-5, atol=1e-5, msg=key)
    # equal path lengths: exactly FedPav
    fedpav = StreamingAggregator(base, StrategyConfig(bn="average"))
    nova = StreamingAggregator(base, StrategyConfig(bn="average", fednova=True))
    for i, s in enumerate(states):
        delta = {key: s[key] - base[key] for key in base}
        fedpav.add(Update(f"site{i}", delta, sizes[i]))
        nova.add(Update(f"site{i}", delta, sizes[i], steps=13.0))
    a, b = fedpav.finish().state, nova.finish().state
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="estimator = mean"):
        StrategyConfig(fednova=True, estimator="median")


def test_duplicate_bad_and_nan_updates_are_rejected_and_the_rest_kept():
    states = _states(3, seed=5)
    base = states[0]
    agg = StreamingAggregator(base, StrategyConfig())
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    good = {k: states[1][k] - base[k] for k in base}
    assert agg.add(Update("a", zero, 10)) is None
    assert agg.add(Update("a", good, 10)) is None  # duplicate: ignored, not folded twice
    nan = dict(
        good, **{"embedding.linear.weight": torch.full_like(good["embedding.linear.weight"], float("nan"))}
    )
    assert agg.add(Update("b", nan, 10)) is None  # found non-finite when its group is folded
    wrong = dict(good, **{"embedding.linear.weight": torch.zeros(2, 2)})
    assert "shape" in agg.add(Update("c", wrong, 10)).reason
    missing = {k: v for k, v in good.items() if k != "embedding.bn.bias"}
    assert "missing" in agg.add(Update("d", missing, 10)).reason
    assert "positive" in agg.add(Update("e", good, 0)).reason
    cdw_agg = StreamingAggregator(base, StrategyConfig(weighting="cdw"))
    assert "CDW" in cdw_agg.add(Update("f", good, 10, cdw=None)).reason
    assert agg.add(Update("g", good, 30)) is None
    result = agg.finish()
    assert set(result.weights) == {"a", "g"}
    assert sorted(r.site for r in result.rejected) == ["b", "c", "d", "e"]
    assert "NaN" in next(r.reason for r in result.rejected if r.site == "b")
    want = _direct([base, states[1]], [10, 30], "first")
    torch.testing.assert_close(result.state["embedding.linear.weight"], want["embedding.linear.weight"])


def _honest_and_attacker(k_honest: int = 5, scale: float = 100.0):
    torch.manual_seed(11)
    base = _states(1, seed=12)[0]
    deltas = []
    for _ in range(k_honest):
        deltas.append(
            {k: 0.01 * torch.randn_like(v) if v.dtype.is_floating_point else v * 0 for k, v in base.items()}
        )
    attack = {k: scale * v if v.dtype.is_floating_point else v for k, v in deltas[0].items()}
    return base, deltas, attack


@pytest.mark.parametrize(
    "config",
    [
        StrategyConfig(clip_norm=40.0),  # honest deltas: norm ~ 0.01 * sqrt(11.2M) = 33
        StrategyConfig(outlier_rule="norm"),
        StrategyConfig(estimator="median"),
        StrategyConfig(estimator="trimmed_mean", trim_fraction=0.2),
    ],
)
def test_a_delta_scaled_x100_is_neutralised(config):
    base, deltas, attack = _honest_and_attacker()
    clean = StreamingAggregator(base, StrategyConfig())
    for i, d in enumerate(deltas):
        clean.add(Update(f"h{i}", d, 100))
    reference = clean.finish().state
    agg = StreamingAggregator(base, config)
    for i, d in enumerate(deltas):
        agg.add(Update(f"h{i}", d, 100))
    agg.add(Update("attacker", attack, 100))
    result = agg.finish()
    key = "embedding.linear.weight"
    err = (result.state[key] - reference[key]).norm() / (reference[key] - base[key]).norm()
    naive = StreamingAggregator(base, StrategyConfig())
    for i, d in enumerate([*deltas, attack]):
        naive.add(Update(f"n{i}", d, 100))
    naive_err = (naive.finish().state[key] - reference[key]).norm() / (reference[key] - base[key]).norm()
    assert naive_err > 10
    assert err < 1.0
    if config.outlier_rule == "norm":
        assert [r.site for r in result.rejected] == ["attacker"]
        assert "outlier" in result.rejected[0].reason
    if config.clip_norm:
        assert result.clipped == ["attacker"]


def test_all_zero_cdw_keeps_the_base():
    states = _states(2, seed=1)
    base = states[0]
    agg = StreamingAggregator(base, StrategyConfig(weighting="cdw"))
    agg.add(Update("a", {k: states[1][k] - base[k] for k in base}, 10, cdw=0.0))
    result = agg.finish()
    torch.testing.assert_close(result.state["embedding.linear.weight"], base["embedding.linear.weight"])


def test_flat_updates_with_a_late_nan_block_are_rolled_back():
    states = _states(4, seed=21)
    base = states[0]
    agg = StreamingAggregator(base, StrategyConfig(weighting="fedpav", bn="average"))
    agg.BLOCK = 1000  # many blocks, so the Inf sits in a late one
    flat = [agg.layout.flatten({k: s[k] - base[k] for k in base}) for s in states[1:]]
    assert agg.add_flat("a", *flat[0], 10) is None
    poisoned = flat[1][0].clone()
    poisoned[-5] = float("inf")
    assert agg.add_flat("b", poisoned, flat[1][1], 10) is None
    assert "does not fit" in agg.add_flat("c", flat[1][0][:-1], flat[1][1], 10).reason
    assert "does not fit" in agg.add_flat("d", flat[1][0].double(), flat[1][1], 10).reason
    assert agg.add_flat("e", *flat[1], 30) is None
    assert agg.add_flat("f", *flat[2], 20) is None  # the group of four is folded here
    assert [r.site for r in agg.rejected] == ["c", "d", "b"]
    result = agg.finish()
    want = _direct([states[1], states[2], states[3]], [10, 30, 20], "average")
    for key in ("embedding.linear.weight", "backbone.trunk.0.weight", "embedding.bn.running_var"):
        torch.testing.assert_close(result.state[key], want[key], msg=key)
    assert set(result.weights) == {"a", "e", "f"}


@pytest.mark.parametrize("bn", ["first", "average"])
def test_nan_found_while_finishing_the_round_is_rolled_back(bn):
    states = _states(3, seed=22)
    base = states[0]
    agg = StreamingAggregator(base, StrategyConfig(bn=bn))
    agg.BLOCK = 777
    flat = [agg.layout.flatten({k: s[k] - base[k] for k in base}) for s in states[1:]]
    poisoned = flat[1][0].clone()
    poisoned[agg.layout.float_numel // 2] = float("nan")
    agg.add_flat("a", *flat[0], 10)
    agg.add_flat("b", poisoned, flat[1][1], 50)  # two pending updates: folded and finished in finish()
    result = agg.finish()
    assert [r.site for r in result.rejected] == ["b"]
    want = _direct([states[1]], [10], bn)
    for key in want:
        torch.testing.assert_close(result.state[key], want[key], msg=key)


def test_share_cap_water_fills_and_keeps_honest_proportions():
    from cloud.strategy.caps import share_capped

    shares = share_capped({"liar": 1e12, "a": 100.0, "b": 300.0, "c": 100.0}, 0.4)
    assert shares["liar"] == pytest.approx(0.4)
    assert shares["b"] == pytest.approx(0.36) and shares["a"] == pytest.approx(0.12)  # 0.6 in 3:1:1
    assert sum(shares.values()) == pytest.approx(1.0)
    two_liars = share_capped({"x": 1e12, "y": 1e11, "a": 1.0, "b": 3.0}, 0.3)
    assert two_liars["x"] == pytest.approx(0.3) and two_liars["y"] == pytest.approx(0.3)
    assert two_liars["b"] == pytest.approx(0.3) and two_liars["a"] == pytest.approx(0.1)
    balanced = {"a": 10.0, "b": 12.0, "c": 9.0}
    assert share_capped(balanced, 2 / 3) == pytest.approx({k: v / 31 for k, v in balanced.items()})
    assert share_capped({"a": 0.0, "b": 0.0}, 0.5) == {"a": 0.0, "b": 0.0}


def test_norm_bound_uses_the_lower_median_and_the_previous_round():
    """One outsized delta never sets its own bound, however few the updates: alone with the previous
    round's reference, or one of two (the lower median of an even count is the smaller middle value)."""
    from cloud.strategy.caps import AdmissionConfig, capped_samples, clip_scales, norm_bound

    cfg = AdmissionConfig()
    bound = norm_bound({"a": 1.0, "b": 2.0, "liar": 1e30}, cfg)
    assert bound == pytest.approx(6.0)
    assert clip_scales({"a": 1.0, "liar": 1e30}, bound) == {"a": 1.0, "liar": pytest.approx(6e-30)}
    assert norm_bound({"a": 1.0, "liar": 1e30}, cfg, reference=1.0) == pytest.approx(3.0)  # 2 updates
    assert norm_bound({"liar": 1e8}, cfg, reference=2.0) == pytest.approx(6.0)  # 1 update
    assert norm_bound({"a": 1.0, "liar": 1e8}, cfg) == pytest.approx(3.0)  # 2 updates, no reference
    assert norm_bound({"a": 1.0, "b": 4.0, "c": 5.0, "liar": 1e8}, cfg) == pytest.approx(12.0)
    assert norm_bound({"a": 1.0}, AdmissionConfig(norm_bound_factor=None)) is None
    capped = AdmissionConfig(max_samples=5000, site_samples={"a": 100})
    assert capped_samples("a", 10**12, capped) == 100 and capped_samples("b", 10**12, capped) == 5000
    assert capped_samples("b", 10, capped) == 10


def test_a_vouched_large_site_keeps_its_step_and_share():
    """The demo's sites (800 / 176 / 40 images) and their measured delta norms after one epoch under
    bn=local: with sizes only claimed, the largest is clipped to 0.38 of its step and capped at 2/K of
    the weight; with its size vouched for (site_samples), neither binds, and a larger claim gets nothing."""
    from cloud.strategy.caps import (
        AdmissionConfig,
        allowances,
        capped_samples,
        clip_scales,
        norm_bound,
        share_capped,
    )

    samples = {"big": 800, "mid": 176, "small": 40}
    norms = {"big": 6.99, "mid": 0.877, "small": 0.08}
    claimed, vouched = AdmissionConfig(), AdmissionConfig(site_samples=samples)
    bound = norm_bound(norms, claimed)
    assert bound == pytest.approx(3 * 0.877)
    fedpav = {s: n / 1016 for s, n in samples.items()}

    assert allowances(samples, claimed) == dict.fromkeys(samples, 1.0)
    assert clip_scales(norms, bound)["big"] == pytest.approx(3 * 0.877 / 6.99)
    assert share_capped(samples, 2 / 3)["big"] == pytest.approx(2 / 3)

    allowance = allowances(samples, vouched)
    assert allowance == pytest.approx({"big": 800 / 176, "mid": 1.0, "small": 1.0})
    assert clip_scales(norms, bound, allowance) == dict.fromkeys(samples, 1.0)
    assert share_capped(samples, 2 / 3, allowance) == pytest.approx(fedpav)
    # a stolen key of the vouched site: its claim is capped at the vouched size, its bound stays
    lie = {**samples, "big": capped_samples("big", 10**12, vouched)}
    assert allowances(lie, vouched) == allowance
    assert clip_scales({**norms, "big": 1e6}, bound, allowance)["big"] == pytest.approx(
        3 * 0.877 * 800 / 176 / 1e6
    )
    # an unvouched site's claim earns no allowance, and the vouched site keeps its own
    other = allowances({**samples, "x": 10**12}, AdmissionConfig(site_samples={"big": 800}))
    assert other["x"] == 1.0 and other["big"] == pytest.approx(800 / 488)
    with pytest.raises(ValueError, match="greater than 0"):  # a negative size would be a negative weight
        AdmissionConfig(site_samples={"big": -800})


def test_a_blob_decodes_straight_into_flat_buffers_or_not_at_all():
    """`FlatLayout.fill` from `iter_state` gives what `flatten` of the decoded dict gives, and refuses a
    blob with a missing, extra, repeated, misshapen or mistyped tensor."""
    import numpy as np

    from cloud.strategy.flat import FlatLayout, LayoutError
    from protocol.codec import decode_state, encode_state, iter_state

    base = shared_state(build_model(ModelSpec(arch="resnet18"), 4))
    layout = FlatLayout(base)
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in base.items()}
    delta = {
        k: v if base[k].dtype.is_floating_point else np.zeros(v.shape, np.int64) for k, v in delta.items()
    }
    for encoding in ("fp32", "fp16", "int8"):
        blob = encode_state(delta, encoding)
        floats, ints = layout.fill(iter_state(blob))
        want = layout.flatten({k: torch.from_numpy(v) for k, v in decode_state(blob).items()})
        assert torch.equal(floats, want[0]) and torch.equal(ints, want[1])
    key = next(iter(delta))
    items = list(delta.items())
    bad = {
        "keys missing": items[1:],
        "unexpected key": [*items, ("extra", np.zeros(1, np.float32))],
        "given twice": [*items, items[0]],
        "has shape": [(key, delta[key].reshape(-1)), *items[1:]],
        "has dtype": [(key, delta[key].astype(np.int64)), *items[1:]],
    }
    for reason, case in bad.items():
        with pytest.raises(LayoutError, match=reason):
            layout.fill(iter(case))


@pytest.mark.parametrize("bn", ["first", "average"])
@pytest.mark.parametrize("estimator", ["mean", "median"])
def test_no_update_raises_the_counters_beyond_what_the_others_trained(bn, estimator):
    """num_batches_tracked counts batches: a hostile update could claim a negative count or 2^62 (it
    came from the first update: an insider whose name sorts first set it). The counters move by the
    smallest count of the round, never below 0, whichever update comes first and however it is folded."""
    base = _states(1, seed=5)[0]
    counters = [k for k, v in base.items() if not v.dtype.is_floating_point]
    cfg = StrategyConfig(bn=bn, estimator=estimator)
    for hostile, want in ((-5, 0), (2**62, 9), (7, 7)):
        for order in ((hostile, 9, 12), (12, 9, hostile)):
            agg = StreamingAggregator(base, cfg)
            for i, count in enumerate(order):
                delta = {
                    k: torch.full_like(v, count) if k in counters else torch.zeros_like(v)
                    for k, v in base.items()
                }
                assert agg.add(Update(f"s{i}", delta, 10)) is None
            state = agg.finish().state
            assert all(torch.equal(state[k], base[k] + want) for k in counters), (hostile, order)
