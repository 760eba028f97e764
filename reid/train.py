"""Local training of a site's model (the paper's recipe) and the cosine-distance weight (CDW).

Recipe: SGD (momentum 0.9, nesterov, weight decay 5e-4), lr 0.05 for the head (embedding block +
classifier) and 0.005 for the backbone, batch 32, incomplete batches dropped, E epochs, plain
cross-entropy. A new optimizer is built for every call (as the original resets it every round).
CUDA runs with mixed precision; both use channels_last (on the CPU 1.3-1.5x faster here).

CDW: the mean over a *fixed* batch of 1 - cos(logits before local training, logits after), computed in
eval mode so that it is deterministic. The original used a random augmented batch in train mode.

`estimate_batchnorm` (AdaBN, Li et al. 2016) sets a model's BatchNorm statistics from a site's images
without training; `adapt_to_site` makes the global model of a federation that keeps BatchNorm layers at
the sites (bn = "local") the model one site scores and serves: its own layers (when it has any) with
their statistics estimated anew under the global weights and shrunk towards those its training kept by
as much as the estimate's own sampling noise explains of the gap between them (`shrinkage_weight`).

`sgd_path_length` / `TrainConfig.path_length`: how far one round of local training moves a site's
weights per unit gradient (FedNova's normaliser, cloud.strategy.aggregate).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader

from reid.data.loading import train_steps
from reid.model import ReIDModel
from reid.tracing import TRACING
from reid.weights import put_site_batchnorm

Progress = Callable[[int, int], None]  # (batches done, batches total)


class DeviceError(ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def check_device_name(name: str) -> str:
    """`name` when it is "auto" or a device torch knows (cpu, cuda, cuda:N, ...); whether this machine has
    it is `resolve_device`'s question (a configuration may be written for another machine)."""
    if name != "auto":
        try:
            torch.device(name)
        except (RuntimeError, ValueError):
            raise DeviceError(f"unknown device {name!r}: auto, cpu, cuda or cuda:N") from None
    return name


DeviceName = Annotated[str, AfterValidator(check_device_name)]


