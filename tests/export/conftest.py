"""The exported tiny model shared by the export tests."""

from __future__ import annotations

import pytest
import torch

from export.onnx_export import export_onnx
from reid.data import ImageDataset, InputSpec, eval_transform, read_dataset
from reid.model import ModelSpec, build_model

SPEC = InputSpec(height=64, width=32)


@pytest.fixture(scope="session")
def exported(tiny_federation, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), 5)
    paths = [r.path for r in read_dataset(tiny_federation / "sites" / "site01").gallery][:24]
    images = torch.stack([ImageDataset(paths, eval_transform(SPEC))[i][0] for i in range(len(paths))])
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics instead of the init values
        model(images)
    model.eval()
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    contract, parity = export_onnx(model, SPEC, out, images, version="round-3")
    return model, out, contract, parity, paths
