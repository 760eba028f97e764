"""`FeatureExtractor`: feature extraction at the camera from an exported model, through ONNX Runtime or
TensorRT (never PyTorch eager).

The backend is picked by the file suffix: ``.onnx`` runs on ONNX Runtime with the best available
provider (TensorRT EP, CUDA EP, CPU EP; `choose_providers`), ``.engine``/``.plan`` on the TensorRT
runtime (`export.tensorrt`). The model's contract sidecar is loaded and enforced: the file's sha256
must match, and the graph input must be what the contract says. Preprocessing is the contract's (RGB,
bicubic resize, /255, mean/std, NCHW float32); batching and optional flip averaging are done here; the
output is L2-normalised. Unreadable images are skipped with one warning by `extract` and are an error
for `__call__`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from export.contract import Contract, ContractError, load_contract
from reid.data.images import open_rgb

log = logging.getLogger(__name__)
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ProviderSpec = str | tuple[str, dict[str, Any]]

__all__ = ["ContractError", "FeatureExtractor", "choose_providers"]


class Backend(Protocol):
    providers: list[str]

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def choose_providers(
    available: Sequence[str],
    contract: Contract,
    preferred: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    max_batch: int = 32,
) -> list[ProviderSpec]:
    """The ONNX Runtime providers to ask for, best first, each only if this onnxruntime build has it.

    The TensorRT EP gets an engine and timing cache (under `cache_dir`, so a session start does not
    rebuild the engine), an optimisation profile 1..max_batch for the dynamic batch axis, and fp16/int8
    flags from the contract's precision. The CPU EP always closes the list as the fallback.
    """
    chosen: list[ProviderSpec] = []
    for name in preferred or PREFERRED_PROVIDERS:
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            shape = f"{contract.input_name}:{{}}x3x{contract.height}x{contract.width}"
            options: dict[str, Any] = {
                "trt_fp16_enable": contract.precision != "fp32",
                "trt_int8_enable": contract.precision == "int8",
                "trt_profile_min_shapes": shape.format(1),
                "trt_profile_opt_shapes": shape.format(max(1, max_batch // 2)),
                "trt_profile_max_shapes": shape.format(max_batch),
            }
            if cache_dir is not None:
                options.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(cache_dir),
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=str(cache_dir),
                )
            chosen.append((name, options))
        else:
            chosen.append(name)
    chosen.append("CPUExecutionProvider")
    return chosen


class OrtBackend:
    """An ONNX Runtime session on the best available provider."""

    def __init__(
        self,
        path: Path,
        contract: Contract,
        providers: Sequence[str] | None,
        threads: int | None,
        cache_dir: Path | None,
        max_batch: int,
        spin: bool = True,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = choose_providers(ort.get_available_providers(), contract, providers, cache_dir, max_batch)
        if cache_dir is not None and any(
            isinstance(p, tuple) for p in chosen
        ):  # only the TensorRT EP uses it
            cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as err:  # (ONNX Runtime's own error types: a truncated or damaged graph)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ContractError(f"{path}: ONNX Runtime cannot load it: {first[:300]}") from None
        self.providers = self.session.get_providers()
        inputs = self.session.get_inputs()
        if (
            len(inputs) != 1
            or inputs[0].name != contract.input_name
            or list(inputs[0].shape[1:]) != [3, contract.height, contract.width]
        ):
            raise ContractError(
                f"{path}: graph input {[(i.name, i.shape) for i in inputs]} does not match "
                f"the contract ({contract.input_name}, [N, 3, {contract.height}, {contract.width}])"
            )
        self.input_name = contract.input_name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def preprocess(contract: Contract, images: Sequence[Image.Image]) -> np.ndarray:
    """Decoded RGB images -> (N, 3, H, W) float32 as the contract requires."""
    c = contract
    size = (c.width, c.height)
    batch = np.empty((len(images), 3, c.height, c.width), dtype=np.float32)
    for i, img in enumerate(images):  # uint8 HWC straight into float CHW: one pass per image, then two
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        np.multiply(np.asarray(img).transpose(2, 0, 1), np.float32(c.scale), out=batch[i])
    batch -= np.array(c.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    batch /= np.array(c.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return batch


class FeatureExtractor:
    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
        threads: int | None = None,
        cache_dir: Path | None = None,
        spin: bool = True,
    ) -> None:
        """`cache_dir`: where the TensorRT EP keeps engines (default: `<model>.trt-cache/` next to it).
        `spin=False`: ONNX Runtime's CPU threads sleep as soon as a run ends instead of spinning for the
        next one; for a process that runs two models in turn on the same cores (a service re-embedding
        its gallery with a new model), where one model's spinning threads would slow the other's runs."""
        self.path = Path(path)
        self.batch_size = batch_size
        if self.path.suffix in (".engine", ".plan"):
            from export.tensorrt import TensorRTBackend, require_tensorrt

            require_tensorrt()  # say what is missing before anything else
            self.contract = load_contract(self.path)
            self.backend: Backend = TensorRTBackend(self.path, self.contract)
            self.batch_size = min(batch_size, self.backend.max_batch)
        elif self.path.suffix == ".onnx":
            self.contract = load_contract(self.path)
            cache = cache_dir or self.path.with_name(self.path.name + ".trt-cache")
            self.backend = OrtBackend(self.path, self.contract, providers, threads, cache, batch_size, spin)
        else:
            raise ContractError(f"{self.path}: unknown model type (expected .onnx, .engine or .plan)")

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return preprocess(self.contract, images)

    def run(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Features of preprocessed images, L2-normalised; with `flip`, of the image + its mirror."""
        out = []
        for start in range(0, len(batch), self.batch_size):
            x = np.ascontiguousarray(batch[start : start + self.batch_size], dtype=np.float32)
            f = self.backend.run(x)
            if flip:
                f = f + self.backend.run(np.ascontiguousarray(x[..., ::-1]))
            out.append(f)
        feats = np.concatenate(out).astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def extract(
        self, paths: Sequence[str | Path], flip: bool = False, chunk: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, indices of the readable paths); unreadable images are skipped with one warning."""
        feats, kept = [], []
        for start in range(0, len(paths), chunk):
            decoded = [(i, open_rgb(Path(paths[i]))) for i in range(start, min(start + chunk, len(paths)))]
            good = [(i, img) for i, img in decoded if img is not None]
            if good:
                kept.extend(i for i, _ in good)
                feats.append(self.run(self.preprocess([img for _, img in good]), flip=flip))
        if not feats:
            named = f": {paths[0]}" if len(paths) == 1 else ""
            raise ValueError(f"no readable image among the {len(paths)} given files{named}")
        return np.concatenate(feats), np.asarray(kept, dtype=np.int64)

    def __call__(self, images: Sequence[Image.Image | str | Path], flip: bool = False) -> np.ndarray:
        """Features of every image, in order; an unreadable file is a ValueError naming it."""
        decoded = []
        for img in images:
            if not isinstance(img, Image.Image):
                opened = open_rgb(Path(img))
                if opened is None:
                    raise ValueError(f"{img}: not a readable image")
                img = opened
            decoded.append(img.convert("RGB"))
        return self.run(self.preprocess(decoded), flip=flip)
