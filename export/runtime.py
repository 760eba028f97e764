"""`FeatureExtractor`: feature extraction at the camera from an exported model, without PyTorch.

The backend is picked by the file suffix: ``.onnx`` runs on ONNX Runtime with the best available
provider (TensorRT EP, CUDA EP, CPU EP). The model's contract sidecar is loaded and enforced: the
file's sha256 must match, and the session's input must be what the contract says. Preprocessing is
the contract's (RGB, bicubic resize, /255, mean/std, NCHW float32); batching and optional flip
averaging are done here; the output is L2-normalised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from export.onnx_export import Contract, contract_path, file_sha256

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ContractError(ValueError):
    """A model file does not match its contract (missing sidecar, wrong hash, wrong input)."""


def load_contract(model_path: Path) -> Contract:
    sidecar = contract_path(model_path)
    if not sidecar.is_file():
        raise ContractError(f"{model_path}: no contract sidecar {sidecar.name} next to the model")
    try:
        contract = Contract.model_validate(json.loads(sidecar.read_text()))
    except ValueError as err:
        raise ContractError(f"{sidecar}: invalid contract: {str(err).splitlines()[0]}") from None
    if file_sha256(model_path) != contract.sha256:
        raise ContractError(f"{model_path}: sha256 does not match its contract (modified or wrong file)")
    return contract


class FeatureExtractor:
    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix in (".engine", ".plan"):
            raise ContractError(
                f"{self.path}: TensorRT engines need the TensorRT runtime (pip install "
                "'fedreid-edge[gpu]') and a GPU; use the .onnx model on this machine"
            )
        if self.path.suffix != ".onnx":
            raise ContractError(f"{self.path}: unknown model type (expected .onnx, .engine or .plan)")
        self.contract = load_contract(self.path)
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        inputs = self.session.get_inputs()
        c = self.contract
        if (
            len(inputs) != 1
            or inputs[0].name != c.input_name
            or list(inputs[0].shape[1:]) != [3, c.height, c.width]
        ):
            raise ContractError(
                f"{self.path}: graph input {[(i.name, i.shape) for i in inputs]} does not match "
                f"the contract ({c.input_name}, [N, 3, {c.height}, {c.width}])"
            )
        self.batch_size = batch_size
        self.mean = np.array(c.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(c.std, dtype=np.float32).reshape(1, 3, 1, 1)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def preprocess(self, images: Iterable[Image.Image | str | Path]) -> np.ndarray:
        """Images (PIL or paths) -> (N, 3, H, W) float32 as the contract requires."""
        c = self.contract
        arrays = []
        for img in images:
            if not isinstance(img, Image.Image):
                with Image.open(img) as opened:
                    img = opened.convert("RGB")
            resized = img.convert("RGB").resize((c.width, c.height), Image.BICUBIC)
            arrays.append(np.asarray(resized, dtype=np.float32))
        batch = np.stack(arrays).transpose(0, 3, 1, 2) * np.float32(c.scale)
        return (batch - self.mean) / self.std

    def run(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Features of preprocessed images, L2-normalised; with `flip`, of the image + its mirror."""
        out = []
        for start in range(0, len(batch), self.batch_size):
            x = np.ascontiguousarray(batch[start : start + self.batch_size], dtype=np.float32)
            f = self.session.run(None, {self.contract.input_name: x})[0]
            if flip:
                f = (
                    f
                    + self.session.run(None, {self.contract.input_name: np.ascontiguousarray(x[..., ::-1])})[
                        0
                    ]
                )
            out.append(f)
        feats = np.concatenate(out)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def __call__(self, images: Iterable[Image.Image | str | Path], flip: bool = False) -> np.ndarray:
        return self.run(self.preprocess(images), flip=flip)
