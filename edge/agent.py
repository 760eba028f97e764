"""`edge-agent start`: a camera site's participation in the federation.

On a round that selects the site: fetch the global blob (missing chunks re-requested after
`transfer_idle_s` without progress), verify its hash against the round's base hash, load it next to the
site's own classifier (persisted in the state dir), evaluate it on the local query/gallery when the
round asks, train, compute the CDW distance, encode the delta of the shared state and upload it as a
manifest + chunks, and keep it (on disk, across restarts) until the aggregator acknowledges it.

Rounds are keyed by (round, base hash), not by the round number alone: an announcement of the round the
site is fetching or training only updates the deadline (extensions, reconnects); one for which the site
holds an unacknowledged update makes it publish the manifest and chunks again (the aggregator was
restarted and lost them); one it has already been acknowledged for is ignored; anything else is trained.
A round the site cannot take part in (training error, divergence, disk) is reported on its status topic
(state "failed", with the reason) so the aggregator stops waiting for it. The evaluation round after
the last one (``train`` false) only evaluates the final model and publishes an EvalReport.

Deployed models (the retained ``deploy`` manifest) are fetched, verified and swapped in by
`edge.deployment.Deployments`, alongside training.

What leaves the site: the delta of the shared state (backbone + embedding), n_samples, CDW, loss,
timings and evaluation metrics. Never images, features, labels or classifier weights.
Training runs on its own thread; MQTT handlers only parse and hand over.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save

from edge.agent_metrics import AgentMetrics
from edge.deployment import AdoptionConfig, Deployments
from edge.feature_api import ServiceConfig
from protocol.broker import parse_url
from protocol.chunks import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ChunkError,
    ForeignChunk,
    InboundBlob,
    blob_ref,
    check_ref,
    chunk_size_for,
    parse_chunk,
)
from protocol.codec import CodecError, Encoding, decode_state, encode_state
from protocol.messages import (
    NAME,
    ChunkRequest,
    EvalReport,
    MessageError,
    RoundStart,
    RunEnd,
    UpdateAck,
    UpdateManifest,
    encode_message,
    parse_message,
)
from protocol.mqtt import Endpoint, IdentityDir
from protocol.topics import Topics, check_site_name
from reid.data import DatasetLayoutError, InputSpec, read_dataset
from reid.files import atomic_write, hold_lock
from reid.logs import bound, log_context
from reid.model import (
    ModelSpec,
    ReIDModel,
    batchnorm_keys,
    build_model,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)
from reid.privacy import DPConfig, PrivacyLedger
from reid.site import SiteData
from reid.site_delta import site_delta
from reid.train import (
    DeviceName,
    TrainConfig,
    TrainResult,
    adapt_to_site,
    loader_workers,
    resolve_device,
    train_local,
)

log = logging.getLogger(__name__)
MAX_MODEL_BYTES = 1 << 30  # the largest global model a site fetches (a ResNet-50 in fp32 is 98 MB)
STOP_WAIT_S = 30.0  # on a signal, how long the training in progress has to reach its next batch and end
RETAINED_SETTLE_S = 1.5  # after the run's end, for a deployment manifest retained on its own topic to come


class RoundFailed(RuntimeError):
    """This site cannot take part in the round (the reason goes on its status topic)."""


class Stopped(Exception):
    """The agent is stopping (a signal): the training in progress ends at its next batch, so the process
    never exits with torch still running in the trainer thread (that aborted: SIGABRT, exit 134)."""


class Superseded(Exception):
    """The job in hand is of a run that is over (another `run_id` came: docs/protocol.md, rule 0) or of
    a round the aggregator closed (a newer round is announced: a site stopped or cut off for a while): it
    is abandoned at its next batch, and its update is never sent (it would be rejected)."""


class AgentConfig(BaseModel):
    """Settings of `edge-agent start` (TOML file + flags)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(
        pattern=NAME, description="this site's id (A-Z a-z 0-9 _ . -; its certificate's CN when provisioned)"
    )
    data: Path = Field(description="the site's data set folder (any supported layout)")
    federation: str = Field("default", pattern=NAME, description="federation name (the aggregator's)")
    broker: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    identity_dir: IdentityDir | None = Field(
        None, description="provisioned identity (mutual TLS with mqtts://)"
    )
    state_dir: Path = Field(
        Path("state/edge"),
        description="classifier, progress, pending upload and deployed models of this site",
    )
    device: DeviceName = Field("auto", description="auto (CUDA when present), cpu or cuda")
    workers: int | None = Field(
        None,
        ge=0,
        description="data loader worker processes (default: none on a CPU, up to 8 with CUDA, where one "
        "process cannot decode images as fast as the GPU trains)",
    )
    transfer_idle_s: float = Field(
        5.0, gt=0, description="re-request missing global chunks after this idle time"
    )
    chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES, description="chunk size of uploads"
    )
    ack_wait_s: float = Field(
        30.0, gt=0, description="announce an update again when it has no acknowledgement after this long"
    )
    exit_when_done: bool = Field(False, description="stop when the aggregator announces the end of the run")
    local_epochs: int | None = Field(None, ge=1, description="override the round's local epochs")
    evaluate: Literal["round", "always", "never"] = Field(
        "round", description="when to evaluate the global model"
    )
    upload_encoding: Encoding | None = Field(None, description="override the round's delta encoding")
    upload_compressed: bool | None = Field(None, description="override the round's zstd setting")
    seed: int = Field(0, description="seeds local training")
    deploy_int8: bool = Field(False, description="quantise deployed models to int8 on this site's images")
    int8_max_drop: float = Field(
        1.0,
        ge=0,
        description="rank-1/mAP points int8 may lose (and its mean cosine to fp32 must stay >= 0.95), "
        "else fp32 serves",
    )
    deploy_engine: bool = Field(False, description="build a TensorRT engine for deployed models (GPU sites)")
    dp: DPConfig = Field(
        DPConfig(), description="differential privacy on the uploaded delta (off by default)"
    )
    adoption: AdoptionConfig | None = Field(
        None,
        description="serve this site's own model instead of a deployment when it scores higher on a "
        "validation set of the site's (off when unset)",
    )
    deploy_drain_s: float = Field(60.0, ge=0, description="on exit, let a deployment in progress finish")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve this agent's Prometheus /metrics on this port (off when unset)",
    )
    metrics_host: str = Field("127.0.0.1", description="listen address of metrics_port (loopback by default)")
    serve_features: ServiceConfig | None = Field(
        None,
        description="run the feature service (docs/serving.md) on the deployed model, gallery in state_dir",
    )

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str) -> str:
        return check_site_name(value)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_url(value)  # ValueError: "broker URL must be mqtt://host[:port] ..."
        return value

    @field_validator("data")
    @classmethod
    def _data_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"data folder not found: {value}")
        read_dataset(value)  # every split, at start, not when the site is first selected (a ValueError)
        return value


