"""The in-process simulator: 3 tiny sites x 2 rounds end to end, metrics + plot, identical resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cloud.cli import app
from cloud.simulate import CHECKPOINT, METRICS, SimulationConfig, Simulator
from cloud.strategy import KDConfig, StrategyConfig
from edge.cli import app as edge_app
from export.runtime import FeatureExtractor
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader, read_dataset, statistics_loader
from reid.data.camera_split import split_by_camera
from reid.evaluate import extract_features
from reid.model import ModelSpec, batchnorm_keys, build_model, load_shared_state, shared_state
from reid.train import TrainConfig, adapt_to_site
from reid.weights import GLOBAL_BATCHNORM_NOTE, load_checkpoint


def _config(algorithm: str, rounds: int = 2, arch: str = "resnet18", **strategy) -> SimulationConfig:
    """A tiny run; `arch="mobilenet_v3_small"` trains about twice as fast where the test is not about
    the architecture."""
    return SimulationConfig(
        algorithm=algorithm,
        rounds=rounds,
        model=ModelSpec(arch=arch),
        input=InputSpec(height=64, width=32),
        train=TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
        strategy=StrategyConfig(**strategy),
        kd=KDConfig(batch_size=8, max_batches=2),
    )


def _sites(federation):
    return sorted((federation / "sites").iterdir())


def _global(out):
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("global/")}  # noqa: SIM118


def test_cdw_kd_runs_end_to_end_and_resumes_identically(tiny_federation, tmp_path):
    cfg = _config("cdw_kd", rounds=2)
    straight = tmp_path / "straight"
    Simulator(cfg, _sites(tiny_federation), straight, tiny_federation / "public").run()

    stopped = tmp_path / "stopped"  # one round, then the process "stops"; a new one extends it to two
    records = Simulator(
        _config("cdw_kd", rounds=1), _sites(tiny_federation), stopped, tiny_federation / "public"
    ).run()
    assert {r["round"] for r in records} == {0}
    resumed = Simulator(cfg, _sites(tiny_federation), stopped, tiny_federation / "public")
    assert resumed.try_resume() and resumed.completed == 1
    assert {r["round"] for r in resumed.run()} == {1}

    a, b = _global(straight), _global(stopped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines_a = (straight / METRICS).read_text().splitlines()
    lines_b = (stopped / METRICS).read_text().splitlines()

    def strip(lines):  # wall times differ between runs; everything else must be identical
        out = []
        for rec in map(json.loads, lines):
            if rec.get("kind") == "timing":
                continue
            rec.pop("train_seconds", None)
            if "kd" in rec:
                rec["kd"].pop("seconds")
            out.append(rec)
        return out

    assert strip(lines_a) == strip(lines_b)

    recs = [json.loads(ln) for ln in lines_a]
    rounds = [r for r in recs if r.get("kind") == "round"]
    assert len(rounds) == 2
    assert set(rounds[0]["weights"]) == {p.name for p in _sites(tiny_federation)}
    assert sum(rounds[0]["weights"].values()) == pytest.approx(1.0)
    assert rounds[0]["kd"]["batches"] == 2
    evals = [r for r in recs if "model" in r]
    assert {(r["site"], r["model"]) for r in evals if r["round"] == 1} == {
        (p.name, m) for p in _sites(tiny_federation) for m in ("global", "local")
    }


def test_resume_refuses_another_configuration(tiny_federation, tmp_path):
    Simulator(_config("fedpav", rounds=1), _sites(tiny_federation), tmp_path).run()
    other = Simulator(_config("fedpav", rounds=1, bn="first"), _sites(tiny_federation), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        other.try_resume()
    nova = Simulator(_config("fednova", rounds=1), _sites(tiny_federation), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        nova.try_resume()
    # a checkpoint written before a setting existed resumes when the setting is at its default
    path = tmp_path / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    stored = json.loads(meta["config"])
    del stored["strategy"]["fednova"]
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(stored)})
    assert Simulator(_config("fedpav", rounds=2), _sites(tiny_federation), tmp_path).try_resume()
    with pytest.raises(ValueError, match="another configuration"):
        nova.try_resume()


def test_fednova_takes_each_sites_delta_back_to_the_mean_path_length(tiny_federation, tmp_path):
    cfg = _config("fednova", rounds=1)
    records = Simulator(cfg, _sites(tiny_federation), tmp_path).run()
    summary = next(r for r in records if r.get("kind") == "round")
    sizes = {p.name: len(read_dataset(p).train) for p in _sites(tiny_federation)}
    train = cfg.train.model_copy(update={"epochs": cfg.local_epochs})
    mean_path = sum(n * train.path_length(n) for n in sizes.values()) / sum(sizes.values())
    assert summary["path_length"] == pytest.approx(mean_path, abs=1e-3)
    assert len({train.path_length(n) for n in sizes.values()}) > 1  # the sites' paths differ
    assert summary["weights"] == pytest.approx({s: n / sum(sizes.values()) for s, n in sizes.items()})
    grouped = Simulator(_config("cluster", rounds=1, fednova=True), _sites(tiny_federation), tmp_path / "c")
    assert grouped.clustering is not None and not grouped.clustering.strategy.fednova  # groups: plain


def test_export_of_a_bn_local_run_takes_a_sites_batchnorm(tiny_federation, tmp_path):
    """Under bn = "local" (the default) the global model's BatchNorm layers are no site's: simulate writes
    each site's beside the model, and `export --site-batchnorm --site-data` exports the model that site
    serves (its layers, statistics estimated on its images under the global weights), which
    `edge-agent evaluate --site-batchnorm` scores as the simulator did."""
    out = tmp_path / "run"
    Simulator(_config("fedpav", rounds=1), _sites(tiny_federation), out).run()
    prefix = "site/site00/private/"
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        private = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    written = load_file(str(out / "batchnorm" / "site00.safetensors"))
    ckpt = load_checkpoint(out)
    assert ckpt.meta["bn"] == "local" and set(written) == batchnorm_keys(shared_state(ckpt.model))
    assert all(torch.equal(written[k], private[k]) for k in private) and written.keys() == private.keys()

    images = tiny_federation / "sites" / "site00" / "query"
    crops = sorted(images.glob("*.jpg"))[:8]
    args = ["export", "--model", str(out), "--images", str(images)]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "global.onnx")])
    assert plain.exit_code == 0 and GLOBAL_BATCHNORM_NOTE in " ".join(plain.output.split())
    bn_file = out / "batchnorm" / "site00.safetensors"
    site_dir = tiny_federation / "sites" / "site00"
    alone = CliRunner().invoke(
        app, [*args, "--site-batchnorm", str(bn_file), "--out", str(tmp_path / "a.onnx")]
    )
    assert alone.exit_code != 0 and "needs --site-data" in alone.output
    site_args = [*args, "--site-batchnorm", str(bn_file), "--site-data", str(site_dir)]
    site = CliRunner().invoke(app, [*site_args, "--out", str(tmp_path / "s.onnx")])
    assert site.exit_code == 0 and "+site-bn" in site.output and "note" not in site.output, site.output
    train = [r.path for r in read_dataset(site_dir).train]
    assert adapt_to_site(ckpt.model, written, statistics_loader(train, ckpt.input_spec)) > 0  # in PyTorch
    loader = make_loader(ImageDataset(crops, eval_transform(ckpt.input_spec)), 8, train=False)
    ref = extract_features(ckpt.model.eval(), loader, flip=False)[0].numpy()
    served, global_ = (
        FeatureExtractor(tmp_path / "s.onnx")(crops),
        FeatureExtractor(tmp_path / "global.onnx")(crops),
    )
    assert np.sum(ref * served, axis=1).min() >= 0.9999
    assert np.sum(ref * global_, axis=1).min() < 0.999  # the global model's own layers are another model

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    bad = CliRunner().invoke(
        app,
        [
            *args,
            "--site-batchnorm",
            str(broken),
            "--site-data",
            str(site_dir),
            "--out",
            str(tmp_path / "b.onnx"),
        ],
    )
    assert bad.exit_code != 0 and "not a readable safetensors file" in bad.output

    # edge-agent evaluate with the site's layers scores what the simulator recorded for site00
    scored = [json.loads(ln) for ln in (out / METRICS).read_text().splitlines()]
    recorded = next(r for r in scored if r.get("model") == "global" and r.get("site") == "site00")
    result = CliRunner().invoke(
        edge_app, ["evaluate", "--data", str(site_dir), "--model", str(out), "--site-batchnorm", str(bn_file)]
    )
    assert result.exit_code == 0, result.output
    assert f"{recorded['rank1']:.1f}" in result.output and f"{recorded['mAP']:.1f}" in result.output


@pytest.mark.parametrize("algorithm", ["local", "central"])
def test_baselines_run(tiny_federation, tmp_path, algorithm):
    records = Simulator(_config(algorithm, rounds=1), _sites(tiny_federation), tmp_path).run()
    kinds = {r["model"] for r in records if "model" in r}
    assert kinds == ({"local"} if algorithm == "local" else {"global"})
    assert len([r for r in records if "model" in r]) == 3


def test_cli_simulate_writes_metrics_plot_and_table(tiny_federation, tmp_path):
    out = tmp_path / "run"
    args = [
        "simulate",
        "--transport",
        "none",
        "--data",
        str(tiny_federation / "sites"),
        "--out",
        str(out),
        "--algorithm",
        "fedpav",
        "--rounds",
        "1",
        "--height",
        "64",
        "--width",
        "32",
        "--batch-size",
        "16",
        "--bn",
        "local",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "global rank-1" in result.output
    png = (out / "rounds.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    again = CliRunner().invoke(app, args)  # already complete: resumes, runs nothing, prints again
    assert again.exit_code == 0, again.output
    assert len([ln for ln in (out / METRICS).read_text().splitlines() if '"kind": "round"' in ln]) == 1
    missing = CliRunner().invoke(
        app,
        [
            "simulate",
            "--algorithm",
            "kd",
            "--data",
            str(tiny_federation / "sites"),
            "--out",
            str(tmp_path / "kd"),
        ],
    )
    assert missing.exit_code != 0 and "public" in missing.output
    # a site that cannot be read is said before any training (it was dropped at every round, exit 0)
    sites = tmp_path / "sites"
    shutil.copytree(tiny_federation / "sites", sites)
    shutil.rmtree(sites / "site02" / "query")
    broken = CliRunner().invoke(app, [*args[:4], str(sites), "--out", str(tmp_path / "broken")])
    assert broken.exit_code == 2 and "site02" in broken.output, broken.output
    assert not (tmp_path / "broken" / METRICS).exists()


def test_differential_privacy_reports_epsilon_per_site_and_round(tiny_federation, tmp_path):
    from reid.privacy import DPConfig, PrivacyLedger

    dp = DPConfig(enabled=True, clip_norm=0.5, noise_multiplier=1.2)
    cfg = _config("fedpav", rounds=2).model_copy(update={"dp": dp, "eval_local": False})
    records = Simulator(cfg, _sites(tiny_federation), tmp_path).run()
    rounds = [r for r in records if r.get("kind") == "round"]
    assert [sorted(r["dp_epsilon"]) for r in rounds] == [[s.name for s in _sites(tiny_federation)]] * 2
    first, second = (next(iter(r["dp_epsilon"].values())) for r in rounds)
    assert first == pytest.approx(PrivacyLedger(dp, 1).epsilon(), rel=1e-3) and second > first
    # each received delta = clipped (norm <= 0.5) + noise of std 0.6 per float value: its norm is the noise's
    floats = sum(v.numel() for k, v in _global(tmp_path).items() if v.is_floating_point())
    expected = 1.2 * 0.5 * floats**0.5
    assert all(abs(n - expected) < 0.01 * expected for r in rounds for n in r["norms"].values()), rounds[0][
        "norms"
    ]


def test_wire_codec_in_the_simulator_records_bytes_and_matches_the_networked_decode(
    tiny_federation, tmp_path
):
    cfg = _config("fedpav", rounds=1).model_copy(update={"wire": "int8+zstd", "eval_local": False})
    records = Simulator(cfg, _sites(tiny_federation), tmp_path / "int8").run()
    summary = next(r for r in records if r.get("kind") == "round")
    floats = sum(v.numel() for v in _global(tmp_path / "int8").values() if v.is_floating_point())
    # int8 + zstd: at most one byte per value plus headers, for every site
    assert sorted(summary["wire_bytes"]) == [s.name for s in _sites(tiny_federation)]
    assert all(1000 < b < floats + 200_000 for b in summary["wire_bytes"].values())
    reference = Simulator(_config("fedpav", rounds=1), _sites(tiny_federation), tmp_path / "none").run()
    assert "wire_bytes" not in next(r for r in reference if r.get("kind") == "round")
    a, b = _global(tmp_path / "int8"), _global(tmp_path / "none")
    key = "global/embedding.linear.weight"
    assert not torch.equal(a[key], b[key]) and torch.allclose(a[key], b[key], atol=1e-2)  # quantised, close


def test_client_sampling_trains_the_seeded_draw_of_the_networked_aggregator(tiny_federation, tmp_path):
    from cloud.strategy.selection import sample_sites

    cfg = _config("fedpav", rounds=2).model_copy(
        update={"sites_per_round": 2, "eval_local": False, "eval_every": 2}
    )
    records = Simulator(cfg, _sites(tiny_federation), tmp_path).run()
    names = [s.name for s in _sites(tiny_federation)]
    rounds = [r for r in records if r.get("kind") == "round"]
    draws = [sample_sites(names, 2, cfg.seed, r) for r in range(2)]
    assert [r["selected"] for r in rounds] == draws  # the same function `serve` selects with
    assert len({tuple(d) for d in draws}) > 1  # (the draw changes from round to round)
    for summary, drawn in zip(rounds, draws, strict=True):
        assert sorted(summary["weights"]) == drawn and sorted(summary["loss"]) == drawn
    evaluated = {(r["round"], r["site"]) for r in records if r.get("model") == "global"}
    assert evaluated == {(1, s) for s in names}  # every site scores the global model, sampled or not


def test_per_camera_clients_score_the_global_model_once_per_site(tiny_federation, tmp_path):
    clients, _ = split_by_camera(_sites(tiny_federation), tmp_path / "cams", min_images=4)
    plain = tmp_path / "plain"  # the same client folders without split.json: scored per client
    plain.mkdir()
    for c in clients:
        shutil.copytree(tmp_path / "cams" / c.name, plain / c.name, symlinks=True)
    # no private layer: one model for the whole site
    cfg = _config("fedpav", rounds=1, arch="mobilenet_v3_small", bn="average")
    once = Simulator(cfg, [tmp_path / "cams" / c.name for c in clients], tmp_path / "once").run()
    each = Simulator(cfg, [plain / c.name for c in clients], tmp_path / "each").run()

    per_site = {r["site"]: r for r in once if r.get("model") == "global"}
    assert sorted(per_site) == sorted({c.site for c in clients})  # once per site, under its name
    per_client = {r["site"]: r for r in each if r.get("model") == "global"}
    assert set(per_client) == {c.name for c in clients}
    for c in clients:  # the same score any of the site's clients gets
        assert per_client[c.name]["rank1"] == per_site[c.site]["rank1"]
        assert per_client[c.name]["mAP"] == per_site[c.site]["mAP"]
    # the clients' own models: each camera's crops by its own client's model, one score per site
    assert sorted(r["site"] for r in once if r.get("model") == "local") == sorted({c.site for c in clients})


def test_per_camera_clients_with_their_own_layers_embed_their_own_cameras_crops(tiny_federation, tmp_path):
    """bn=local by camera: each camera's query/gallery crops are embedded by the global weights with its
    own client's BatchNorm layers (statistics estimated anew on that camera's training images), cameras
    without a client by the site's largest client, and the site is scored once on the union."""
    from reid.evaluate import Embedded
    from reid.site import SiteData
    from reid.train import prepare_model

    clients, skipped = split_by_camera(_sites(tiny_federation), tmp_path / "cams", min_images=36)
    assert skipped  # some cameras have no client: their crops go to their site's largest client
    cfg = _config("fedpav", rounds=1, bn="local").model_copy(update={"eval_local": False})
    folders = [tmp_path / "cams" / c.name for c in clients]
    records = Simulator(cfg, folders, tmp_path / "run").run()
    scored = {r["site"]: r for r in records if r.get("model") == "global"}
    assert sorted(scored) == sorted({c.site for c in clients})

    tensors = load_file(str(tmp_path / "run" / CHECKPOINT))
    state = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
    for site in sorted(scored):
        members = [c for c in clients if c.site == site]
        largest = min(members, key=lambda c: (-c.train_images, c.name))  # the most training images
        parts = []
        for c in members:
            private = {
                k.removeprefix(f"site/{c.name}/private/"): v
                for k, v in tensors.items()
                if k.startswith(f"site/{c.name}/private/")
            }
            data = SiteData(tmp_path / "cams" / c.name, cfg.input, cfg.train.batch_size)
            model = build_model(cfg.model, 1)
            load_shared_state(model, {**state, **private})
            prepare_model(model, cfg.train)
            adapt_to_site(model, private, data.statistics_loader())
            everything = data.embed(model)
            mine = np.isin(everything.query_cams, [c.camera]), np.isin(everything.gallery_cams, [c.camera])
            if c is largest:  # also every camera of the site that has no client
                owned = [m.camera for m in members if m is not c]
                mine = ~np.isin(everything.query_cams, owned), ~np.isin(everything.gallery_cams, owned)
            parts.append(
                Embedded(
                    everything.query[mine[0]],
                    everything.query_pids[mine[0]],
                    everything.query_cams[mine[0]],
                    everything.gallery[mine[1]],
                    everything.gallery_pids[mine[1]],
                    everything.gallery_cams[mine[1]],
                )
            )
        by_hand = Embedded.union(parts).score().summary()
        assert scored[site]["rank1"] == pytest.approx(by_hand["rank1"], abs=1e-3)
        assert scored[site]["mAP"] == pytest.approx(by_hand["mAP"], abs=1e-3)
        assert len(Embedded.union(parts).query) == len(everything.query)  # every crop once


