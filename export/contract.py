"""The preprocessing/output contract of an exported model: the JSON sidecar ``<model>.json``.

It says exactly what the caller must feed (RGB, NCHW, float32, pixel/255, ImageNet mean/std, bicubic
resize to height x width), what comes out (512-d, L2-normalised), which model and round it is, and the
sha256 of the model file. Loading a model always goes through `load_contract`, which refuses a file
whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reid.model_spec import ModelSpec

CONTRACT_FORMAT = "fedreid-onnx/1"
Precision = Literal["fp32", "fp16", "int8"]


Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ContractError(ValueError):
    """A model file does not match its contract (missing sidecar, wrong hash, wrong input)."""


class Contract(BaseModel):
    """What an exported model expects and returns (the JSON sidecar)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["fedreid-onnx/1"] = CONTRACT_FORMAT
    input_name: str = "images"
    output_name: str = "features"
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"
    dtype: Literal["float32"] = "float32"
    scale: Positive = 1 / 255
    mean: tuple[Finite, Finite, Finite]
    std: tuple[Positive, Positive, Positive]
    height: int = Field(ge=16, le=4096)
    width: int = Field(ge=16, le=4096)
    resize: Literal["bicubic"] = "bicubic"
    normalization_in_graph: bool = False
    output_dim: int = Field(ge=1, le=65536)
    l2_normalized: bool = True
    precision: Precision = "fp32"
    exporter: str
    opset: int
    model: ModelSpec
    version: str = ""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # how the file was accepted: parity (min cosine, max abs diff) and, for int8, retrieval before/after
    quality: dict[str, Finite] = {}
    # TensorRT engines only: the GPU and TensorRT version that built it, the source ONNX's sha256
    engine: dict[str, str] = {}


def received_contract(doc: object) -> Contract:
    """The contract of a deployment manifest from the network, held to the wire's rules (JSON types as
    they are, no NaN or infinities: docs/protocol.md); ValueError saying in one line what is wrong."""
    try:
        return Contract.model_validate_json(json.dumps(doc), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "contract"
        raise ValueError(f"invalid contract: {where}: {first['msg']}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def contract_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")


def write_contract(model_path: Path, contract: Contract) -> None:
    contract_path(model_path).write_text(json.dumps(contract.model_dump(mode="json"), indent=2))


def load_contract(model_path: Path) -> Contract:
    """The sidecar of `model_path`, checked against the file's sha256. Raises ContractError."""
    sidecar = contract_path(model_path)
    if not sidecar.is_file():
        raise ContractError(f"{model_path}: no contract sidecar {sidecar.name} next to the model")
    try:
        contract = Contract.model_validate(json.loads(sidecar.read_text()))
    except ValueError as err:
        raise ContractError(f"{sidecar}: invalid contract: {str(err).splitlines()[0]}") from None
    if not model_path.is_file():
        raise ContractError(f"{model_path}: no such model file")
    if file_sha256(model_path) != contract.sha256:
        raise ContractError(f"{model_path}: sha256 does not match its contract (modified or wrong file)")
    return contract
