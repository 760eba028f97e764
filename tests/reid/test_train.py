"""Local training: the loss falls and retrieval beats chance; CDW distance; corrupt images mid-epoch."""

from __future__ import annotations

import shutil

import pytest
import torch

from reid.data import InputSpec
from reid.data.loading import make_loader, train_steps
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.train import Proximal, TrainConfig, cosine_distance, sgd_path_length, train_local

TINY_INPUT = InputSpec(height=64, width=32)


def test_cosine_distance_bounds():
    a = torch.randn(8, 5)
    assert cosine_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-9)
    assert cosine_distance(a, -a) == pytest.approx(2.0)
    e = torch.eye(4)
    assert cosine_distance(e[:2], e[2:]) == pytest.approx(1.0)
    assert cosine_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-9)  # scale does not matter
    with pytest.raises(ValueError, match="shape"):
        cosine_distance(a, torch.randn(8, 6))


def test_training_lowers_the_loss_and_beats_chance(tiny_federation):
    torch.manual_seed(0)
    site = SiteData(tiny_federation / "sites" / "site00", TINY_INPUT, batch_size=32, seed=0)
    model = build_model(ModelSpec(arch="resnet18"), site.num_classes)
    before = site.evaluate(model)
    config = TrainConfig(epochs=8, lr_head=0.02, lr_backbone=0.02, seed=0)
    result = train_local(model, site.train_loader(), config, cdw_images=site.cdw_images())
    after = site.evaluate(model)
    assert len(result.epoch_losses) == 8
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    chance = 1 / len({r.pid for r in site.splits.query})
    assert after.rank1 >= 2 * chance
    assert after.mAP >= 1.5 * before.mAP
    assert 0.0 < result.cdw <= 2.0
    assert result.images == 8 * (site.num_train_images // 32) * 32
    assert result.images_per_s > 0


def test_cdw_is_deterministic_and_zero_without_change(tiny_federation):
    site = SiteData(tiny_federation / "sites" / "site01", TINY_INPUT, batch_size=16, seed=0)
    batch = site.cdw_images()
    assert torch.equal(batch, site.cdw_images())
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), site.num_classes)
    for module in model.modules():  # freeze BN running statistics: nothing at all changes
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    frozen = TrainConfig(
        epochs=1, lr_head=1e-30, lr_backbone=0.0, momentum=0.0, weight_decay=0.0, nesterov=False
    )
    assert train_local(model, site.train_loader(), frozen, cdw_images=batch).cdw == pytest.approx(
        0.0, abs=1e-6
    )
    config = TrainConfig(epochs=1, lr_head=0.02, lr_backbone=0.02, seed=3)
    distances = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelSpec(arch="resnet18"), site.num_classes)
        distances.append(train_local(model, site.train_loader(), config, cdw_images=batch).cdw)
    assert distances[0] == distances[1] > 0


def test_corrupt_training_image_is_skipped_not_fatal(tiny_federation, tmp_path, caplog):
    root = tmp_path / "site"
    shutil.copytree(tiny_federation / "sites" / "site02", root)
    victim = sorted((root / "bounding_box_train").glob("*.jpg"))[3]
    victim.write_bytes(b"garbage")
    site = SiteData(root, TINY_INPUT, batch_size=8, seed=0)
    model = build_model(ModelSpec(arch="mobilenet_v3_small"), site.num_classes)
    result = train_local(model, site.train_loader(), TrainConfig(epochs=1))
    assert result.skipped_images == 1
    assert victim.name in caplog.text


