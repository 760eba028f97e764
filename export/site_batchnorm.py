"""A deployed model with this site's own BatchNorm layers, for federations that keep them local.

Under ``strategy.bn = "local"`` (FedBN, the default) every site trains with its own BatchNorm layers and
never sends them; the global model keeps its initial or pretrained ones, which fit no site in
particular. A site that served the aggregator's export as it is would serve a model it never trained
with. So the aggregator exports such a federation's deployments with the BatchNorm layers separate
(`export_onnx(keep_batchnorm=True)`), and `with_site_batchnorm`, at the site:

1. rebuilds the PyTorch model from the file's initialisers (named after its state keys),
2. checks the rebuild against the file with the parity gate (so it *is* the deployed model),
3. puts the site's own BatchNorm layers in (every BatchNorm key, with the right shapes; a site with none
   yet keeps the deployed ones) and estimates their statistics on its training images under the
   deployed weights (`reid.train.adapt_to_site`: what the site also scores), and
4. exports that with the usual parity gate and contract (BatchNorm folded), version ``<version>+site-bn``
   (``<version>+site-stats`` for a site without layers of its own).

Any failure raises ExportError, and the caller serves the deployed file as it is. Step 3 is what
`export --site-batchnorm/--site-data` and `evaluate --site-batchnorm` do too. `keeps_batchnorm` tells
whether a file was exported with its layers separate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from export.contract import Contract, ContractError, load_contract
from export.onnx_export import MIN_COSINE, ExportError, FeatureNet, Parity, export_onnx, parity, parity_images
from reid.data import InputSpec, statistics_loader
from reid.model import ModelError, ReIDModel, build_model, load_shared_state, shared_state
from reid.train import adapt_to_site

PREFIX = "model."  # FeatureNet's attribute: the initialisers are named "model." + the state key
VERSION_SUFFIX = "+site-bn"
STATS_SUFFIX = "+site-stats"


def keeps_batchnorm(path: Path) -> bool:
    """Whether the ONNX file at `path` has BatchNormalization nodes (exported with keep_batchnorm)."""
    return any(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)


def rebuild(path: Path, contract: Contract) -> ReIDModel:
    """The PyTorch model whose weights are the initialisers of `path` (exported with keep_batchnorm)."""
    graph = onnx.load(str(path)).graph
    weights = {i.name.removeprefix(PREFIX): i for i in graph.initializer if i.name.startswith(PREFIX)}
    model = build_model(contract.model, 1).eval()
    state = shared_state(model)
    missing = [k for k in state if k not in weights and not k.endswith(".num_batches_tracked")]
    if missing:
        raise ExportError(
            f"{path.name} has no initialiser for {len(missing)} of the model's weights (e.g. {missing[0]}): "
            "its BatchNorm layers were folded at export"
        )
    rebuilt = {
        k: torch.from_numpy(numpy_helper.to_array(weights[k]).astype("float32")) if k in weights else v
        for k, v in state.items()
    }
    try:
        load_shared_state(model, rebuilt)
    except ModelError as err:
        raise ExportError(f"{path.name} does not fit its contract's model: {err}") from None
    return model


def _rebuilt(deployed: Path, images: Sequence[Path]) -> tuple[Contract, InputSpec, torch.Tensor, ReIDModel]:
    """The deployed file's contract, input, parity batch (from `images`) and rebuilt, checked model."""
    try:
        contract = load_contract(deployed)
    except ContractError as err:
        raise ExportError(str(err)) from None
    if contract.precision == "int8":
        raise ExportError("an int8 model cannot take other BatchNorm layers (deploy fp32 or fp16)")
    spec = InputSpec(height=contract.height, width=contract.width, mean=contract.mean, std=contract.std)
    batch = parity_images(images, spec)
    model = rebuild(deployed, contract)
    check = parity(FeatureNet(model).eval(), deployed, batch)
    if not check.min_cosine >= MIN_COSINE[contract.precision]:  # (NaN fails too)
        raise ExportError(
            f"the model rebuilt from {deployed.name} differs from it (min cosine {check.min_cosine:.6f})"
        )
    return contract, spec, batch, model


def with_site_batchnorm(
    deployed: Path, site_bn: Mapping[str, torch.Tensor] | None, images: Sequence[Path], out: Path
) -> tuple[Contract, Parity, int]:
    """Export the model a site serves from `deployed` to `out` (parity-gated): its own BatchNorm layers
    `site_bn` (None: the deployed ones) with their statistics estimated on its training `images`
    (`reid.train.adapt_to_site`); also returns the number of images that set them."""
    contract, spec, batch, model = _rebuilt(deployed, images)
    try:
        seen = adapt_to_site(model, site_bn, statistics_loader(images, spec))
    except ModelError as err:
        raise ExportError(str(err)) from None
    if seen == 0:
        raise ExportError("no readable image to estimate the BatchNorm statistics on")
    suffix = STATS_SUFFIX if site_bn is None else VERSION_SUFFIX
    contract, check = export_onnx(
        model, spec, out, batch, version=contract.version + suffix, precision=contract.precision
    )
    return contract, check, seen
