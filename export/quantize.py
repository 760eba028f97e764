"""int8 static quantisation (QDQ, per-channel) calibrated on a site's own images, accepted on retrieval.

Calibration reads the site's training crops, so no image leaves the site. The quantised model is
accepted only if retrieval on the site's query/gallery stays within a budget (default: rank-1 and mAP
each drop by at most 1 point against the fp32 model it came from) and its features stay close to the
fp32 ones (mean cosine at least 0.95). Both are needed: a model can keep a high mean cosine and still
reorder a gallery, and on a site with few queries a degraded model can keep its rank-1 by luck. A
rejected model is deleted and `QuantizationRejected` carries the report.

Dynamic int8 is deliberately absent: on CNNs it leaves the convolutions in fp32 and measured slower
than fp32 here (reference/machine-figures.md section 5).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict, Field

from export.contract import contract_path, file_sha256, load_contract, write_contract
from export.onnx_export import ExportError
from export.runtime import FeatureExtractor
from reid.data import ReIDSplits
from reid.evaluate import Metrics, evaluate_features

log = logging.getLogger(__name__)


class RetrievalBudget(BaseModel):
    """How much retrieval an int8 model may lose against its fp32 source, in points (percent), and how
    far its features may move (mean cosine to the fp32 features of the same crops)."""

    model_config = ConfigDict(extra="forbid")

    max_rank1_drop: float = Field(1.0, ge=0)
    max_map_drop: float = Field(1.0, ge=0)
    min_mean_cosine: float = Field(0.95, ge=-1, le=1)


class QuantizationRejected(ExportError):
    def __init__(self, message: str, report: QuantReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class QuantReport:
    calibration_images: int
    min_cosine: float
    mean_cosine: float
    fp32: dict[str, float]
    int8: dict[str, float]
    reasons: list[str]

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def as_quality(self) -> dict[str, float]:
        out = {"calibration_images": float(self.calibration_images), "min_cosine": self.min_cosine}
        out.update(mean_cosine=self.mean_cosine)
        out.update({f"fp32_{k}": v for k, v in self.fp32.items()})
        out.update({f"int8_{k}": v for k, v in self.int8.items()})
        return out

    def describe(self) -> str:
        return (
            f"rank-1 {self.fp32['rank1']:.1f} -> {self.int8['rank1']:.1f}, "
            f"mAP {self.fp32['mAP']:.1f} -> {self.int8['mAP']:.1f}, cosine to fp32 min {self.min_cosine:.4f} "
            f"mean {self.mean_cosine:.4f} ({self.calibration_images} calibration images)"
        )


def retrieval_gate(
    fp32: dict[str, float], int8: dict[str, float], mean_cosine: float, budget: RetrievalBudget
) -> list[str]:
    """Why the int8 metrics and features break the budget (empty when they do not)."""
    reasons = []
    if fp32["rank1"] - int8["rank1"] > budget.max_rank1_drop:
        reasons.append(
            f"rank-1 drops {fp32['rank1'] - int8['rank1']:.2f} points (budget {budget.max_rank1_drop})"
        )
    if fp32["mAP"] - int8["mAP"] > budget.max_map_drop:
        reasons.append(f"mAP drops {fp32['mAP'] - int8['mAP']:.2f} points (budget {budget.max_map_drop})")
    if not mean_cosine >= budget.min_mean_cosine:  # (NaN fails too)
        reasons.append(f"mean cosine to fp32 {mean_cosine:.4f} is below {budget.min_mean_cosine}")
    return reasons


def site_retrieval(fx: FeatureExtractor, splits: ReIDSplits) -> tuple[Metrics, np.ndarray]:
    """Retrieval on the site's query/gallery through `fx`, and the features (query then gallery)."""
    q_paths, g_paths = [r.path for r in splits.query], [r.path for r in splits.gallery]
    q, q_kept = fx.extract(q_paths)
    g, g_kept = fx.extract(g_paths)
    ids = (
        np.array([splits.query[i].pid for i in q_kept]),
        np.array([splits.gallery[i].pid for i in g_kept]),
        np.array([splits.query[i].camid for i in q_kept]),
        np.array([splits.gallery[i].camid for i in g_kept]),
    )
    return evaluate_features(torch.from_numpy(q), torch.from_numpy(g), *ids), np.concatenate([q, g])


