"""The in-process simulator: a whole federation in one process, with the same strategy code as the
networked aggregator (only the transport differs).

Algorithms: ``local`` (each site alone), ``fedpav``, ``fednova`` (FedPav with each delta normalised by
its site's local path length, `cloud.strategy.aggregate`), ``cdw`` (FedPav + CDW weights), ``kd`` (FedPav +
server KD), ``cdw_kd`` (both), ``cluster`` (FedPav within groups of sites with similar updates,
`cloud.strategy.clustering`), and ``central`` (pooled training on all sites' data, the upper bound).
Where the sites' jobs run is the executor's business (`cloud.executors`: this process, or Ray).
Every algorithm gets the same compute: ``local_epochs`` x ``rounds`` epochs per site.

Each round writes one JSON line per evaluated (site, model) and one round summary to
``<out>/metrics.jsonl``, then an atomic checkpoint (``<out>/checkpoint.safetensors``: the global
shared state, every site's classifier and private state; the resume state of the run) and the global
model as a model file (``<out>/model.safetensors``, `reid.weights`: what evaluate, export and
--pretrained read; not for ``local``, which has no global model). Under ``bn = "local"`` each site's
BatchNorm layers are written beside it (``<out>/batchnorm/<site>.safetensors``, what ``export
--site-batchnorm`` takes with ``--site-data``: the model that site serves), and each site scores the
global model with them, their statistics estimated on its images (``refresh_bn_stats``, as a real site
scores and serves it: `reid.train.adapt_to_site`). Every random draw is seeded by
(seed, round, site), so a run stopped between rounds and started again gives the identical result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch.utils.data import ConcatDataset

from cloud.camera_scoring import CameraScores, crops_per_client
from cloud.executors import ExecutorConfig, LocalExecutor, RayExecutor, make_executor
from cloud.site_round import SiteJob, private_keys, site_seed
from cloud.strategy import (
    KDConfig,
    KDDiverged,
    NoUpdatesError,
    StrategyConfig,
    StreamingAggregator,
    TeacherMean,
    distill,
    kd_summary,
)
from cloud.strategy.clustering import ClusterConfig, Clustering
from cloud.strategy.selection import sample_sites, sites_per_round
from reid.choices import Algorithm
from reid.data import (
    ImageDataset,
    InputSpec,
    make_loader,
    public_images,
    train_transform,
)
from reid.data.camera_split import client_sites
from reid.files import atomic_write
from reid.logs import log_context
from reid.model import ModelSpec, ReIDModel, build_model, is_shared_key, load_shared_state, shared_state
from reid.privacy import DPConfig
from reid.site import SiteData
from reid.train import TrainConfig, prepare_model, resolve_device, train_local
from reid.weights import save_state

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm = "fedpav"
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    eval_every: int = Field(1, ge=1)
    eval_local: bool | Literal["last"] = Field(
        True,
        description="also evaluate each site's trained model before upload: in every evaluation round, or "
        'only in the last round ("last")',
    )
    refresh_bn_stats: bool = Field(
        True,
        description="under bn=local, score the global model with each site's BatchNorm statistics estimated "
        "anew under the global weights (its affine weights kept; AdaBN), as a site serves it; off: with "
        "those of its training (the stale ones, for the study's comparison)",
    )
    seed: int = 0
    model: ModelSpec = ModelSpec(arch="resnet18")
    input: InputSpec = InputSpec(height=128, width=64)
    train: TrainConfig = TrainConfig(lr_head=0.02, lr_backbone=0.02)
    strategy: StrategyConfig = StrategyConfig()
    kd: KDConfig = KDConfig()
    dp: DPConfig = DPConfig()
    wire: Literal["none", "fp32", "fp16", "int8", "int8+zstd"] = Field(
        "none", description="pass every delta through the wire codec (bytes per site and round are recorded)"
    )
    pretrained: str | None = None
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of the sites sampled per round")
    sites_per_round: int | None = Field(
        None, ge=1, description="sites sampled per round (overrides fraction)"
    )
    quorum: int = Field(
        1, ge=1, description="site results a round needs to close (fewer: the run stops, resumable)"
    )
    cluster: ClusterConfig = ClusterConfig()
    eval_global: bool = Field(
        True,
        description="with clustering: also score the global model once the sites are grouped (off: only each "
        "site's group model, the one it trains from and serves, as the study reads it)",
    )
    ditto: float | None = Field(
        None,
        ge=0,
        description="Ditto personalisation: each site also trains a personal model of its own, pulled "
        "towards each round's global model with this strength (lambda; 0: its own training alone), and is "
        "scored with it as its own model; None: off",
    )

    @model_validator(mode="after")
    def _personal_needs_a_federation(self) -> SimulationConfig:
        if self.ditto is not None and self.algorithm in ("local", "central"):
            raise ValueError(f"ditto personalises a federation's sites, not {self.algorithm!r} training")
        if not self.eval_global and self.algorithm != "cluster":
            raise ValueError(
                f"eval_global off leaves {self.algorithm!r} nothing to score (only clustering has "
                "group models)"
            )
        return self

    def selected(self, names: list[str], round_: int) -> list[str]:
        """The sites that train in `round_`: the networked aggregator's seeded draw."""
        k = sites_per_round(len(names), self.fraction, exactly=self.sites_per_round)
        return names if k == len(names) else sample_sites(names, k, self.seed, round_)

    def effective_strategy(self) -> StrategyConfig:
        """The algorithm decides FedPav vs CDW weights (and ``fednova`` normalised averaging); the rest of
        the strategy is as configured."""
        weighting = self.strategy.weighting
        if self.algorithm in ("cdw", "cdw_kd"):
            weighting = weighting if weighting != "fedpav" else "cdw"
        else:
            weighting = "fedpav"
        fednova = self.strategy.fednova or self.algorithm == "fednova"
        return StrategyConfig.model_validate(
            {**self.strategy.model_dump(), "weighting": weighting, "fednova": fednova}
        )

    @property
    def uses_kd(self) -> bool:
        return self.algorithm in ("kd", "cdw_kd")


