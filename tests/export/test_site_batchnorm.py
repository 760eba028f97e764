"""A site serves the deployed model with its own BatchNorm layers (bn=local): the export keeps them
separate, the site rebuilds the model from the file, checks the rebuild, puts its own in, estimates their
statistics on its images under the deployed weights and re-exports."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import ExportError, FeatureNet, export_onnx
from export.runtime import FeatureExtractor
from export.site_batchnorm import with_site_batchnorm
from reid.data import ImageDataset, InputSpec, eval_transform, read_dataset, statistics_loader
from reid.model import ModelSpec, batchnorm_keys, build_model, shared_state
from reid.train import adapt_to_site

SPEC = InputSpec(height=64, width=32)


def _images(paths):
    return torch.stack([ImageDataset(paths, eval_transform(SPEC))[i][0] for i in range(len(paths))])


def _features(model, images) -> np.ndarray:
    with torch.no_grad():
        return FeatureNet(model.eval())(images).numpy()


@pytest.fixture(scope="module")
def federation_models(tiny_federation, tmp_path_factory):
    """A global model exported with its BatchNorm layers separate, and one site's own BatchNorm layers
    (statistics and affine weights of another domain)."""
    sites = sorted((tiny_federation / "sites").iterdir())
    deployed_paths = [r.path for r in read_dataset(sites[0]).gallery][:24]
    site_paths = [r.path for r in read_dataset(sites[2]).train][:32]
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), 5)
    model.train()
    with torch.no_grad():
        model(_images(deployed_paths))
    model.eval()
    out = tmp_path_factory.mktemp("deployed") / "model.onnx"
    export_onnx(model, SPEC, out, _images(deployed_paths), version="fed/round-4", keep_batchnorm=True)
    site = copy.deepcopy(model).train()
    with torch.no_grad():
        site(_images(site_paths) * 1.7 + 0.3)  # the site's own (shifted) statistics
        for key, value in site.state_dict().items():
            if key.endswith("bn1.weight"):
                value.mul_(1.5)
            elif key.endswith("bn1.bias"):  # (a scale alone the next layer's statistics would undo)
                value.add_(0.3)
    site.eval()
    site_bn = {k: v for k, v in shared_state(site).items() if k in batchnorm_keys(shared_state(site))}
    return model, out, site, site_bn, site_paths


def test_the_site_serves_the_shared_weights_with_its_own_batchnorm(federation_models, tmp_path):
    model, deployed, site, site_bn, paths = federation_models
    ops = {n.op_type for n in onnx.load(str(deployed)).graph.node}
    assert "BatchNormalization" in ops  # kept separate in the deployed file
    images = _images(paths)
    # the deployed file as it is computes the global model
    as_deployed = FeatureExtractor(deployed)(paths)
    assert np.sum(_features(model, images) * as_deployed, axis=1).min() >= 0.9999

    out = tmp_path / "model.site-bn.onnx"
    contract, parity, seen = with_site_batchnorm(deployed, site_bn, paths, out)
    assert contract.version == "fed/round-4+site-bn" and contract.precision == "fp32"
    assert parity.min_cosine >= 0.9999 and seen == len(paths) == 32
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    served = FeatureExtractor(out)(paths)
    # exactly the shared weights with the site's affine BatchNorm weights, statistics of its images ...
    want = copy.deepcopy(model)
    assert adapt_to_site(want, site_bn, statistics_loader(paths, SPEC)) == 32
    assert np.sum(_features(want, images) * served, axis=1).min() >= 0.9999
    # ... which is neither the deployed model nor the site's layers with the statistics of its training
    assert np.sum(as_deployed * served, axis=1).mean() < 0.99
    assert np.sum(_features(site, images) * served, axis=1).mean() < 0.99
    # (and its affine weights count: the deployed ones with the same statistics are another model)
    global_affine = copy.deepcopy(model)
    adapt_to_site(global_affine, None, statistics_loader(paths, SPEC))
    assert np.sum(_features(global_affine, images) * served, axis=1).mean() < 0.999


def test_what_cannot_take_the_sites_batchnorm_is_refused(federation_models, exported, tmp_path):
    _, deployed, _, site_bn, paths = federation_models
    out = tmp_path / "out.onnx"
    folded = exported[1]  # exported as usual: BatchNorm folded into the convolutions
    with pytest.raises(ExportError, match="folded at export"):
        with_site_batchnorm(folded, site_bn, paths, out)
    partial = dict(list(site_bn.items())[: len(site_bn) // 2])
    with pytest.raises(ExportError, match="lack"):
        with_site_batchnorm(deployed, partial, paths, out)
    wrong = {k: torch.cat([v, v]) if v.ndim else v for k, v in site_bn.items()}
    with pytest.raises(ExportError, match="do not fit"):
        with_site_batchnorm(deployed, wrong, paths, out)
    with pytest.raises(ExportError, match="no readable image"):
        with_site_batchnorm(deployed, site_bn, [tmp_path / "missing.jpg"], out)
    assert not out.exists()


def test_a_site_without_its_own_layers_serves_the_statistics_of_its_images(
    federation_models, exported, tmp_path
):
    """A site that has not trained yet (no BatchNorm layers of its own) re-exports the deployment with
    statistics estimated on its own images (AdaBN): exactly the deployed weights with those statistics."""
    from export.site_batchnorm import keeps_batchnorm
    from reid.train import estimate_batchnorm

    model, deployed, _, _, paths = federation_models
    assert keeps_batchnorm(deployed) and not keeps_batchnorm(exported[1])
    out = tmp_path / "model.site-stats.onnx"
    contract, parity, seen = with_site_batchnorm(deployed, None, paths, out)
    assert contract.version == "fed/round-4+site-stats" and seen == len(paths) == 32
    assert parity.min_cosine >= 0.9999
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    want = copy.deepcopy(model)
    assert estimate_batchnorm(want, statistics_loader(paths, SPEC)) == 32
    served = FeatureExtractor(out)(paths)
    assert np.sum(_features(want, _images(paths)) * served, axis=1).min() >= 0.9999
    as_deployed = FeatureExtractor(deployed)(paths)  # statistics of another site's images
    assert np.sum(as_deployed * served, axis=1).mean() < 0.99
    with pytest.raises(ExportError, match="folded at export"):
        with_site_batchnorm(exported[1], None, paths, tmp_path / "folded.onnx")
    with pytest.raises(ExportError, match="no readable image"):
        with_site_batchnorm(deployed, None, [tmp_path / "missing.jpg"], tmp_path / "none.onnx")
