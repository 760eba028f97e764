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

A site that has no BatchNorm layers of its own yet (it joined after the last round, or only serves) gets
`with_estimated_batchnorm` instead: step 3 sets the statistics from up to `ESTIMATE_IMAGES` of its own
images (AdaBN, `reid.train.estimate_batchnorm`; the affine weights stay the deployed ones), version
``<version>+site-stats``. `keeps_batchnorm` tells whether a file was exported with its layers separate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from export.contract import Contract, ContractError, load_contract
from export.onnx_export import MIN_COSINE, ExportError, FeatureNet, Parity, export_onnx, parity, parity_images
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader
from reid.model import ModelError, ReIDModel, build_model, load_shared_state, shared_state
from reid.train import estimate_batchnorm
from reid.weights import put_site_batchnorm

PREFIX = "model."  # FeatureNet's attribute: the initialisers are named "model." + the state key
VERSION_SUFFIX = "+site-bn"
STATS_SUFFIX = "+site-stats"
ESTIMATE_IMAGES = 512  # images that set the statistics of a site without its own layers (seconds on a CPU)


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
    if check.min_cosine < MIN_COSINE[contract.precision]:
        raise ExportError(
            f"the model rebuilt from {deployed.name} differs from it (min cosine {check.min_cosine:.6f})"
        )
    return contract, spec, batch, model


def with_site_batchnorm(
    deployed: Path, site_bn: Mapping[str, torch.Tensor], images: Sequence[Path], out: Path
) -> tuple[Contract, Parity]:
    """Export the model of `deployed` with the BatchNorm layers `site_bn` to `out` (parity-gated)."""
    contract, spec, batch, model = _rebuilt(deployed, images)
    try:
        put_site_batchnorm(model, site_bn)
    except ModelError as err:
        raise ExportError(str(err)) from None
    return export_onnx(
        model, spec, out, batch, version=contract.version + VERSION_SUFFIX, precision=contract.precision
    )


def with_estimated_batchnorm(
    deployed: Path, images: Sequence[Path], out: Path
) -> tuple[Contract, Parity, int]:
    """Export the model of `deployed` with BatchNorm statistics estimated on (up to `ESTIMATE_IMAGES` of)
    `images` to `out` (parity-gated); also returns the number of images that set them."""
    contract, spec, batch, model = _rebuilt(deployed, images)
    dataset = ImageDataset(list(images)[:ESTIMATE_IMAGES], eval_transform(spec))
    loader = make_loader(dataset, 32, train=True, seed=0)  # equal batches, each counting the same
    seen = estimate_batchnorm(model, loader)
    if seen == 0:
        raise ExportError("no readable image to estimate the BatchNorm statistics on")
    contract, check = export_onnx(
        model, spec, out, batch, version=contract.version + STATS_SUFFIX, precision=contract.precision
    )
    return contract, check, seen
