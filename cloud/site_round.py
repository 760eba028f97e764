"""One simulated site's work in one round, as a pure function of its inputs: what an executor runs.

A `SiteJob` carries everything that decides the result (round, the site's index for the seeds, its
folder, its classifier and private state, the rounds it took part in so far); `SiteWorker.train` loads
the round's global state next to the site's own state, trains, computes the CDW distance, evaluates
when asked, privatises and wire-encodes the delta when configured, embeds the public set for KD, and
returns a `SiteResult` with the update and the site's new private state. `SiteWorker.evaluate` scores a
model on the site's query/gallery. Nothing here knows whether it runs in the simulator's process or in
a Ray worker on another node (`cloud.executors`); every random draw is seeded by (seed, round, site).

A failure of the site's own work (a missing folder, unreadable images) becomes `SiteResult.error`, one
line naming the site and the node, so that the round can close with the other sites.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cloud.strategy import Update, embed_public
from cloud.strategy.aggregate import bn_policy_keys
from protocol.codec import decode_state, encode_state
from reid.data import ImageDataset, eval_transform, make_loader, read_image_folder
from reid.evaluate import Embedded
from reid.logs import log_context
from reid.model import (
    ReIDModel,
    build_model,
    is_shared_key,
    load_local_state,
    load_shared_state,
    local_state,
    new_classifier,
    shared_state,
)
from reid.privacy import PrivacyLedger
from reid.site import SiteData
from reid.site_delta import site_delta
from reid.train import Proximal, adapt_to_site, prepare_model, resolve_device, train_local

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def site_seed(seed: int, round_: int, site: int) -> int:
    """The seed of every draw of site `site` (its index in the run) in round `round_` (-1: its init)."""
    return (seed * 1_000_003 + round_ * 1009 + site) % (2**31)


def private_keys(config, keys: list[str]) -> set[str]:
    """Shared-state keys that stay at the site: all of them for ``local``, BN layers under bn=local."""
    if config.algorithm == "local":
        return set(keys)
    return bn_policy_keys(keys, "local") if config.effective_strategy().bn == "local" else set()


@dataclass
class SiteJob:
    """One site's part of a round (train: a local update; otherwise: evaluate the given global state)."""

    index: int
    name: str
    path: str  # the site's folder, the same path on every node that may run it
    round: int
    classifier: State = field(default_factory=dict)  # empty: the site's first round, a seeded new one
    private: State = field(default_factory=dict)
    evaluate: bool = False  # after training: score the site's own model (before upload)
    teacher: bool = False  # after training: embed the public set for KD
    taken: int = 0  # rounds the site took part in so far, this one included (the DP accountant)
    base: str = "global"  # which of the round's models the job starts from (a group's, when clustered)
    # per-camera scoring (cloud.camera_scoring): embed only these cameras' query/gallery crops and return
    # them, not metrics; None: score the whole query/gallery
    cameras: tuple[int, ...] | None = None
    personal: State = field(default_factory=dict)  # Ditto: the site's personal model; empty until its first


