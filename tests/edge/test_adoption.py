"""The adoption gate: a site serves the deployment or its own model, whichever retrieves better on a
validation set of its own (real ONNX Runtime sessions on the tiny federation's crops)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from pydantic import ValidationError

from edge.deployment import AdoptionConfig, Deployments, adopt
from export.contract import contract_path, load_contract
from export.quantize import site_retrieval
from export.runtime import FeatureExtractor
from protocol.mqtt import Endpoint
from protocol.topics import Topics
from reid.adoption import prefer_own
from reid.data import read_dataset


def test_the_rule_prefers_the_federation_unless_the_site_model_is_strictly_better():
    fed = {"rank1": 80.0, "mAP": 60.0, "valid_queries": 10.0}
    assert prefer_own({"rank1": 90.0, "mAP": 10.0}, fed)
    assert prefer_own({"rank1": 80.0, "mAP": 60.1}, fed)
    assert not prefer_own({"rank1": 80.0, "mAP": 60.0}, fed)  # a tie keeps the federation's
    assert not prefer_own({"rank1": 79.9, "mAP": 99.0}, fed)
    assert not prefer_own({"valid_queries": 0.0}, fed)  # nothing to decide on
    assert not prefer_own({"rank1": 90.0, "mAP": 90.0}, {"valid_queries": 0.0})


@pytest.fixture(scope="module")
def two_models(exported, tmp_path_factory):
    """The session's exported model and another one (other weights), both real ONNX files."""
    import torch

    from export.onnx_export import export_onnx
    from reid.data import ImageDataset, InputSpec, eval_transform
    from reid.model import ModelSpec, build_model

    _, first, _, _, paths = exported
    spec = InputSpec(height=64, width=32)
    torch.manual_seed(5)
    model = build_model(ModelSpec(arch="resnet18"), 5)
    images = torch.stack([ImageDataset(paths, eval_transform(spec))[i][0] for i in range(len(paths))])
    model.train()
    with torch.no_grad():
        model(images)
    second = tmp_path_factory.mktemp("other") / "model.onnx"
    export_onnx(model.eval(), spec, second, images, version="own")
    return first, second


def test_the_better_model_on_validation_serves_whichever_side_it_is_on(two_models, tiny_federation, tmp_path):
    validation = tiny_federation / "sites" / "site00"
    splits = read_dataset(validation)
    a, b = two_models
    score = {p: site_retrieval(FeatureExtractor(p), splits)[0].summary() for p in (a, b)}
    key = {p: (score[p]["rank1"], score[p]["mAP"]) for p in (a, b)}
    assert key[a] != key[b]
    served_sha = []
    for fed, own in ((a, b), (b, a)):
        folder = tmp_path / own.parent.name
        folder.mkdir()
        served, record = adopt(fed, AdoptionConfig(own_model=own, validation=validation), folder)
        assert record["validation"] == {"federation": score[fed], "own": score[own]}
        if prefer_own(score[own], score[fed]):
            assert record["adopted"] == "own" and served.parent == folder  # a copy the folder keeps
            assert FeatureExtractor(served).contract.sha256 == FeatureExtractor(own).contract.sha256
        else:
            assert record["adopted"] == "federation" and served == fed
        served_sha.append(FeatureExtractor(served).contract.sha256)
    # whichever side the better model is on, it is the one that serves
    better = a if key[a] > key[b] else b
    assert served_sha == [FeatureExtractor(better).contract.sha256] * 2


def test_adoption_settings_name_a_missing_model_or_folder(two_models, tiny_federation, tmp_path):
    fed = two_models[0]
    site = tiny_federation / "sites" / "site00"
    with pytest.raises(ValidationError, match="no ONNX model with its contract sidecar"):
        AdoptionConfig(own_model=tmp_path / "missing.onnx", validation=site)
    (tmp_path / "bare.onnx").write_bytes(fed.read_bytes())  # the model without its contract
    with pytest.raises(ValidationError, match="contract sidecar"):
        AdoptionConfig(own_model=tmp_path / "bare.onnx", validation=site)
    with pytest.raises(ValidationError, match=r"not a labelled validation folder.*not found"):
        AdoptionConfig(own_model=fed, validation=tmp_path / "nowhere")
    with pytest.raises(ValidationError, match=r"not a labelled validation folder.*unknown data set layout"):
        AdoptionConfig(own_model=fed, validation=fed.parent)  # a folder of models
    # "a query and a gallery, any supported layout": no training split needed
    val = tmp_path / "val"
    for split in ("query", "bounding_box_test"):
        shutil.copytree(site / split, val / split)
    assert AdoptionConfig(own_model=fed, validation=val).validation == val
    splits = read_dataset(val, need_train=False)
    assert splits.train == [] and splits.query and splits.gallery


