"""TensorRT 10 engines: built on the site's own GPU from the exported ONNX, cached, checked, and run.

`build_engine_cached` parses the ONNX, sets an optimisation profile for the dynamic batch axis
(1 / max/2 / max), the precision flags (fp16; int8 only from an ONNX that already carries Q/DQ nodes,
the explicit route TensorRT 10.1+ recommends instead of the deprecated calibrators; TF32 off for an
fp32 engine), a workspace limit and a timing cache, then checks the engine against ONNX Runtime on the
same inputs before it is kept. Engines are cached by (GPU, TensorRT version, precision, max batch,
ONNX sha256), because an engine only runs on the GPU model and TensorRT version that built it.

`TensorRTBackend` runs an engine with the named-tensor API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`), using torch CUDA tensors as device buffers. Without TensorRT or without a GPU every
entry point raises `TensorRTError` saying which is missing.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.contract import Contract, ContractError, file_sha256, load_contract, write_contract

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 2 << 30
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


class TensorRTError(RuntimeError):
    """TensorRT is missing, no GPU is visible, or an engine failed to build or to match ONNX Runtime."""


def require_tensorrt() -> Any:
    """The tensorrt module, once TensorRT and a CUDA GPU are both present."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the TensorRT Python package (pip install 'fedreid-edge[gpu]', TensorRT 10)")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if missing:
        raise TensorRTError(
            "TensorRT engines need " + " and ".join(missing) + "; on this machine use the .onnx model "
            "(ONNX Runtime picks the best available provider)"
        )
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTError(f"TensorRT {trt.__version__} is too old: TensorRT 10 or newer is required")
    return trt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def engine_precision(contract: Contract, fp16: bool, int8: bool) -> str:
    if int8:
        if contract.precision != "int8":
            raise TensorRTError(
                "--int8 needs a model with Q/DQ nodes: quantise it on this site first "
                "(edge-agent quantize), then build the engine from the int8 .onnx"
            )
        return "int8"
    return "fp16" if fp16 or contract.precision == "fp16" else "fp32"


def engine_path(
    cache_dir: Path, gpu: str, trt_version: str, precision: str, max_batch: int, sha: str
) -> Path:
    """Where the engine for this (GPU, TensorRT, precision, max batch, ONNX) lives in the cache."""
    return cache_dir / _slug(gpu) / f"trt-{trt_version}" / f"{precision}-b{max_batch}-{sha[:16]}.engine"


@dataclass
class EngineResult:
    path: Path
    cached: bool
    seconds: float
    min_cosine: float


def _build(
    trt: Any, onnx_path: Path, contract: Contract, precision: str, max_batch: int, timing: Path
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT cannot parse the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    shape = (3, contract.height, contract.width)
    profile.set_shape(contract.input_name, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see its log above)")
    timing.parent.mkdir(parents=True, exist_ok=True)
    timing.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parity_inputs(contract: Contract, images: list[Path] | None, n: int = 16) -> np.ndarray:
    if images:
        from export.runtime import preprocess
        from reid.data.images import open_rgb

        decoded = [img for p in images[:n] if (img := open_rgb(p)) is not None]
        if decoded:
            return preprocess(contract, decoded)
    log.warning("no images given for the engine parity check: using random inputs")
    return np.random.default_rng(0).standard_normal((n, 3, contract.height, contract.width), dtype=np.float32)


def build_engine_cached(
    onnx_path: Path,
    fp16: bool = False,
    int8: bool = False,
    max_batch: int = 32,
    cache_dir: Path | None = None,
    images: list[Path] | None = None,
) -> EngineResult:
    """The engine for `onnx_path` on this GPU: from the cache, or built, parity-checked and cached."""
    contract = load_contract(onnx_path)
    precision = engine_precision(contract, fp16, int8)
    trt = require_tensorrt()
    import torch

    gpu = torch.cuda.get_device_name()
    cache_dir = cache_dir or onnx_path.with_name(onnx_path.stem + ".engines")
    target = engine_path(cache_dir, gpu, trt.__version__, precision, max_batch, contract.sha256)
    try:
        cached = load_contract(target)  # the entry's own hash check
        log.info("engine cache hit: %s", target)
        return EngineResult(target, True, 0.0, cached.quality.get("min_cosine", 1.0))
    except ContractError:
        pass  # not cached (or a stale/corrupt entry): build it
    start = time.perf_counter()
    engine = _build(trt, onnx_path, contract, precision, max_batch, target.parent / "timing.cache")
    seconds = time.perf_counter() - start
    tmp = target.with_name(target.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(engine)
    engine_contract = contract.model_copy(
        update={
            "precision": precision,
            "sha256": file_sha256(tmp),
            "engine": {
                "gpu": gpu,
                "tensorrt": trt.__version__,
                "onnx_sha256": contract.sha256,
                "max_batch": str(max_batch),
            },
        }
    )
    x = _parity_inputs(contract, images)[:max_batch]
    from export.runtime import OrtBackend

    reference = OrtBackend(onnx_path, contract, ["CPUExecutionProvider"], None, None, max_batch).run(x)
    got = TensorRTBackend.from_bytes(engine, engine_contract).run(x)
    cos = np.sum(reference * got, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1) + 1e-12
    )
    min_cos = float(cos.min())
    if not min_cos >= MIN_COSINE[precision]:  # (NaN fails too)
        tmp.unlink(missing_ok=True)
        raise TensorRTError(
            f"{precision} engine rejected: min cosine to ONNX Runtime {min_cos:.5f} < {MIN_COSINE[precision]}"
        )
    tmp.replace(target)
    engine_contract = engine_contract.model_copy(
        update={"quality": {**contract.quality, "min_cosine": min_cos}}
    )
    write_contract(target, engine_contract)
    log.info(
        "%s engine built in %.0f s on %s: min cosine to ONNX Runtime %.5f", precision, seconds, gpu, min_cos
    )
    return EngineResult(target, False, seconds, min_cos)


class TensorRTBackend:
    """Runs a serialized engine (named-tensor API, TensorRT 10) on torch CUDA buffers."""

    def __init__(self, path: Path, contract: Contract) -> None:
        self._setup(path.read_bytes(), contract, str(path))

    @classmethod
    def from_bytes(cls, engine: bytes, contract: Contract) -> TensorRTBackend:
        backend = cls.__new__(cls)
        backend._setup(engine, contract, "(new engine)")
        return backend

    def _setup(self, engine: bytes, contract: Contract, name: str) -> None:
        trt = require_tensorrt()
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise TensorRTError(
                f"{name}: not an engine for this GPU/TensorRT (build it again on this machine)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [contract.input_name] or len(outputs) != 1:
            raise ContractError(f"{name}: engine tensors {names} do not match the contract")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.providers = ["TensorRT"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        if len(batch) > self.max_batch:
            return np.concatenate(
                [self.run(batch[s : s + self.max_batch]) for s in range(0, len(batch), self.max_batch)]
            )
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda"
        )
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execution failed")
        stream.synchronize()
        return y.cpu().numpy()