@dataclass
class SiteResult:
    name: str
    node: str
    update: Update | None = None
    loss: float | None = None
    train_seconds: float | None = None
    classifier: State = field(default_factory=dict)
    private: State = field(default_factory=dict)
    personal: State = field(default_factory=dict)
    metrics: dict[str, float] | None = None  # the site's own model (train jobs) or the global one
    embedded: Embedded | None = None  # instead of metrics, for a job with `cameras`
    teacher: torch.Tensor | None = None
    wire_bytes: int | None = None
    dp_epsilon: float | None = None
    error: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensors this result carries back to the driver."""
        tensors = [*self.classifier.values(), *self.private.values(), *self.personal.values()]
        if self.update is not None:
            tensors += list(self.update.delta.values())
        if self.teacher is not None:
            tensors.append(self.teacher)
        embedded = self.embedded.nbytes if self.embedded is not None else 0
        return embedded + sum(t.numel() * t.element_size() for t in tensors)


class SiteWorker:
    """Runs site jobs of one simulation; keeps its model and the sites' parsed folders between jobs."""

    def __init__(self, config, public_dir: str | None = None, model: ReIDModel | None = None) -> None:
        self.cfg = config
        self.device = resolve_device(config.train.device)
        self.train_cfg = config.train.model_copy(update={"epochs": config.local_epochs})
        self.model = model if model is not None else build_model(config.model, 1)
        self.public_dir = public_dir
        self.public: ImageDataset | None = None
        self.data: dict[str, SiteData] = {}
        self.node = socket.gethostname()

    def _site(self, job: SiteJob) -> SiteData:
        data = self.data.get(job.path)
        if data is None:
            if not Path(job.path).is_dir():
                raise FileNotFoundError(f"site folder {job.path} not found on node {self.node}")
            cfg = self.cfg
            data = SiteData(job.path, cfg.input, cfg.train.batch_size, cfg.train.num_workers)
            self.data[job.path] = data
        data.seed = site_seed(self.cfg.seed, job.round, job.index)
        return data

    def _load(self, job: SiteJob, data: SiteData, state: State) -> None:
        if not job.classifier:  # the site's first round: its classifier's init is seeded by the site
            torch.manual_seed(site_seed(self.cfg.seed, -1, job.index))
        classifier = new_classifier(self.cfg.model.embed_dim, data.num_classes)
        if job.classifier:
            classifier.load_state_dict(job.classifier)
        self.model.classifier = classifier
        load_shared_state(self.model, {**state, **job.private})
        prepare_model(self.model, self.train_cfg)  # one memory format for every job: the same floats

    def train(self, job: SiteJob, state: State) -> SiteResult:
        """Train the site on `state` (the round's global shared state) and return its update."""
        with log_context(site=job.name, round=job.round):
            try:
                return self._train(job, state)
            except Exception as err:  # the site's failure, not the run's: the round goes on without it
                return self._failed(job, err)

    def evaluate(self, job: SiteJob, state: State) -> SiteResult:
        """Score `state` on the site's query/gallery as the site serves it: with its private layers, and
        under bn=local (with ``refresh_bn_stats``, the default) their statistics estimated anew under
        these weights first (`reid.train.adapt_to_site`, as a real site's deployments)."""
        with log_context(site=job.name, round=job.round):
            try:
                data = self._site(job)
                self._load(job, data, state)
                if self.cfg.refresh_bn_stats and self.cfg.effective_strategy().bn == "local":
                    adapt_to_site(self.model, job.private or None, data.statistics_loader(), self.device)
                return self._scored(job, data, SiteResult(job.name, self.node))
            except Exception as err:
                return self._failed(job, err)

    def _scored(self, job: SiteJob, data: SiteData, out: SiteResult) -> SiteResult:
        """`out` with the model's score on the site's query/gallery, or its cameras' crops embedded."""
        if job.cameras is None:
            out.metrics = data.evaluate(self.model, self.device).summary()
        else:
            out.embedded = data.embed(self.model, self.device, cameras=job.cameras)
        return out

    def _failed(self, job: SiteJob, err: Exception) -> SiteResult:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        log.warning("site %s failed on node %s: %s", job.name, self.node, reason)
        return SiteResult(job.name, self.node, error=reason)

    def _train(self, job: SiteJob, state: State) -> SiteResult:
        cfg = self.cfg
        data = self._site(job)
        self._load(job, data, state)
        seed = site_seed(cfg.seed, job.round, job.index)
        torch.manual_seed(seed)
        result = train_local(self.model, data.train_loader(), self.train_cfg, cdw_images=data.cdw_images())
        trained = shared_state(self.model)
        out = SiteResult(
            job.name,
            self.node,
            loss=result.loss,
            train_seconds=result.seconds,
            classifier={k: v.detach().cpu().clone() for k, v in self.model.classifier.state_dict().items()},
            private={k: trained[k] for k in private_keys(cfg, list(trained))},
        )
        if cfg.algorithm != "local":
            # as at a real site: its BatchNorm layers stay there under bn=local
            delta, _ = site_delta(trained, state, cfg.effective_strategy().bn == "local", cfg.dp, seed)
            if cfg.dp.enabled:  # one mechanism per round the site took part in so far
                out.dp_epsilon = PrivacyLedger(cfg.dp, job.taken).epsilon()
            if cfg.wire != "none":  # exactly what the networked aggregator would decode
                blob = encode_state(
                    {k: v.numpy() for k, v in delta.items()},
                    cfg.wire.split("+")[0],
                    compress=cfg.wire.endswith("+zstd"),
                )
                out.wire_bytes = len(blob)
                delta = {k: torch.from_numpy(v) for k, v in decode_state(blob).items()}
            n = data.num_train_images
            out.update = Update(job.name, delta, n, result.cdw, steps=self.train_cfg.path_length(n))
        if job.teacher:
            public = self._public()
            loader = make_loader(public, cfg.kd.batch_size * 2, train=False)
            out.teacher = embed_public(self.model, loader, len(public), self.device)
        if cfg.ditto is not None:
            out.personal = self._train_personal(job, data, state, seed)
        if job.evaluate:  # the site's own model: the one it trained, or its personal one
            self._scored(job, data, out)
        return out

    def _train_personal(self, job: SiteJob, data: SiteData, state: State, seed: int) -> State:
        """Ditto: the site's personal model (its own backbone and classifier; the global model and the
        site's classifier of its first round to begin with) trained on its images, pulled towards this
        round's global model as the site holds it (its private layers in). Returns the personal model."""
        if job.personal:
            load_shared_state(self.model, {k: v for k, v in job.personal.items() if is_shared_key(k)})
            load_local_state(self.model, {k: v for k, v in job.personal.items() if not is_shared_key(k)})
        else:
            self._load(job, data, state)
        torch.manual_seed(seed)
        anchor = Proximal({**state, **job.private}, self.cfg.ditto)
        train_local(self.model, data.train_loader(), self.train_cfg, proximal=anchor)
        return {**shared_state(self.model), **local_state(self.model)}

    def _public(self) -> ImageDataset:
        if self.public is None:
            if self.public_dir is None or not Path(self.public_dir).is_dir():
                raise FileNotFoundError(f"public folder {self.public_dir} not found on node {self.node}")
            self.public = ImageDataset(read_image_folder(self.public_dir), eval_transform(self.cfg.input))
        return self.public
