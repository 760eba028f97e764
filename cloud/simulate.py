"""The in-process simulator: a whole federation in one process, with the same strategy code as the
networked aggregator (only the transport differs).

Algorithms: ``local`` (each site alone), ``fedpav``, ``cdw`` (FedPav + CDW weights), ``kd`` (FedPav +
server KD), ``cdw_kd`` (both), and ``central`` (pooled training on all sites' data, the upper bound).
Every algorithm gets the same compute: ``local_epochs`` x ``rounds`` epochs per site.

Each round writes one JSON line per evaluated (site, model) and one round summary to
``<out>/metrics.jsonl``, then an atomic checkpoint (``<out>/checkpoint.safetensors``: the global
shared state, every site's classifier and private state; the resume state of the run) and the global
model as a model file (``<out>/model.safetensors``, `reid.weights`: what evaluate, export and
--pretrained read; not for ``local``, which has no global model). Every random draw is seeded by
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
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset

from cloud.strategy import (
    KDConfig,
    StrategyConfig,
    StreamingAggregator,
    TeacherMean,
    Update,
    distill,
    embed_public,
)
from cloud.strategy.aggregate import bn_policy_keys
from cloud.strategy.selection import sample_sites, sites_per_round
from protocol.codec import decode_state, encode_state
from reid.choices import Algorithm
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader, read_image_folder, train_transform
from reid.evaluate import Metrics
from reid.logs import log_context
from reid.model import ModelSpec, ReIDModel, build_model, load_shared_state, new_classifier, shared_state
from reid.privacy import DPConfig, PrivacyLedger, privatize
from reid.site import SiteData
from reid.train import TrainConfig, resolve_device, train_local
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
    eval_local: bool = Field(True, description="also evaluate each site's trained model before upload")
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

    def selected(self, names: list[str], round_: int) -> list[str]:
        """The sites that train in `round_`: the networked aggregator's seeded draw."""
        k = sites_per_round(len(names), self.fraction, exactly=self.sites_per_round)
        return names if k == len(names) else sample_sites(names, k, self.seed, round_)

    def effective_strategy(self) -> StrategyConfig:
        """The algorithm decides FedPav vs CDW weights; the rest of the strategy is as configured."""
        weighting = self.strategy.weighting
        if self.algorithm in ("cdw", "cdw_kd"):
            weighting = weighting if weighting != "fedpav" else "cdw"
        else:
            weighting = "fedpav"
        return self.strategy.model_copy(update={"weighting": weighting})

    @property
    def uses_kd(self) -> bool:
        return self.algorithm in ("kd", "cdw_kd")


@dataclass
class SimSite:
    data: SiteData
    classifier: torch.nn.Linear
    private: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data.name


def _seed(cfg: SimulationConfig, round_: int, site: int) -> int:
    return (cfg.seed * 1_000_003 + round_ * 1009 + site) % (2**31)


def _metric_record(round_: int, site: str, model: str, m: Metrics) -> dict[str, object]:
    return {"round": round_, "site": site, "model": model, **{k: round(v, 4) for k, v in m.summary().items()}}