def test_central_over_camera_clients_pools_a_person_into_one_class_and_scores_once_per_site(
    tiny_federation, tmp_path
):
    sites = _sites(tiny_federation)
    clients, skipped = split_by_camera(sites, tmp_path / "cams", min_images=1, min_ids=1)
    assert not skipped  # every training image is in some client: the pooled data are the sites'
    cfg = _config("central", rounds=1)
    by_camera = Simulator(cfg, [tmp_path / "cams" / c.name for c in clients], tmp_path / "c")
    by_site = Simulator(cfg, sites, tmp_path / "s")
    # one class per person of each site, as when each site is a client (not one per person and camera)
    assert by_camera.model.classifier.weight.shape == by_site.model.classifier.weight.shape
    assert set(by_camera.pooled_labels.values()) == set(range(len(by_camera.pooled_labels)))
    assert {site for site, _ in by_camera.pooled_labels} == {s.name for s in sites}
    records = by_camera.run()
    scored = [r for r in records if r.get("model") == "global"]
    assert sorted(r["site"] for r in scored) == sorted(s.name for s in sites)  # once per site, by name


def test_refreshed_statistics_score_the_global_weights_with_the_sites_affine_layers(tiny_federation):
    """refresh_bn_stats: a site scores the global model with its own BatchNorm affine weights and
    statistics estimated anew on its training images under the global weights (not those of its own
    training); off, it scores them with its layers as they are. A site without layers of its own yet
    scores the global ones with its statistics (as it would serve a deployment)."""
    from cloud.site_round import SiteJob, SiteWorker
    from reid.site import SiteData
    from reid.train import prepare_model

    cfg = SimulationConfig(
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        train=TrainConfig(batch_size=16, device="cpu"),
        refresh_bn_stats=True,
    )
    site = sorted((tiny_federation / "sites").iterdir())[0]
    torch.manual_seed(0)
    state = shared_state(build_model(cfg.model, 1))
    bn = batchnorm_keys(state)
    private = {  # the site's own layers: other affine weights and statistics than the global copy's
        k: v * 1.5 + 0.1 if v.is_floating_point() else v for k, v in state.items() if k in bn
    }
    job = SiteJob(0, site.name, str(site), 3, private=private)
    refreshed = SiteWorker(cfg).evaluate(job, state)
    as_kept = SiteWorker(cfg.model_copy(update={"refresh_bn_stats": False})).evaluate(job, state)
    newcomer = SiteWorker(cfg).evaluate(SiteJob(0, site.name, str(site), 3), state)
    assert refreshed.error is None and as_kept.error is None and newcomer.error is None

    data = SiteData(site, cfg.input, cfg.train.batch_size)
    by_hand = {}
    for case, layers, refresh in (
        ("as_kept", private, False),
        ("refreshed", private, True),
        ("new", {}, True),
    ):
        model = build_model(cfg.model, data.num_classes)
        load_shared_state(model, {**state, **layers})
        prepare_model(model, cfg.train)
        if refresh:
            seen = adapt_to_site(model, layers or None, data.statistics_loader())
            assert seen == min(512, data.num_train_images) // 16 * 16  # equal batches
            weight = "backbone.trunk.1.weight"
            torch.testing.assert_close(model.state_dict()[weight], {**state, **layers}[weight])  # affine kept
        by_hand[case] = data.evaluate(model).summary()
    assert refreshed.metrics == pytest.approx(by_hand["refreshed"], abs=1e-6)
    assert as_kept.metrics == pytest.approx(by_hand["as_kept"], abs=1e-6)
    assert newcomer.metrics == pytest.approx(by_hand["new"], abs=1e-6)
    assert refreshed.metrics != as_kept.metrics and refreshed.metrics != newcomer.metrics


