"""The one model file of FedReID Edge: safetensors with the ModelSpec and InputSpec in the metadata
(``format = fedreid-checkpoint/1``).

Every producer writes it: `edge-agent train` (``<out>/model.safetensors``, with the site's classifier),
`cloud-aggregator simulate` (``<out>/model.safetensors``, the global model after the last round) and
`serve` (``rounds/<r>/global.safetensors`` in its state dir). Every consumer reads it with
`load_checkpoint`, given the file or any of those folders (`find_model`). Loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file

from reid.data import InputSpec
from reid.model import (
    LOCAL_PREFIX,
    ModelError,
    ModelSpec,
    ReIDModel,
    batchnorm_keys,
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

    @property
    def batchnorm_kept_local(self) -> bool:
        """The model of a run with ``bn = "local"``: its BatchNorm layers are no site's."""
        return self.meta.get("bn") == "local"


def _header(spec: ModelSpec, input_spec: InputSpec, num_classes: int, meta: dict[str, str] | None) -> dict:
    return {
        "format": FORMAT,
        "model": spec.model_dump_json(),
        "input": input_spec.model_dump_json(),
        "num_classes": str(num_classes),
        **(meta or {}),
    }


def _write(path: Path, tensors: Mapping[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Atomic (temporary file + rename): a crash never leaves a half-written model. Tensors may be views
    of one buffer (the aggregator's flat global state), hence the numpy writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}, str(tmp), metadata=header
    )
    tmp.replace(path)
    return path


def save_state(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    input_spec: InputSpec,
    meta: dict[str, str] | None = None,
) -> Path:
    """A shared state (no classifier) as a model file, e.g. a global model."""
    return _write(Path(path), state, _header(spec, input_spec, 0, meta))


def save_checkpoint(
    path: str | Path,
    model: ReIDModel,
    input_spec: InputSpec,
    include_classifier: bool = True,
    meta: dict[str, str] | None = None,
) -> Path:
    """A model (shared state, and the local classifier unless told otherwise) as a model file."""
    tensors = shared_state(model)
    if include_classifier:
        tensors.update(local_state(model))
    num_classes = model.num_classes if include_classifier else 0
    return _write(Path(path), tensors, _header(model.spec, input_spec, num_classes, meta))


def round_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, file) of every ``rounds/<r>/global.safetensors`` of a `serve` run, oldest first. Only
    folders named by a round number count: ``rounds/<r>.damaged`` (a checkpoint moved aside) never does."""
    found = []
    for path in (run_dir / "rounds").glob("*/global.safetensors"):
        try:
            found.append((int(path.parent.name), path))
        except ValueError:
            continue
    return sorted(found)


def find_model(path: str | Path) -> Path:
    """The model file a path means: the file itself, or in a folder `model.safetensors` (an `edge-agent
    train` or `simulate` output) or the newest ``rounds/<r>/global.safetensors`` (a `serve` run, also
    one level down: ``<state-dir>/<federation>/``). ModelError names what was looked for."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    for runs in ([path], sorted(p for p in path.iterdir() if p.is_dir())):
        found = [r for r in runs if round_checkpoints(r)]
        if len(found) > 1:
            raise ModelError(f"{path} holds several runs ({', '.join(r.name for r in found)}): name one")
        if found:
            return round_checkpoints(found[0])[-1][1]
    raise ModelError(
        f"{path}: a folder without a model (looked for model.safetensors and rounds/*/global.safetensors)"
    )


def load_checkpoint(path: str | Path, num_classes: int | None = None) -> Checkpoint:
    """Rebuild the model described by a checkpoint and load its weights.

    Without a classifier in the file, a fresh one with `num_classes` (default 1) is attached.
    """
    path = find_model(path)
    if path.suffix in (
        ".onnx",
        ".engine",
        ".plan",
    ):  # (the reverse of `edge-agent extract` given a .safetensors)
        raise ModelError(
            f"{path} is an exported model; this command takes the PyTorch model file it was exported from "
            "(a .safetensors, or the run folder holding it)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if header.get("format") != FORMAT:
        if "completed_rounds" in header:
            raise ModelError(
                f"{path} is the simulator's resume state; its model is {path.with_name('model.safetensors')}"
            )
        raise ModelError(f"{path}: not a FedReID model file (format {header.get('format')!r})")
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


GLOBAL_BATCHNORM_NOTE = (
    "this run kept the BatchNorm layers at the sites, so the global model's own were trained by none of "
    "them; --site-data DIR (with --site-batchnorm FILE) gives the model a site serves"
)


def read_site_batchnorm(path: Path) -> dict[str, torch.Tensor]:
    """A site's BatchNorm layers from a safetensors file (an agent's ``private_bn.safetensors``, or
    simulate's ``batchnorm/<site>.safetensors``)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ModelError(f"{path}: not a readable safetensors file of BatchNorm layers ({err})") from None


def put_site_batchnorm(model: ReIDModel, site_bn: Mapping[str, torch.Tensor]) -> None:
    """Replace every BatchNorm layer of `model` with the site's (all of them, with the model's shapes):
    under ``bn = "local"`` that makes the global model the one the site serves."""
    state = shared_state(model)
    keys = batchnorm_keys(state)
    absent = sorted(keys - set(site_bn))
    if absent:
        raise ModelError(
            f"the site's BatchNorm layers lack {len(absent)} of the model's (e.g. {absent[0]}): "
            "they were trained with another model"
        )
    try:
        load_shared_state(model, {**state, **{k: site_bn[k] for k in keys}})
    except ModelError as err:
        raise ModelError(f"the site's BatchNorm layers do not fit the model: {err}") from None