def test_estimated_batchnorm_statistics_are_the_images_statistics():
    """AdaBN: each layer's running mean becomes the mean of its input over the images (equal batches),
    its running variance their average batch variance; no weight moves, the mode stays, and a loader
    without a usable batch (or one that fails) leaves the statistics as they were."""
    from torch.utils.data import DataLoader

    from reid.data import Batch
    from reid.train import estimate_batchnorm

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), 3).eval()
    images = torch.rand(48, 3, 64, 32) * 2 + 0.5
    labels = torch.zeros(16, dtype=torch.long)
    batches = [Batch(images[i : i + 16], labels, labels, 0) for i in (0, 16, 32)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn1 = model.backbone.trunk[1]  # after the first convolution
    with torch.no_grad():
        inputs = model.backbone.trunk[0](images)  # what bn1 sees (conv1 is before any BatchNorm)
    assert estimate_batchnorm(model, DataLoader(batches, batch_size=None)) == 48
    assert not model.training
    torch.testing.assert_close(bn1.running_mean, inputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    per_batch = torch.stack([inputs[i : i + 16].var(dim=(0, 2, 3)) for i in (0, 16, 32)]).mean(0)
    torch.testing.assert_close(bn1.running_var, per_batch, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(bn1.running_mean, before["backbone.trunk.1.running_mean"])
    after = model.state_dict()
    for key, value in before.items():  # only running statistics (and their counters) changed
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(after[key], value, msg=key)
    assert model.backbone.trunk[1].momentum == 0.1  # the layers' own momentum is back

    estimated = {k: v.clone() for k, v in model.state_dict().items()}
    single = [Batch(images[:1], labels[:1], labels[:1], 0)]
    assert estimate_batchnorm(model, DataLoader(single, batch_size=None)) == 0

    class Broken:
        def __iter__(self):
            yield batches[0]
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        estimate_batchnorm(model, Broken())  # type: ignore[arg-type]
    for key, value in estimated.items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_site_statistics_are_shrunk_towards_the_kept_ones_by_the_estimates_noise():
    """`pool_statistics` gives the mean and (population) variance of the union of two image sets (or of
    a weighted mixture); `shrinkage_weight` is the positive-part James-Stein weight; with `shrink`,
    `estimate_batchnorm` mixes each layer's estimate with the statistics it had by that weight, the
    estimate's noise measured on each image's own channel means (no usable batch: nothing changes)."""
    from torch.utils.data import DataLoader

    from reid.data import Batch
    from reid.train import adapt_to_site, estimate_batchnorm, pool_statistics, shrinkage_weight
    from reid.weights import batchnorm_keys, put_site_batchnorm, shared_state

    torch.manual_seed(0)
    a, b = torch.randn(30, 5) * 2 + 1, torch.randn(70, 5) * 0.5 - 1
    union = torch.cat([a, b])
    mean, var = pool_statistics(
        (a.mean(0), a.var(0, unbiased=False), 30), (b.mean(0), b.var(0, unbiased=False), 70)
    )
    torch.testing.assert_close(mean, union.mean(0))
    torch.testing.assert_close(var, union.var(0, unbiased=False))
    two = torch.tensor([1.0, 1.0])
    assert shrinkage_weight(torch.tensor([2.0, 2.0]), torch.zeros(2), two) == 0.25  # noise 2, gap 8
    assert shrinkage_weight(torch.tensor([1.0, 0.0]), torch.zeros(2), two) == 1.0  # within the noise

    model = build_model(ModelSpec(arch="resnet18"), 3).eval()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(32, 3, 64, 32) * 2 + 0.5
    labels = torch.zeros(16, dtype=torch.long)
    loader = DataLoader([Batch(images[i : i + 16], labels, labels, 0) for i in (0, 16)], batch_size=None)
    assert estimate_batchnorm(model, loader) == 32
    estimated = {k: v.clone() for k, v in model.state_dict().items()}

    # the first layer's noise, by hand: its input is the first convolution's output
    with torch.no_grad():
        per_image = model.backbone.trunk[0](images).double().mean((2, 3))
    noise = per_image.var(0) / 32
    layer = "backbone.trunk.1"
    for shift in (0.0, 0.3, 30.0):  # the kept means: at the estimate, near it, far from it
        start = {**kept, f"{layer}.running_mean": estimated[f"{layer}.running_mean"] + shift}
        model.load_state_dict(start)
        assert estimate_batchnorm(model, loader, shrink=True) == 32
        weight = shrinkage_weight(estimated[f"{layer}.running_mean"], start[f"{layer}.running_mean"], noise)
        expected = pool_statistics(
            (estimated[f"{layer}.running_mean"], estimated[f"{layer}.running_var"], 1 - weight),
            (start[f"{layer}.running_mean"], start[f"{layer}.running_var"], weight),
        )
        torch.testing.assert_close(model.state_dict()[f"{layer}.running_mean"], expected[0])
        torch.testing.assert_close(model.state_dict()[f"{layer}.running_var"], expected[1])
        assert {0.0: weight == 1.0, 0.3: 0.0 < weight < 1.0, 30.0: weight < 1e-3}[shift], (shift, weight)
    model.load_state_dict(kept)
    single = DataLoader([Batch(images[:1], labels[:1], labels[:1], 0)], batch_size=None)
    assert estimate_batchnorm(model, single, shrink=True) == 0
    for key, value in kept.items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)

    # a site's own layers are shrunk towards; without any, the plain estimate
    state = shared_state(model)
    site_bn = {
        k: state[k] * 1.5 + 0.1 if state[k].is_floating_point() else state[k] for k in batchnorm_keys(state)
    }
    assert adapt_to_site(model, site_bn, loader) == 32
    model_with_own = build_model(ModelSpec(arch="resnet18"), 3).eval()
    model_with_own.load_state_dict(kept)
    put_site_batchnorm(model_with_own, site_bn)
    estimate_batchnorm(model_with_own, loader, shrink=True)
    for key, value in model_with_own.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    model.load_state_dict(kept)
    adapt_to_site(model, None, loader)
    mean = f"{layer}.running_mean"
    torch.testing.assert_close(model.state_dict()[mean], estimated[mean])


def test_site_statistics_are_the_same_wherever_they_are_estimated(tiny_federation):
    """`statistics_loader` augments a site's images as training does and `estimate_batchnorm` seeds those
    draws: two estimates are identical (the agent's score and its deployment agree), they differ from
    the un-augmented crops' statistics, and the caller's random state is left as it was."""
    import copy

    from reid.data import (
        ImageDataset,
        InputSpec,
        eval_transform,
        make_loader,
        read_dataset,
        statistics_loader,
    )
    from reid.train import estimate_batchnorm

    spec = InputSpec(height=64, width=32)
    paths = [r.path for r in read_dataset(sorted((tiny_federation / "sites").iterdir())[0]).train]
    torch.manual_seed(0)
    first = build_model(ModelSpec(arch="resnet18"), 3).eval()
    second, plain = copy.deepcopy(first), copy.deepcopy(first)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert estimate_batchnorm(first, statistics_loader(paths, spec)) == min(512, len(paths)) // 16 * 16
    assert torch.equal(torch.rand(3), expected)  # the caller's draws are not consumed
    estimate_batchnorm(second, statistics_loader(paths, spec))
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
    unaugmented = make_loader(ImageDataset(paths[:512], eval_transform(spec)), 16, train=True, seed=0)
    estimate_batchnorm(plain, unaugmented)
    key = "backbone.trunk.1.running_var"
    assert not torch.allclose(plain.state_dict()[key], first.state_dict()[key], rtol=1e-3)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
def test_sgd_path_length_is_how_far_torch_sgd_moves_along_a_constant_gradient(momentum, nesterov, steps):
    weight = torch.zeros(3, requires_grad=True)
    gradient = torch.tensor([1.0, -2.0, 0.5])
    optimizer = torch.optim.SGD([weight], lr=0.01, momentum=momentum, nesterov=nesterov)
    for _ in range(steps):
        optimizer.zero_grad()
        (weight * gradient).sum().backward()
        optimizer.step()
    moved = -weight.detach() / (0.01 * gradient)
    torch.testing.assert_close(moved, torch.full((3,), sgd_path_length(steps, momentum, nesterov)))


@pytest.mark.parametrize("n,batch,epochs", [(20, 16, 1), (35, 16, 1), (406, 16, 3), (16, 16, 2), (3, 32, 1)])
def test_a_rounds_path_length_counts_the_steps_its_loader_takes(n, batch, epochs):
    loader = make_loader(list(range(n)), batch, train=True)
    assert train_steps(n, batch) == len(loader) == sum(1 for _ in loader.batch_sampler)
    config = TrainConfig(epochs=epochs, batch_size=batch)
    assert config.path_length(n) == sgd_path_length(epochs * len(loader), 0.9, True)
    # the recipe's momentum: a site with 10x the steps moves more than 10x as far
    assert TrainConfig(batch_size=batch).path_length(10 * batch + 1) > 10 * TrainConfig(
        batch_size=batch
    ).path_length(batch)


def test_a_proximal_pull_adds_mu_times_the_distance_to_its_anchor_to_each_step(tiny_federation):
    site = SiteData(tiny_federation / "sites" / "site01", TINY_INPUT, batch_size=16, seed=0)
    one_step = TrainConfig(
        epochs=1, batch_size=site.num_train_images, momentum=0.0, weight_decay=0.0, nesterov=False, seed=3
    )
    torch.manual_seed(0)
    start = build_model(ModelSpec(arch="resnet18"), site.num_classes)
    anchor = {
        k: v + torch.randn_like(v) for k, v in start.named_parameters() if not k.startswith("classifier")
    }
    models = {}
    for mu in (None, 0.5):
        loader = make_loader(site.train_loader().dataset, site.num_train_images, train=True, seed=0)
        model = build_model(ModelSpec(arch="resnet18"), site.num_classes)
        model.load_state_dict(start.state_dict())
        train_local(model, loader, one_step, proximal=None if mu is None else Proximal(anchor, mu))
        models[mu] = dict(model.named_parameters())
    w0 = dict(start.named_parameters())
    first_conv = next(name for name in w0 if name.startswith("backbone."))
    for name, lr in ((first_conv, one_step.lr_backbone), ("embedding.linear.weight", one_step.lr_head)):
        pull = models[0.5][name] - models[None][name]
        assert torch.allclose(pull, -lr * 0.5 * (w0[name] - anchor[name]), atol=1e-6)
    free = "classifier.weight"  # not anchored: the same step with and without the pull
    assert torch.equal(models[0.5][free], models[None][free])
