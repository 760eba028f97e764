"""Backend choice: the ONNX Runtime provider order and options, and TensorRT (skipped without it)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from export.contract import Contract, load_contract
from export.runtime import FeatureExtractor, choose_providers
from reid.model import ModelSpec

CONTRACT = Contract(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    height=256,
    width=128,
    output_dim=512,
    exporter="dynamo",
    opset=18,
    model=ModelSpec(arch="resnet18"),
    sha256="0" * 64,
)
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_provider_order_prefers_tensorrt_then_cuda_then_cpu(tmp_path):
    chosen = choose_providers(ALL, CONTRACT.model_copy(update={"precision": "fp16"}), cache_dir=tmp_path)
    trt_name, options = chosen[0]
    assert trt_name == "TensorrtExecutionProvider"
    assert chosen[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["trt_fp16_enable"] is True and options["trt_int8_enable"] is False
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_profile_min_shapes"] == "images:1x3x256x128"
    assert options["trt_profile_opt_shapes"] == "images:16x3x256x128"
    assert options["trt_profile_max_shapes"] == "images:32x3x256x128"
    fp32 = dict(choose_providers(ALL, CONTRACT, max_batch=8)[0][1])
    assert fp32["trt_fp16_enable"] is False and "trt_engine_cache_path" not in fp32
    assert fp32["trt_profile_max_shapes"] == "images:8x3x256x128"
    int8 = dict(choose_providers(ALL, CONTRACT.model_copy(update={"precision": "int8"}))[0][1])
    assert int8["trt_int8_enable"] is True


def test_providers_missing_from_the_build_are_skipped_and_cpu_closes_the_list():
    azure = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(azure, CONTRACT) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], CONTRACT) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    # an explicit preference list is honoured in its order, CPU still last
    assert choose_providers(ALL, CONTRACT, preferred=["CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(ALL, CONTRACT, preferred=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
NO_TRT = "TensorRT engines need TensorRT 10 and a CUDA GPU: " + (
    "tensorrt is not installed" if importlib.util.find_spec("tensorrt") is None else "no CUDA GPU visible"
)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are present: the real build is tested instead")
def test_build_engine_without_tensorrt_says_what_is_missing(exported):
    from edge.cli import app

    _, onnx_path, _, _, _ = exported
    result = CliRunner().invoke(app, ["build-engine", "--model", str(onnx_path), "--fp16"])
    assert result.exit_code == 1
    assert "TensorRT engines need" in result.output and "on this machine use the .onnx model" in result.output
    assert not list(onnx_path.parent.glob("*.engine")) and not list(onnx_path.parent.rglob("*.engine"))


@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_parity_and_cache(exported, precision, tmp_path):
    from export.tensorrt import build_engine_cached

    _, onnx_path, _, _, paths = exported
    half = precision == "fp16"
    first = build_engine_cached(onnx_path, fp16=half, max_batch=8, cache_dir=tmp_path, images=paths)
    assert not first.cached and first.min_cosine >= (0.9999 if precision == "fp32" else 0.999)
    again = build_engine_cached(onnx_path, fp16=half, max_batch=8, cache_dir=tmp_path)
    assert again.cached and again.path == first.path
    contract = load_contract(first.path)
    assert contract.precision == precision
    assert contract.engine["onnx_sha256"] == load_contract(onnx_path).sha256
    engine_fx = FeatureExtractor(first.path)
    onnx_fx = FeatureExtractor(onnx_path, providers=["CPUExecutionProvider"])
    got, ref = engine_fx(paths[:11]), onnx_fx(paths[:11])  # 11 > max batch 8: split into two runs
    assert np.sum(got * ref, axis=1).min() >= 0.999
