"""Client clustering: sketches group sites whose updates point the same way, each group folds exactly its
own updates, the global model is the size-weighted average of the groups, and a clustered simulation
resumes identically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cloud.simulate import CHECKPOINT, METRICS, SimulationConfig, Simulator
from cloud.strategy import StrategyConfig, Update
from cloud.strategy.clustering import ClusterConfig, Clustering, sketch, sketch_index, spherical_kmeans
from reid.data import InputSpec
from reid.model import ModelSpec
from reid.train import TrainConfig
from tests.cloud.test_executors import _assert_same_run


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(300, generator=g)}


def _toward(direction: dict[str, torch.Tensor], seed: int, noise: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + noise * torch.randn(v.shape, generator=g) for k, v in direction.items()}


def test_kmeans_finds_planted_groups_numbered_by_first_row_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 50, generator=g, dtype=torch.float64)
    rows = [u, v, u, u, v, v, u]
    x = torch.stack([r + 0.1 * torch.randn(50, generator=g, dtype=torch.float64) for r in rows])
    x = x / x.norm(dim=1, keepdim=True)
    assign, centroids = spherical_kmeans(x, 2, seed=3)
    assert assign == [0, 1, 0, 0, 1, 1, 0]
    assert centroids.shape == (2, 50)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(2, dtype=torch.float64))
    for seed in (0, 1, 2, 3):  # another seed may start from other rows: the same groups, the same numbers
        assert spherical_kmeans(x, 2, seed)[0] == assign
    assert spherical_kmeans(x[:1], 4, seed=0)[0] == [0]  # fewer rows than groups


def test_groups_fold_their_own_updates_and_the_global_model_is_their_weighted_average():
    base = _state(0)
    up, down = _state(1), {k: -v for k, v in _state(1).items()}
    clustering = Clustering(ClusterConfig(groups=2, sketch_size=256), StrategyConfig(), seed=0)
    assert clustering.grouping_round(0) and clustering.base_of("s1") == "global"
    grouping = {"s1": up, "s2": down, "s3": up, "s4": down}
    for i, (site, direction) in enumerate(grouping.items()):
        clustering.observe(Update(site, _toward(direction, 10 + i), n_samples=10 * (i + 1)), base)
    assert clustering.group(base) == {"s1": 0, "s2": 1, "s3": 0, "s4": 1}
    assert clustering.base_of("s2") == "group1" and not clustering.grouping_round(1)

    deltas = {site: _toward(grouping[site], 20 + i) for i, site in enumerate(["s1", "s2", "s3"])}
    sizes = {"s1": 10, "s2": 20, "s3": 30}
    for site, delta in deltas.items():
        clustering.add(Update(site, delta, sizes[site]), base)
    # s5 had no group: it trained from the global model (here another one than the groups' start) and
    # its update points down; it joins group 1 with its trained model re-based onto the group's
    elsewhere = _state(5)
    newcomer = _toward(down, 99)
    assert clustering.add(Update("s5", newcomer, 50), elsewhere) == 1
    new_global, weights = clustering.finish()

    group0 = {k: base[k] + (10 * deltas["s1"][k] + 30 * deltas["s3"][k]) / 40 for k in base}
    trained5 = {k: elsewhere[k] + newcomer[k] for k in base}
    group1 = {k: base[k] + (20 * deltas["s2"][k] + 50 * (trained5[k] - base[k])) / 70 for k in base}
    for k in base:
        assert torch.allclose(clustering.states[0][k], group0[k], atol=1e-5)
        assert torch.allclose(clustering.states[1][k], group1[k], atol=1e-5)
        # group sizes: s1+s3 = 40 images; s2 (20) + s4 (40, from the grouping round) + s5 (50) = 110
        expected = (40 * group0[k] + 110 * group1[k]) / 150
        assert torch.allclose(new_global[k], expected, atol=1e-5)
    assert weights == pytest.approx({"s1": 0.25, "s3": 0.75, "s2": 20 / 70, "s5": 50 / 70})


def test_a_newcomer_clipped_hard_is_re_based_onto_its_group_without_overflow():
    """A site placed after the grouping has its delta re-based onto its group's model after the clip the
    aggregator decided: a delta of 3.4e38 clipped by 1e-38 was once re-based as (global - base) / 1e-38,
    which overflowed, and an acknowledged update was dropped at the fold (2026-12-05 insider audit)."""
    base = _state(0)
    clustering = Clustering(ClusterConfig(groups=2, sketch_size=256), StrategyConfig(), seed=0)
    up, down = _state(1), {k: -v for k, v in _state(1).items()}
    for i, (site, direction) in enumerate({"s1": up, "s2": down}.items()):
        clustering.observe(Update(site, _toward(direction, 10 + i), n_samples=10), base)
    clustering.group(base)
    clustering.add(Update("s1", _toward(up, 20), 10), base)
    elsewhere = _state(5)  # (the global model the newcomer trained from is not the groups' start)
    huge = {k: torch.full_like(v, 3.4e38) for k, v in up.items()}
    floats, ints = clustering.layout.flatten(huge)
    scale = 1e-38
    group = clustering.add_flat("s3", floats, ints, 10, None, elsewhere, weight=1.0, scale=scale)
    new_global, _ = clustering.finish()
    assert not clustering.rejected
    trained = {k: elsewhere[k] + huge[k] * scale for k in base}
    for k in base:
        assert torch.isfinite(new_global[k]).all()
        assert torch.allclose(clustering.states[group][k], trained[k], atol=1e-4)


def test_a_sketch_estimates_the_cosine_of_two_updates():
    a, b = torch.randn(200_000), torch.randn(200_000)
    c = a + 0.5 * b
    index = sketch_index(len(a), 4096, seed=0)
    assert torch.equal(index, sketch_index(len(a), 4096, seed=0))
    exact = float(torch.nn.functional.cosine_similarity(a, c, dim=0))
    estimate = float(sketch(a, index) @ sketch(c, index))
    assert abs(estimate - exact) < 0.03


def _config(rounds: int, eval_global: bool = True) -> SimulationConfig:
    return SimulationConfig(
        algorithm="cluster",
        rounds=rounds,
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        train=TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
        cluster=ClusterConfig(groups=2, after=1, sketch_size=4096),
        eval_local=False,
        eval_global=eval_global,
    )


def test_a_clustered_simulation_scores_group_models_and_resumes_identically(tiny_federation, tmp_path):
    sites = sorted((tiny_federation / "sites").iterdir())
    Simulator(_config(2), sites, tmp_path / "straight").run()
    Simulator(_config(1), sites, tmp_path / "stopped").run()
    resumed = Simulator(_config(2), sites, tmp_path / "stopped")
    assert resumed.try_resume() and resumed.clustering is not None and resumed.clustering.active
    resumed.run()
    _assert_same_run(tmp_path / "straight", tmp_path / "stopped")

    records = [json.loads(line) for line in (tmp_path / "straight" / METRICS).read_text().splitlines()]
    rounds = [r for r in records if r.get("kind") == "round"]
    groups = rounds[0]["groups"]
    assert set(groups) == {s.name for s in sites} and set(groups.values()) <= {0, 1}
    assert rounds[1]["groups"] == groups
    scored = {(r["site"], r["model"]) for r in records if r["round"] == 1 and "rank1" in r}
    assert scored == {(s.name, m) for s in sites for m in ("global", "group")}
    with safe_open(str(tmp_path / "straight" / CHECKPOINT), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("group/0/") for k in keys) and "cluster/centroids" in keys


def test_group_models_alone_score_as_they_do_beside_the_global_model(tiny_federation, tmp_path):
    sites = sorted((tiny_federation / "sites").iterdir())
    Simulator(_config(2), sites, tmp_path / "both").run()
    Simulator(_config(2, eval_global=False), sites, tmp_path / "groups").run()

    def scores(run: str) -> dict[tuple[int, str, str], float]:
        records = map(json.loads, (tmp_path / run / METRICS).read_text().splitlines())
        return {(r["round"], r["site"], r["model"]): r["rank1"] for r in records if "rank1" in r}

    both, groups = scores("both"), scores("groups")
    assert {k: v for k, v in both.items() if k[2] == "group"} == groups  # the same models, the same scores
    assert {m for _, _, m in groups} == {"group"} and any(k[0] == 0 and k[2] == "global" for k in both)
    with pytest.raises(ValueError, match="nothing to score"):
        SimulationConfig(algorithm="fedpav", eval_global=False)