class _Calibration:
    """ONNX Runtime CalibrationDataReader over preprocessed site images."""

    def __init__(self, fx: FeatureExtractor, paths: Sequence[Path], batch: int) -> None:
        self.fx, self.paths, self.batch = fx, list(paths), batch
        self.count = 0
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        from reid.data.images import open_rgb

        for start in range(0, len(self.paths), self.batch):
            images = [img for p in self.paths[start : start + self.batch] if (img := open_rgb(p)) is not None]
            if images:
                self.count += len(images)
                yield {self.fx.contract.input_name: self.fx.preprocess(images)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self.count = 0
        self._batches = self._iterate()


def _preprocessed(source: Path, workdir: Path) -> Path:
    """Shape inference + graph optimisation before quantisation, as onnxruntime recommends."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "prepared.onnx"
    # symbolic shape inference is for transformer graphs (and cannot read the dynamo exporter's)
    quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
    return out


def quantize_int8(
    fp32_model: Path,
    splits: ReIDSplits,
    out: Path,
    budget: RetrievalBudget | None = None,
    calibration_images: int = 256,
    seed: int = 0,
    calibration_paths: Sequence[Path] | None = None,
) -> QuantReport:
    """Quantise `fp32_model` to `out` and gate it on the site's retrieval.

    QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on `calibration_paths` (by
    default up to `calibration_images` of the site's training crops); the embedding layer stays fp32
    (little compute, and the cosine to fp32 stays higher). Raises QuantizationRejected, leaving no
    file, when the budget is broken.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    budget = budget or RetrievalBudget()
    source = load_contract(fp32_model)
    if source.precision != "fp32":
        raise ExportError(f"{fp32_model}: int8 starts from an fp32 model, this one is {source.precision}")
    if not splits.query or not splits.gallery:
        raise ExportError(f"{splits.root}: int8 needs the site's query and gallery for the retrieval gate")
    reference = FeatureExtractor(fp32_model, providers=["CPUExecutionProvider"])
    if calibration_paths is None:
        pool = splits.train or splits.gallery
        chosen = np.random.default_rng(seed).permutation(len(pool))[:calibration_images]
        calibration_paths = [pool[i].path for i in sorted(chosen)]
    reader = _Calibration(reference, calibration_paths, batch=32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedreid-int8-") as tmp:
        prepared = _preprocessed(fp32_model, Path(tmp))
        embedding = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Gemm", "MatMul")]
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=embedding,
        )
    onnx.checker.check_model(str(out))
    write_contract(out, source.model_copy(update={"precision": "int8", "sha256": file_sha256(out)}))
    quantized = FeatureExtractor(out, providers=["CPUExecutionProvider"])
    fp32_metrics, fp32_feats = site_retrieval(reference, splits)
    int8_metrics, int8_feats = site_retrieval(quantized, splits)
    cos = np.sum(fp32_feats * int8_feats, axis=1) if len(fp32_feats) == len(int8_feats) else np.zeros(1)
    fp32_summary = {k: fp32_metrics.summary()[k] for k in ("rank1", "mAP")}
    int8_summary = {k: int8_metrics.summary()[k] for k in ("rank1", "mAP")}
    mean_cosine = float(cos.mean())
    report = QuantReport(
        calibration_images=reader.count,
        min_cosine=float(cos.min()),
        mean_cosine=mean_cosine,
        fp32=fp32_summary,
        int8=int8_summary,
        reasons=retrieval_gate(fp32_summary, int8_summary, mean_cosine, budget),
    )
    log.info("int8 on %s: %s", splits.root.name, report.describe())
    if not report.accepted:
        out.unlink(missing_ok=True)
        contract_path(out).unlink(missing_ok=True)
        raise QuantizationRejected(
            f"int8 rejected: {'; '.join(report.reasons)} ({report.describe()})", report
        )
    write_contract(
        out,
        source.model_copy(
            update={"precision": "int8", "sha256": file_sha256(out), "quality": report.as_quality()}
        ),
    )
    return report