def _job_key(start: RoundStart) -> tuple[str, int, str, bool]:
    """What names a site's job: its run, round, base hash and whether it trains (docs/protocol.md)."""
    return (start.run_id, start.round, start.base_hash, start.train)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """The seconds the block takes, to the millisecond, as `timings[name]` (an update's timings)."""
    clock = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - clock, 3)


@dataclass(frozen=True)
class Progress:
    """The last round this site trained in the run `run_id`, persisted in ``progress.json`` (atomic
    writes)."""

    last_round: int = -1
    base_hash: str = ""
    acked: bool = False
    run_id: str = ""
    settled: bool = True  # its update acknowledged or rejected (False: pending, or lost before either)

    def same(self, start: RoundStart) -> bool:
        """Whether `start` is the training round recorded (an evaluation round of the same round and base
        is another round: docs/protocol.md keys rounds on (round, base_hash, train))."""
        return start.train and (self.last_round, self.base_hash) == (start.round, start.base_hash)


@dataclass
class Received:
    """A round's model as this site trains it: the global weights (`shared`, as received) with its
    classifier and, under bn=local, the BatchNorm layers it kept (`own_bn`, empty when it has none)."""

    model: ReIDModel
    shared: dict[str, torch.Tensor]
    own_bn: dict[str, torch.Tensor]
    site: SiteData


@dataclass
class Fetch:
    start: RoundStart
    transfer: InboundBlob
    requested: float = 0.0
    began: float = field(default_factory=time.monotonic)


