"""Model checkpoints as safetensors files: the tensors plus the ModelSpec and InputSpec in the metadata.

A checkpoint holds the shared state and, for a site's own model, the local classifier. Loading never
unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from reid.data import InputSpec
from reid.model import (
    LOCAL_PREFIX,
    ModelError,
    ModelSpec,
    ReIDModel,
    build_model,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)

FORMAT = "fedreid-checkpoint/1"


@dataclass
class Checkpoint:
    model: ReIDModel
    input_spec: InputSpec
    has_classifier: bool
    meta: dict[str, str] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model: ReIDModel,
    input_spec: InputSpec,
    include_classifier: bool = True,
    meta: dict[str, str] | None = None,
) -> Path:
    """Write atomically (temporary file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = shared_state(model)
    if include_classifier:
        tensors.update(local_state(model))
    header = {
        "format": FORMAT,
        "model": model.spec.model_dump_json(),
        "input": input_spec.model_dump_json(),
        "num_classes": str(model.num_classes if include_classifier else 0),
        **(meta or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, num_classes: int | None = None) -> Checkpoint:
    """Rebuild the model described by a checkpoint and load its weights.

    Without a classifier in the file, a fresh one with `num_classes` (default 1) is attached.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if header.get("format") != FORMAT:
        raise ModelError(f"{path}: not a FedReID checkpoint (format {header.get('format')!r})")
    spec = ModelSpec.model_validate_json(header["model"])
    input_spec = InputSpec.model_validate_json(header["input"])
    stored_classes = int(header.get("num_classes", "0"))
    has_classifier = stored_classes > 0
    model = build_model(spec, stored_classes if has_classifier else (num_classes or 1))
    load_shared_state(model, {k: v for k, v in tensors.items() if not k.startswith(LOCAL_PREFIX)})
    if has_classifier:
        load_local_state(model, {k: v for k, v in tensors.items() if k.startswith(LOCAL_PREFIX)})
    extra = {k: v for k, v in header.items() if k not in {"format", "model", "input", "num_classes"}}
    return Checkpoint(model, input_spec, has_classifier, extra)
