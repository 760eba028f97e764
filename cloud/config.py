"""The settings of `cloud-aggregator serve` (`ServeConfig`: the TOML file and the flags), and the model
description they give the sites (`model_info`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud.strategy import AdmissionConfig, KDConfig, StrategyConfig
from cloud.strategy.clustering import ClusterConfig
from protocol.chunks import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from protocol.codec import Encoding
from protocol.messages import MAX_SELECTED, ModelInfo, TrainingInfo
from protocol.mqtt import IdentityDir
from reid.data import InputSpec
from reid.model import ModelSpec
from reid.train import DeviceName

# what `serve` aggregates with unless told otherwise: FedPav weights normalised by each site's path length
# (fednova) with each site's BatchNorm kept local, the winner of the learning study's validation split
SERVE_STRATEGY = StrategyConfig(fednova=True)


class ServeConfig(BaseModel):
    """Settings of `cloud-aggregator serve` (TOML file + flags)."""

    model_config = ConfigDict(extra="forbid")

    federation: str = Field("default", description="federation name: the topic root fedreid/v1/<federation>/")
    broker: str = Field("auto", description="auto (a private local mosquitto) or mqtt(s)://host:port")
    identity_dir: IdentityDir | None = Field(
        None, description="provisioned identity (mutual TLS with mqtts://)"
    )
    state_dir: Path = Field(
        Path("state/cloud"), description="checkpoints, journal and metrics (resumes from here)"
    )
    rounds: int = Field(
        10, ge=1, description="rounds to run (a finished run can be extended by raising this)"
    )
    device: DeviceName = Field(
        "auto", description="where KD's teachers and distillation run: auto (CUDA when present), cpu, cuda:N"
    )
    min_sites: int = Field(1, ge=1, le=MAX_SELECTED, description="sites needed online to start a round")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of online sites selected per round")
    deadline_s: float = Field(
        600.0, gt=0, le=1e7, allow_inf_nan=False, description="collection time per round"
    )
    quorum: int = Field(1, ge=1, description="accepted updates needed to close a round at its deadline")
    max_extensions: int = Field(3, ge=0, description="deadline extensions without quorum before a restart")
    transfer_idle_s: float = Field(5.0, gt=0, description="re-request missing chunks after this idle time")
    wait_for_sites_s: float = Field(
        3600.0, gt=0, description="how long to wait for min_sites online before giving up"
    )
    eval_every: int = Field(1, ge=1, description="sites evaluate the global model every N rounds")
    seed: int = Field(0, description="seeds the initial model and the per-round site selection")
    model: ModelSpec = ModelSpec()
    input: InputSpec = InputSpec()
    pretrained: str | None = Field(
        None,
        description="initial backbone: local ImageNet weights or a FedReID model file (never downloaded)",
    )
    local_epochs: int = Field(1, ge=1, description="local epochs per round at each site")
    batch_size: int = Field(
        32, ge=2, description="the sites' training batch size (a smaller site trains with one smaller batch)"
    )
    lr_head: float = Field(
        0.02,
        gt=0,
        description="0.02/0.02: the learning study's rates (from its pretrained start they beat the paper's "
        "0.05/0.005 on its validation split); the paper used 0.05/0.005 with ImageNet weights",
    )
    lr_backbone: float = Field(0.02, gt=0, description="the sites' backbone learning rate")
    strategy: StrategyConfig = Field(
        SERVE_STRATEGY,
        description="aggregation (the default, FedPav weights normalised by each site's path length "
        "(fednova) with each site's BatchNorm kept local, won the learning study's validation split)",
    )
    kd: KDConfig = KDConfig()
    kd_enabled: bool = Field(
        False,
        description="server-side knowledge distillation on `public` after aggregation (off by default: it "
        "added nothing in the learning study)",
    )
    public: Path | None = Field(
        None, description="public unlabeled images for KD (and parity images for deployments)"
    )
    upload_encoding: Encoding = Field("fp16", description="delta encoding the sites use: fp32, fp16 or int8")
    upload_compressed: bool = Field(False, description="zstd on the sites' delta blobs")
    chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES,
        ge=MIN_CHUNK_BYTES,
        le=MAX_CHUNK_BYTES,
        description="chunk size of the global model's blob",
    )
    max_update_bytes: int = Field(1 << 30, ge=1024, description="also capped by the model's own size")
    admission: AdmissionConfig = AdmissionConfig()
    keep_checkpoints: int = Field(5, ge=1, description="newest global checkpoints kept in the state dir")
    min_resend_interval_s: float = Field(
        2.0,
        ge=0,
        description="chunk requests (global model, deployment) closer together per site are "
        "dropped, and a blob is resent at most once per interval",
    )
    deploy_every: int = Field(
        0, ge=0, description="export and deploy the global model every N rounds; 0: off"
    )
    deploy_precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="precision of deployed ONNX models: fp32 or fp16"
    )
    deploy_images: Path | None = Field(None, description="parity-gate images to deploy (default: public)")
    final_deploy_wait_s: float = Field(
        600.0,
        ge=0,
        le=1e7,
        description="after the run, keep sending the last deployment to online sites that do not serve it "
        "yet while they ask for it (a site killed during its transfer), at most this long; 0: exit at once",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus /metrics and the dashboard page on this port (off when unset)",
    )
    metrics_host: str = Field("127.0.0.1", description="listen address of metrics_port (loopback by default)")
    cluster: ClusterConfig | None = Field(
        None,
        description="client clustering: after `cluster.after` rounds the sites are grouped by the similarity "
        "of their updates and each group trains its own model (off when unset; not with KD)",
    )
    final_eval: bool = Field(
        True,
        description="after the last round, every online site evaluates the final model "
        "(an evaluation round of at most deadline_s)",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _over_the_shipped_strategy(cls, value: object) -> object:
        """A [strategy] table (or --bn) sets its keys over the shipped default, not over the library's."""
        if isinstance(value, dict):
            return {**SERVE_STRATEGY.model_dump(), **value}
        return value

    @model_validator(mode="after")
    def _fits_the_round_announcement(self) -> ServeConfig:
        """Every setting the round announcement carries must fit its schema now, not when round 0 opens
        (`local_epochs = 2000` or `lr_backbone = inf` used to stop `serve` there, sites waiting)."""
        model_info(self)
        self.training_info()
        return self

    def training_info(self) -> TrainingInfo:
        """How the sites train, as the round announcement says it."""
        return TrainingInfo(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr_head=self.lr_head,
            lr_backbone=self.lr_backbone,
            keep_local_bn=self.strategy.bn == "local",
        )

    def identity(self) -> dict:
        """What must not change when a run is resumed."""
        fields = {"federation", "model", "input", "seed", "strategy", "pretrained"}
        return self.model_dump(mode="json", include=fields | ({"cluster"} if self.cluster else set()))

    @classmethod
    def stored_identity(cls, stored: dict) -> dict:
        """A run.json as this version reads it: a setting added since it was written takes its model's
        default, which is what the version that wrote it ran (e.g. ``strategy.fednova``: off)."""
        stored = dict(stored)
        if isinstance(stored.get("strategy"), dict):  # the library's defaults, not today's shipped ones
            stored["strategy"] = StrategyConfig.model_validate(stored["strategy"]).model_dump(mode="json")
        return cls.model_validate(stored).identity()


def model_info(cfg: ServeConfig) -> ModelInfo:
    """What the sites build and feed the model with; the preprocessing only where it is not the default
    (so a federation on the defaults is read by sites of earlier versions too)."""
    m, i, default = cfg.model, cfg.input, InputSpec()
    return ModelInfo(
        arch=m.arch,
        embed_dim=m.embed_dim,
        last_stride=m.last_stride,
        dropout=m.dropout,
        height=i.height,
        width=i.width,
        mean=list(i.mean) if i.mean != default.mean else None,
        std=list(i.std) if i.std != default.std else None,
        pad=i.pad if i.pad_pixels != InputSpec(height=i.height, width=i.width).pad_pixels else None,
    )
