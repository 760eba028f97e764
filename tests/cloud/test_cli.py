"""`cloud-aggregator synthesize` writes a readable federation and refuses to overwrite one."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cloud.cli import app
from reid.data import read_dataset

runner = CliRunner()


def test_synthesize_writes_sites_and_refuses_a_non_empty_folder(tmp_path):
    args = [
        "synthesize",
        "--out",
        str(tmp_path / "fed"),
        "--sites",
        "2",
        "--train-images-max",
        "64",
        "--size-ratio",
        "2",
        "--public-images",
        "8",
        "--height",
        "64",
        "--width",
        "32",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "site00" in result.output and "site01" in result.output
    assert len(read_dataset(tmp_path / "fed" / "sites" / "site01").train) >= 16
    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert "not empty" in again.output


def test_the_command_lines_start_without_torch():
    """`--help` and argument errors answer at once: importing the CLIs loads no torch, numpy or ONNX
    Runtime (each command imports what it needs when it runs)."""
    import subprocess
    import sys

    heavy = ("torch", "torchvision", "numpy", "onnxruntime", "paho")
    code = f"import sys, cloud.cli, edge.cli; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_pretrain_builds_a_disjoint_source_once_and_its_weights_start_a_federation(tmp_path):
    import torch
    from safetensors.torch import load_file

    from reid.model import ModelSpec, build_model

    out = tmp_path / "backbone.safetensors"
    args = ["pretrain", "--out", str(out), "--epochs", "1", "--height", "64", "--width", "32"]
    args += ["--source-images", "64", "--batch-size", "16"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "building the synthetic source domain" in first.output
    source = tmp_path / "backbone.safetensors.work" / "source" / "federation.json"
    assert '"domains": true' in source.read_text() and '"seed": 1000' in source.read_text()
    weights = load_file(str(out))
    model = build_model(ModelSpec(arch="resnet18"), 3, pretrained=out)  # what --pretrained does
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert trunk and all(torch.equal(v, weights[k]) for k, v in trunk.items() if k in weights)
    assert sum(k in weights for k in trunk) == len(trunk)
    fresh = build_model(ModelSpec(arch="resnet18"), 3)
    assert not torch.equal(fresh.state_dict()["backbone.trunk.0.weight"], trunk["backbone.trunk.0.weight"])
    again = runner.invoke(app, args)  # the source is built once; the finished run is resumed, not redone
    assert again.exit_code == 0 and "building the synthetic source" not in again.output
    assert torch.equal(load_file(str(out))["backbone.trunk.0.weight"], weights["backbone.trunk.0.weight"])


def test_status_names_why_it_cannot_reach_the_broker(tmp_path):
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "run.json").write_text("{}")
    args = ["status", "--state-dir", str(tmp_path), "--federation", "fed", "--broker", "mqtt://127.0.0.1:1"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "could not connect to mqtt://127.0.0.1:1" in result.output and "--identity-dir" in result.output


def test_status_is_a_watcher_that_changes_nothing(tmp_path):
    """`status` moved a damaged newest checkpoint aside (and wrote into the state dir) while `serve` may
    be running: it now reads the round numbers only, and leaves every file as it was."""
    root = tmp_path / "fed"
    for r in ("-0001", "00000", "00001"):
        (root / "rounds" / r).mkdir(parents=True)
        (root / "rounds" / r / "global.safetensors").write_bytes(b"cut short")
    (root / "run.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--federation", "fed"])
    assert result.exit_code == 0, result.output
    assert "fed: 2 rounds done" in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_second_aggregator_on_one_state_folder_is_refused(tmp_path):
    """Two `serve` processes on one federation's folder would both journal, announce and close every round:
    while one holds it (here: this test process), another stops at once with one line."""
    import subprocess
    import sys

    from reid.files import hold_lock

    (tmp_path / "f").mkdir()
    assert hold_lock(tmp_path / "f" / "aggregator.lock") is not None
    command = [sys.executable, "-m", "cloud.cli", "serve", "--state-dir", str(tmp_path), "--federation", "f"]
    result = subprocess.run([*command, "--broker", "mqtt://127.0.0.1:1"], capture_output=True, text=True)
    assert result.returncode == 1
    said = " ".join(result.stdout.split())
    assert f"{tmp_path / 'f'} is in use by another cloud-aggregator serve of federation f" in said


def test_settings_the_round_announcement_cannot_carry_are_refused_at_start(tmp_path):
    """`local_epochs = 2000`, `lr_backbone = inf`, `deadline_s = inf` passed the config and stopped
    `serve` when round 0 opened (the announcement's schema refused them), its sites left waiting."""
    for line, key in (("local_epochs = 2000", "local_epochs"), ("lr_backbone = inf", "lr_backbone"),
                      ("deadline_s = inf", "deadline_s"), ("batch_size = 5000", "batch_size")):  # fmt: skip
        (tmp_path / "cloud.toml").write_text(f'federation = "f"\n{line}\n')
        args = ["serve", "--config", str(tmp_path / "cloud.toml"), "--state-dir", str(tmp_path / "s")]
        result = runner.invoke(app, [*args, "--broker", "mqtt://127.0.0.1:1"])
        assert result.exit_code == 2, result.output
        said = "".join(result.output.replace("│", " ").split())
        assert f"cloud.toml:{key}:" in said, said
    assert not (tmp_path / "s").exists()  # nothing written


def test_an_unreadable_deployment_schedule_never_undoes_a_rollback(tmp_path, caplog):
    """With `deployments/scheduled.json` damaged, a restarted `serve` took the latest deployment (a
    rollback to round 0 by hand) as a scheduled one cut short and deployed round 3 over it."""
    from cloud.deploy import record_scheduled, scheduled_round

    for r in ("-0001", "00000", "00001", "00002", "00003"):
        (tmp_path / "rounds" / r).mkdir(parents=True)
        (tmp_path / "rounds" / r / "global.safetensors").write_bytes(b"x")
    record_scheduled(tmp_path, 1)
    assert scheduled_round(tmp_path) == 1
    (tmp_path / "deployments" / "scheduled.json").write_text("garbage{")
    assert scheduled_round(tmp_path) == 3 and "no deployment is made again at this start" in caplog.text


def test_export_names_what_it_cannot_read(tmp_path):
    """Tracebacks before (2026-12-04 operator audit): a garbage run.json, a checkpoint cut short, a
    --round that is no number."""
    root = tmp_path / "f"
    (root / "rounds" / "00000").mkdir(parents=True)
    (root / "rounds" / "00000" / "global.safetensors").write_bytes(b"cut short")
    args = ["export", "--state-dir", str(tmp_path), "--federation", "f", "--images", str(tmp_path)]

    def said(*extra: str) -> str:
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2, result.output
        return "".join(result.output.replace("│", " ").split())

    (root / "run.json").write_text("{garbage")
    assert "run.jsonunreadable" in said()
    (root / "run.json").write_text(
        json.dumps({"model": {"arch": "resnet18"}, "input": {"height": 64, "width": 32}})
    )
    assert "global.safetensors:notareadablecheckpointofthisrun'smodel" in said()
    assert "'abc':aroundnumberorlatest" in said("--round", "abc")


def test_a_config_file_that_is_not_text_or_starts_with_a_bom(tmp_path):
    from cloud.config import ServeConfig
    from reid.config import ConfigError, load_config

    path = tmp_path / "cloud.toml"
    path.write_bytes('\ufefffederation = "f"\nrounds = 3\n'.encode())  # as some editors save it
    assert load_config(ServeConfig, path, {}).rounds == 3
    path.write_bytes(b"\xd3\x00\xff binary")
    with pytest.raises(ConfigError, match=r"cloud\.toml: not valid TOML: 'utf-8' codec"):
        load_config(ServeConfig, path, {})
    with pytest.raises(ConfigError, match=r"cannot read it"):
        load_config(ServeConfig, tmp_path, {})  # a folder


def test_ray_placement_flags_without_the_ray_executor_are_refused(tmp_path):
    """--site-gpus with the local executor was accepted and ignored (2026-12-04 new-user audit)."""
    for flag, value in (("--site-gpus", "1"), ("--site-cpus", "4"), ("--ray-address", "auto")):
        result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path), flag, value])
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "go with --executor ray" in said, result.output