def test_a_gate_that_cannot_score_keeps_the_federation_model(two_models, tiny_federation, tmp_path, caplog):
    fed = two_models[0]
    gone = tmp_path / "own.onnx"  # valid when the agent started, removed since
    shutil.copyfile(fed, gone)
    shutil.copyfile(contract_path(fed), contract_path(gone))
    gate = AdoptionConfig(own_model=gone, validation=tiny_federation / "sites" / "site00")
    gone.unlink()
    with caplog.at_level(logging.WARNING):
        served, record = adopt(fed, gate, tmp_path)
    assert served == fed and record["adopted"] == "federation"
    assert "adoption gate not applied" in caplog.text
    json.dumps(record)  # goes into current.json as it is


def test_the_gate_decides_again_when_the_agent_starts_with_other_adoption_settings(
    two_models, tiny_federation, tmp_path, mosquitto_url, caplog
):
    """A deployment installed before the gate was turned on is judged at the next start; turning the gate
    off again serves the deployment; unchanged settings keep the choice on file (no new scoring)."""
    validation = tiny_federation / "sites" / "site00"
    splits = read_dataset(validation)
    score = {p: site_retrieval(FeatureExtractor(p), splits)[0].summary() for p in two_models}
    a, b = two_models  # the deployment is the worse of the two on validation, the site's own the better
    fed_model, own_model = (a, b) if prefer_own(score[b], score[a]) else (b, a)
    assert prefer_own(score[own_model], score[fed_model])
    folder = tmp_path / "edge" / "models" / "f_round-1-0123456789ab"
    folder.mkdir(parents=True)
    shutil.copyfile(fed_model, folder / "model.onnx")
    shutil.copyfile(contract_path(fed_model), contract_path(folder / "model.onnx"))
    rel = f"{folder.name}/model.onnx"
    pointer = {"path": rel, "version": "f/round-1", "source_sha256": "ab" * 32, "created": 1.0}
    (folder.parent / "current.json").write_text(json.dumps(pointer))
    gate = AdoptionConfig(own_model=own_model, validation=validation)

    def started(adoption: AdoptionConfig | None) -> tuple[str, str, dict]:
        endpoint = Endpoint(mosquitto_url, Topics("f"), "s", "site")  # (never started: no broker needed)
        deployments = Deployments(tmp_path / "edge", endpoint, adoption=adoption)
        try:
            served = deployments.current()
            assert served is not None and deployments.version == "f/round-1"
            written = json.loads((folder.parent / "current.json").read_text())
            return served.contract.sha256, deployments.adopted, written
        finally:
            deployments.stop()

    sha = {p: load_contract(p).sha256 for p in (fed_model, own_model)}
    gone = tmp_path / "gone"  # a validation folder removed since the agent started: the gate cannot decide,
    shutil.copytree(validation, gone)  # and tries again at the next start
    settings = AdoptionConfig(own_model=own_model, validation=gone)
    shutil.rmtree(gone)
    served, adopted, written = started(settings)
    assert (served, adopted) == (sha[fed_model], "federation") and "gate_error" in written
    assert "gate" not in written
    with caplog.at_level(logging.INFO):
        served, adopted, written = started(gate)  # the gate turned on: it decides
    assert "choosing again" in caplog.text
    assert (served, adopted) == (sha[own_model], "own")
    assert written["validation"] == {"federation": score[fed_model], "own": score[own_model]}
    assert written["federation_path"] == rel and written["version"] == "f/round-1"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert started(gate)[:2] == (served, adopted)  # the same settings: the choice on file
    assert "choosing again" not in caplog.text and "adoption gate on" not in caplog.text
    served, adopted, written = started(None)  # the gate turned off: the deployment serves
    assert (served, adopted) == (sha[fed_model], "federation")
    assert "adopted" not in written and "gate" not in written and written["path"] == rel