class StateDirInUse(RuntimeError):
    """Another agent process holds this site's state folder."""


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        check_site_name(cfg.site)
        self.cfg = cfg
        self.topics = Topics(cfg.federation)
        self.dir = cfg.state_dir / cfg.site
        self.dir.mkdir(parents=True, exist_ok=True)
        self.owner = hold_lock(self.dir / "agent.lock")  # held for the life of the process
        if self.owner is None:  # two agents on one folder both trained, and broke each other's installs
            raise StateDirInUse(
                f"{self.dir} is in use by another edge-agent of site {cfg.site}: one agent per site and "
                "state folder"
            )
        self.classifier_file = self.dir / "classifier.safetensors"  # the site's own, never sent
        self.private_bn_file = self.dir / "private_bn.safetensors"  # its BN layers when kept local
        self.device = resolve_device(cfg.device)
        self.workers = loader_workers(cfg.workers, self.device)
        self.lock = threading.Lock()
        self.fetch: Fetch | None = None
        self.jobs: queue.Queue[tuple[RoundStart, bytes, float] | None] = queue.Queue()
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.site_data: SiteData | None = None
        self.progress = self._load_progress()
        self.upload = self._load_pending()
        self._settle_privacy()
        self.working: tuple[str, int, str, bool] | None = None  # (run, round, base hash, train) in hand
        self.announced: tuple[str, int] | None = None  # (run, round) of the newest RoundStart
        self.republished = 0.0  # when the pending update was last announced again
        self.started = time.monotonic()  # (a pending update found at start waits for the round first)
        self.tick_error = ("", 0.0)  # the last error of the periodic work, and when it was logged
        self.said_ended: set[str] = set()  # runs this site was not part of, said to have ended
        t = self.topics
        self.endpoint = Endpoint(
            cfg.broker,
            t,
            cfg.site,
            "site",
            {
                t.round: bound(self._on_round, cfg.site),
                t.global_chunks: bound(self._on_global_chunk, cfg.site),
                t.site(cfg.site, "ack"): bound(self._on_ack, cfg.site),
                t.site(cfg.site, "resend"): bound(self._on_resend, cfg.site),
            },
            identity_dir=cfg.identity_dir,
        )
        self.deployments = Deployments(
            self.dir,
            self.endpoint,
            int8_data=cfg.data if cfg.deploy_int8 else None,
            int8_max_drop=cfg.int8_max_drop,
            engine=cfg.deploy_engine,
            site_batchnorm=self.private_bn_file,
            site_data=cfg.data,
            adoption=cfg.adoption,
        )
        self.metrics = AgentMetrics(
            lambda: (self.deployments.version, self.deployments.adopted), self.progress.last_round
        )

    # -- persistent site state -------------------------------------------------------------------------
    def _load_progress(self) -> Progress:
        path = self.dir / "progress.json"
        try:
            doc = json.loads(path.read_text()) if path.is_file() else {}
            return Progress(
                int(doc.get("last_round", -1)),
                str(doc.get("base_hash", "")),
                bool(doc.get("acked")),
                str(doc.get("run_id", "")),
                bool(doc.get("settled", True)),
            )
        except (ValueError, TypeError, AttributeError) as err:
            log.warning("%s unreadable (%s): starting from no progress", path, err)
            return Progress()

    def _save_progress(self, progress: Progress) -> None:
        self.progress = progress
        atomic_write(self.dir / "progress.json", json.dumps(progress.__dict__).encode())

    def _load_pending(self) -> tuple[UpdateManifest, bytes] | None:
        """The update waiting for its acknowledgement (``pending.json`` + ``pending.blob``), if any."""
        manifest, blob = self.dir / "pending.json", self.dir / "pending.blob"
        if not (manifest.is_file() and blob.is_file()):
            return None
        try:
            m = parse_message(manifest.read_bytes(), UpdateManifest)
            data = blob.read_bytes()
        except (MessageError, OSError) as err:
            log.warning("pending update unreadable (%s): dropped", err)
            return None
        if hashlib.sha256(data).hexdigest() != m.blob.sha256:
            log.warning("pending update does not match its manifest: dropped")
            return None
        return m, data

    def _keep_pending(self, manifest: UpdateManifest, blob: bytes) -> None:
        atomic_write(self.dir / "pending.blob", blob)
        atomic_write(self.dir / "pending.json", encode_message(manifest))
        with self.lock:
            self.upload = (manifest, blob)
        self._settle_privacy()

    def _new_run(self, run_id: str) -> None:
        """A round of another run (a new run, or the aggregator went back on work it acknowledged):
        what this site settled or holds unacknowledged belongs to the old one and is dropped, and a fetch
        or a training of the old run in progress is abandoned (`Superseded`)."""
        with self.lock:
            upload = self.upload
            self.working = None
            if self.fetch is not None:
                self.fetch.transfer.close()
                self.fetch = None
        if self.progress.last_round >= 0 or upload is not None:
            log.info(
                "a new run (%s): dropping this site's progress of the previous one (last round %d%s)",
                run_id,
                self.progress.last_round,
                ", an unacknowledged update" if upload is not None else "",
            )
        if upload is not None:
            self._drop_pending()
        self._save_progress(Progress(run_id=run_id))

    def _drop_pending(self) -> None:
        with self.lock:
            self.upload = None
        for name in ("pending.json", "pending.blob"):
            (self.dir / name).unlink(missing_ok=True)

    def _spend_privacy(self, start: RoundStart) -> float:
        """One more Gaussian mechanism on this site's data: the ledger is persisted across restarts. The
        spend is `staged` until its update is kept as pending (`_settle_privacy`): a kill before that
        released nothing, and the restart takes the spend back instead of counting the round twice."""
        spent = self._privacy_doc().get("rounds", 0)
        ledger = PrivacyLedger(self.cfg.dp, spent)
        epsilon = ledger.spend()
        self._write_privacy(ledger, staged=f"{start.round}:{start.base_hash}")
        return epsilon

    def _privacy_doc(self) -> dict:
        path = self.dir / "privacy.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_privacy(self, ledger: PrivacyLedger, staged: str | None = None) -> None:
        doc = {"rounds": ledger.rounds, "epsilon": ledger.epsilon(), "delta": self.cfg.dp.delta}
        atomic_write(
            self.dir / "privacy.json", json.dumps(doc | ({"staged": staged} if staged else {})).encode()
        )

    def _settle_privacy(self) -> None:
        """A staged spend whose update is pending was released (it is sent until acknowledged); one
        without it never left the site (a kill between the noise and the pending files): not counted."""
        doc = self._privacy_doc()
        staged = doc.get("staged")
        if not staged:
            return
        ledger = PrivacyLedger(self.cfg.dp, int(doc.get("rounds", 0)))
        upload = self.upload
        if upload is None or f"{upload[0].round}:{upload[0].base_hash}" != staged:
            ledger.rounds = max(0, ledger.rounds - 1)
            log.info("DP: the update noised for round %s was never sent: not counted", staged.split(":")[0])
        self._write_privacy(ledger)

    # -- handlers (endpoint worker thread) -------------------------------------------------------------
    def _on_round(self, topic: str, payload: bytes) -> None:
        try:
            msg = parse_message(payload)
        except MessageError as err:
            log.warning("dropped round message: %s", err)
            return
        if isinstance(msg, RunEnd) and msg.federation == self.cfg.federation:
            # (a retained RunEnd without run_id names no run: it ends none)
            if self.endpoint.retained_message and (not msg.run_id or msg.run_id != self.progress.run_id):
                if msg.run_id not in self.said_ended:  # (once: it comes again at every reconnect)
                    self.said_ended.add(msg.run_id)
                    log.info("a run this site was not part of ended before it came: waiting for the next run")
                return
            log.info("the aggregator finished the run (%d rounds)", msg.rounds)
            if self.cfg.exit_when_done:
                self.done.set()
            return
        if not isinstance(msg, RoundStart) or msg.federation != self.cfg.federation:
            return
        try:
            self._on_round_start(msg.for_site(self.cfg.site))  # (clustering: its group model is its base)
        except OSError as err:  # the state folder (a full disk): this site cannot take part, and says so
            with log_context(site=self.cfg.site, round=msg.round):
                log.warning("cannot take part in round %d: %s", msg.round, err)
            self.endpoint.set_state("failed", msg.round, f"{type(err).__name__}: {err}")

    def _on_round_start(self, msg: RoundStart) -> None:
        if why := check_ref(msg.blob, MAX_MODEL_BYTES):
            log.warning("dropped round %d announcement: %s", msg.round, why)
            return
        if msg.run_id and msg.run_id != self.progress.run_id:
            self._new_run(msg.run_id)
        with self.lock:
            self.announced = (msg.run_id, msg.round)
            if self.fetch is not None and self.fetch.start.round < msg.round:  # that round is closed
                self.fetch.transfer.close()
                self.fetch = None
                self.working = None
        if self.endpoint.state == "failed" and not self.progress.same(msg):
            self.endpoint.set_state("online", msg.round)  # a new round: this site may be selected again
        if self.cfg.site not in msg.selected or msg.round < self.progress.last_round:
            return
        with self.lock:
            if self.working == _job_key(msg):
                if self.fetch is not None:
                    self.fetch.start = msg  # an extension or a reconnect: keep fetching
                return
            upload = self.upload
        if (
            upload is not None
            and msg.train
            and (upload[0].round, upload[0].base_hash) == (msg.round, msg.base_hash)
        ):
            self._republish(upload)
            return
        if not msg.train and self._report_again(msg):
            return  # evaluated already: the report was sent again
        if self.progress.same(msg) and upload is None:
            if self.progress.settled:
                return  # trained and settled (acknowledged or rejected): nothing to do for this round
            with log_context(site=self.cfg.site, round=msg.round):
                log.warning("this round's update was lost before it was acknowledged: training again")
        with self.lock:
            if self.fetch:
                self.fetch.transfer.close()
            self.fetch = Fetch(msg, InboundBlob(msg.blob, MAX_MODEL_BYTES), requested=time.monotonic())
            self.working = _job_key(msg)
        self.metrics.phase("fetching")
        with log_context(site=self.cfg.site, round=msg.round):
            log.info(
                "selected for round %d: fetching the global model (%d chunks)", msg.round, msg.blob.chunks
            )

    def _republish(self, upload: tuple[UpdateManifest, bytes]) -> None:
        """The round of the pending update was announced again: publish it again (at most once per
        `transfer_idle_s`); the aggregator keeps what it already has and acks a duplicate."""
        if time.monotonic() - self.republished < self.cfg.transfer_idle_s:
            return
        self.republished = time.monotonic()
        manifest, blob = upload
        log.info("round %d announced again: publishing the unacknowledged update again", manifest.round)
        self.endpoint.publish(self.topics.site(self.cfg.site, "update"), encode_message(manifest))
        self._send_chunks(manifest, blob)
        self.metrics.upload_bytes.inc(len(blob))

    def _send_chunks(self, manifest: UpdateManifest, blob: bytes, indices: set[int] | None = None) -> None:
        """The update's chunks (all, or `indices`), cut as its manifest announced (it may predate a
        restart with another `chunk_bytes`)."""
        size = chunk_size_for(manifest.blob, self.cfg.chunk_bytes)
        topic = self.topics.site(self.cfg.site, "chunks")
        self.endpoint.publish_blob(topic, blob, manifest.blob.blob_id, size, indices)

    def _announce_unacknowledged(self) -> None:
        """An update still without an acknowledgement `ack_wait_s` after it was last announced: announce
        its manifest again. Whatever was lost (the manifest, chunks or the ack, in a broker restart or a
        reconnect of either side), the aggregator answers: it acks an update it holds, asks for the chunks
        it misses, or rejects an update of a closed round, which drops it here."""
        with self.lock:
            upload = self.upload
        if upload is None or time.monotonic() - max(self.republished, self.started) < self.cfg.ack_wait_s:
            return
        if not self.endpoint.connected.is_set():
            return
        self.republished = time.monotonic()
        manifest = upload[0]
        with log_context(site=self.cfg.site, round=manifest.round):
            log.info("update for round %d has no acknowledgement yet: announcing it again", manifest.round)
        self.endpoint.publish(self.topics.site(self.cfg.site, "update"), encode_message(manifest))

    def _on_global_chunk(self, topic: str, payload: bytes) -> None:
        try:
            header, data = parse_chunk(payload)
        except ChunkError as err:
            log.warning("dropped global-model chunk: %s", err)
            return
        with self.lock:
            f = self.fetch
            if f is None or header.blob_id != f.start.blob.blob_id:
                return
            try:
                f.transfer.add(header, data)
                if not f.transfer.complete:
                    return
                blob = f.transfer.result()
            except ForeignChunk as err:
                log.warning("dropped global-model chunk, it disagrees with the round announcement: %s", err)
                return
            except ChunkError as err:
                log.warning("global model transfer failed (%s); fetching it again", err)
                f.transfer.close()
                f.transfer = InboundBlob(f.start.blob, MAX_MODEL_BYTES)
                return
            f.transfer.close()
            self.fetch = None
        if hashlib.sha256(blob).hexdigest() != f.start.base_hash:
            log.warning("global model does not match the round's base hash; ignored")
            return
        self.jobs.put((f.start, blob, time.monotonic() - f.began))

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = parse_message(payload, UpdateAck)
        except MessageError as err:
            log.warning("dropped ack: %s", err)
            return
        with self.lock:
            upload = self.upload
        # an ack names (site, round, blob_id): all three must be the pending update's
        ours = upload is not None and (upload[0].site, upload[0].round, upload[0].blob.blob_id) == (
            ack.site,
            ack.round,
            ack.blob_id,
        )
        with log_context(site=self.cfg.site, round=ack.round):
            if ack.accepted:
                log.info("update for round %d acknowledged by the aggregator", ack.round)
            elif ack.reason.startswith("stale round"):  # (it may be in that round's model: an ack was lost)
                log.warning(
                    "update for round %d not taken again: %s; if the aggregator received it before this "
                    "site stopped, it is in that round's model",
                    ack.round,
                    ack.reason,
                )
            else:
                log.warning("update for round %d rejected by the aggregator: %s", ack.round, ack.reason)
            if ours:  # settled either way: a rejected update is never accepted later
                self._drop_pending()
                if self.progress.last_round == ack.round:
                    done = Progress(ack.round, self.progress.base_hash, ack.accepted, self.progress.run_id)
                    self._save_progress(done)

    def _on_resend(self, topic: str, payload: bytes) -> None:
        try:
            req = parse_message(payload, ChunkRequest)
        except MessageError as err:
            log.warning("dropped resend request: %s", err)
            return
        with self.lock:
            upload = self.upload
        if upload is None or upload[0].blob.blob_id != req.blob_id:
            return
        manifest, blob = upload
        self.endpoint.publish(self.topics.site(self.cfg.site, "update"), encode_message(manifest))
        self._send_chunks(manifest, blob, set(req.indices))
        self.metrics.resent_chunks.inc(len(set(req.indices)))
        self.metrics.upload_bytes.inc(min(len(blob), len(set(req.indices)) * self.cfg.chunk_bytes))

    # -- training (trainer thread) ---------------------------------------------------------------------
    def _site(self, start: RoundStart) -> SiteData:
        m = start.model  # (fields the aggregator left out: InputSpec's defaults, as docs/protocol.md says)
        given = {"mean": m.mean, "std": m.std, "pad": m.pad}
        spec = InputSpec(height=m.height, width=m.width, **{k: v for k, v in given.items() if v is not None})
        if self.site_data is None or self.site_data.input_spec != spec:
            self.site_data = SiteData(
                self.cfg.data, spec, start.training.batch_size, self.workers, self.cfg.seed
            )
        self.site_data.batch_size = start.training.batch_size
        first = self.site_data.splits.train[0].path
        if not first.exists():  # a folder unmounted or moved: one line, not one per image
            raise RoundFailed(f"the site's training images are gone ({first} not found)")
        return self.site_data

    def _received_model(self, start: RoundStart, blob: bytes) -> Received:
        """The round's model with this site's classifier (and own BN layers when kept local)."""
        try:
            received = {k: torch.from_numpy(v) for k, v in decode_state(blob).items()}
        except CodecError as err:
            raise RoundFailed(f"global model undecodable: {err}") from None
        site = self._site(start)
        info = start.model
        spec = ModelSpec(
            arch=info.arch, embed_dim=info.embed_dim, last_stride=info.last_stride, dropout=info.dropout
        )
        model = build_model(spec, site.num_classes)
        if self.classifier_file.is_file():
            load_local_state(model, load_file(str(self.classifier_file)))
        private = self.private_bn_file
        own = load_file(str(private)) if start.training.keep_local_bn and private.is_file() else {}
        load_shared_state(model, {**received, **own})
        return Received(model, received, own, site)

    def _evaluate(self, received: Received, start: RoundStart) -> dict[str, float]:
        """Score the round's model as this site serves it: under bn=local with its BatchNorm statistics
        estimated under the global weights (as its deployments: `reid.train.adapt_to_site`), on a copy
        so that training starts from the layers as kept."""
        model, site = received.model, received.site
        if start.training.keep_local_bn:
            model = copy.deepcopy(model)
            adapt_to_site(model, received.own_bn or None, site.statistics_loader(), self.device)
        summary = site.evaluate(model.to(self.device), self.device).summary()
        metrics = {k: round(v, 4) for k, v in summary.items()}
        if "rank1" in metrics:
            log.info("global model here: rank-1 %.1f, mAP %.1f", metrics["rank1"], metrics["mAP"])
        return metrics

    def _evaluation_round(self, start: RoundStart, blob: bytes) -> None:
        """The round after the last one (``train`` false): evaluate the final model, report, keep the
        report so that the round announced again (an aggregator restart) gets it again without work."""
        metrics: dict[str, float] = {}
        self.metrics.phase("evaluating")
        if self.cfg.evaluate != "never":
            metrics = self._evaluate(self._received_model(start, blob), start)
        report = EvalReport(site=self.cfg.site, round=start.round, base_hash=start.base_hash, metrics=metrics)
        atomic_write(self.dir / "eval_report.json", encode_message(report))  # (progress is about training)
        self.endpoint.send(self.topics.site(self.cfg.site, "eval"), encode_message(report))
        log.info("final model evaluated and reported")

    def _report_again(self, start: RoundStart) -> bool:
        """An evaluation round announced again after this site reported: send the kept report again."""
        try:
            report = parse_message((self.dir / "eval_report.json").read_bytes(), EvalReport)
        except (OSError, MessageError):
            return False
        if (report.round, report.base_hash) != (start.round, start.base_hash):
            return False
        self.endpoint.publish(self.topics.site(self.cfg.site, "eval"), encode_message(report))
        return True

    def _train_round(self, start: RoundStart, blob: bytes, fetch_seconds: float) -> None:
        """One training round: load the round's model, evaluate it when asked, train, privatize and
        encode the delta, keep it on disk as pending, then announce and upload it."""
        self._check_current(start)  # (a job that waited for the trainer while a newer round came)
        if not start.train:
            self._evaluation_round(start, blob)
            return
        try:  # before training, not after it: the trained classifier and the update must be kept
            atomic_write(self.dir / ".writable", b"ok")
        except OSError as err:
            raise RoundFailed(f"the state folder cannot be written: {err}") from None
        self.metrics.phase("training")
        self.metrics.progress.set(0)
        timings = {"fetch": round(fetch_seconds, 3)}
        with _timed(timings, "load"):
            got = self._received_model(start, blob)
        metrics: dict[str, float] = {}
        with _timed(timings, "evaluate"):
            if self.cfg.evaluate == "always" or (self.cfg.evaluate == "round" and start.evaluate):
                metrics = self._evaluate(got, start)
        config = self._train_config(start)
        with _timed(timings, "train"):
            result = self._train(got, config, start)
        with _timed(timings, "encode"):
            trained = shared_state(got.model)
            delta, dp_epsilon = self._delta(got, trained, start, config.seed)
            encoding = self.cfg.upload_encoding or start.upload_encoding
            compressed = (
                start.upload_compressed if self.cfg.upload_compressed is None else self.cfg.upload_compressed
            )
            upload = encode_state(delta, encoding, compress=compressed)
            ref = blob_ref(upload, self.cfg.chunk_bytes, encoding, compressed)
        manifest = UpdateManifest(
            site=self.cfg.site,
            round=start.round,
            base_hash=start.base_hash,
            blob=ref,
            n_samples=got.site.num_train_images,
            cdw=min(2.0, max(0.0, result.cdw or 0.0)),
            loss=result.loss,
            train_seconds=result.seconds,
            timings=timings,
            metrics=metrics,
            dp_epsilon=dp_epsilon,
        )
        self._check_current(start)
        self._keep_local_layers(got.model, trained, start)
        self._keep_pending(manifest, upload)
        self._save_progress(Progress(start.round, start.base_hash, False, start.run_id, settled=False))
        self._upload(start, manifest, upload, result)

    def _train_config(self, start: RoundStart) -> TrainConfig:
        t = start.training
        return TrainConfig(
            epochs=self.cfg.local_epochs or t.local_epochs,
            batch_size=t.batch_size,
            lr_head=t.lr_head,
            lr_backbone=t.lr_backbone,
            device=self.cfg.device,
            num_workers=self.workers,
            seed=self.cfg.seed * 100_003 + start.round,
        )

    def _train(self, got: Received, config: TrainConfig, start: RoundStart) -> TrainResult:
        """E local epochs on the site's images (the model in `got` is trained in place)."""
        got.site.seed = config.seed
        result = train_local(
            got.model,
            got.site.train_loader(),
            config,
            progress=lambda done, total: self._trained(start, done, total),
            cdw_images=got.site.cdw_images(),
        )
        self.metrics.images_per_s.set(result.images_per_s)
        if not math.isfinite(result.loss):
            raise RoundFailed(f"training diverged (loss {result.loss}): the global model is not usable here")
        return result

    def _trained(self, start: RoundStart, done: int, total: int) -> None:
        """After each batch of local training: its progress; Stopped when the agent is stopping,
        Superseded when a new run or a newer round was announced meanwhile."""
        self.metrics.progress.set(done / max(1, total))
        if self.stopping.is_set():
            raise Stopped
        self._check_current(start)

    def _check_current(self, start: RoundStart) -> None:
        """Superseded when `start` belongs to a run other than the one this site now takes part in, or to a
        round older than the newest one announced in its run (closed: the aggregator moved on)."""
        if start.run_id and start.run_id != self.progress.run_id:
            raise Superseded(f"round {start.round} of the previous run abandoned: a new run started")
        announced = self.announced
        if announced is not None and announced[0] == start.run_id and start.round < announced[1]:
            raise Superseded(f"round {start.round} abandoned: round {announced[1]} is announced (it closed)")

    def _delta(
        self, got: Received, trained: dict[str, torch.Tensor], start: RoundStart, seed: int
    ) -> tuple[dict, float | None]:
        """What leaves the site: trained - received shared state (without BatchNorm layers under
        bn=local), clipped and noised when DP is on; and the privacy spent so far (None without DP)."""
        delta_t, norm = site_delta(trained, got.shared, start.training.keep_local_bn, self.cfg.dp, seed)
        dp_epsilon = None
        if norm is not None:
            dp_epsilon = self._spend_privacy(start)
            log.info(
                "DP: delta norm %.4f clipped to %.4f, noise sigma %.2f; epsilon so far %.2f (delta %g)",
                norm,
                self.cfg.dp.clip_norm,
                self.cfg.dp.noise_multiplier,
                dp_epsilon,
                self.cfg.dp.delta,
            )
        return {k: v.numpy() for k, v in delta_t.items()}, dp_epsilon

    def _keep_local_layers(
        self, model: ReIDModel, trained: dict[str, torch.Tensor], start: RoundStart
    ) -> None:
        """The classifier (always) and, under bn=local, the BatchNorm layers: what the next round
        trains from. Atomic writes: a kill mid-write leaves the old files."""
        atomic_write(self.classifier_file, save(local_state(model)))
        if start.training.keep_local_bn:
            atomic_write(self.private_bn_file, save({k: trained[k] for k in batchnorm_keys(trained)}))
        else:  # the federation shares BatchNorm layers (again): the site's deployments are as exported
            self.private_bn_file.unlink(missing_ok=True)

    def _upload(
        self, start: RoundStart, manifest: UpdateManifest, upload: bytes, result: TrainResult
    ) -> None:
        if time.time() > start.deadline:
            log.warning("training finished after the round's deadline by this site's clock; uploading anyway")
        self.endpoint.send(self.topics.site(self.cfg.site, "update"), encode_message(manifest))
        self.republished = time.monotonic()
        self.metrics.phase("uploading")
        self.metrics.rounds.inc()
        self.metrics.last_round.set(start.round)
        try:
            self._send_chunks(manifest, upload)
        except TimeoutError as err:  # the update stays pending on disk; the aggregator asks for it again
            log.warning("upload of round %d interrupted (%s); it is sent again when asked", start.round, err)
            return
        self.metrics.upload_bytes.inc(len(upload))
        log.info(
            "round %d: trained %.1f s (%.1f img/s, loss %.3f, CDW %.4f), uploaded %.2f MB (%s)%s",
            start.round,
            result.seconds,
            result.images_per_s,
            result.loss,
            manifest.cdw,
            len(upload) / 1e6,
            manifest.blob.encoding,
            f"; {result.skipped_images} unreadable images skipped" if result.skipped_images else "",
        )

    def _next_job(self) -> tuple[RoundStart, bytes, float] | None:
        """The newest round's model waiting to be trained (None: stop). Models of rounds that arrived
        while this site was still training an older one are dropped: the aggregator has moved on, and
        the queue never holds more than what arrived during one round."""
        job = self.jobs.get()
        while job is not None:
            try:
                newer = self.jobs.get_nowait()
            except queue.Empty:
                return job
            if newer is None:
                return None
            with log_context(site=self.cfg.site, round=job[0].round):
                log.info("round %d skipped: round %d's model arrived meanwhile", job[0].round, newer[0].round)
            job = newer
        return None

    def _trainer(self) -> None:
        while (job := self._next_job()) is not None:
            start, blob, fetch_seconds = job
            with log_context(site=self.cfg.site, round=start.round):
                try:
                    self.endpoint.set_state("training", start.round)  # seen in `status` and the round's log
                    self._train_round(start, blob, fetch_seconds)
                    state, reason = "online", ""
                except Stopped:
                    log.info("training of round %d stopped: it is done again after a restart", start.round)
                    return
                except Superseded as err:
                    log.info("%s", err)
                    state, reason = "online", ""
                except Exception as err:  # the agent keeps running for the next round
                    reason = f"{type(err).__name__}: {err}"
                    if isinstance(err, (RoundFailed, DatasetLayoutError, OSError)):  # one line says it all
                        log.warning("cannot take part in round %d: %s", start.round, err)
                    else:
                        log.exception("round %d failed at this site: %s", start.round, err)
                    state = "failed"
                with self.lock:  # before the state goes out: a restart of this round must find the site idle
                    if self.working == _job_key(start):
                        self.working = None
                self.endpoint.set_state(state, start.round, reason)
                self.metrics.phase("waiting" if state == "online" else "failed")

    def _request_missing(self) -> None:
        with self.lock:
            f = self.fetch
            if f is None:
                return
            idle = self.cfg.transfer_idle_s
            if f.transfer.idle_seconds() < idle or time.monotonic() - f.requested < idle:
                return
            missing = f.transfer.missing()
            f.requested = time.monotonic()
            req = ChunkRequest.first_of(self.cfg.site, f.start.blob.blob_id, missing)
        log.info("asking the aggregator to resend %d chunks of the global model", len(missing))
        self.endpoint.publish(self.topics.global_resend, encode_message(req))

    def _tick(self) -> None:
        """The periodic work of the main loop; an error in it is one log line, not the end of the agent."""
        try:
            self._request_missing()
            self._announce_unacknowledged()
            self.deployments.poll(self.cfg.transfer_idle_s)
        except Exception as err:
            said, when = self.tick_error
            if str(err) != said or time.monotonic() - when > 60:  # one traceback a minute for a lasting error
                self.tick_error = (str(err), time.monotonic())
                log.exception("periodic work failed (the agent keeps running): %s", err)

    def stop(self) -> None:
        """Ask `run()` to return (from a signal handler or another thread)."""
        self.stopping.set()

    def run(self) -> None:
        """Take part in rounds until the run ends or `stop()`; MetricsPortError when metrics_port is taken."""
        if self.cfg.metrics_port is not None:
            port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_host, port)
        trainer = threading.Thread(target=self._trainer, name="trainer", daemon=True)
        trainer.start()
        service_stop = threading.Event()
        service = None
        if self.cfg.serve_features is not None:
            from edge.feature_service import serve_deployed

            args = (self.dir, self.cfg.serve_features, service_stop)
            target = bound(serve_deployed, self.cfg.site)
            service = threading.Thread(target=target, args=args, name="features", daemon=True)
            service.start()
        self.endpoint.start()
        with log_context(site=self.cfg.site):
            log.info("site %s up: %s, state in %s", self.cfg.site, self.cfg.data, self.dir)
            try:
                while not self.done.wait(0.5) and not self.stopping.is_set():
                    self._tick()
                if self.stopping.is_set():
                    log.info("stopping (signal); a pending update stays on disk and is sent after a restart")
            except KeyboardInterrupt:
                log.info("stopping (Ctrl-C); a pending update stays on disk and is sent after a restart")
            finally:
                self.jobs.put(None)
                trainer.join(timeout=STOP_WAIT_S if not self.done.is_set() else 600)
                drain = self.cfg.deploy_drain_s if self.done.is_set() else 0.0
                if drain:  # a site that starts after the run gets the retained RunEnd and the retained
                    # deployment on two topics: the RunEnd first, the deployment a moment later, and a
                    # site that looked for a deployment in progress at once left without it
                    time.sleep(RETAINED_SETTLE_S)
                self.deployments.stop(drain, self.cfg.transfer_idle_s)
                service_stop.set()
                if service is not None:
                    service.join(timeout=30)
                self.metrics.close()
                self.endpoint.stop()