def test_the_final_table_takes_sites_without_a_local_score():
    """With client sampling (or a failed site) some sites have only a global score in the last round:
    the table took its columns from the first row and `simulate` ended in KeyError after every run and
    every resume (2026-12-04 new-user audit)."""
    from cloud.cli import _final_rows

    records = [
        {"round": 0, "site": "a", "model": "global", "rank1": 10.0, "mAP": 5.0},
        {"round": 1, "site": "a", "model": "global", "rank1": 40.0, "mAP": 20.0},
        {"round": 1, "site": "b", "model": "global", "rank1": 60.0, "mAP": 30.0},
        {"round": 1, "site": "b", "model": "local", "rank1": 50.0, "mAP": 25.0},
        {"round": 1, "kind": "round_summary"},
    ]
    rows = _final_rows(records)
    assert [r["site"] for r in rows] == ["a", "b", "mean"]
    assert all(list(r) == ["site", "global rank-1", "global mAP", "local rank-1", "local mAP"] for r in rows)
    assert (
        rows[0]["local rank-1"] == "-" and rows[2]["global rank-1"] == 50.0 and rows[2]["local mAP"] == 25.0
    )


def test_a_public_set_of_unreadable_images_is_refused_before_training(tiny_federation, tmp_path):
    """KD with a public folder of corrupt files failed only at the first KD, after the sites trained a
    round ("no teacher embeddings"; 2026-12-04 new-user audit): refused at start, naming the folder."""
    from cloud.config import ServeConfig
    from cloud.server import Aggregator

    public = tmp_path / "public"
    public.mkdir()
    for i in range(3):
        (public / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = CliRunner().invoke(
        app,
        ["simulate", "--data", str(tiny_federation / "sites"), "--public", str(public), "--algorithm", "kd",
         "--rounds", "1", "--height", "64", "--width", "32", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "none of its 3 images can be read" in said, result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # (no site trained)
    with pytest.raises(ValueError, match="none of its 3 images can be read"):
        Aggregator(
            ServeConfig(federation="pub", state_dir=tmp_path / "s", public=public, kd_enabled=True),
            "mqtt://127.0.0.1:1",
        )


def test_the_round_carries_preprocessing_only_where_it_is_not_the_default():
    """ModelInfo gained mean/std/pad: sent always, they made every site of an earlier version (which
    refuses unknown fields) drop every round. A federation on the defaults sends the RoundStart those
    sites read; one with its own normalisation sends it, and it reads back the same."""
    import json

    from cloud.config import ServeConfig, model_info
    from protocol.messages import ModelInfo
    from reid.data import InputSpec

    default = json.loads(model_info(ServeConfig()).model_dump_json())
    assert set(default) == {"arch", "embed_dim", "last_stride", "dropout", "height", "width"}
    custom = model_info(ServeConfig(input=InputSpec(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), pad=4)))
    sent = json.loads(custom.model_dump_json())
    assert (sent["mean"], sent["std"], sent["pad"]) == ([0.5] * 3, [0.2] * 3, 4)
    assert ModelInfo.model_validate_json(custom.model_dump_json()) == custom
    same = model_info(ServeConfig(input=InputSpec(pad=10)))  # (the default at 256 high, given explicitly)
    assert "pad" not in json.loads(same.model_dump_json())