class Simulator:
    """Runs (or resumes) one simulated federation in `out`."""

    def __init__(
        self,
        cfg: SimulationConfig,
        site_dirs: list[Path],
        out: Path,
        public_dir: Path | None = None,
        on_round: Callable[[int, list[dict]], None] | None = None,
    ) -> None:
        if not site_dirs:
            raise ValueError("a simulation needs at least one site")
        if cfg.uses_kd and public_dir is None:
            raise ValueError(f"algorithm {cfg.algorithm} needs a public image folder for KD")
        self.cfg = cfg
        self.out = out
        self.on_round = on_round
        self.device = resolve_device(cfg.train.device)
        self.train_cfg = cfg.train.model_copy(update={"epochs": cfg.local_epochs})
        self.strategy = cfg.effective_strategy()
        datas = [SiteData(d, cfg.input, cfg.train.batch_size, cfg.train.num_workers) for d in site_dirs]
        names = [d.name for d in datas]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        torch.manual_seed(cfg.seed)
        classes = sum(d.num_classes for d in datas) if cfg.algorithm == "central" else 1
        self.model: ReIDModel = build_model(cfg.model, classes, cfg.pretrained)
        self.sites = [SimSite(d, new_classifier(cfg.model.embed_dim, d.num_classes)) for d in datas]
        self.global_state = shared_state(self.model)
        self.private_keys = (
            set(self.global_state)
            if cfg.algorithm == "local"
            else bn_policy_keys(list(self.global_state), "local")
            if self.strategy.bn == "local"
            else set()
        )
        self.public: ImageDataset | None = None
        if public_dir is not None and cfg.uses_kd:
            self.public = ImageDataset(read_image_folder(public_dir), eval_transform(cfg.input))
        self.completed = 0

    # -- state on disk -------------------------------------------------------------------------------
    def _config_json(self) -> str:
        """The identity of a run: everything but the number of rounds (a run can be extended)."""
        return self.cfg.model_dump_json(exclude={"rounds"})

    def save(self) -> None:
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        for site in self.sites:
            tensors.update(
                {f"site/{site.name}/classifier/{k}": v for k, v in site.classifier.state_dict().items()}
            )
            tensors.update({f"site/{site.name}/private/{k}": v for k, v in site.private.items()})
        if self.cfg.algorithm == "central":
            tensors.update({f"central/{k}": v for k, v in self.model.classifier.state_dict().items()})
        meta = {"config": self._config_json(), "completed_rounds": str(self.completed)}
        tmp = self.out / (CHECKPOINT + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(self.out / CHECKPOINT)
        if self.cfg.algorithm != "local":
            model_meta = {"round": str(self.completed), "algorithm": self.cfg.algorithm}
            save_state(self.out / MODEL, self.global_state, self.cfg.model, self.cfg.input, model_meta)

    def try_resume(self) -> bool:
        """Load the checkpoint in `out` if there is one; refuse one written with another configuration."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("config") != self._config_json():
                raise ValueError(f"{path} was written with another configuration; use a new --out or --fresh")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        self.global_state = {
            k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")
        }
        for site in self.sites:
            prefix = f"site/{site.name}/"
            cls = {
                k.removeprefix(prefix + "classifier/"): v
                for k, v in tensors.items()
                if k.startswith(prefix + "classifier/")
            }
            site.classifier.load_state_dict(cls)
            site.private = {
                k.removeprefix(prefix + "private/"): v
                for k, v in tensors.items()
                if k.startswith(prefix + "private/")
            }
        if self.cfg.algorithm == "central":
            self.model.classifier.load_state_dict(
                {k.removeprefix("central/"): v for k, v in tensors.items() if k.startswith("central/")}
            )
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

    # -- one site -------------------------------------------------------------------------------------
    def _load_site_model(self, site: SimSite, state: dict[str, torch.Tensor]) -> None:
        self.model.classifier = site.classifier
        load_shared_state(self.model, {**state, **site.private})

    def _evaluate(self, site: SimSite) -> Metrics:
        return site.data.evaluate(self.model, self.device)

    # -- rounds ---------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run the remaining rounds; returns all metric records written by this call."""
        self.out.mkdir(parents=True, exist_ok=True)
        written: list[dict] = []
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
        return written

    def _eval_round(self, r: int) -> bool:
        return (r + 1) % self.cfg.eval_every == 0 or r + 1 == self.cfg.rounds

    def _round(self, r: int) -> list[dict]:
        cfg = self.cfg
        federated = cfg.algorithm != "local"
        kd_due = cfg.uses_kd and (r + 1) % cfg.kd.every == 0
        agg = StreamingAggregator(self.global_state, self.strategy) if federated else None
        teachers = TeacherMean(cfg.kd.normalize) if kd_due else None
        records: list[dict] = []
        summary: dict[str, dict] = {"loss": {}, "cdw": {}, "n_samples": {}, "train_seconds": {}}
        if cfg.dp.enabled and federated:
            summary["dp_epsilon"] = {}
        names = [s.name for s in self.sites]
        selected = set(cfg.selected(names, r)) if federated else set(names)
        summary["selected"] = sorted(selected)  # type: ignore[assignment]
        for i, site in enumerate(self.sites):
            if site.name not in selected:
                continue
            with log_context(site=site.name):
                torch.manual_seed(_seed(cfg, r, i))
                site.data.seed = _seed(cfg, r, i)
                self._load_site_model(site, self.global_state)
                result = train_local(
                    self.model, site.data.train_loader(), self.train_cfg, cdw_images=site.data.cdw_images()
                )
                for key, value in {
                    "loss": result.loss,
                    "cdw": result.cdw,
                    "n_samples": site.data.num_train_images,
                    "train_seconds": result.seconds,
                }.items():
                    summary[key][site.name] = round(value, 5) if isinstance(value, float) else value
                trained = shared_state(self.model)
                site.private = {k: trained[k] for k in self.private_keys}
                if self._eval_round(r) and (cfg.eval_local or not federated):
                    records.append(_metric_record(r, site.name, "local", self._evaluate(site)))
                if agg is not None:
                    delta = {k: trained[k] - self.global_state[k] for k in trained}
                    if cfg.dp.enabled:  # one mechanism per round the site took part in so far
                        generator = torch.Generator().manual_seed(_seed(cfg, r, i))
                        delta, _ = privatize(delta, cfg.dp, generator)
                        taken = sum(site.name in cfg.selected(names, q) for q in range(r + 1))
                        summary["dp_epsilon"][site.name] = round(PrivacyLedger(cfg.dp, taken).epsilon(), 4)
                    if cfg.wire != "none":  # exactly what the networked aggregator would decode
                        blob = encode_state(
                            {k: v.numpy() for k, v in delta.items()},
                            cfg.wire.split("+")[0],  # type: ignore[arg-type]
                            compress=cfg.wire.endswith("+zstd"),
                        )
                        summary.setdefault("wire_bytes", {})[site.name] = len(blob)
                        delta = {k: torch.from_numpy(v) for k, v in decode_state(blob).items()}
                    agg.add(Update(site.name, delta, site.data.num_train_images, result.cdw))
                if teachers is not None and self.public is not None:
                    loader = make_loader(self.public, cfg.kd.batch_size * 2, train=False)
                    teachers.add(embed_public(self.model, loader, len(self.public), self.device))
        if agg is not None:
            aggregate = agg.finish()
            self.global_state = aggregate.state
            summary.update(
                weights=aggregate.weights,
                norms={k: round(v, 5) for k, v in aggregate.norms.items()},
                rejected=[r_.__dict__ for r_ in aggregate.rejected],
                clipped=aggregate.clipped,
            )
        if teachers is not None and self.public is not None:
            summary["kd"] = self._distill(r, teachers)
        if federated and self._eval_round(r):
            for site in self.sites:
                with log_context(site=site.name):
                    self._load_site_model(site, self.global_state)
                    records.append(_metric_record(r, site.name, "global", self._evaluate(site)))
        records.append({"round": r, "kind": "round", "algorithm": cfg.algorithm, **summary})
        return records

    def _distill(self, r: int, teachers: TeacherMean) -> dict[str, float]:
        assert self.public is not None
        torch.manual_seed(_seed(self.cfg, r, len(self.sites)))
        load_shared_state(self.model, self.global_state)
        self.model.to(self.device)
        loader = make_loader(
            self.public, self.cfg.kd.batch_size, train=True, seed=_seed(self.cfg, r, len(self.sites))
        )
        result = distill(self.model, loader, teachers.target().to(self.device), self.cfg.kd, self.device)
        self.global_state = shared_state(self.model)
        log.info("KD: %d batches, MSE %.5f -> %.5f", result.batches, result.loss_first, result.loss_last)
        return {
            "batches": result.batches,
            "mse_first": round(result.loss_first, 6),
            "mse_last": round(result.loss_last, 6),
            "seconds": round(result.seconds, 3),
        }

    def _central_round(self, r: int) -> list[dict]:
        """Pooled training on every site's images with one classifier over all identities."""
        datasets, offset = [], 0
        for site in self.sites:
            labels = [label + offset for label in site.data.labels]
            paths = [rec.path for rec in site.data.splits.train]
            datasets.append(ImageDataset(paths, train_transform(self.cfg.input), labels))
            offset += site.data.num_classes
        pooled = ConcatDataset(datasets)
        torch.manual_seed(_seed(self.cfg, r, 0))
        loader = make_loader(pooled, self.cfg.train.batch_size, train=True, seed=_seed(self.cfg, r, 0))  # type: ignore[arg-type]
        load_shared_state(self.model, self.global_state)
        result = train_local(self.model, loader, self.train_cfg)
        self.global_state = shared_state(self.model)
        records: list[dict] = []
        if self._eval_round(r):
            for site in self.sites:
                with log_context(site=site.name):
                    records.append(_metric_record(r, site.name, "global", self._evaluate(site)))
        records.append(
            {"round": r, "kind": "round", "algorithm": "central", "loss": {"pooled": round(result.loss, 5)}}
        )
        return records
