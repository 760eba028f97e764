"""The FedReID network: a torchvision backbone, the shared 512-d embedding block and a local classifier.

The model is split in two parts that travel differently:

* the **shared state** (backbone + embedding block, parameters *and* BatchNorm buffers) is what sites
  send to the aggregator and what the aggregator averages;
* the **local state** (the identity classifier) never leaves its site.

`shared_state`, `local_state`, `load_shared_state` and `load_local_state` are the one place where that
split is defined. Pretrained backbone weights come from a local torchvision-format file only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from reid.model_spec import ModelSpec

SHARED_PREFIXES = ("backbone.", "embedding.")
LOCAL_PREFIX = "classifier."
BN_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


class ModelError(ValueError):
    """A state or weight file does not fit the model it is loaded into."""


class Backbone(nn.Module):
    """Convolutional trunk + global average pooling -> (N, out_dim)."""

    def __init__(self, trunk: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.trunk(x)), 1)


class EmbeddingBlock(nn.Module):
    """Linear(in -> 512) -> BatchNorm1d -> Dropout, initialised as the paper's ClassBlock."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_normal_(self.linear.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.bn.weight, 1.0, 0.02)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.bn(self.linear(x)))


class ReIDModel(nn.Module):
    """backbone -> embedding (512-d, shared) -> classifier (C identities, local to a site)."""

    def __init__(self, spec: ModelSpec, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.embedding = EmbeddingBlock(backbone.out_dim, spec.embed_dim, spec.dropout)
        self.classifier = new_classifier(spec.embed_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d embedding used for retrieval, KD and export (not normalised)."""
        return self.embedding(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity logits (N, C)."""
        return self.classifier(self.embed(x))


def new_classifier(embed_dim: int, num_classes: int) -> nn.Linear:
    """A fresh local classifier with the paper's init: weight ~ N(0, 0.001), bias 0."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    layer = nn.Linear(embed_dim, num_classes)
    nn.init.normal_(layer.weight, std=0.001)
    nn.init.zeros_(layer.bias)
    return layer


def _resnet(arch: str, last_stride: int) -> tuple[nn.Module, nn.Module, int]:
    net = getattr(tvm, arch)(weights=None)
    if last_stride == 1:
        block = net.layer4[0]
        strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
        strided.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return net, trunk, net.fc.in_features


def _mobilenet(arch: str, last_stride: int) -> tuple[nn.Module, nn.Module, int]:
    net = getattr(tvm, arch)(weights=None)
    if last_stride == 1:
        last_strided = [m for m in net.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)][
            -1
        ]
        last_strided.stride = (1, 1)
    return net, net.features, net.classifier[0].in_features


def _torchvision_to_trunk_keys(arch: str) -> dict[str, str]:
    """Map torchvision (and FedReID model file) state-dict key prefixes onto our `trunk.` naming."""
    ours = {"backbone.trunk.": ""}  # a FedReID model file
    if arch.startswith("resnet"):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return {**ours, **{f"{name}.": f"{i}." for i, name in enumerate(names)}}
    return {**ours, "features.": ""}


def load_pretrained_backbone(backbone: Backbone, arch: str, path: str | Path) -> None:
    """Load the trunk from a local file: torchvision-format ImageNet weights (.pth/.pt or .safetensors) or
    a FedReID model file (`reid.weights`; also a folder holding one, e.g. a pretraining run's output).

    The torchvision classification head (`fc.*` / `classifier.*`) is ignored. Every trunk tensor must be
    present with the right shape, otherwise a `ModelError` names what is wrong.
    """
    from reid.weights import find_model  # (reid.weights builds models: imported here, not at the top)

    path = Path(path)
    if not path.exists():
        raise ModelError(f"pretrained weights not found: {path} (weights are never downloaded)")
    path = find_model(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
            if "model" in header:  # a FedReID model file: its architecture is in its header
                built = ModelSpec.model_validate_json(header["model"]).arch
                if built != arch:
                    raise ModelError(
                        f"{path} is a {built} model file; this model is a {arch}: use --arch {built}"
                    )
        else:  # tensors only: a file that needs unpickling arbitrary objects is refused
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
    except ModelError:
        raise
    except Exception as err:  # safetensors' and pickle's own error types, a truncated file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(
            f"{path}: not a readable weights file (torchvision .pth/.safetensors state dict, or a FedReID "
            f"model file): {type(err).__name__}{': ' + first[:200] if first else ''}"
        ) from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    mapping = _torchvision_to_trunk_keys(arch)
    trunk_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for src, dst in mapping.items():
            if key.startswith(src):
                trunk_state[dst + key[len(src) :]] = value
                break
    expected = backbone.trunk.state_dict()
    _check_state(expected, trunk_state, f"{path}: {arch} torchvision weights")
    backbone.trunk.load_state_dict({k: trunk_state[k] for k in expected}, strict=True)


def build_model(
    spec: ModelSpec | None = None, num_classes: int = 1, pretrained: str | Path | None = None
) -> ReIDModel:
    """Build the ReID network. `pretrained` is a local torchvision weight file; nothing is downloaded."""
    spec = spec or ModelSpec()
    factory = _resnet if spec.arch.startswith("resnet") else _mobilenet
    _, trunk, out_dim = factory(spec.arch, spec.last_stride)
    backbone = Backbone(trunk, out_dim)
    if pretrained is not None:
        load_pretrained_backbone(backbone, spec.arch, pretrained)
    return ReIDModel(spec, backbone, num_classes)


def is_shared_key(key: str) -> bool:
    return key.startswith(SHARED_PREFIXES)


def is_bn_buffer(key: str) -> bool:
    """True for BatchNorm running statistics (the keys a BN aggregation policy acts on)."""
    return key.endswith(BN_BUFFER_SUFFIXES)


def batchnorm_keys(keys: Iterable[str]) -> set[str]:
    """All keys of BatchNorm layers (affine weight/bias and running statistics) among state keys.

    A layer is BatchNorm when it has a ``running_mean`` buffer; found from the names alone, so this works
    on any state dict without the model.
    """
    keys = list(keys)
    layers = {k.removesuffix(".running_mean") for k in keys if k.endswith(".running_mean")}
    return {k for k in keys if k.rsplit(".", 1)[0] in layers}


def shared_state(model: ReIDModel) -> dict[str, torch.Tensor]:
    """Backbone + embedding block, parameters and BN buffers, detached copies on CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if is_shared_key(k)}


def local_state(model: ReIDModel) -> dict[str, torch.Tensor]:
    """The identity classifier: stays at the site."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in model.state_dict().items()
        if k.startswith(LOCAL_PREFIX)
    }


def _check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{what} does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ModelError(
                f"{what}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            # (a model of NaN scored rank-1 0.0, trained at loss nan and was written again, all "fine")
            raise ModelError(f"{what}: {key} holds NaN or infinite values")


def load_shared_state(model: ReIDModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load a shared state exactly (all keys, right shapes); the classifier is left untouched."""
    expected = {k: v for k, v in model.state_dict().items() if is_shared_key(k)}
    _check_state(expected, state, "shared state")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def load_local_state(model: ReIDModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load a site's classifier; the number of identities must match."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(LOCAL_PREFIX)}
    _check_state(expected, state, "local state")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
