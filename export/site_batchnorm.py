"""A deployed model with this site's own BatchNorm layers, for federations that keep them local.

Under ``strategy.bn = "local"`` (FedBN, the default) every site trains with its own BatchNorm layers and
never sends them; the global model keeps its initial or pretrained ones, which fit no site in
particular. A site that served the aggregator's export as it is would serve a model it never trained
with. So the aggregator exports such a federation's deployments with the BatchNorm layers separate
(`export_onnx(keep_batchnorm=True)`), and `with_site_batchnorm`, at the site:

1. rebuilds the PyTorch model from the file's initialisers (named after its state keys),
2. checks the rebuild against the file with the parity gate (so it *is* the deployed model),
3. loads the site's own BatchNorm layers into it (every BatchNorm key, with the right shapes), and
4. exports that with the usual parity gate and contract (BatchNorm folded), version ``<version>+site-bn``.

Any failure raises ExportError, and the caller serves the deployed file as it is. Step 3 is
`reid.weights.put_site_batchnorm`, which `export --site-batchnorm` and `evaluate --site-batchnorm` use too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from export.contract import Contract, ContractError, load_contract
from export.onnx_export import MIN_COSINE, ExportError, FeatureNet, Parity, export_onnx, parity, parity_images
from reid.data import InputSpec
from reid.model import ModelError, ReIDModel, build_model, load_shared_state, shared_state
from reid.weights import put_site_batchnorm

PREFIX = "model."  # FeatureNet's attribute: the initialisers are named "model." + the state key
VERSION_SUFFIX = "+site-bn"


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


def with_site_batchnorm(
    deployed: Path, site_bn: Mapping[str, torch.Tensor], images: Sequence[Path], out: Path
) -> tuple[Contract, Parity]:
    """Export the model of `deployed` with the BatchNorm layers `site_bn` to `out` (parity-gated)."""
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
    if check.min_cosine < MIN_COSINE[contract.precision]:
        raise ExportError(
            f"the model rebuilt from {deployed.name} differs from it (min cosine {check.min_cosine:.6f})"
        )
    try:
        put_site_batchnorm(model, site_bn)
    except ModelError as err:
        raise ExportError(str(err)) from None
    return export_onnx(
        model, spec, out, batch, version=contract.version + VERSION_SUFFIX, precision=contract.precision
    )