@dataclass
class SimSite:
    """What the driver keeps of a site: where its data is, and its state between rounds."""

    index: int
    path: Path
    classifier: dict[str, torch.Tensor] = field(default_factory=dict)  # empty until it first trains
    private: dict[str, torch.Tensor] = field(default_factory=dict)
    personal: dict[str, torch.Tensor] = field(default_factory=dict)  # Ditto's personal model

    @property
    def name(self) -> str:
        return self.path.name

    def job(self, round_: int, **kw) -> SiteJob:
        return SiteJob(
            self.index,
            self.name,
            str(self.path),
            round_,
            self.classifier,
            self.private,
            personal=self.personal,
            **kw,
        )


class RoundFailed(RuntimeError):
    """Fewer sites than the quorum returned an update; the run stops after the previous round."""


def _metric_record(round_: int, site: str, model: str, summary: dict[str, float]) -> dict[str, object]:
    return {"round": round_, "site": site, "model": model, **{k: round(v, 4) for k, v in summary.items()}}


class Simulator:
    """Runs (or resumes) one simulated federation in `out`; `executor` says where the sites run."""

    def __init__(
        self,
        cfg: SimulationConfig,
        site_dirs: list[Path],
        out: Path,
        public_dir: Path | None = None,
        on_round: Callable[[int, list[dict]], None] | None = None,
        executor: ExecutorConfig | None = None,
    ) -> None:
        if not site_dirs:
            raise ValueError("a simulation needs at least one site")
        if cfg.uses_kd and public_dir is None:
            raise ValueError(f"algorithm {cfg.algorithm} needs a public image folder for KD")
        self.cfg = cfg
        self.out = out
        self.on_round = on_round
        self.executor_config = executor or ExecutorConfig()
        self.device = resolve_device(cfg.train.device)
        self.train_cfg = cfg.train.model_copy(update={"epochs": cfg.local_epochs})
        self.strategy = cfg.effective_strategy()
        self.sites = [SimSite(i, Path(d)) for i, d in enumerate(site_dirs)]
        self.site_of = client_sites([s.path for s in self.sites])  # per-camera clients: their sites
        self.crops = crops_per_client([s.path for s in self.sites])  # ... and the cameras each embeds
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        # the driver reads the sites' data only for pooled training; site jobs read it where they run
        self.pooled = (
            [SiteData(d, cfg.input, cfg.train.batch_size, cfg.train.num_workers) for d in site_dirs]
            if cfg.algorithm == "central"
            else []
        )
        torch.manual_seed(cfg.seed)
        self.pooled_labels = self._pooled_labels()
        classes = len(self.pooled_labels) if self.pooled else 1
        self.model: ReIDModel = build_model(cfg.model, classes, cfg.pretrained)
        self.global_state = shared_state(self.model)
        self.public_dir = str(public_dir) if public_dir is not None and cfg.uses_kd else None
        self.public: ImageDataset | None = None
        if self.public_dir is not None:
            self.public = public_images(self.public_dir, cfg.input)
        self.completed = 0
        self.executor: LocalExecutor | RayExecutor | None = None
        self.clustering = (
            Clustering(cfg.cluster, self.strategy, cfg.seed) if cfg.algorithm == "cluster" else None
        )

    # -- state on disk -------------------------------------------------------------------------------
    def _config_json(self, cfg: SimulationConfig | None = None) -> str:
        """The identity of a run: everything but the number of rounds (a run can be extended)."""
        cfg = cfg or self.cfg
        # (refresh_bn_stats changes scoring only, and only under bn=local; left out when it changes
        # nothing or is off, so that the runs from before it resume)
        refreshed = cfg.refresh_bn_stats and cfg.effective_strategy().bn == "local"
        exclude = {"rounds"} if refreshed else {"rounds", "refresh_bn_stats"}
        return cfg.model_dump_json(exclude=exclude)

    def _same_run(self, stored: str | None) -> bool:
        """Whether a checkpoint's configuration is this run's: a setting added since it was written
        counts as its default."""
        try:
            data = json.loads(stored or "")
            if not isinstance(data, dict):
                return False
            data.setdefault("rounds", self.cfg.rounds)
            data.setdefault("refresh_bn_stats", False)  # left out when it changes nothing or is off
            return self._config_json(SimulationConfig.model_validate(data)) == self._config_json()
        except ValueError:  # not JSON, or not a configuration (pydantic's ValidationError)
            return False

    def save(self) -> None:
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        for site in self.sites:
            tensors.update({f"site/{site.name}/classifier/{k}": v for k, v in site.classifier.items()})
            tensors.update({f"site/{site.name}/private/{k}": v for k, v in site.private.items()})
            tensors.update({f"site/{site.name}/personal/{k}": v for k, v in site.personal.items()})
        if self.cfg.algorithm == "central":
            tensors.update({f"central/{k}": v for k, v in self.model.classifier.state_dict().items()})
        meta = {"config": self._config_json(), "completed_rounds": str(self.completed)}
        if self.clustering is not None:
            tensors.update(self.clustering.tensors())
            meta.update(self.clustering.metadata())
        tmp = self.out / (CHECKPOINT + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(self.out / CHECKPOINT)
        if self.cfg.algorithm == "local":
            return
        bn = self.strategy.bn
        model_meta = {"round": str(self.completed), "algorithm": self.cfg.algorithm, "bn": bn}
        save_state(self.out / MODEL, self.global_state, self.cfg.model, self.cfg.input, model_meta)
        for site in self.sites:
            if site.personal:  # Ditto: the model the site serves, a model file of its own
                shared = {k: v for k, v in site.personal.items() if is_shared_key(k)}
                (self.out / "personal").mkdir(exist_ok=True)
                save_state(
                    self.out / "personal" / f"{site.name}.safetensors",
                    shared,
                    self.cfg.model,
                    self.cfg.input,
                    {**model_meta, "site": site.name, "ditto": str(self.cfg.ditto)},
                )
            if bn == "local" and site.private:  # a site not sampled yet has none
                path = self.out / "batchnorm" / f"{site.name}.safetensors"
                path.parent.mkdir(exist_ok=True)
                atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in site.private.items()}))

    def try_resume(self) -> bool:
        """Load the checkpoint in `out` if there is one; refuse one written with another configuration."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if not self._same_run(meta.get("config")):
                raise ValueError(f"{path} was written with another configuration; use a new --out or --fresh")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        self.global_state = part("global/")
        for site in self.sites:
            site.classifier = part(f"site/{site.name}/classifier/")
            site.private = part(f"site/{site.name}/private/")
            site.personal = part(f"site/{site.name}/personal/")
        if self.cfg.algorithm == "central":
            self.model.classifier.load_state_dict(part("central/"))
        if self.clustering is not None:
            self.clustering.restore(tensors, meta)
        self.completed = int(meta["completed_rounds"])
        self._truncate_metrics()
        log.info("resuming after round %d from %s", self.completed, path)
        return True

    def _truncate_metrics(self) -> None:
        """Drop metrics of a round that was running when the previous process stopped."""
        path = self.out / METRICS
        if path.is_file():
            lines = [
                ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["round"] < self.completed
            ]
            path.write_text("".join(ln + "\n" for ln in lines))

    def _write_metrics(self, records: list[dict]) -> None:
        with open(self.out / METRICS, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    # -- rounds ---------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run the remaining rounds; returns all metric records written by this call."""
        self.out.mkdir(parents=True, exist_ok=True)
        written: list[dict] = []
        if self.cfg.algorithm != "central":
            self.executor = make_executor(self.executor_config, self.cfg, self.public_dir, self.model)
        try:
            for r in range(self.completed, self.cfg.rounds):
                with log_context(round=r):
                    start = time.perf_counter()
                    records = self._central_round(r) if self.cfg.algorithm == "central" else self._round(r)
                    records.append(
                        {"round": r, "kind": "timing", "seconds": round(time.perf_counter() - start, 3)}
                    )
                    self._write_metrics(records)
                    self.completed = r + 1
                    self.save()
                    written.extend(records)
                    if self.on_round is not None:
                        self.on_round(r, records)
        finally:
            if self.executor is not None:
                self.executor.close()
                self.executor = None
        return written

    def _eval_round(self, r: int) -> bool:
        return (r + 1) % self.cfg.eval_every == 0 or r + 1 == self.cfg.rounds

    def _round(self, r: int) -> list[dict]:
        cfg, executor = self.cfg, self.executor
        assert executor is not None
        federated = cfg.algorithm != "local"
        kd_due = cfg.uses_kd and cfg.kd.due(r)
        grouped = self.clustering is not None and self.clustering.active
        agg = StreamingAggregator(self.global_state, self.strategy) if federated and not grouped else None
        bases = {"global": self.global_state, **(self.clustering.bases() if self.clustering else {})}
        teachers = TeacherMean(cfg.kd.normalize) if kd_due else None
        records: list[dict] = []
        summary: dict[str, dict] = {"loss": {}, "cdw": {}, "n_samples": {}, "train_seconds": {}}
        names = [s.name for s in self.sites]
        selected = cfg.selected(names, r) if federated else names
        summary["selected"] = sorted(selected)  # type: ignore[assignment]
        failed: dict[str, str] = {}
        own_scored = cfg.eval_local is True or (cfg.eval_local == "last" and r + 1 == cfg.rounds)
        evaluate = self._eval_round(r) and (own_scored or not federated)
        scores = CameraScores(self.site_of)
        jobs = [
            site.job(
                r,
                evaluate=evaluate,
                teacher=teachers is not None,
                taken=sum(site.name in cfg.selected(names, q) for q in range(r + 1)) if federated else 0,
                base=self.clustering.base_of(site.name) if self.clustering else "global",
                cameras=self.crops.get(site.name),
            )
            for site in self.sites
            if site.name in selected
        ]
        by_name = {s.name: s for s in self.sites}
        for result in executor.train(jobs, bases):
            if result.error is not None:
                failed[result.name] = result.error
                continue
            site = by_name[result.name]
            site.classifier, site.private, site.personal = result.classifier, result.private, result.personal
            if result.update is not None:
                for key, value in {
                    "loss": result.loss,
                    "cdw": result.update.cdw,
                    "n_samples": result.update.n_samples,
                    "train_seconds": result.train_seconds,
                }.items():
                    summary[key][site.name] = round(value, 5) if isinstance(value, float) else value
            else:
                summary["loss"][site.name] = round(result.loss or 0.0, 5)
            if result.dp_epsilon is not None:
                summary.setdefault("dp_epsilon", {})[site.name] = round(result.dp_epsilon, 4)
            if result.wire_bytes is not None:
                summary.setdefault("wire_bytes", {})[site.name] = result.wire_bytes
            if result.metrics is not None:
                records.append(_metric_record(r, site.name, "local", result.metrics))
            if result.embedded is not None:
                scores.add("local", site.name, result.embedded)
            if result.update is not None and self.clustering is not None:
                if grouped:
                    self.clustering.add(result.update, self.global_state)
                elif self.clustering.grouping_round(r):
                    self.clustering.observe(result.update, self.global_state)
            if agg is not None and result.update is not None:
                agg.add(result.update)
            if teachers is not None and result.teacher is not None:
                teachers.add(result.teacher)
        returned = len(jobs) - len(failed)
        if failed:
            summary["failed"] = failed
            log.warning("%d of %d sites failed this round: %s", len(failed), len(jobs), sorted(failed))
        if returned < min(cfg.quorum, len(jobs)) or returned == 0:
            detail = "; ".join(f"{s}: {why}" for s, why in failed.items())
            raise RoundFailed(
                f"round {r}: {returned} of {len(jobs)} selected sites returned (quorum {cfg.quorum}): "
                + detail
            )
        if agg is not None:
            try:
                aggregate = agg.finish()
            except NoUpdatesError as err:  # every update rejected: the run stops after the previous round
                raise RoundFailed(f"round {r}: {err}") from None
            self.global_state = aggregate.state
            summary.update(
                weights=aggregate.weights,
                norms={k: round(v, 5) for k, v in aggregate.norms.items()},
                rejected=[r_.__dict__ for r_ in aggregate.rejected],
                clipped=aggregate.clipped,
            )
            if aggregate.path_length is not None:
                summary["path_length"] = round(aggregate.path_length, 3)
            if self.clustering is not None and self.clustering.grouping_round(r):
                summary["groups"] = self.clustering.group(self.global_state)
                log.info("sites grouped: %s", summary["groups"])
        elif grouped and self.clustering is not None:
            self.global_state, weights = self.clustering.finish()
            summary.update(weights=weights, groups=dict(self.clustering.groups))
        if teachers is not None and self.public is not None:
            summary["kd"] = self._distill(r, teachers)
        if federated and self._eval_round(r):
            by_group = self.clustering is not None and self.clustering.active
            jobs, scored_as = self._global_eval_jobs(r) if cfg.eval_global or not by_group else ([], {})
            if by_group and self.clustering is not None:  # each site also (or only) by its group's model
                jobs += [
                    site.job(r, base=self.clustering.base_of(site.name), cameras=self.crops.get(site.name))
                    for site in self.sites
                    if site.name in self.clustering.groups
                ]
            bases = {"global": self.global_state, **(self.clustering.bases() if self.clustering else {})}
            for job, result in zip(jobs, executor.evaluate(jobs, bases), strict=True):
                if result.error is not None:
                    failed.setdefault(result.name, f"evaluation: {result.error}")
                    summary["failed"] = failed
                    continue
                model = "global" if job.base == "global" else "group"
                if result.embedded is not None:
                    scores.add(model, result.name, result.embedded)
                elif result.metrics is not None:
                    name = scored_as.get(result.name, result.name) if model == "global" else result.name
                    records.append(_metric_record(r, name, model, result.metrics))
        records += [_metric_record(r, s, model, m.summary()) for s, model, m in scores.scored()]
        if stats := executor.take_stats():
            summary["executor"] = stats  # type: ignore[assignment]
        records.append({"round": r, "kind": "round", "algorithm": cfg.algorithm, **summary})
        return records

    def _global_eval_jobs(self, r: int) -> tuple[list[SiteJob], dict[str, str]]:
        """Jobs that score the global model, and the name each result is recorded under. Per-camera
        clients of one site share its query/gallery: when no layer is private, one of them scores the
        global model for the whole site, recorded under the site's name; otherwise each embeds its
        cameras' crops with its own layers (`cloud.camera_scoring`)."""
        if not self.site_of:
            return [site.job(r) for site in self.sites], {}
        if private_keys(self.cfg, list(self.global_state)):
            return [site.job(r, cameras=self.crops.get(site.name)) for site in self.sites], {}
        first: dict[str, SimSite] = {}
        for site in self.sites:
            first.setdefault(self.site_of.get(site.name, site.name), site)
        return [site.job(r) for site in first.values()], {s.name: name for name, s in first.items()}

    def _distill(self, r: int, teachers: TeacherMean) -> dict[str, float | str]:
        assert self.public is not None
        seed = site_seed(self.cfg.seed, r, len(self.sites))
        torch.manual_seed(seed)
        load_shared_state(self.model, self.global_state)
        prepare_model(self.model, self.train_cfg)  # as the site jobs: the same floats wherever they ran
        loader = make_loader(self.public, self.cfg.kd.batch_size, train=True, seed=seed)
        target = teachers.target().to(self.device)
        try:
            local_bn = self.strategy.bn == "local"
            result = distill(self.model, loader, target, self.cfg.kd, self.device, statistics=local_bn)
        except KDDiverged as err:  # the aggregate stands
            log.warning("KD diverged, the aggregated model is kept: %s", err)
            return kd_summary(err)
        self.global_state = shared_state(self.model)
        log.info("KD: %d batches, MSE %.5f -> %.5f", result.batches, result.loss_first, result.loss_last)
        return kd_summary(result)

    def _pooled_labels(self) -> dict[tuple[str, int], int]:
        """One class per identity of each site: the per-camera clients of one site pool their images of
        a person into one class (each client its own class would teach the model to tell cameras apart)."""
        labels: dict[tuple[str, int], int] = {}
        for data in self.pooled:  # in site order, identities by pid: as each site numbers its own
            site = self.site_of.get(data.name, data.name)
            for pid in sorted({r.pid for r in data.splits.train}):
                labels.setdefault((site, pid), len(labels))
        return labels

    def _central_round(self, r: int) -> list[dict]:
        """Pooled training on every site's images with one classifier over all identities; scored once
        per site (per-camera clients share their site's query/gallery)."""
        datasets = []
        for data in self.pooled:
            site = self.site_of.get(data.name, data.name)
            labels = [self.pooled_labels[(site, rec.pid)] for rec in data.splits.train]
            paths = [rec.path for rec in data.splits.train]
            datasets.append(ImageDataset(paths, train_transform(self.cfg.input), labels))
        pooled = ConcatDataset(datasets)
        seed = site_seed(self.cfg.seed, r, 0)
        torch.manual_seed(seed)
        loader = make_loader(pooled, self.cfg.train.batch_size, train=True, seed=seed)  # type: ignore[arg-type]
        load_shared_state(self.model, self.global_state)
        result = train_local(self.model, loader, self.train_cfg)
        self.global_state = shared_state(self.model)
        records: list[dict] = []
        if self._eval_round(r):
            first: dict[str, SiteData] = {}
            for data in self.pooled:
                first.setdefault(self.site_of.get(data.name, data.name), data)
            for site, data in first.items():
                with log_context(site=site):
                    summary = data.evaluate(self.model, self.device).summary()
                    records.append(_metric_record(r, site, "global", summary))
        records.append(
            {"round": r, "kind": "round", "algorithm": "central", "loss": {"pooled": round(result.loss, 5)}}
        )
        return records
