"""ONNX export of the feature extractor, its preprocessing contract, and the parity gate.

The exported graph is backbone + embedding in eval mode with an L2-normalised 512-d output; only the
batch axis is dynamic. Normalisation is **outside** the graph: the contract (a JSON sidecar
``<model>.onnx.json``) says exactly what the caller must feed (RGB, NCHW, float32, pixel/255, ImageNet
mean/std, bicubic resize to height x width) and carries the file's sha256; the runtime enforces it.

Exporter: the dynamo exporter at opset 18 (single file, no external data); if it fails, the legacy
TorchScript exporter at opset 17. The exporter folds BatchNorm layers into the convolutions before them;
``keep_batchnorm`` leaves them as BatchNormalization nodes whose inputs are initialisers named after the
PyTorch state keys (dynamo only; ONNX Runtime and TensorRT fold them when they load the file), so that a
site can put its own BatchNorm layers in (`export.site_batchnorm`). ``fp16`` converts the weights and
activations with onnxruntime's float16 converter, keeping float32 inputs and outputs. Every export
passes `onnx.checker` and the parity gate: ONNX Runtime against PyTorch on real images, minimum cosine
>= 0.9999 (fp32) or >= 0.999 (fp16), or the export fails loudly and leaves no file.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from export.contract import Contract, file_sha256, write_contract
from reid.data import ImageDataset, InputSpec, eval_transform, first_readable
from reid.files import disk_full
from reid.model import ReIDModel
from reid.tracing import TRACING

log = logging.getLogger(__name__)
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}


class ExportError(RuntimeError):
    """The export or its parity gate failed."""


class FeatureNet(nn.Module):
    """images (N,3,H,W, normalised) -> L2-normalised embeddings (N, 512)."""

    def __init__(self, model: ReIDModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.embed(images), dim=1)


def _export(net: FeatureNet, example: torch.Tensor, out: Path, keep_batchnorm: bool) -> tuple[str, int]:
    with TRACING:  # process-wide tracing state: no other export, no training step meanwhile
        return _export_unlocked(net, example, out, keep_batchnorm)


def _export_unlocked(
    net: FeatureNet, example: torch.Tensor, out: Path, keep_batchnorm: bool
) -> tuple[str, int]:
    try:
        torch.onnx.export(
            net,
            (example,),
            str(out),
            dynamo=True,
            opset_version=18,
            external_data=False,
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
            optimize=not keep_batchnorm,  # its graph optimiser is what folds BatchNorm
            verbose=False,  # (its progress lines are bare prints; our log lines say what was exported)
        )
        return "dynamo", 18
    except Exception as err:  # the dynamo exporter is young: fall back to the legacy one
        if disk_full(err):  # (not the exporter's fault: the other one would fail the same way)
            raise OSError(errno.ENOSPC, f"no room to export {out.name}: {err}") from None
        if keep_batchnorm:
            raise ExportError(
                f"the dynamo exporter failed ({type(err).__name__}: {err}); only it can keep "
                "the BatchNorm layers separate"
            ) from None
        log.warning("dynamo export failed (%s: %s); using the TorchScript exporter", type(err).__name__, err)
    torch.onnx.export(
        net,
        (example,),
        str(out),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
    )
    return "torchscript", 17


def parity_images(paths: Sequence[Path], input_spec: InputSpec, n: int = 32) -> torch.Tensor:
    """Up to `n` readable images, preprocessed for the model (corrupt ones skipped): the parity gate's."""
    try:
        return first_readable(ImageDataset(list(paths), eval_transform(input_spec)), n)
    except ValueError:
        raise ExportError("no readable image for the parity gate") from None


@dataclass
class Parity:
    min_cosine: float
    max_abs_diff: float
    images: int


def parity(net: FeatureNet, model_path: Path, images: torch.Tensor) -> Parity:
    """Compare ONNX Runtime (CPU) with PyTorch on the same preprocessed images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(images).numpy()
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return Parity(float(cos.min()), float(np.abs(ref - got).max()), len(images))


def to_fp16(path: Path) -> None:
    """Convert an fp32 ONNX model in place to fp16 weights/activations with fp32 inputs and outputs."""
    from onnxruntime.transformers import float16

    converted = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    _topological_sort(converted.graph)  # the converter appends its input casts at the end
    onnx.save(converted, str(path))


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so that every input is produced before it is used (as onnx.checker requires)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise ExportError("the converted graph has a cycle or a missing input")
        for node in progress:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in progress]
    del graph.node[:]
    graph.node.extend(ordered)


def export_onnx(
    model: ReIDModel,
    input_spec: InputSpec,
    out: Path,
    parity_images: torch.Tensor,
    version: str = "",
    precision: Literal["fp32", "fp16"] = "fp32",
    keep_batchnorm: bool = False,
) -> tuple[Contract, Parity]:
    """Export, check, gate on parity, then write the contract sidecar. Raises ExportError on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()  # outside inference mode
    net = FeatureNet(model).eval()
    example = parity_images[:2].contiguous()
    exporter, opset = _export(net, example, out, keep_batchnorm)
    if precision == "fp16":
        to_fp16(out)
    onnx.checker.check_model(str(out))
    report = parity(net, out, parity_images)
    log.info(
        "%s parity on %d images: min cosine %.6f, max abs diff %.2e",
        precision,
        report.images,
        report.min_cosine,
        report.max_abs_diff,
    )
    if not report.min_cosine >= MIN_COSINE[precision]:  # (NaN fails too)
        out.unlink(missing_ok=True)
        raise ExportError(f"parity gate failed: min cosine {report.min_cosine:.6f} < {MIN_COSINE[precision]}")
    contract = Contract(
        mean=input_spec.mean,
        std=input_spec.std,
        height=input_spec.height,
        width=input_spec.width,
        output_dim=model.spec.embed_dim,
        exporter=exporter,
        opset=opset,
        model=model.spec,
        version=version,
        sha256=file_sha256(out),
        precision=precision,
        quality={"min_cosine": report.min_cosine, "max_abs_diff": report.max_abs_diff},
    )
    write_contract(out, contract)
    return contract, report