class TrainConfig(BaseModel):
    """Local training settings (defaults: the FedReID paper)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr_head: float = Field(0.05, gt=0)
    lr_backbone: float = Field(0.005, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True
    device: DeviceName = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int | None = None

    def path_length(self, n_images: int) -> float:
        """How far a site of `n_images` moves in one round of this training, in units of lr * gradient
        (`sgd_path_length` over its steps): what FedNova divides its delta by."""
        steps = self.epochs * train_steps(n_images, self.batch_size)
        return sgd_path_length(steps, self.momentum, self.nesterov)


@dataclass
class TrainResult:
    loss: float  # mean loss of the last epoch
    epoch_losses: list[float]
    images: int
    seconds: float
    skipped_images: int
    cdw: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Proximal:
    """A pull of strength `mu` towards `anchor` (parameter name -> tensor; names outside it are free): each
    step adds mu * (w - anchor) to the gradient of every anchored parameter, the gradient of
    mu / 2 * ||w - anchor||^2. Ditto's personal objective (Li et al. 2021), anchored at the round's global
    model."""

    anchor: Mapping[str, torch.Tensor]
    mu: float


def resolve_device(name: str) -> torch.device:
    """The torch device `name` means on this machine; DeviceError when it names none it has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_device_name(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but this machine has no CUDA (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPUs")
    return device


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """`model` on `device` for the block and back on the CPU after it, also after an error (a model
    that lives on the CPU, such as the aggregator's, visiting the GPU for one job)."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def loader_workers(requested: int | None, device: torch.device) -> int:
    """Data loader worker processes: as `requested`, else none on a CPU (they would take its cores from
    training) and up to 8 with CUDA (one process decodes images slower than a GPU trains: 1.78x on an
    H200 with 8, docs/benchmarks.md)."""
    if requested is not None:
        return requested
    return min(8, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0


def uses_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """channels_last where it pays: on the CPU (oneDNN), and on CUDA under mixed precision (tensor cores;
    an H200 trained a ResNet-50 7 % faster so, bench/train_loop.py --device cuda)."""
    return config.channels_last and (device.type == "cpu" or (device.type == "cuda" and config.amp))


def prepare_model(model: ReIDModel, config: TrainConfig) -> torch.device:
    """Move the model to its device and memory format (outside inference mode; see export notes)."""
    device = resolve_device(config.device)
    model.to(device)
    if uses_channels_last(config, device):
        model.to(memory_format=torch.channels_last)
    return device


def make_optimizer(model: ReIDModel, config: TrainConfig) -> torch.optim.SGD:
    head = [*model.embedding.parameters(), *model.classifier.parameters()]
    return torch.optim.SGD(
        [
            {"params": list(model.backbone.parameters()), "lr": config.lr_backbone},
            {"params": head, "lr": config.lr_head},
        ],
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def sgd_path_length(steps: int, momentum: float, nesterov: bool) -> float:
    """How far `steps` SGD steps move the weights along a constant gradient g, in units of lr * g (FedNova's
    ||a||_1, Wang et al. 2020): `steps` without momentum; with momentum the velocity builds up, so a site
    that takes 20 steps moves far more than 10 times one that takes 2. Heavy ball: sum_t (1 - m^t) / (1 - m);
    Nesterov (PyTorch's form, each step g + m * velocity): steps + m * that sum."""
    if steps < 1 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"need steps >= 1 and momentum in [0, 1), got {steps}, {momentum}")
    if momentum == 0.0:
        return float(steps)
    heavy_ball = (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)
    return steps + momentum * heavy_ball if nesterov else heavy_ball


@torch.no_grad()
def estimate_batchnorm(
    model: ReIDModel, loader: DataLoader, device: torch.device | str = "cpu", shrink: bool = False
) -> int:
    """Set every BatchNorm layer's running mean and variance to their average over `loader`'s batches
    under the model's current weights (AdaBN); the affine weights and every other weight stay as they
    are, and so does the model's mode. With `shrink` each layer's estimate is pooled with the statistics
    the layer had, those weighted by `shrinkage_weight` (the estimate's sampling noise over its gap to
    them). Returns the number of images seen (0: nothing changed)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
    model.to(device).train()
    for m in model.modules():  # (after the last BatchNorm; off, it draws nothing from the global state)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    images = 0
    noise = _MeanNoise(layers) if shrink else None
    try:
        for batch in loader:
            if len(batch) >= 2:  # BatchNorm needs two samples
                model.embed(batch.images.to(device))
                images += len(batch)
    except BaseException:  # (an unreadable loader: the statistics are put back as they were)
        images = 0
        raise
    finally:
        if noise is not None:
            noise.close()
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
        for m, (mean, var, tracked) in zip(layers, saved, strict=True):
            if images == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
            elif noise is not None:
                kept = shrinkage_weight(m.running_mean, mean, noise.of(m))
                pooled = pool_statistics((m.running_mean, m.running_var, 1 - kept), (mean, var, kept))
                m.running_mean.copy_(pooled[0])
                m.running_var.copy_(pooled[1])
    return images


class _MeanNoise:
    """The sampling variance, per channel, of the means `estimate_batchnorm` takes: the variance across
    images of each image's own channel mean (its input to the layer, averaged over positions), over the
    number of images. Recorded by hooks on the layers while the estimate runs."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self._sums: dict[nn.Module, list] = {m: [0, 0.0, 0.0] for m in layers}
        self._hooks = [m.register_forward_pre_hook(self._record) for m in layers]

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double()
        per_image = x.flatten(2).mean(2) if x.dim() > 2 else x
        sums = self._sums[layer]
        sums[0] += len(per_image)
        sums[1] = sums[1] + per_image.sum(0)
        sums[2] = sums[2] + (per_image**2).sum(0)

    def of(self, layer: nn.Module) -> torch.Tensor:
        n, total, squares = self._sums[layer]
        between = (squares / n - (total / n) ** 2).clamp(min=0) * n / max(n - 1, 1)
        return between / n

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def shrinkage_weight(estimate: torch.Tensor, kept: torch.Tensor, noise: torch.Tensor) -> float:
    """The weight of `kept` means against `estimate`d ones whose sampling variance is `noise` (per
    channel): the positive-part James-Stein weight, all the noise over the squared gap between the two,
    at most 1. Kept statistics within the estimate's noise are kept; far from it (the weights they were
    taken under moved), the estimate wins."""
    gap = float(((estimate.double() - kept.double()) ** 2).sum())
    total = float(noise.double().sum())
    return 1.0 if gap <= total else total / gap


Statistics = tuple[torch.Tensor, torch.Tensor, float]  # (mean, variance, images or weight)


def pool_statistics(a: Statistics, b: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of the union of two sets of images, from each set's own (or of a mixture
    of the two distributions, with weights in place of the counts)."""
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    n = n_a + n_b
    mean = (n_a * mean_a + n_b * mean_b) / n
    var = (n_a * var_a + n_b * var_b) / n + (n_a * n_b / n**2) * (mean_a - mean_b) ** 2
    return mean, var


def adapt_to_site(
    model: ReIDModel,
    site_bn: Mapping[str, torch.Tensor] | None,
    loader: DataLoader,
    device: torch.device | str = "cpu",
) -> int:
    """Make `model` (the global weights of a federation with bn = "local") the model a site serves: its
    own BatchNorm layers put in (`site_bn`, when it has trained; else the global ones' affine weights
    stay), then their statistics estimated on `loader` (`reid.data.statistics_loader` of its training
    images) under the weights in use and shrunk towards the statistics its layers kept
    (`shrinkage_weight`; a site without layers of its own has none). The kept ones are those of its
    training, under the weights it trained, not the aggregated ones: they stay where the estimate
    cannot tell them from its own noise (a pretrained federation whose weights moved little, a client
    with one batch of images) and give way where the weights moved (a federation trained from scratch).
    Returns the images seen (0: nothing estimated)."""
    if site_bn is not None:
        put_site_batchnorm(model, site_bn)
    return estimate_batchnorm(model, loader, device, shrink=bool(site_bn))


def train_local(
    model: ReIDModel,
    loader: DataLoader,
    config: TrainConfig,
    progress: Progress | None = None,
    cdw_images: torch.Tensor | None = None,
    proximal: Proximal | None = None,
) -> TrainResult:
    """Train `model` in place for `config.epochs` epochs on a loader of `reid.data.Batch` batches.

    With `cdw_images` (a fixed, un-augmented batch) the result also carries the CDW distance between
    the model's logits before and after training; with `proximal`, every step is pulled towards its anchor.
    """
    if config.seed is not None:
        torch.manual_seed(config.seed)
    device = prepare_model(model, config)
    use_amp = config.amp and device.type == "cuda"
    memory_format = torch.channels_last if uses_channels_last(config, device) else torch.contiguous_format
    old_logits = logits_on(model, cdw_images, device) if cdw_images is not None else None

    optimizer = make_optimizer(model, config)
    pulled = [
        (p, proximal.anchor[name].to(device=device, dtype=p.dtype))
        for name, p in model.named_parameters()
        if proximal is not None and name in proximal.anchor
    ]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss()
    total = config.epochs * len(loader)
    done = images = skipped = 0
    epoch_losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for _ in range(config.epochs):
        loss_sum = torch.zeros((), device=device)
        batches = 0
        for batch in loader:
            done += 1
            skipped += batch.skipped
            if len(batch) >= 2:  # BatchNorm needs two samples; a batch emptied by corrupt images is skipped
                x = batch.images.to(device, memory_format=memory_format, non_blocking=True)
                y = batch.labels.to(device, non_blocking=True)
                with TRACING:  # never beside an ONNX export in this process (reid.tracing)
                    with torch.autocast(device.type, enabled=use_amp):
                        loss = criterion(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if pulled:
                        scaler.unscale_(optimizer)  # the pull is added to the true gradient
                        with torch.no_grad():
                            for p, anchor in pulled:
                                if p.grad is not None:
                                    p.grad.add_(p - anchor, alpha=proximal.mu)  # type: ignore[union-attr]
                    scaler.step(optimizer)
                    scaler.update()
                loss_sum += loss.detach()
                batches += 1
                images += len(batch)
            if progress is not None:
                progress(done, total)
        epoch_losses.append(float(loss_sum) / max(batches, 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if images == 0:
        raise ValueError("no training batch: the site has fewer readable images than one batch")
    result = TrainResult(epoch_losses[-1], epoch_losses, images, seconds, skipped)
    if old_logits is not None:
        result.cdw = cosine_distance(old_logits, logits_on(model, cdw_images, device))
    return result


@torch.no_grad()
def logits_on(model: ReIDModel, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Identity logits of `images` in eval mode (deterministic), on CPU."""
    was_training = model.training
    model.eval()
    out = model(images.to(device)).float().cpu()
    model.train(was_training)
    return out


def cosine_distance(old_logits: torch.Tensor, new_logits: torch.Tensor) -> float:
    """The CDW distance: mean over the batch of 1 - cos(old, new), in [0, 2]."""
    if old_logits.shape != new_logits.shape or old_logits.ndim != 2:
        raise ValueError(
            f"logit shapes differ or are not 2-D: {tuple(old_logits.shape)} vs {tuple(new_logits.shape)}"
        )
    cos = nn.functional.cosine_similarity(old_logits.double(), new_logits.double(), dim=1, eps=1e-8)
    return float((1.0 - cos).mean().clamp(0.0, 2.0))
