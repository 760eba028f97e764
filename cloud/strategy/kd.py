"""Server-side knowledge distillation (KD) on a public unlabeled image set.

Teachers are the round's received site models; each teacher's 512-d embeddings of the public set are
computed once, when its update arrives, and folded into a running mean (N_public x 512), so the server
never holds K models. The target is the mean over teachers of the (optionally L2-normalised, the
original's ``--regularization``) embeddings. The student is the aggregated global model, trained with
MSE to the target for `epochs` at `lr` (SGD, momentum 0.9, nesterov, weight decay 5e-4), within an
optional batch/time budget so that KD can never stall a round.

Differences from the original (docs/algorithms.md): teachers run in eval mode on un-augmented images
(deterministic targets; the original used train mode with dropout and augmentation), the student sees
the same un-augmented images that the targets were computed on, and the student's BatchNorm layers use
and keep their running statistics (the original let the public set overwrite them, shifting the global
model's statistics towards the public domain). Dropout stays on in the student, as in the original.
Under bn=local the global model has no statistics of its own (sites keep their BatchNorm layers; the
global copy keeps its initial ones), so the student's statistics are first estimated on the public set
(`statistics=True`): with its initial ones, a student trained from scratch embeds the public set at
thousands of times the teachers' scale and the distillation diverges. KD stops with `KDDiverged`, and
the caller keeps the aggregated model from before KD, when a batch's loss is not finite or is more than
`DIVERGED_LOSS_RATIO` times the first batch's, or when the student's weights or its eval-mode embeddings
of the last batch are not finite (weights can stay finite while the embeddings overflow: a MobileNet
student at the default lr went from MSE 28 to 1.5e7 in one step, and every site's CDW of the next round
was NaN).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader

from reid.model import ReIDModel
from reid.tracing import TRACING
from reid.train import estimate_batchnorm

log = logging.getLogger(__name__)


class KDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(1, ge=1, description="run KD every N rounds (the original: 10)")
    epochs: int = Field(1, ge=1, description="passes over the public set per KD run")
    lr: float = Field(5e-4, gt=0, description="KD learning rate (SGD)")
    momentum: float = Field(0.9, ge=0, lt=1, description="KD SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="KD weight decay")
    normalize: bool = Field(True, description="L2-normalise each teacher's embeddings (--regularization)")
    batch_size: int = Field(32, ge=2, description="KD batch size")
    max_batches: int | None = Field(None, ge=1, description="stop KD after this many batches")
    max_seconds: float | None = Field(None, gt=0, description="stop KD after this much wall time")

    def due(self, r: int) -> bool:
        """Whether KD runs after training round `r` (0-based): after every `every`-th round."""
        return (r + 1) % self.every == 0


def kd_target(teacher_embeddings: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """The KD target: mean over teachers of their (N x D) embeddings, each L2-normalised per sample."""
    acc = TeacherMean(normalize)
    for emb in teacher_embeddings:
        acc.add(emb)
    return acc.target()


class TeacherMean:
    """Running mean of teacher embeddings, per public image: O(N x D) memory whatever the number of
    teachers. A row that is not finite (a corrupt public image, or a model that is not finite on it) is
    left out of that image's mean; an image no teacher covers gets a NaN target, which KD skips."""

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self.total: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # per image: teachers whose row was finite
        self.count = 0  # teachers added (with at least one finite row)

    def add(self, embeddings: torch.Tensor) -> int:
        """Add one teacher's (N x D) embeddings; returns its finite rows (0: nothing was added)."""
        if embeddings.ndim != 2:
            raise ValueError(f"teacher embeddings must be (N, D), got {tuple(embeddings.shape)}")
        if self.total is not None and embeddings.shape != self.total.shape:
            raise ValueError(f"teacher embeddings {tuple(embeddings.shape)} != {tuple(self.total.shape)}")
        e = embeddings.double()
        finite = torch.isfinite(e).all(dim=1)
        rows = int(finite.sum())
        if rows == 0:
            return 0
        if self.normalize:
            e = torch.nn.functional.normalize(e, dim=1)
        e = torch.where(finite[:, None], e, torch.zeros((), dtype=e.dtype))
        self.total = e if self.total is None else self.total + e
        self.counts = finite.double() if self.counts is None else self.counts + finite.double()
        self.count += 1
        return rows

    def target(self) -> torch.Tensor:
        if self.total is None or self.counts is None:
            raise ValueError("no teacher embeddings")
        return (self.total / self.counts[:, None]).float()  # (0 / 0: NaN where no teacher was finite)


