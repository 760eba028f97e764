"""The learning study (bench/federated.py) on real data-set layouts: `--data DIR --public DIR` with one
site per layout the foundation reads (Market-1501, FedReID `pytorch/`, MSMT17 lists), run end to end on
a tiny model in both scenarios and on the validation split, and its argument errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from reid.adoption import prefer_own
from reid.data import InputSpec, parse_image_name, read_dataset
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.synthetic import generate_federation
from reid.train import adapt_to_site
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "bench" / "federated.py"
MARKET_SPLITS = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}


def to_fedreid(market: Path, out: Path) -> None:
    """Market layout -> the FedReID preprocessed layout pytorch/{train_all,query,gallery}/<pid>/."""
    target = {"train": "train_all", "query": "query", "gallery": "gallery"}
    for folder, split in MARKET_SPLITS.items():
        for image in (market / folder).iterdir():
            pid, _ = parse_image_name(image.name)
            dest = out / "pytorch" / target[split] / f"{pid:04d}" / image.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest)


def to_msmt17(market: Path, out: Path) -> None:
    """Market layout -> MSMT17: train/ test/ image folders plus list_{train,query,gallery}.txt."""
    lists = {"train": [], "query": [], "gallery": []}
    for folder, split in MARKET_SPLITS.items():
        image_dir = "train" if split == "train" else "test"
        for idx, image in enumerate(sorted((market / folder).iterdir())):
            pid, cam = parse_image_name(image.name)
            if pid < 0:  # MSMT17 lists hold no junk images
                continue
            rel = f"{pid:04d}/{pid:04d}_{idx:03d}_{cam:02d}_0113morning_{idx:04d}_0.jpg"
            (out / image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, out / image_dir / rel)
            lists[split].append(f"{rel} {pid}")
    for split, lines in lists.items():
        (out / f"list_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    cfg = TINY.model_copy(update={"seed": 3, "train_images_max": 48, "size_ratio": 2, "images_per_id_max": 6})
    generate_federation(cfg, root / "synthetic")
    data = root / "data"
    shutil.copytree(root / "synthetic" / "sites" / "site00", data / "market")
    to_fedreid(root / "synthetic" / "sites" / "site01", data / "viper")
    to_msmt17(root / "synthetic" / "sites" / "site02", data / "msmt")
    return data, root / "synthetic" / "public"


def run_study(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STUDY), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_study_runs_on_real_layouts(real_layouts, tmp_path):
    data, public = real_layouts
    layouts = {site.name: read_dataset(site) for site in data.iterdir()}
    assert {s.layout for s in layouts.values()} == {"market1501", "fedreid", "msmt17"}
    out = tmp_path / "out"
    proc = run_study(
        "--data", data, "--public", public, "--methods", "local,fedpav,fednova,cdw_kd", "--seeds", "0,1",
        "--rounds", "2", "--arch", "mobilenet_v3_small", "--batch-size", "8", "--kd-seconds", "5",
        "--out", out, "--scenario", "dataset", "--from-scratch", "--start-mix", "0,1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())["scenarios"]["dataset"]
    names = sorted(layouts)
    assert study["sizes"] == {name: len(s.train) for name, s in layouts.items()}
    assert set(study["table"]) == {"local", "fedpav", "fednova", "cdw_kd"}
    for method, row in study["table"].items():
        assert set(row) == {*names, "mean"}
        for site in names:
            (rank1, _), (mAP, _) = row[site]["rank1"], row[site]["mAP"]
            assert 0 <= rank1 <= 100 and 0 < mAP <= 100, (method, site, row[site])
        means = [study["table"][method][n]["rank1"][0] for n in names]
        assert row["mean"]["rank1"][0] == pytest.approx(sum(means) / len(means))
    # every run logged one global (or local) evaluation per round and site, for both seeds
    for method in ("fedpav", "fednova", "cdw_kd"):
        assert all(len(curve) == 2 for seed in study["curves"][method].values() for curve in seed.values())
        assert set(study["site_model_table"][method]) == {*names, "mean"}
    assert "local" not in study["site_model_table"]
    assert set(study["beats_local"]) == {"fedpav", "fednova", "cdw_kd"}
    verdict, mean = study["verdicts"], {m: row["mean"]["rank1"][0] for m, row in study["table"].items()}
    assert verdict["ranking"] == sorted(mean, key=mean.get, reverse=True)
    assert verdict["margin_over_fedpav"]["cdw_kd"] == pytest.approx(mean["cdw_kd"] - mean["fedpav"], abs=0.01)
    local, shipped, own = (  # the shipped default: FedPav weights + fednova (bench/federated.py SHIPPED)
        study["table"]["local"],
        study["table"]["fednova"],
        study["site_model_table"]["fednova"],
    )
    below = [n for n in names if max(shipped[n]["rank1"][0], own[n]["rank1"][0]) < local[n]["rank1"][0]]
    assert verdict["shipped_below_local"] == below
    # alpha 0 of the start mix is the final global model, served as the study serves it: the same scores
    mixes = study["start_mix_table"]
    assert set(mixes) == {f"{m} mixed {a}" for m in ("fedpav", "fednova", "cdw_kd") for a in ("0.00", "1.00")}
    for method in ("fedpav", "fednova", "cdw_kd"):
        for site in [*names, "mean"]:  # (the runs' metrics are written to 4 decimals)
            for metric in ("rank1", "mAP"):
                mixed = mixes[f"{method} mixed 0.00"][site][metric]
                assert mixed == pytest.approx(study["table"][method][site][metric], abs=1e-3), (method, site)
    assert mixes["fednova mixed 1.00"] != mixes["fednova mixed 0.00"]  # the start's weights, not the global's
    md = (out / "study.md").read_text()
    assert all(name in md for name in names) and "sites' own model" in md and "from scratch" in md
    assert "mixed with the start model in weight space" in md
    with Image.open(out / "study-dataset.png") as png:
        assert png.format == "PNG" and png.size[0] > 500
    # --resume keeps finished rounds (a run's identity is its settings but the number of rounds): one
    # more round of FedPav seed 0, the first two read back from disk, not trained again
    proc = run_study(
        "--data", data, "--methods", "fedpav", "--seeds", "0", "--rounds", "3", "--kd-seconds", "5",
        "--arch", "mobilenet_v3_small", "--batch-size", "8", "--out", out, "--scenario", "dataset",
        "--from-scratch", "--resume",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = study["curves"]["fedpav"]["0"]
    after = json.loads((out / "study.json").read_text())["scenarios"]["dataset"]["curves"]["fedpav"]["0"]
    assert all(len(after[n]) == 3 and after[n][:2] == before[n] for n in names)
    metrics = (out / "dataset" / "runs" / "fedpav" / "seed0" / "metrics.jsonl").read_text().splitlines()
    timing = [json.loads(line) for line in metrics]
    assert [r["round"] for r in timing if r.get("kind") == "timing"] == [0, 1, 2]


def test_study_runs_both_scenarios_on_the_validation_split(real_layouts, tmp_path):
    data, _ = real_layouts
    out = tmp_path / "out"
    proc = run_study(
        "--data", data, "--methods", "local,fedpav,central", "--seeds", "0", "--rounds", "2",
        "--validation", "0.3", "--validation-distractors", "--arch", "mobilenet_v3_small",
        "--batch-size", "8", "--out", out, "--from-scratch",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())["scenarios"]
    assert set(study) == {"dataset", "camera"}
    held = {s.name: s for s in data.iterdir()}
    for scenario, summary in study.items():
        assert set(summary["sizes"]) == set(held), scenario  # per site, also when each camera is a client
        for name, site in held.items():  # trained on the kept identities only
            assert summary["sizes"][name] < len(read_dataset(site).train), (scenario, name)
        assert set(summary["table"]) == {"local", "fedpav", "central"}
    assert study["camera"]["site_model_table"] == {}  # a camera's own model is not a site's
    # a camera was left out (too few images), so pooled training by camera has other images: run again
    assert "left out [{'site': 'market'" in study["camera"]["data"]
    assert (out / "camera" / "runs" / "central").is_dir()
    assert set(study["dataset"]["site_model_table"]) == {"fedpav"}
    assert "validation split (30% of training identities)" in (out / "study.md").read_text()
    assert "camera" in study["camera"]["data"] and "validation" in study["camera"]["data"]
    assert "the others' images as gallery distractors" in study["dataset"]["data"]


def test_pooled_training_runs_once_when_every_camera_is_a_client_and_direct_transfer_scores_the_start(
    tmp_path,
):
    """By camera with no camera left out, central pools exactly the images and classes it pooled by data
    set: the study reuses that run instead of training it again. The direct row is the federation's start
    model served at each site (its BatchNorm statistics estimated there), the same in both scenarios."""
    generate_federation(TINY, tmp_path / "fed")
    out = tmp_path / "out"
    proc = run_study(
        "--data", tmp_path / "fed" / "sites", "--methods", "direct,local,central", "--seeds", "0",
        "--rounds", "1", "--arch", "mobilenet_v3_small", "--batch-size", "8", "--out", out, "--from-scratch",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())["scenarios"]
    assert list(study["dataset"]["table"]) == ["direct", "local", "central"]
    assert study["camera"]["table"]["direct"] == study["dataset"]["table"]["direct"]
    torch.manual_seed(0)
    start = build_model(ModelSpec(arch="mobilenet_v3_small"), 1).state_dict()
    for site_dir in sorted((tmp_path / "fed" / "sites").iterdir()):
        site = SiteData(site_dir, InputSpec(height=64, width=32), 8)
        model = build_model(ModelSpec(arch="mobilenet_v3_small"), 1)
        model.load_state_dict(start)
        adapt_to_site(model, None, site.statistics_loader())
        expected = site.evaluate(model).summary()
        row = study["dataset"]["table"]["direct"][site_dir.name]
        assert row["rank1"][0] == pytest.approx(expected["rank1"], abs=0.01), site_dir.name
        assert row["mAP"][0] == pytest.approx(expected["mAP"], abs=0.01), site_dir.name
    assert "left out []" in study["camera"]["data"]
    assert study["camera"]["table"]["central"] == study["dataset"]["table"]["central"]
    assert study["camera"]["table"]["local"] != study["dataset"]["table"]["local"]
    assert (out / "dataset" / "runs" / "central").is_dir()
    assert not (out / "camera" / "runs" / "central").exists()


def test_study_argument_errors_name_the_problem(real_layouts, tmp_path):
    data, _ = real_layouts
    proc = run_study("--data", data, "--methods", "fedpav,kd", "--out", tmp_path)
    assert proc.returncode == 2 and "--public" in proc.stderr
    bad = tmp_path / "bad"
    shutil.copytree(data / "market", bad / "market")
    (bad / "notes").mkdir()
    (bad / "notes" / "readme.txt").write_text("not a data set")
    proc = run_study("--data", bad, "--methods", "local", "--out", tmp_path)
    assert proc.returncode == 2 and "unknown data set layout" in proc.stderr and "notes" in proc.stderr
    proc = run_study("--data", tmp_path / "missing", "--methods", "local", "--out", tmp_path)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    proc = run_study("--data", data, "--methods", "local", "--validation-distractors", "--out", tmp_path)
    assert proc.returncode == 2 and "only with --validation" in proc.stderr
    for mix in ("0.5,1.5", "half"):
        proc = run_study("--data", data, "--methods", "fedpav", "--start-mix", mix, "--out", tmp_path)
        assert proc.returncode == 2 and "--start-mix" in proc.stderr, proc.stderr


def test_the_adoption_gate_serves_each_site_the_model_its_validation_runs_chose(real_layouts, tmp_path):
    """--gate-from: per seed and site, the test scores of the model the site's validation runs chose by the
    agent's rule (`reid.adoption.prefer_own`): its own locally trained one or the shipped global model."""
    data, _ = real_layouts
    common = (
        "--data", data, "--methods", "local,fednova", "--seeds", "0,1", "--rounds", "1", "--scenario",
        "dataset", "--arch", "mobilenet_v3_small", "--batch-size", "8", "--from-scratch", "--no-site-models",
    )  # fmt: skip
    val, test = tmp_path / "val", tmp_path / "test"
    proc = run_study(*common, "--validation", "0.4", "--validation-distractors", "--out", val)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_study(*common, "--gate-from", val, "--out", test)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((test / "study.json").read_text())["scenarios"]["dataset"]
    names = sorted(s.name for s in data.iterdir())

    def finals(root: Path, method: str, seed: int) -> dict[str, dict]:
        run = root / "dataset" / "runs" / method / f"seed{seed}"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r.get("model") == ("local" if method == "local" else "global")]
        return {r["site"]: r for r in evals}  # one round: one evaluation per site

    cells: dict[str, list[float]] = {n: [] for n in names}
    for seed in (0, 1):
        for name in names:
            own = prefer_own(finals(val, "local", seed)[name], finals(val, "fednova", seed)[name])
            assert study["gate_choices"][str(seed)][name] == ("own" if own else "federation")
            cells[name].append(finals(test, "local" if own else "fednova", seed)[name]["rank1"])
    gate = study["gate_table"]["fednova + gate"]
    for name in names:
        assert gate[name]["rank1"][0] == pytest.approx(sum(cells[name]) / 2, abs=1e-3), name
    local = study["table"]["local"]
    below = [n for n in names if gate[n]["rank1"][0] < local[n]["rank1"][0]]
    assert study["verdicts"]["gated_below_local"] == below
    assert "with the adoption gate" in (test / "study.md").read_text()
    # the gate reads validation runs of every seed the study has, and only for a test-split study
    proc = run_study(*common[:5], "0,2", *common[6:], "--gate-from", val, "--out", tmp_path / "other")
    assert proc.returncode == 2 and "no validation run of local, seed 2" in proc.stderr, proc.stderr[-2000:]
    proc = run_study(*common, "--validation", "0.4", "--gate-from", val, "--out", tmp_path / "other")
    assert proc.returncode == 2 and "--gate-from" in proc.stderr
