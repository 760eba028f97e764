"""int8 static QDQ calibrated on the site's images, accepted or rejected on retrieval, via the CLIs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from export.contract import contract_path, load_contract
from export.onnx_export import export_onnx
from export.quantize import QuantizationRejected, RetrievalBudget, quantize_int8, retrieval_gate
from export.runtime import FeatureExtractor
from reid.data import InputSpec
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.train import TrainConfig, train_local

SPEC = InputSpec(height=64, width=32)


@pytest.fixture(scope="module")
def trained(tiny_federation, tmp_path_factory):
    """A tiny ResNet-18 trained for a few epochs on site01 (retrieval well above chance), exported fp32."""
    site = SiteData(tiny_federation / "sites" / "site01", SPEC, batch_size=16)
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), site.num_classes)
    config = TrainConfig(epochs=6, batch_size=16, lr_head=0.02, lr_backbone=0.02, seed=0)
    train_local(model, site.train_loader(), config)
    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    export_onnx(model, SPEC, out, site.cdw_images(32), version="fed/round-6")
    return out, site


def test_gate_compares_rank1_map_and_feature_cosine_with_the_budget():
    fp32 = {"rank1": 80.0, "mAP": 60.0}
    budget = RetrievalBudget()
    assert retrieval_gate(fp32, {"rank1": 79.5, "mAP": 59.1}, 0.99, budget) == []
    assert retrieval_gate(fp32, {"rank1": 81.0, "mAP": 62.0}, 0.96, budget) == []
    reasons = retrieval_gate(fp32, {"rank1": 78.5, "mAP": 58.0}, 0.99, budget)
    assert len(reasons) == 2 and "rank-1 drops 1.50" in reasons[0] and "mAP drops 2.00" in reasons[1]
    loose = RetrievalBudget(max_rank1_drop=2, max_map_drop=2)
    assert retrieval_gate(fp32, {"rank1": 78.5, "mAP": 58.0}, 0.99, loose) == []
    # retrieval held (rank-1 even rose) but the features moved: rejected on the cosine floor alone
    (reason,) = retrieval_gate(fp32, {"rank1": 81.0, "mAP": 61.0}, 0.70, budget)
    assert "mean cosine to fp32 0.7000 is below 0.95" in reason


def test_edge_agent_quantize_accepts_a_calibrated_int8_model(trained, tiny_federation):
    from edge.cli import app

    fp32, site = trained
    # with 20 queries one query moves rank-1 by 5 points: the budget allows one query, and 2 points of mAP
    one_query = 100 / len(site.splits.query) + 0.01
    out = fp32.with_name("site.int8.onnx")
    args = ["quantize", "--model", str(fp32), "--data", str(site.splits.root), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--max-rank1-drop", str(one_query), "--max-map-drop", "2"])
    assert result.exit_code == 0, result.output
    assert "int8 accepted" in result.output and "rank-1" in result.output and "mAP" in result.output
    contract = load_contract(out)
    assert contract.precision == "int8" and contract.version == "fed/round-6"
    assert contract.quality["calibration_images"] == len(site.splits.train)
    assert contract.quality["fp32_rank1"] - contract.quality["int8_rank1"] <= one_query
    assert out.stat().st_size < 0.4 * fp32.stat().st_size  # int8 weights
    crops = [r.path for r in site.splits.gallery[:12]]
    reference, quantized = FeatureExtractor(fp32)(crops), FeatureExtractor(out)(crops)
    assert np.sum(reference * quantized, axis=1).mean() > 0.99


def test_a_badly_calibrated_model_is_rejected_and_leaves_no_file(trained, tmp_path):
    fp32, site = trained
    blank = []
    for i in range(4):  # calibrating on flat frames of the mean colour (every normalised input 0): every
        # activation range is the biases' alone, so a real crop clips everywhere and its features degrade
        blank.append(tmp_path / f"flat{i}.png")
        Image.new("RGB", (32, 64), (124, 116, 104)).save(blank[-1])
    out = tmp_path / "bad.int8.onnx"
    # On 20 queries such a model may keep its rank-1 and mAP by luck (it does on some CPUs' int8 kernels):
    # the retrieval drops are left unbounded here, so the default feature floor alone must reject it.
    budget = RetrievalBudget(max_rank1_drop=100, max_map_drop=100)
    floor = r"int8 rejected: mean cosine to fp32 -?\d\.\d+ is below"
    with pytest.raises(QuantizationRejected, match=floor) as err:
        quantize_int8(fp32, site.splits, out, budget, calibration_paths=blank)
    assert err.value.report.calibration_images == 4
    assert err.value.report.mean_cosine < budget.min_mean_cosine
    assert not out.exists() and not contract_path(out).exists()


def test_int8_needs_an_fp32_source_and_a_query_gallery(trained, tmp_path):
    from export.onnx_export import ExportError

    fp32, site = trained
    int8_contract = json.loads(contract_path(fp32).read_text()) | {"precision": "fp16"}
    fake = tmp_path / "half.onnx"
    fake.write_bytes(fp32.read_bytes())
    contract_path(fake).write_text(json.dumps(int8_contract))
    with pytest.raises(ExportError, match="starts from an fp32 model"):
        quantize_int8(fake, site.splits, tmp_path / "x.onnx")
    no_eval = dataclasses.replace(site.splits, query=[])
    with pytest.raises(ExportError, match="query and gallery"):
        quantize_int8(fp32, no_eval, tmp_path / "x.onnx")
