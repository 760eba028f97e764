"""`cloud-aggregator serve`: the networked aggregator's round state machine.

announce (retained RoundStart + global blob chunks) -> collect (manifests + update chunks; missing
chunks re-requested after `transfer_idle_s` without progress) -> close when every selected site is
accepted, or at the deadline with quorum (without quorum the deadline is extended `max_extensions`
times, then the round is restarted with a new selection: a round never hangs) -> aggregate (+KD when
due) -> checkpoint -> next round.

Every accepted update is journaled to disk before it is acknowledged; killing the process at any moment
and starting it again on the same state dir resumes the open round with every acknowledged update.
MQTT handlers run on the endpoint's worker thread; the round loop runs on the caller's thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cloud.deploy import DeploymentSource, deploy_round
from cloud.journal import Journal
from cloud.strategy import (
    KDConfig,
    LayoutError,
    StrategyConfig,
    StreamingAggregator,
    TeacherMean,
    Update,
    distill,
    embed_public,
)
from protocol.chunks import DEFAULT_CHUNK_BYTES, ChunkError, Reassembler, parse_chunk
from protocol.codec import CodecError, Encoding, decode_state, encode_state
from protocol.messages import (
    BlobRef,
    ChunkRequest,
    MessageError,
    ModelInfo,
    NodeStatus,
    RoundStart,
    RunEnd,
    TrainingInfo,
    UpdateAck,
    UpdateManifest,
    encode_message,
    parse_message,
)
from protocol.mqtt import Endpoint
from protocol.topics import Topics
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader, read_image_folder
from reid.logs import log_context
from reid.model import ModelSpec, build_model, load_shared_state, shared_state

log = logging.getLogger(__name__)


class ServeConfig(BaseModel):
    """Settings of `cloud-aggregator serve` (TOML file + flags)."""

    model_config = ConfigDict(extra="forbid")

    federation: str = "default"
    broker: str = "auto"
    identity_dir: Path | None = Field(None, description="provisioned identity (mutual TLS with mqtts://)")
    state_dir: Path = Path("state/cloud")
    rounds: int = Field(10, ge=1)
    min_sites: int = Field(1, ge=1, description="sites needed online to start a round")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of online sites selected per round")
    deadline_s: float = Field(600.0, gt=0, description="collection time per round")
    quorum: int = Field(1, ge=1, description="accepted updates needed to close a round at its deadline")
    max_extensions: int = Field(3, ge=0, description="deadline extensions without quorum before a restart")
    transfer_idle_s: float = Field(5.0, gt=0, description="re-request missing chunks after this idle time")
    wait_for_sites_s: float = Field(3600.0, gt=0)
    eval_every: int = Field(1, ge=1, description="sites evaluate the global model every N rounds")
    seed: int = 0
    model: ModelSpec = ModelSpec()
    input: InputSpec = InputSpec()
    pretrained: str | None = None
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr_head: float = 0.05
    lr_backbone: float = 0.005
    strategy: StrategyConfig = StrategyConfig()
    kd: KDConfig = KDConfig()
    kd_enabled: bool = False
    public: Path | None = None
    upload_encoding: Encoding = "fp16"
    upload_compressed: bool = False
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=1024, le=64 << 20)
    max_update_bytes: int = Field(1 << 30, ge=1024)
    deploy_every: int = Field(
        0, ge=0, description="export and deploy the global model every N rounds; 0: off"
    )
    deploy_precision: Literal["fp32", "fp16"] = "fp32"
    deploy_images: Path | None = Field(None, description="parity-gate images to deploy (default: public)")

    def identity(self) -> dict:
        """What must not change when a run is resumed."""
        return self.model_dump(
            mode="json", include={"federation", "model", "input", "seed", "strategy", "pretrained"}
        )


def model_info(cfg: ServeConfig) -> ModelInfo:
    m, i = cfg.model, cfg.input
    return ModelInfo(
        arch=m.arch,
        embed_dim=m.embed_dim,
        last_stride=m.last_stride,
        dropout=m.dropout,
        height=i.height,
        width=i.width,
    )


class Stopped(Exception):
    """The aggregator was asked to stop; its state on disk lets it resume."""


@dataclass
class OpenRound:
    round: int
    selected: list[str]
    base_hash: str
    blob: bytes
    blob_ref: BlobRef
    deadline: float
    started: float
    kd_due: bool
    agg: StreamingAggregator
    teachers: TeacherMean | None
    manifests: dict[str, UpdateManifest] = field(default_factory=dict)
    transfers: dict[str, Reassembler] = field(default_factory=dict)
    accepted: dict[str, UpdateManifest] = field(default_factory=dict)
    last_resend: dict[str, float] = field(default_factory=dict)


class Aggregator:
    def __init__(self, cfg: ServeConfig, broker_url: str) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.federation)
        self.journal = Journal(cfg.state_dir / cfg.federation)
        self.journal.check_identity(cfg.identity())
        self.lock = threading.RLock()
        self.online: dict[str, str] = {}
        self.current: OpenRound | None = None
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, 1, cfg.pretrained)
        last = self.journal.last_global()
        if last is None:
            self.completed = -1
            self.global_state = shared_state(self.model)
            self.journal.save_global(-1, self.global_state, {"round": "-1"})
        else:
            self.completed, self.global_state = last
        self.public: ImageDataset | None = None
        if cfg.kd_enabled:
            if cfg.public is None:
                raise ValueError("kd_enabled needs a public image folder (public = ...)")
            self.public = ImageDataset(read_image_folder(cfg.public), eval_transform(cfg.input))
        self.deploy_images: list[Path] = []
        if cfg.deploy_every:
            folder = cfg.deploy_images or cfg.public
            if folder is None:
                raise ValueError("deploy_every needs parity images (deploy_images = ... or public = ...)")
            self.deploy_images = read_image_folder(folder)[:32]
        self.round_payload: bytes | None = None  # the retained round document, re-published on reconnect
        self.stopping = threading.Event()
        t = self.topics
        self.endpoint = Endpoint(
            broker_url,
            t,
            "aggregator",
            "aggregator",
            {
                t.status_all: self._on_status,
                t.any_site("update"): self._on_manifest,
                t.any_site("chunks"): self._on_chunk,
                t.global_resend: self._on_global_resend,
            },
            identity_dir=cfg.identity_dir,
        )
        self.deployments = DeploymentSource(self.endpoint, self.journal.root)
        self.endpoint.on_connected = self._republish_round

    # -- handlers (endpoint worker thread) -------------------------------------------------------------
    def _republish_round(self) -> None:
        """After a reconnect (e.g. the broker restarted and lost its retained messages)."""
        if self.round_payload is not None:
            self.endpoint.publish(self.topics.round, self.round_payload, retain=True)
        self.deployments.republish()

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            status = parse_message(payload, NodeStatus)
        except MessageError as err:
            log.warning("dropped status on %s: %s", topic, err)
            return
        if status.role == "site" and topic == self.topics.status(status.node):
            with self.lock:
                self.online[status.node] = status.state

    def _ack(self, site: str, round_: int, blob_id: str, accepted: bool, reason: str = "") -> None:
        ack = UpdateAck(site=site, round=round_, blob_id=blob_id, accepted=accepted, reason=reason)
        self.endpoint.publish(self.topics.site(site, "ack"), encode_message(ack))

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        site = self.topics.site_of(topic) or "?"
        try:
            m = parse_message(payload, UpdateManifest)
        except MessageError as err:
            log.warning("dropped update manifest from %s: %s", site, err)
            return
        if m.site != site:
            log.warning("dropped update manifest on %s: it claims to be from site %s", topic, m.site)
            return
        with self.lock:
            cur = self.current
            reason = ""
            if cur is None:
                reason = "no round is open"
            elif m.round != cur.round:
                reason = f"stale round {m.round} (current round {cur.round})"
            elif m.base_hash != cur.base_hash:
                reason = "update computed against another base model (wrong base hash)"
            elif site not in cur.selected:
                reason = f"site {site} is not selected for round {cur.round}"
            elif site in cur.accepted:
                if cur.accepted[site].blob.blob_id == m.blob.blob_id:
                    self._ack(site, m.round, m.blob.blob_id, True, "duplicate")
                    return
                reason = "a different update of this site was already accepted this round"
            if reason:
                with log_context(site=site):
                    log.warning("update rejected: %s", reason)
                self._ack(site, m.round, m.blob.blob_id, False, reason)
                return
            cur.manifests[site] = m
            old = cur.transfers.pop(site, None)
            if old is not None:
                old.close()

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        site = self.topics.site_of(topic) or "?"
        try:
            header, data = parse_chunk(payload)
        except ChunkError as err:
            log.warning("dropped chunk from %s: %s", site, err)
            return
        with self.lock:
            cur = self.current
            m = cur.manifests.get(site) if cur else None
            if cur is None or m is None or header.blob_id != m.blob.blob_id or site in cur.accepted:
                log.debug("chunk of blob %s from %s matches no pending update", header.blob_id, site)
                return
            if (header.blob_size, header.blob_sha256, header.count) != (
                m.blob.size,
                m.blob.sha256,
                m.blob.chunks,
            ):
                log.warning("dropped chunk from %s: it disagrees with the manifest", site)
                return
            try:
                transfer = cur.transfers.get(site)
                if transfer is None:
                    transfer = cur.transfers[site] = Reassembler(header, max_bytes=self.cfg.max_update_bytes)
                transfer.add(header, data)
                if not transfer.complete:
                    return
                blob = transfer.result()
            except ChunkError as err:
                self._reject(cur, site, m, str(err))
                return
            finally:
                if site in cur.transfers and cur.transfers[site].complete:
                    cur.transfers.pop(site).close()
            self._accept(cur, site, m, blob, journaled=False)

    def _on_global_resend(self, topic: str, payload: bytes) -> None:
        try:
            req = parse_message(payload, ChunkRequest)
        except MessageError as err:
            log.warning("dropped chunk request: %s", err)
            return
        with self.lock:
            cur = self.current
        if cur is None or req.blob_id != cur.blob_ref.blob_id:
            return
        indices = {i for i in req.indices if 0 <= i < cur.blob_ref.chunks}
        log.info("resending %d chunks of the global model to %s", len(indices), req.requester)
        self.endpoint.publish_blob(
            self.topics.global_chunks, cur.blob, cur.blob_ref.blob_id, self.cfg.chunk_bytes, indices=indices
        )

    # -- accepting updates -----------------------------------------------------------------------------
    def _reject(self, cur: OpenRound, site: str, m: UpdateManifest, reason: str) -> None:
        with log_context(site=site):
            log.warning("update rejected: %s", reason)
        cur.manifests.pop(site, None)
        self._ack(site, cur.round, m.blob.blob_id, False, reason)

    def _accept(self, cur: OpenRound, site: str, m: UpdateManifest, blob: bytes, journaled: bool) -> None:
        with log_context(site=site, round=cur.round):
            try:
                delta = {
                    k: torch.from_numpy(v) for k, v in decode_state(blob, self.cfg.max_update_bytes).items()
                }
                cur.agg.layout.check(delta, "update")
            except (CodecError, LayoutError) as err:
                self._reject(cur, site, m, str(err))
                if journaled:
                    self.journal.drop_update(cur.round, site)
                return
            if not journaled:
                self.journal.journal_update(cur.round, site, blob, encode_message(m))
            rejection = cur.agg.add(Update(site, delta, m.n_samples, m.cdw))
            if rejection is not None:
                self.journal.drop_update(cur.round, site)
                self._reject(cur, site, m, rejection.reason)
                return
            if cur.teachers is not None and self.public is not None:
                load_shared_state(self.model, {k: self.global_state[k] + delta[k] for k in self.global_state})
                loader = make_loader(self.public, 64, train=False)
                cur.teachers.add(embed_public(self.model, loader, len(self.public)))
            cur.accepted[site] = m
            cur.manifests.pop(site, None)
            log.info(
                "update accepted (%d/%d): %d images, CDW %.4f, loss %.3f",
                len(cur.accepted),
                len(cur.selected),
                m.n_samples,
                m.cdw,
                m.loss,
            )
            self._ack(site, cur.round, m.blob.blob_id, True)

    # -- the round loop (caller thread) ----------------------------------------------------------------
    def _select(self, r: int) -> list[str]:
        waited = time.monotonic()
        while True:
            with self.lock:
                online = sorted(s for s, state in self.online.items() if state != "offline")
            if len(online) >= self.cfg.min_sites:
                break
            if time.monotonic() - waited > self.cfg.wait_for_sites_s:
                raise TimeoutError(
                    f"fewer than {self.cfg.min_sites} sites online after {self.cfg.wait_for_sites_s} s"
                )
            if self.stopping.wait(0.2):
                raise Stopped
        k = min(len(online), max(self.cfg.min_sites, math.ceil(self.cfg.fraction * len(online))))
        return sorted(random.Random(self.cfg.seed * 100_003 + r).sample(online, k))

    def _publish_round(self, cur: OpenRound) -> None:
        cfg = self.cfg
        msg = RoundStart(
            federation=cfg.federation,
            round=cur.round,
            base_hash=cur.base_hash,
            blob=cur.blob_ref,
            model=model_info(cfg),
            deadline=cur.deadline,
            selected=cur.selected,
            training=TrainingInfo(
                local_epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                lr_head=cfg.lr_head,
                lr_backbone=cfg.lr_backbone,
                keep_local_bn=cfg.strategy.bn == "local",
            ),
            evaluate=(cur.round % cfg.eval_every == 0),
            upload_encoding=cfg.upload_encoding,
            upload_compressed=cfg.upload_compressed,
        )
        self.round_payload = encode_message(msg)
        self.endpoint.publish(self.topics.round, self.round_payload, retain=True).wait_for_publish(10)
        self.endpoint.publish_blob(self.topics.global_chunks, cur.blob, cur.blob_ref.blob_id, cfg.chunk_bytes)

    def _open_round(self, r: int, reselect: bool = False) -> OpenRound:
        blob = encode_state({k: v.numpy() for k, v in self.global_state.items()}, "fp32")
        base_hash = hashlib.sha256(blob).hexdigest()  # deterministic: see protocol.codec
        saved = self.journal.open_round()
        resumed = (
            saved is not None and saved["round"] == r and saved["base_hash"] == base_hash and not reselect
        )
        if saved is not None and saved["round"] == r and saved["base_hash"] != base_hash:
            log.warning(
                "journal of round %d was written for base %s, the checkpoint gives %s: not resuming it",
                r,
                saved["base_hash"][:12],
                base_hash[:12],
            )
        selected = saved["selected"] if resumed else self._select(r)
        now = time.time()
        ref = BlobRef(
            blob_id=base_hash[:32],
            size=len(blob),
            sha256=base_hash,
            chunks=max(1, -(-len(blob) // self.cfg.chunk_bytes)),
        )
        kd_due = self.public is not None and (r + 1) % self.cfg.kd.every == 0
        cur = OpenRound(
            r,
            selected,
            base_hash,
            blob,
            ref,
            now + self.cfg.deadline_s,
            now,
            kd_due,
            StreamingAggregator(self.global_state, self.cfg.strategy),
            TeacherMean(self.cfg.kd.normalize) if kd_due else None,
        )
        self.journal.save_open_round({"round": r, "selected": selected, "base_hash": base_hash})
        with self.lock:
            self.current = cur
            for site, site_blob, manifest in self.journal.journaled_updates(r) if resumed else []:
                try:
                    m = parse_message(manifest, UpdateManifest)
                except MessageError as err:
                    log.warning("journaled manifest of %s unreadable (%s); the site will resend", site, err)
                    continue
                self._accept(cur, site, m, site_blob, journaled=True)
        log.info(
            "round %d open (base %s): %d sites selected (%s)%s",
            r,
            base_hash[:12],
            len(selected),
            ", ".join(selected),
            f", {len(cur.accepted)} journaled updates restored" if resumed else "",
        )
        self.endpoint.set_state("training", r)
        self._publish_round(cur)
        return cur

    def _collect(self, cur: OpenRound) -> bool:
        """Wait for the round's updates; False when it must be restarted (no quorum after extensions)."""
        extensions = 0
        while True:
            if self.stopping.wait(0.1):
                raise Stopped
            now = time.time()
            with self.lock:
                if set(cur.accepted) >= set(cur.selected):
                    return True
                for site, m in cur.manifests.items():
                    t = cur.transfers.get(site)
                    idle = t.idle_seconds() if t else now - cur.last_resend.get(site, now)
                    if site not in cur.last_resend:
                        cur.last_resend[site] = now
                    elif (
                        idle > self.cfg.transfer_idle_s
                        and now - cur.last_resend[site] > self.cfg.transfer_idle_s
                    ):
                        missing = t.missing() if t else list(range(m.blob.chunks))
                        req = ChunkRequest(requester="aggregator", blob_id=m.blob.blob_id, indices=missing)
                        self.endpoint.publish(self.topics.site(site, "resend"), encode_message(req))
                        cur.last_resend[site] = now
                        log.info("asked %s to resend %d chunks", site, len(missing))
                accepted = len(cur.accepted)
            if now < cur.deadline:
                continue
            if accepted >= self.cfg.quorum:
                missing_sites = sorted(set(cur.selected) - set(cur.accepted))
                log.warning(
                    "deadline passed: closing round %d with %d/%d updates (missing: %s)",
                    cur.round,
                    accepted,
                    len(cur.selected),
                    ", ".join(missing_sites),
                )
                return True
            if extensions >= self.cfg.max_extensions:
                log.warning(
                    "round %d has no quorum (%d/%d) after %d extensions: restarting it",
                    cur.round,
                    accepted,
                    self.cfg.quorum,
                    extensions,
                )
                return False
            extensions += 1
            cur.deadline = now + self.cfg.deadline_s
            log.warning(
                "no quorum at the deadline (%d/%d): extending round %d by %.0f s",
                accepted,
                self.cfg.quorum,
                cur.round,
                self.cfg.deadline_s,
            )
            self._publish_round(cur)

    def _close(self, cur: OpenRound) -> None:
        clock = time.perf_counter()
        with self.lock:
            self.current = None
            result = cur.agg.finish()
        new_state = {k: v.clone() for k, v in result.state.items()}
        aggregate_seconds = time.perf_counter() - clock
        summary: dict = {
            "round": cur.round,
            "kind": "round",
            "weights": result.weights,
            "rejected": [r.__dict__ for r in result.rejected],
            "selected": cur.selected,
            "accepted": sorted(cur.accepted),
            "collect_seconds": round(time.time() - cur.started, 3),
            "aggregate_seconds": round(aggregate_seconds, 4),
            "upload_bytes": {s: m.blob.size for s, m in sorted(cur.accepted.items())},
            "site_timings": {s: m.timings for s, m in sorted(cur.accepted.items())},
            "dp_epsilon": {
                s: m.dp_epsilon for s, m in sorted(cur.accepted.items()) if m.dp_epsilon is not None
            },
        }
        if cur.teachers is not None and cur.teachers.count and self.public is not None:
            load_shared_state(self.model, new_state)
            loader = make_loader(
                self.public, self.cfg.kd.batch_size, train=True, seed=self.cfg.seed + cur.round
            )
            kd = distill(self.model, loader, cur.teachers.target(), self.cfg.kd)
            new_state = shared_state(self.model)
            summary["kd"] = {
                "batches": kd.batches,
                "mse_first": kd.loss_first,
                "mse_last": kd.loss_last,
                "seconds": round(kd.seconds, 3),
            }
        self.global_state = new_state
        self.journal.save_global(cur.round, new_state, {"round": str(cur.round)})
        summary["round_seconds"] = round(time.time() - cur.started, 3)
        records = [
            {"round": cur.round - 1, "site": s, "model": "global", **m.metrics}
            for s, m in sorted(cur.accepted.items())
            if m.metrics
        ]
        self.journal.append_metrics([*records, summary])
        self.completed = cur.round
        log.info("round %d closed: %d updates aggregated", cur.round, len(result.weights))

    def _maybe_deploy(self, r: int) -> None:
        every = self.cfg.deploy_every
        if not every or ((r + 1) % every and r != self.cfg.rounds - 1):
            return
        try:
            deploy_round(self.endpoint, self.journal.root, self.deploy_images, r, self.cfg.deploy_precision)
        except Exception as err:  # the run goes on; the sites keep their current model
            log.warning("round %d not deployed: %s", r, err)

    def stop(self) -> None:
        """Ask `run()` to return (from another thread or a signal handler); the state on disk is kept."""
        self.stopping.set()

    def run(self) -> None:
        self.endpoint.start()
        try:
            for r in range(self.completed + 1, self.cfg.rounds):
                with log_context(round=r):
                    cur = self._open_round(r)
                    while not self._collect(cur):
                        cur = self._open_round(r, reselect=True)
                    self._close(cur)
                    self._maybe_deploy(r)
            end = RunEnd(federation=self.cfg.federation, rounds=self.cfg.rounds)
            self.round_payload = encode_message(end)
            self.endpoint.publish(self.topics.round, self.round_payload, retain=True).wait_for_publish(10)
            self.endpoint.set_state("idle", self.completed)
            log.info("run complete: %d rounds", self.cfg.rounds)
        except Stopped:
            log.info("stopped after round %d; start again on the same state dir to resume", self.completed)
        finally:
            self.endpoint.stop()