@torch.no_grad()
def embed_public(
    model: ReIDModel, loader: DataLoader, size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Raw 512-d embeddings of the public set in eval mode, rows in dataset order (NaN: corrupt image)."""
    was_training = model.training
    model.eval()
    out = torch.full((size, model.spec.embed_dim), float("nan"))
    for batch in loader:
        if len(batch):
            out[batch.indices] = model.embed(batch.images.to(device)).float().cpu()
    model.train(was_training)
    return out


#: A healthy KD run lowers its loss; a diverging one multiplies it within a few batches.
DIVERGED_LOSS_RATIO = 10.0


class KDDiverged(RuntimeError):
    """KD's loss grew out of bounds or the student stopped being finite: keep the model from before KD.
    `seconds`: the time KD ran before it was stopped."""

    def __init__(self, why: str, seconds: float) -> None:
        super().__init__(why)
        self.seconds = seconds


@dataclass
class KDResult:
    loss_first: float
    loss_last: float
    batches: int
    seconds: float
    stopped_by_budget: bool


def distill(
    student: ReIDModel,
    loader: DataLoader,
    target: torch.Tensor,
    config: KDConfig,
    device: torch.device | str = "cpu",
    statistics: bool = False,
) -> KDResult:
    """Train the student's shared part to the target embeddings (MSE). Rows with NaN targets are skipped.
    With `statistics` (bn=local), the student's BatchNorm statistics are estimated on `loader` first."""
    device = torch.device(device)
    if statistics:
        estimate_batchnorm(student, loader, device)
    params = [*student.backbone.parameters(), *student.embedding.parameters()]
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    valid = torch.isfinite(target).all(dim=1)
    student.train()
    for module in student.modules():  # BN uses (and keeps) its running statistics, like the teachers did
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    losses: list[float] = []
    start = time.perf_counter()
    stopped = False
    for _ in range(config.epochs):
        for batch in loader:
            keep = valid[batch.indices]
            if int(keep.sum()) < 2:
                continue
            x = batch.images[keep].to(device)
            y = target[batch.indices[keep]].to(device)
            with TRACING:  # never beside an ONNX export in this process (reid.tracing)
                loss = torch.nn.functional.mse_loss(student.embed(x), y)
                value = float(loss.detach())
                if not torch.isfinite(loss) or (losses and value > DIVERGED_LOSS_RATIO * losses[0]):
                    first = f" (first batch: {losses[0]:.4g})" if losses else ""
                    why = f"KD loss is {value:.4g} at batch {len(losses) + 1}{first}"
                    raise KDDiverged(why, time.perf_counter() - start)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(value)
            over_batches = config.max_batches is not None and len(losses) >= config.max_batches
            over_time = config.max_seconds is not None and time.perf_counter() - start >= config.max_seconds
            if over_batches or over_time:
                stopped = True
                break
        if stopped:
            log.info("KD stopped by its budget after %d batches", len(losses))
            break
    if not losses:
        raise ValueError("no public image could be used for KD")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        why = f"the student's weights are not finite after {len(losses)} KD batches"
        raise KDDiverged(why, time.perf_counter() - start)
    student.eval()
    with torch.no_grad():
        finite = bool(torch.isfinite(student.embed(x)).all())
    student.train()
    if not finite:
        why = f"the student's embeddings are not finite after {len(losses)} KD batches"
        raise KDDiverged(why, time.perf_counter() - start)
    return KDResult(losses[0], losses[-1], len(losses), time.perf_counter() - start, stopped)


def kd_summary(outcome: KDResult | KDDiverged) -> dict[str, float | str]:
    """The round summary's `kd` entry (serve and simulate alike; its `seconds` feed fedreid_kd_seconds)."""
    if isinstance(outcome, KDDiverged):
        return {"diverged": str(outcome), "seconds": round(outcome.seconds, 3)}
    return {
        "batches": outcome.batches,
        "mse_first": round(outcome.loss_first, 6),
        "mse_last": round(outcome.loss_last, 6),
        "seconds": round(outcome.seconds, 3),
    }