def test_sites_own_models_can_be_scored_in_the_last_round_only(tiny_federation, tmp_path):
    cfg = _config("fedpav", rounds=2, arch="mobilenet_v3_small").model_copy(update={"eval_local": "last"})
    records = Simulator(cfg, _sites(tiny_federation), tmp_path / "run").run()
    scored = {(r["round"], r["model"]) for r in records if "model" in r}
    assert scored == {(0, "global"), (1, "global"), (1, "local")}


def test_ditto_personal_models_are_the_sites_own_training_at_lambda_zero_and_survive_a_resume(
    tiny_federation, tmp_path
):
    """At lambda 0 nothing pulls a site's personal model: it is exactly what training alone makes of the
    site (same start, seeds and images), round after round, also across a stop and resume; a pull makes
    it another model."""
    small = "mobilenet_v3_small"
    alone = Simulator(_config("local", 2, small), _sites(tiny_federation), tmp_path / "local").run()
    personal = _config("fedpav", rounds=2, arch=small).model_copy(update={"ditto": 0.0})
    out = tmp_path / "ditto"
    Simulator(personal.model_copy(update={"rounds": 1}), _sites(tiny_federation), out).run()
    resumed = Simulator(personal, _sites(tiny_federation), out)
    assert resumed.try_resume() and resumed.completed == 1
    resumed.run()
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]

    def scores(recs, model):
        return {(r["round"], r["site"]): (r["rank1"], r["mAP"]) for r in recs if r.get("model") == model}

    assert len(scores(records, "local")) == 6
    assert scores(records, "local") == scores(alone, "local")
    served = load_file(str(out / "personal" / "site00.safetensors"))  # the model file the site would serve
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        prefix = "site/site00/personal/"
        kept = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    global_ = _global(out)
    assert served.keys() == {k.removeprefix("global/") for k in global_}
    assert all(torch.equal(served[k], kept[k]) for k in served)
    assert not torch.equal(served["embedding.linear.weight"], global_["global/embedding.linear.weight"])
    pulled = personal.model_copy(update={"ditto": 50.0, "rounds": 1})
    records = Simulator(pulled, _sites(tiny_federation), tmp_path / "pulled").run()
    assert scores(records, "local") != {k: v for k, v in scores(alone, "local").items() if k[0] == 0}
    with pytest.raises(ValueError, match="personalises a federation"):
        SimulationConfig(algorithm="local", ditto=0.1)
