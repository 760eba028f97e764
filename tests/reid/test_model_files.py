"""One model file for every producer and every consumer: what `edge-agent train`, `cloud-aggregator
simulate` and `serve` write is read by `edge-agent evaluate`, `cloud-aggregator export --model` and
`--pretrained`, given as the file or as the producer's output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cloud.cli import app as cloud_app
from cloud.config import ServeConfig
from cloud.server import Aggregator
from edge.cli import app as edge_app
from reid.data import InputSpec
from reid.model import ModelError, ModelSpec, build_model
from reid.weights import find_model, load_checkpoint

runner = CliRunner()
SIZE = ["--height", "64", "--width", "32"]


def _train(site: Path, out: Path) -> Path:
    args = [
        "train",
        "--data",
        str(site),
        "--arch",
        "resnet18",
        *SIZE,
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    result = runner.invoke(edge_app, [*args, "--eval-every", "0"])
    assert result.exit_code == 0, result.output
    return out


def _simulate(sites: Path, out: Path) -> Path:
    args = [
        "simulate",
        "--data",
        str(sites),
        "--out",
        str(out),
        "--rounds",
        "1",
        "--arch",
        "resnet18",
        *SIZE,
        "--batch-size",
        "16",
    ]
    result = runner.invoke(cloud_app, [*args, "--algorithm", "fedpav", "--transport", "none"])
    assert result.exit_code == 0, result.output
    return out


def _serve(out: Path) -> Path:
    """The aggregator writes its initial global model on start, with the code it uses after every round."""
    cfg = ServeConfig(
        federation="files",
        state_dir=out,
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
    )
    Aggregator(cfg, "mqtt://127.0.0.1:1")  # not started: no broker needed
    return out


@pytest.fixture(scope="module")
def produced(tiny_federation, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("producers")
    sites = tiny_federation / "sites"
    return {
        "train": _train(sites / "site01", root / "train"),
        "simulate": _simulate(sites, root / "simulate"),
        "serve": _serve(root / "serve"),
    }


def _file(producer: str, folder: Path) -> Path:
    if producer == "serve":
        return folder / "files" / "rounds" / "-0001" / "global.safetensors"
    return folder / "model.safetensors"


@pytest.mark.parametrize("producer", ["train", "simulate", "serve"])
def test_every_consumer_reads_every_producer(produced, producer, tiny_federation, tmp_path):
    folder = produced[producer]
    file = _file(producer, folder)
    assert find_model(folder) == file  # the folder means its model
    ckpt = load_checkpoint(file)
    weights = load_file(str(file))
    assert ckpt.input_spec == InputSpec(height=64, width=32) and ckpt.model.spec.arch == "resnet18"
    for key, value in ckpt.model.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key
    site = tiny_federation / "sites" / "site00"
    for given in (file, folder):  # evaluate
        result = runner.invoke(edge_app, ["evaluate", "--data", str(site), "--model", str(given)])
        assert result.exit_code == 0, result.output
        assert "rank-1" in result.output
    # --pretrained: the trunk of a new model is the producer's trunk
    model = build_model(ModelSpec(arch="resnet18"), 3, pretrained=folder)
    trunk = {k: v for k, v in weights.items() if k.startswith("backbone.trunk.")}
    assert trunk and all(torch.equal(model.state_dict()[k], v) for k, v in trunk.items())
    # export --model: an ONNX model that passed the parity gate, versioned by its round when known
    onnx = tmp_path / "m.onnx"
    images = site / "query"
    result = runner.invoke(
        cloud_app, ["export", "--model", str(file), "--images", str(images), "--out", str(onnx)]
    )
    assert result.exit_code == 0, result.output
    assert onnx.is_file() and "parity" in result.output
    version = json.loads(onnx.with_name(onnx.name + ".json").read_text())["version"]
    assert (
        version
        == {"train": "site01/own", "simulate": "default/round-1", "serve": "default/round--1"}[producer]
    )
    # extract runs exported models only, and says how to get one
    result = runner.invoke(edge_app, ["extract", "--model", str(file), "--images", str(images)])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "cloud-aggregator export --model" in said


def test_what_is_not_a_model_says_so(produced, tmp_path):
    resume = produced["simulate"] / "checkpoint.safetensors"
    with pytest.raises(ModelError, match="resume state; its model is"):
        load_checkpoint(resume)
    with pytest.raises(ModelError, match="a folder without a model"):
        find_model(tmp_path)
    with pytest.raises(ModelError, match="model not found"):
        find_model(tmp_path / "missing")


def test_a_model_file_of_nan_is_refused_by_every_reader(produced, tiny_federation, tmp_path):
    """`evaluate` scored a model of NaN (rank-1 0.0, exit 0), `train --pretrained` trained it at loss nan
    and wrote it again, `export` blamed its parity gate (2026-12-04 new-user audit): one line naming the
    tensor, wherever the file is read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = produced["train"] / "model.safetensors"
    with safe_open(str(source), framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k, v in tensors.items() if k.startswith("backbone") and v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ModelError, match=f"{key} holds NaN or infinite values"):
        load_checkpoint(bad)
    site = tiny_federation / "sites" / "site01"
    runner = CliRunner()
    train = [
        "train",
        "--data",
        str(site),
        "--arch",
        "resnet18",
        "--pretrained",
        str(bad),
        "--out",
        str(tmp_path),
    ]
    for command in (["evaluate", "--model", str(bad), "--data", str(site)], train):
        result = runner.invoke(edge_app, command)
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code != 0 and "holds NaN or infinite values" in said, result.output


def test_atomic_writes_from_threads_leave_one_whole_version_and_no_leftovers(tmp_path):
    """Two threads writing one state file (the aggregator's open round) each use their own temporary
    file: the result is one whole version, never an error or a mix. A temporary that a killed process
    left behind is removed by the next process's first write into the folder."""
    import json
    import subprocess
    import sys
    import threading

    from reid.files import atomic_write

    path = tmp_path / "open.json"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".open.json.{int(dead.stdout)}.1234.tmp"
    leftover.write_bytes(b"torn")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(200):
                atomic_write(path, json.dumps({"writer": n, "i": i, "pad": "x" * (1000 * n)}).encode())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["i"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == ["open.json"]
