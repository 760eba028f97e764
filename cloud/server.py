"""`cloud-aggregator serve`: the networked aggregator's round state machine.

announce (retained RoundStart + global blob chunks) -> collect (manifests + update chunks; missing
chunks re-requested after `transfer_idle_s` without progress) -> close when every selected site is
accepted, or at the deadline with quorum (without quorum the deadline is extended `max_extensions`
times, then the round is restarted with a new selection: a round never hangs) -> aggregate (+KD when
due) -> checkpoint -> next round. After the last round, an evaluation round (RoundStart with ``train``
false) sends the final model to every online site and records what they report (EvalReport).

Every accepted update is journaled to disk before it is acknowledged; killing the process at any moment
and starting it again on the same state dir resumes the open round with every acknowledged update.
MQTT handlers run on the endpoint's worker thread; the round loop runs on the caller's thread. The
round's own state and the rule admitting a manifest are in cloud/round.py (pure), the settings in
cloud/config.py; this module wires them to MQTT and the journal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path

import torch

from cloud.config import ServeConfig, model_info
from cloud.deploy import (
    DeploymentSource,
    ManifestUnacknowledged,
    deploy_round,
    latest_deployment,
    record_scheduled,
    scheduled_round,
)
from cloud.journal import Journal, StateDirError
from cloud.monitoring import AggregatorMetrics, RunHistory, SiteFacts, View
from cloud.round import GroupBlob, OpenRound, admit, short_reason, update_limit
from cloud.strategy import (
    FlatLayout,
    KDDiverged,
    LayoutError,
    NoUpdatesError,
    RoundAggregate,
    StreamingAggregator,
    TeacherMean,
    distill,
    embed_public,
    kd_summary,
    raw_weight,
)
from cloud.strategy.caps import (
    allowances,
    capped_samples,
    clip_scales,
    max_share,
    norm_bound,
    path_claims,
    share_capped,
)
from cloud.strategy.clustering import Clustering
from cloud.strategy.flat import l2_norm
from cloud.strategy.selection import sample_sites, sites_per_round
from protocol.chunks import (
    ChunkError,
    ForeignChunk,
    InboundBlob,
    blob_ref,
    parse_chunk,
)
from protocol.codec import CodecError, encode_state, iter_state_file
from protocol.messages import (
    MAX_SELECTED,
    ChunkRequest,
    EvalReport,
    MessageError,
    NodeStatus,
    RoundStart,
    RunEnd,
    UpdateAck,
    UpdateManifest,
    encode_message,
    parse_message,
)
from protocol.mqtt import Endpoint
from protocol.resend import ChunkResender
from protocol.topics import RESERVED_NODES, Topics
from reid.data import ImageDataset, make_loader, public_images, read_image_folder
from reid.files import hold_lock
from reid.logs import log_context
from reid.model import build_model, load_shared_state, shared_state
from reid.train import TrainConfig, on_device, resolve_device

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 15.0  # a waiting round says what it waits for this often
FAILED_RETRIES = 2  # a restarted round selects a site that failed in it again at most this often
# the retained statuses reach a process that has just (re)connected over a slow link after a moment:
# "no site is online" is concluded only after waiting this long for them
STATUS_SETTLE_S = 10.0
# after the run, the last deployment is served while online sites that do not serve it yet ask for it: a
# site stops asking (its requests back off to one a minute) after this long without a request
FINAL_DEPLOY_QUIET_S = 90.0


class Stopped(Exception):
    """The aggregator was asked to stop; its state on disk lets it resume."""


def _libc_malloc_tuning() -> Callable[[], None]:
    """glibc only: serve big buffers straight from the OS (no heap growth that is never given back when a
    round's transient buffers are freed) and return a function that trims the heap; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: allocations >= 1 MiB are mmapped, freed at once
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


class Aggregator:
    """The networked aggregator: owns the open round, the journal and the global state.

    `run()` drives the rounds on the caller's thread; MQTT handlers run on the endpoint's worker thread
    and share state under `lock`; global-model resends go out on their own thread, coalesced.
    """

    def __init__(self, cfg: ServeConfig, broker_url: str) -> None:
        self.cfg = cfg
        self.trim_heap = _libc_malloc_tuning()
        self.topics = Topics(cfg.federation)
        self.journal = Journal(cfg.state_dir / cfg.federation)
        self.owner = hold_lock(self.journal.root / "aggregator.lock")  # held for the life of the process
        if self.owner is None:  # two aggregators would both journal, announce and close every round
            raise StateDirError(
                f"{self.journal.root} is in use by another cloud-aggregator serve of federation "
                f"{cfg.federation}: one aggregator per federation and state folder"
            )
        self.journal.check_identity(cfg.identity(), ServeConfig.stored_identity)
        self.lock = threading.RLock()
        self.online: dict[str, tuple[str, int | None]] = {}  # site -> (state, round) of its status
        self.connection = 0  # connections to the broker so far (`_republish_round` counts them)
        self.closed: tuple[int, dict[str, str]] = (-2, {})  # the last closed round: site -> accepted blob id
        self.heard_on: dict[str, int] = {}  # site -> the connection its last status came on
        self.facts: dict[str, SiteFacts] = {}  # site -> what the dashboard shows of it
        self.phase = "starting"
        self.history = RunHistory(self.journal.root / "metrics.jsonl")
        self.metrics = AggregatorMetrics(lambda: self.view(history=False))
        self.current: OpenRound | None = None
        # (site, reason) of rejections outside the open round already logged since it opened (bounded)
        self.said_rejections: set[tuple[str, str]] = set()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, 1, cfg.pretrained)  # on the CPU between KD's uses of `device`
        self.device = resolve_device(cfg.device)
        last = self.journal.last_global()
        if last is None:
            self.completed, state = -1, shared_state(self.model)
            self.journal.save_global(-1, state, cfg.model, cfg.input, cfg.strategy.bn)
        else:
            self.completed, state = last
            self._finish_close()
        if self.completed + 1 > cfg.rounds:
            raise ValueError(
                f"{self.completed + 1} rounds are done in {self.journal.root}, more than rounds = "
                f"{cfg.rounds}: raise rounds to go on, or give another state dir"
            )
        self.run_id = self.journal.run_id()
        opened = self.journal.open_round()
        if self.journal.went_back or (opened is not None and opened["round"] > self.completed + 1):
            log.warning(
                "the state dir went back to round %d (rounds after it were acknowledged and are lost): a new "
                "run id, so that the sites train from there again",
                self.completed,
            )
            self.run_id = self.journal.renew_run_id()
            if self.journal.forget_metrics_after(self.completed):  # made again as the rounds are redone
                self.history = RunHistory(self.journal.root / "metrics.jsonl")
        self.layout = FlatLayout(state)
        self.global_flat = self.layout.flatten(state)
        self.global_state = self.layout.unflatten(*self.global_flat)  # views: one copy of the model
        del state
        self.scratch = self.layout.empty()  # validation buffer: one update at a time
        # the previous round's lower median delta norm (the norm bound's reference), also after a restart
        self.reference_norm = self.history.median_norm(self.completed)
        self.clustering = Clustering(cfg.cluster, cfg.strategy, cfg.seed) if cfg.cluster else None
        if self.clustering is not None:
            if cfg.kd_enabled:
                raise ValueError("clustering (cluster) and KD cannot be combined: leave kd_enabled off")
            saved = self.journal.load_groups(self.completed) if self.completed >= 0 else None
            if saved is not None:
                self.clustering.restore(*saved)
        self.public: ImageDataset | None = None
        if cfg.kd_enabled:
            if cfg.public is None:
                raise ValueError("kd_enabled needs a public image folder (public = ...)")
            self.public = public_images(cfg.public, cfg.input)
        self.deploy_images: list[Path] = []
        if cfg.deploy_every:
            folder = cfg.deploy_images or cfg.public
            if folder is None:
                raise ValueError("deploy_every needs parity images (deploy_images = ... or public = ...)")
            self.deploy_images = read_image_folder(folder)[:32]
        self.round_payload: bytes | None = None  # the retained round document, re-published on reconnect
        self.metrics_url: str | None = None  # where the dashboard and /metrics answer (metrics_port)
        self.stopping = threading.Event()
        self.fatal: StateDirError | None = None
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
                t.any_site("eval"): self._on_eval,
                t.global_resend: lambda topic, payload: self.resender.on_request(topic, payload),
            },
            identity_dir=cfg.identity_dir,
        )
        self.resender = ChunkResender(
            self.endpoint,
            t.global_chunks,
            cfg.chunk_bytes,
            self._global_chunks_for,
            self._global_blob,
            cfg.min_resend_interval_s,
            "global model",
        )
        self.deployments = DeploymentSource(self.endpoint, self.journal.root, cfg.min_resend_interval_s)
        self.endpoint.on_connected = self._republish_round

    # -- handlers (endpoint worker thread) -------------------------------------------------------------
    def _republish_round(self) -> None:
        """After a reconnect (e.g. the broker restarted and lost its retained messages). What the sites
        said before is stale: a site that died meanwhile left no will on a broker that restarted, and
        would be selected forever. A site is selectable again once its status comes on this connection:
        its retained one (a broker that kept them) or the one it sends when it reconnects. (Paho's network
        thread runs this: it takes no lock, it only counts the connection.)"""
        self.connection += 1
        if self.round_payload is not None:
            self.endpoint.publish(self.topics.round, self.round_payload, retain=True)
        self.deployments.republish()

    def _on_status(self, topic: str, payload: bytes) -> None:
        try:
            status = parse_message(payload, NodeStatus)
        except MessageError as err:
            log.warning("dropped status on %s: %s", topic, err)
            return
        if topic != self.topics.status(status.node):  # a node speaks for itself only
            log.warning("dropped a status on %s that names node %s", topic, status.node)
            return
        if status.role != "site":
            return
        if status.node in RESERVED_NODES:  # (a node of another role's name: never a site of this run)
            log.warning("dropped a site status on %s: %s is a reserved node name", topic, status.node)
            return
        with self.lock:
            self.online[status.node] = (status.state, status.round)
            self.heard_on[status.node] = self.connection
            facts = self.facts.setdefault(status.node, SiteFacts())
            facts.deployed = status.deployed
            if status.state != "offline":  # (its will, or a retained one: the broker speaks, not the site)
                facts.last_seen = time.time()
            cur = self.current
            # only failures in the open round count: a retained "failed" of an earlier run's round 0 must
            # not keep a site out of this run's round 0
            if status.state == "failed" and cur is not None and status.round == cur.number:
                cur.failed_once.add(status.node)
                if status.node in cur.waiting():
                    cur.failed[status.node] = status.reason or "no reason given"
                    self._save_open(cur)  # (a restart keeps the failure)
                    with log_context(site=status.node, round=cur.number):
                        log.warning("site cannot take part in this round: %s", cur.failed[status.node])

    def _ack(self, site: str, round_: int, blob_id: str, accepted: bool, reason: str = "") -> None:
        ack = UpdateAck(site=site, round=round_, blob_id=blob_id, accepted=accepted, reason=reason[:1000])
        self.endpoint.publish(self.topics.site(site, "ack"), encode_message(ack))

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        site = self.topics.site_of(topic)
        if site is None or not payload:  # (empty: a retained message being cleared)
            return
        try:
            m = parse_message(payload, UpdateManifest)
        except MessageError as err:
            log.warning("dropped update manifest from %s: %s", site, err)
            return
        with self.lock:
            self._heard(site)
            cur = self.current
            refusal = admit(cur, site, m, self.completed)
            closed_round, closed_accepted = self.closed
            accepted_before = (
                m.site == site and m.round == closed_round and closed_accepted.get(site) == m.blob.blob_id
            )
            if refusal is not None and (refusal[0] == "duplicate" or accepted_before):
                # (an update of the round that closed or is closing, announced again by a site that missed
                # its ack: it was aggregated, and the answer says so)
                self._ack(site, m.round, m.blob.blob_id, True, "duplicate")
                return
            if refusal is not None and refusal[0] == "no_round" and cur is None and m.round > self.completed:
                # starting, resuming or closing a round: not settled now (once per site and round in the log)
                said = (site, f"early {m.round}")
                if said not in self.said_rejections and len(self.said_rejections) < 1024:
                    self.said_rejections.add(said)
                    with log_context(site=site, round=m.round):
                        log.info("update manifest while no round is open: judged when it is announced again")
                return
            if refusal is not None:
                self._reject(cur, site, m, refusal[1], refusal[0])
                return
            assert cur is not None
            pending = cur.manifests.get(site)
            cur.manifests[site] = m  # (the newest manifest counts)
            if cur.failed.pop(site, None) is not None:  # (it failed or was rejected, and sends an update
                self._save_open(cur)  # after all: the round waits for this upload like any other)
            if pending is not None and pending.blob == m.blob:
                return  # announced again (a site answering a request): keep the chunks received so far
            cur.last_resend.pop(site, None)
            old = cur.transfers.pop(site, None)
            if old is not None:
                old.close()
            # (spooled to a file beside the journal from the first byte: many uploads in flight hold one
            # chunk each in memory)
            try:
                spool = self.journal.root
                cur.transfers[site] = InboundBlob(m.blob, cur.limit, spool_bytes=0, spool_dir=spool)
            except OSError as err:
                cur.manifests.pop(site, None)
                self._fail(StateDirError(f"cannot spool an upload in {self.journal.root}: {err}"))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        site = self.topics.site_of(topic) or "?"
        try:
            header, data = parse_chunk(payload)
        except ChunkError as err:
            log.warning("dropped chunk from %s: %s", site, err)
            return
        with self.lock:
            self._heard(site)
            cur = self.current
            m = cur.manifests.get(site) if cur else None
            transfer = cur.transfers.get(site) if cur and m else None
            if cur is None or m is None or transfer is None or header.blob_id != m.blob.blob_id:
                log.debug("chunk of blob %s from %s matches no pending update", header.blob_id, site)
                return
            try:
                transfer.add(header, data)
                if not transfer.complete:
                    return
                blob = transfer.result()
            except ForeignChunk as err:
                log.warning("dropped chunk from %s, it disagrees with the manifest: %s", site, err)
                return
            except ChunkError as err:
                self._reject(cur, site, m, str(err), "bad_transfer")
                return
            except OSError as err:  # the spool beside the journal: the state dir is full or read-only
                self._fail(StateDirError(f"cannot spool an upload in {self.journal.root}: {err}"))
                return
            finally:
                if transfer.complete and cur.transfers.get(site) is transfer:
                    cur.transfers.pop(site).close()
            try:
                self.journal.journal_update(cur.number, site, blob, encode_message(m))
            except StateDirError as err:
                self._fail(err)
                return
            del blob  # from here on the update is read from its journal file, one tensor at a time
            self._accept(cur, site, m)

    def _on_eval(self, topic: str, payload: bytes) -> None:
        site = self.topics.site_of(topic)
        if site is None or not payload:  # (empty: a retained message being cleared)
            return
        try:
            report = parse_message(payload, EvalReport)
        except MessageError as err:
            log.warning("dropped evaluation report from %s: %s", site, err)
            return
        with self.lock:
            self._heard(site)
            cur = self.current
            if report.site != site:
                why = f"it names site {report.site} but came on the topic of site {site}"
            elif cur is None or cur.train or report.round != cur.number:
                why = f"no evaluation round {report.round} is open"
            elif report.base_hash != cur.base_hash:
                why = "it evaluates another model (wrong base hash)"
            elif site not in cur.selected:
                why = f"site {site} is not selected for evaluation round {cur.number}"
            else:
                again = site in cur.reports
                cur.reports[site] = dict(report.metrics)
                cur.failed.pop(site, None)
                why = ""
        with log_context(site=site, round=report.round):
            if why:
                log.warning("evaluation report dropped: %s", why)
            elif again:  # (a report sent again replaces the first: no new line)
                log.debug("evaluation report received again")
            elif "rank1" in report.metrics:
                log.info("final model: rank-1 %.1f, mAP %.1f", report.metrics["rank1"], report.metrics["mAP"])
            else:
                log.info("final model not evaluated at this site (no valid query, or evaluation off)")

    def _global_chunks_for(self, req: ChunkRequest) -> int | None:
        """Only sites selected for the open round may ask for its global model (`ChunkResender`)."""
        with self.lock:
            cur = self.current
            found = cur.blob_by_id(req.blob_id) if cur is not None else None
            if cur is None or found is None or req.requester not in cur.selected:
                return None
            return found[1].chunks

    def _global_blob(self, blob_id: str) -> bytes | None:
        cur = self.current
        found = cur.blob_by_id(blob_id) if cur is not None else None
        return found[0] if found is not None else None

    # -- accepting updates (worker thread, under the lock) ----------------------------------------------
    def _heard(self, site: str) -> None:
        """(under the lock) A message came from `site`; only sites that announced themselves count."""
        facts = self.facts.get(site)
        if facts is not None:
            facts.last_seen = time.time()

    def _count_rejection(self, round_: int, site: str, reason: str, kind: str) -> None:
        self.metrics.rejected.labels(site if site in self.facts else "-", kind).inc()
        with self.lock:
            self.history.rejected(round_, site, reason, time.time())

    def _reject(self, cur: OpenRound | None, site: str, m: UpdateManifest, reason: str, kind: str) -> None:
        """Refuse an update: one log line per site and reason per round (repeats at debug level: a
        replayed message costs a count, not a line), the round's summary and an ack with the reason."""
        reason = short_reason(reason)
        if cur is not None and m.round == cur.number:
            new = cur.note_rejection(site, reason)
        else:
            new = (site, reason) not in self.said_rejections and len(self.said_rejections) < 1024
            if new:
                self.said_rejections.add((site, reason))
        with log_context(site=site, round=m.round):
            log.log(logging.WARNING if new else logging.DEBUG, "update rejected: %s", reason)
        self._count_rejection(m.round, site, reason, kind)
        if cur is not None and cur.manifests.get(site) is m:
            cur.manifests.pop(site, None)
            transfer = cur.transfers.pop(site, None)
            if transfer is not None:
                transfer.close()
        if cur is not None and m.round == cur.number and site in cur.waiting():
            # a rejection settles the update: the site never sends it again (docs/protocol.md), so the
            # round does not wait for it, and a restart of this round does not select it again (it once
            # ignored every re-announcement while the round restarted for good)
            cur.failed[site] = f"update rejected: {reason}"
            cur.failed_once.add(site)
            cur.retried[site] = FAILED_RETRIES
            self._save_open(cur)
        self._ack(site, m.round, m.blob.blob_id, False, reason)

    def _decode(self, cur: OpenRound, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The journaled delta of `site`, read tensor by tensor straight into the flat scratch buffers
        (valid until the next call); CodecError / LayoutError for anything the fold cannot take."""
        path = self.journal.update_path(cur.number, site)
        return self.layout.fill(iter_state_file(path, cur.limit), out=self.scratch, what="update")

    def _accept(self, cur: OpenRound, site: str, m: UpdateManifest, resumed: bool = False) -> None:
        """Validate the journaled update fully, then ack: an acknowledged update is aggregated at close.
        `resumed`: the update was journaled before a restart (and perhaps acknowledged): if it is
        unreadable now, the state dir was damaged, and the site is not blamed with a rejection; it
        trains the round again under a new run id (the caller renews it)."""
        with log_context(site=site, round=cur.number):
            try:
                floats, _ = self._decode(cur, site)
                norm = l2_norm(floats)
            except Exception as err:  # a decoder's bug on hostile bytes costs this update, not the round
                why = (
                    str(err)
                    if isinstance(err, CodecError | LayoutError)
                    else f"undecodable: {type(err).__name__}: {err}"
                )
                if resumed:  # (the caller drops it once the sites are told to train again)
                    log.warning("journaled update unreadable at the restart: %s", short_reason(why))
                else:
                    self._reject(cur, site, m, why, "bad_payload")
                    self.journal.drop_update(cur.number, site)
                return
            cur.norms[site] = norm
            self.metrics.accepted.labels(site).inc()
            self.metrics.received.labels(site).inc(m.blob.size)
            facts = self.facts.setdefault(site, SiteFacts())
            facts.last_update_round = cur.number
            if m.dp_epsilon is not None:
                facts.epsilon = m.dp_epsilon
            cur.accepted[site] = m
            cur.failed.pop(site, None)
            cur.manifests.pop(site, None)
            log.info(
                "update accepted (%d/%d): %d images, CDW %.4f, loss %.3f, delta norm %.4g",
                len(cur.accepted),
                len(cur.selected),
                m.n_samples,
                m.cdw,
                m.loss,
                norm,
            )
            self._ack(site, cur.number, m.blob.blob_id, True)

    def _fail(self, err: StateDirError) -> None:
        """The state dir cannot be written: say so once and stop (nothing unjournaled is acknowledged)."""
        if self.fatal is None:
            self.fatal = err
            log.error("%s: stopping (fix the state dir and start again to resume)", err)
        self.stopping.set()

    # -- the round loop (caller thread) ----------------------------------------------------------------
    def _eligible(self, failed: Collection[str] = (), retry: Collection[str] = ()) -> list[str]:
        """Sites that may be selected: not offline and heard since the last reconnect, not `failed` (in the
        open round) unless in `retry` and, with signing, not revoked."""
        with self.lock:
            return sorted(
                s
                for s, (state, _) in self.online.items()
                if state != "offline"
                and self.heard_on.get(s) == self.connection
                and (s not in failed or s in retry)
                and self.endpoint.knows(s)
            )

    def _select(self, r: int, draw: int = 0, cur: OpenRound | None = None) -> list[str]:
        """Sample round r's sites once `min_sites` are eligible. A restart (`cur`, the open round) keeps
        the sites with an accepted update or an upload in progress and leaves out those that failed the
        round; a failed one with retries left counts only when the others are too few (a transient
        failure gets one more chance rather than waiting for a site that is not coming). Judged afresh
        while it waits: a site whose update was rejected and that then sent one that counts (a corrected
        manifest is a new update) failed nothing."""
        waited = time.monotonic()
        keep: set[str] = set()
        while True:
            failed: Collection[str] = ()
            retry: Collection[str] = ()
            if cur is not None:
                with self.lock:
                    keep = set(cur.accepted) | set(cur.manifests)
                    failed = cur.failed_once - keep
                    retry = {s for s in cur.failed if cur.retried.get(s, 0) < FAILED_RETRIES} - keep
            online = self._eligible(failed)
            if len(online) < self.cfg.min_sites and retry:
                online = self._eligible(failed, retry)
            if len(online) >= self.cfg.min_sites:
                break
            if time.monotonic() - waited > self.cfg.wait_for_sites_s:
                raise TimeoutError(
                    f"fewer than {self.cfg.min_sites} sites online after {self.cfg.wait_for_sites_s} s"
                )
            if self.stopping.wait(0.2):
                raise Stopped
        k = sites_per_round(len(online), self.cfg.fraction, at_least=self.cfg.min_sites)
        if k > MAX_SELECTED and draw == 0:
            with log_context(round=r):
                log.info("%d sites drawn, not %d: a round names at most that many", MAX_SELECTED, k)
        return sample_sites(online, min(k, MAX_SELECTED), self.cfg.seed, r, draw, keep)

    def _evaluators(self, r: int) -> list[str]:
        """The evaluation round's sites: every eligible one, as many as a round names (a seeded draw past
        that, said in one line; name order would leave the same sites out of every evaluation)."""
        eligible = self._eligible()
        if len(eligible) <= MAX_SELECTED:
            return eligible
        with log_context(round=r):
            log.info(
                "%d of %d sites drawn to evaluate: a round names at most that many",
                MAX_SELECTED,
                len(eligible),
            )
        return sample_sites(eligible, MAX_SELECTED, self.cfg.seed, r)

    def _publish_round(self, cur: OpenRound, with_blob: bool = True) -> None:
        cfg = self.cfg
        msg = RoundStart(
            federation=cfg.federation,
            round=cur.number,
            base_hash=cur.base_hash,
            blob=cur.blob_ref,
            model=model_info(cfg),
            deadline=cur.deadline,
            selected=cur.selected,
            training=cfg.training_info(),
            evaluate=not cur.train or cur.number % cfg.eval_every == 0,
            upload_encoding=cfg.upload_encoding,
            run_id=self.run_id,
            upload_compressed=cfg.upload_compressed,
            train=cur.train,
            groups=cur.groups(),
        )
        self.round_payload = encode_message(msg)
        # a broker that is down gets the round document at the reconnect (_republish_round) and the
        # sites ask for the chunks they missed: neither is a reason to stop
        self.endpoint.send(self.topics.round, self.round_payload, retain=True, timeout=10)
        if with_blob:
            used = {cur.group_of[s] for s in cur.selected if s in cur.group_of}
            blobs = [(cur.blob, cur.blob_ref)] if set(cur.selected) - set(cur.group_of) else []
            blobs += [(b.blob, b.ref) for g, b in sorted(cur.group_bases.items()) if g in used]
            sent: set[str] = set()  # groups start equal to the global model: the same blob once
            try:
                for blob, ref in blobs:
                    if ref.blob_id in sent:
                        continue
                    sent.add(ref.blob_id)
                    self.endpoint.publish_blob(
                        self.topics.global_chunks, blob, ref.blob_id, cfg.chunk_bytes, timeout=60
                    )
            except TimeoutError as err:
                log.warning("global model not fully published (%s); sites will ask for what they miss", err)

    def _open_round(self, r: int, train: bool = True) -> OpenRound:
        """Announce round r (an evaluation round when not `train`: every eligible site, no updates)."""
        blob = encode_state({k: v.numpy() for k, v in self.global_state.items()}, "fp32")
        base_hash = hashlib.sha256(blob).hexdigest()  # deterministic: see protocol.codec
        saved = self.journal.open_round()
        resumed = (
            saved is not None
            and saved["round"] == r
            and saved["base_hash"] == base_hash
            and saved.get("train", True) == train
        )
        if saved is not None and saved["round"] == r and saved["base_hash"] != base_hash:
            log.warning(
                "journal of round %d was written for base %s, the checkpoint gives %s: not resuming it",
                r,
                saved["base_hash"][:12],
                base_hash[:12],
            )
        selected = saved["selected"] if resumed else self._select(r) if train else self._evaluators(r)
        now = time.time()
        kd_due = train and self.public is not None and self.cfg.kd.due(r)
        cur = OpenRound(
            r,
            selected,
            base_hash,
            blob,
            blob_ref(blob, self.cfg.chunk_bytes),
            now + self.cfg.deadline_s,
            now,
            kd_due,
            TeacherMean(self.cfg.kd.normalize) if kd_due else None,
            update_limit(len(blob), len(self.global_state), self.cfg.max_update_bytes),
            train=train,
            restarts=saved.get("restarts", 0) if resumed else 0,
        )
        if resumed:  # failures in this round and its retries, as journaled before the restart
            cur.failed_once = set(saved.get("failed", []))
            cur.retried = dict(saved.get("retried", {}))
            out = saved.get("out", {})  # the sites it no longer waited for (a journal is input too)
            if isinstance(out, dict):
                cur.failed = {s: str(why)[:300] for s, why in out.items() if s in cur.selected}
        if train and self.clustering is not None and self.clustering.active:
            cur.group_of = dict(self.clustering.groups)
            for g, state in sorted(self.clustering.states.items()):
                group_blob = encode_state({k: v.numpy() for k, v in state.items()}, "fp32")
                cur.group_bases[g] = GroupBlob(
                    hashlib.sha256(group_blob).hexdigest(),
                    group_blob,
                    blob_ref(group_blob, self.cfg.chunk_bytes),
                )
        self._save_open(cur)
        with self.lock:
            self.current = cur
            self.said_rejections.clear()
            # every update journaled for round r is judged again (a journal is input too): kept if it
            # passes the rules it came under, lost if it was acknowledged for this base and cannot count
            # (unreadable, or a round opened afresh did not select its site), ignored if it is of another
            # base (an older run, a rollback: its site sees the new base and trains again)
            lost, dropped = [], []
            for site, manifest in self.journal.journaled_updates(r):
                try:
                    m = parse_message(manifest, UpdateManifest)
                    assert isinstance(m, UpdateManifest)
                except MessageError as err:
                    log.warning("journaled manifest of %s unreadable (%s)", site, err)
                    lost.append(site)
                    continue
                refusal = admit(cur, site, m)  # (a round opened afresh may have selected it again)
                if refusal is None:
                    self._accept(cur, site, m, resumed=True)
                    if site not in cur.accepted:
                        lost.append(site)  # (unreadable now)
                elif m.base_hash == cur.base_of(site):
                    log.warning("journaled update of %s cannot count: %s", site, refusal[1])
                    lost.append(site)
                else:
                    dropped.append(site)
            if lost:  # acknowledged, so these sites will not send them again unless the run id changes
                log.warning(
                    "round %d: journaled updates of %s lost (the state dir was damaged): a new run id, so "
                    "that the sites train this round again",
                    r,
                    ", ".join(lost),
                )
                self.run_id = self.journal.renew_run_id()
            for site in lost + dropped:  # only now: a kill before the new run id must find them again
                self.journal.drop_update(r, site)
        log.info(
            "%s %d open (base %s): %d sites selected (%s)%s",
            "round" if train else "evaluation round",
            r,
            base_hash[:12],
            len(selected),
            ", ".join(selected),
            f", {len(cur.accepted)} journaled updates restored" if cur.accepted else "",
        )
        self.endpoint.set_state("training", r)
        self.phase = "collecting" if train else "evaluating"
        self._publish_round(cur)
        return cur

    def _restart(self, cur: OpenRound) -> None:
        """No quorum: select again, keeping every accepted update and every upload in progress (one whose
        site is online and whose last chunk came within the last `deadline_s`: an upload that stopped, by
        a site that died or one that only announced, would keep its site in every selection for good)."""
        cur.restarts += 1
        self.metrics.restarts.inc()
        with self.lock:
            self._drop_stalled_uploads(cur)
        selected = self._select(cur.number, cur.restarts, cur)
        with self.lock:
            kept = set(cur.accepted) | set(cur.manifests)
            retry = {s for s in cur.failed if cur.retried.get(s, 0) < FAILED_RETRIES} - kept
            for site in retry & set(selected):
                cur.retried[site] = cur.retried.get(site, 0) + 1
                with log_context(site=site, round=cur.number):
                    log.info("selected again after failing in this round (try %d)", cur.retried[site] + 1)
            cur.selected = selected
            cur.failed = {s: why for s, why in cur.failed.items() if s not in selected}
            cur.deadline = time.time() + self.cfg.deadline_s
            cur.extensions = 0
        self._save_open(cur)
        log.info(
            "round %d restarted: %d sites selected (%s), %d accepted updates kept",
            cur.number,
            len(selected),
            ", ".join(selected),
            len(cur.accepted),
        )
        self._publish_round(cur)

    def _drop_stalled_uploads(self, cur: OpenRound) -> None:
        live = set(self._eligible())
        for site in list(cur.manifests):
            transfer = cur.transfers.get(site)
            idle = transfer.idle_seconds() if transfer is not None else float("inf")
            if site in live and idle <= self.cfg.deadline_s:
                continue
            cur.manifests.pop(site)
            cur.last_resend.pop(site, None)
            if transfer is not None:
                cur.transfers.pop(site).close()
            with log_context(site=site, round=cur.number):
                log.warning(
                    "upload dropped at the restart: %s",
                    "the site is offline" if site not in live else f"no chunk for {idle:.0f} s",
                )

    def _save_open(self, cur: OpenRound) -> None:
        with self.lock:  # the status thread adds failures: snapshot and write in one step (newest wins)
            info = {"round": cur.number, "selected": cur.selected, "base_hash": cur.base_hash}
            failed, retried, out = sorted(cur.failed_once), dict(cur.retried), dict(cur.failed)
            self.journal.save_open_round(
                {**info, "restarts": cur.restarts, "train": cur.train, "failed": failed, "retried": retried}
                | {"out": out}  # (the sites not waited for now, and why)
            )

    def _drop_revoked(self, cur: OpenRound) -> None:
        for site in cur.waiting():
            if not self.endpoint.knows(site):
                cur.failed[site] = "identity revoked"
                self.online.pop(site, None)
                with log_context(site=site, round=cur.number):
                    log.warning("site dropped from the round: its identity was revoked")

    def _request_missing(self, cur: OpenRound, now: float) -> None:
        """Ask each site with an incomplete upload for its missing chunks after `transfer_idle_s`."""
        for site, m in cur.manifests.items():
            t = cur.transfers.get(site)
            if t is None:
                continue
            if site not in cur.last_resend:
                cur.last_resend[site] = now
                continue
            idle = self.cfg.transfer_idle_s
            if t.idle_seconds() <= idle or now - cur.last_resend[site] <= idle:
                continue
            missing = t.missing()
            req = ChunkRequest.first_of("aggregator", m.blob.blob_id, missing)
            self.endpoint.publish(self.topics.site(site, "resend"), encode_message(req))
            cur.last_resend[site] = now
            with log_context(site=site, round=cur.number):
                log.info("asked for %d of %d missing chunks again", len(req.indices), len(missing))

    def _say_progress(self, cur: OpenRound) -> None:
        """Every PROGRESS_EVERY_S while a round waits: one line on what each waiting site is doing."""
        if time.monotonic() - cur.said < PROGRESS_EVERY_S:
            return
        cur.said = time.monotonic()
        states = dict(self.online)
        log.info(
            "%s %d: %d/%d in, deadline in %.0f s; waiting for %s",
            "round" if cur.train else "evaluation round",
            cur.number,
            len(cur.accepted) + len(cur.reports),
            len(cur.selected),
            cur.deadline - time.time(),
            ", ".join(cur.doing(states)),
        )

    def _collect(self, cur: OpenRound) -> bool:
        """Wait for the round's updates; False when it must be restarted (no quorum after extensions)."""
        while True:
            if self.stopping.wait(0.1):
                raise Stopped
            now = time.time()
            with self.lock:
                self._drop_revoked(cur)
                waiting = cur.waiting()
                accepted = len(cur.accepted)
                if not waiting and accepted >= min(self.cfg.quorum, len(cur.selected)):
                    return True
                self._request_missing(cur, now)
                self._say_progress(cur)
            if waiting and now < cur.deadline:
                continue
            if accepted >= self.cfg.quorum:
                log.warning(
                    "deadline passed: closing round %d with %d/%d updates (missing: %s)",
                    cur.number,
                    accepted,
                    len(cur.selected),
                    ", ".join(sorted(waiting)),
                )
                return True
            self.metrics.quorum_misses.inc()
            if not waiting or cur.extensions >= self.cfg.max_extensions:
                log.warning(
                    "round %d has no quorum (%d/%d) after %d extensions%s: restarting it",
                    cur.number,
                    accepted,
                    self.cfg.quorum,
                    cur.extensions,
                    " (every other selected site failed)" if not waiting else "",
                )
                return False
            cur.extensions += 1
            cur.deadline = now + self.cfg.deadline_s
            log.warning(
                "no quorum at the deadline (%d/%d): extending round %d by %.0f s",
                accepted,
                self.cfg.quorum,
                cur.number,
                self.cfg.deadline_s,
            )
            self._publish_round(cur, with_blob=False)

    def _fold(self, cur: OpenRound) -> tuple[RoundAggregate, dict]:
        """The round's average with the weights and clips the aggregator decides (cloud.strategy.caps),
        folding the journaled updates one at a time, each decoded straight into one flat buffer
        (memory: the base, the sum, one update and one blob, whatever the number of sites)."""
        adm = self.cfg.admission
        sites = sorted(cur.accepted)
        samples = {s: capped_samples(s, cur.accepted[s].n_samples, adm) for s in sites}
        allowance = allowances(samples, adm)
        clustering = self.clustering
        grouped = clustering is not None and clustering.active  # (each group folds its own sites)
        # fednova: each delta is divided by the path length of the round's training at the site's
        # (capped) size, so the norm bound applies to the normalised deltas, the steps the fold adds; a
        # size nobody vouched for counts there as at most the round's lower median one (path_claims)
        paths = path_claims(samples, adm)
        normalised = self.cfg.strategy.fednova and not grouped
        steps = {s: 1.0 if grouped else self.path_length(paths[s]) for s in sites}
        norms = {s: cur.norms[s] / steps[s] for s in sites}
        bound = norm_bound(norms, adm, self.reference_norm)
        scales = clip_scales(norms, bound, allowance)
        raw = {s: raw_weight(self.cfg.strategy.weighting, samples[s], cur.accepted[s].cdw) for s in sites}
        shares = share_capped(raw, max_share(adm, len(sites)), allowance)
        agg: StreamingAggregator | None = None
        if not grouped:
            strategy = self.cfg.strategy
            agg = StreamingAggregator(self.global_state, strategy, base_flat=self.global_flat, group=1)
        for site in sites:
            try:
                floats, ints = self._decode(cur, site)
            except (CodecError, LayoutError) as err:  # only if the state dir was damaged since the ack
                log.error("journaled update of %s unreadable at close, left out: %s", site, err)
                reason = f"journaled update unreadable: {err}"
                cur.note_rejection(site, reason)
                self._count_rejection(cur.number, site, reason, "bad_payload")
                continue
            cdw = cur.accepted[site].cdw
            if agg is None:
                assert clustering is not None
                clustering.add_flat(
                    site, floats, ints, samples[site], cdw, self.global_state, shares[site], scales[site]
                )
                continue
            if clustering is not None and clustering.grouping_round(cur.number):
                clustering.observe_flat(site, floats * scales[site], samples[site], self.global_state)
            agg.add_flat(
                site, floats, ints, samples[site], cdw, shares[site], scales[site], steps=steps[site]
            )
            if cur.teachers is not None:
                self._add_teacher(cur.teachers, site, floats * scales[site], ints)
        self.reference_norm = statistics.median_low(norms.values()) if sites else None
        caps = {
            "norm_bound": bound,
            "norms": {s: round(norms[s], 6) for s in sites},
            "allowances": {s: round(a, 4) for s, a in allowance.items() if a > 1.0},
            "clipped": sorted(s for s in sites if scales[s] < 1.0),
            "n_samples_capped": sorted(s for s in sites if samples[s] < cur.accepted[s].n_samples),
            "path_capped": sorted(s for s in sites if normalised and paths[s] < samples[s]),
            "share_capped": sorted(
                s for s in sites if raw[s] > 0 and shares[s] < raw[s] / sum(raw.values()) - 1e-12
            ),
        }
        bound_on = sorted({*caps["clipped"], *caps["share_capped"]})
        if bound_on:  # an attack, or honest sites of very different sizes (docs/operations.md)
            log.warning(
                "round %d: admission caps bind on %s; if they are honest and larger than the others, "
                "vouch for their sizes (admission.site_samples)",
                cur.number,
                ", ".join(f"{s} (step x{scales[s]:.2f}, share {shares[s]:.2f})" for s in bound_on),
            )
        try:
            if agg is not None:
                return agg.finish(), caps
            assert clustering is not None
            # the global model weights each group by its sites' sizes as the caps see them: a size nobody
            # vouched for at most the lower median of all (one claim once weighted a group 2^31 : 32),
            # and a revoked site's size no more
            kept = {s: n for s, n in clustering.samples.items() if self.endpoint.knows(s)}
            new_global, weights = clustering.finish(path_claims(kept, adm))
        except NoUpdatesError:  # every acknowledged update unreadable: stop; a restart asks for them again
            raise StateDirError(
                f"no journaled update of round {cur.number} is readable: the state dir was damaged"
            ) from None
        flat = self.layout.flatten(new_global)
        state = self.layout.unflatten(*flat)
        return RoundAggregate(state, flat, weights, dict(cur.norms), rejected=list(clustering.rejected)), caps

    def _add_teacher(
        self, teachers: TeacherMean, site: str, floats: torch.Tensor, ints: torch.Tensor
    ) -> None:
        """KD's teacher of `site`: the global model plus its delta as clipped for the fold (so a site's
        pull on the KD target is bounded like its pull on the average), embedding the public set."""
        if self.public is None:
            return
        delta = self.layout.unflatten(floats, ints)
        load_shared_state(self.model, {k: self.global_state[k] + delta[k] for k in self.global_state})
        loader = make_loader(self.public, 64, train=False)
        with on_device(self.model, self.device):
            rows = teachers.add(embed_public(self.model, loader, len(self.public), self.device))
        if rows < len(self.public):
            with log_context(site=site):
                log.warning(
                    "KD teacher of %s not finite on %d of %d public images: left out there",
                    site,
                    len(self.public) - rows,
                    len(self.public),
                )

    def path_length(self, n_samples: int) -> float:
        """What fednova divides a site's delta by: the round's training (epochs, batch size, the recipe's
        momentum) at its size; 1 without fednova (and in grouped rounds: groups fold by plain weights)."""
        if not self.cfg.strategy.fednova:
            return 1.0
        training = TrainConfig(epochs=self.cfg.local_epochs, batch_size=self.cfg.batch_size)
        return training.path_length(n_samples)

    def _close(self, cur: OpenRound) -> None:
        clock = time.perf_counter()
        with self.lock:
            self.current = None
            self.phase = "aggregating"
            self.closed = (cur.number, {site: m.blob.blob_id for site, m in cur.accepted.items()})
        result, caps = self._fold(cur)
        new_flat = result.flat  # the new global model lives in the fold's buffers: no copy
        for rejection in result.rejected:
            cur.note_rejection(rejection.site, rejection.reason)
            self._count_rejection(cur.number, rejection.site, rejection.reason, "bad_payload")
        aggregate_seconds = time.perf_counter() - clock
        summary: dict = {
            "round": cur.number,
            "kind": "round",
            "weights": result.weights,
            "rejected": cur.rejections,
            "failed": dict(sorted(cur.failed.items())),
            "selected": cur.selected,
            "accepted": sorted(cur.accepted),
            "restarts": cur.restarts,
            **caps,
            "collect_seconds": round(time.time() - cur.started, 3),
            "aggregate_seconds": round(aggregate_seconds, 4),
            "upload_bytes": {s: m.blob.size for s, m in sorted(cur.accepted.items())},
            "site_timings": {s: m.timings for s, m in sorted(cur.accepted.items())},
            "dp_epsilon": {
                s: m.dp_epsilon for s, m in sorted(cur.accepted.items()) if m.dp_epsilon is not None
            },
        }
        if result.path_length is not None:  # fednova: the mean path length the average was taken to
            summary["path_length"] = round(result.path_length, 4)
        if cur.teachers is not None and cur.teachers.count and self.public is not None:
            load_shared_state(self.model, result.state)
            loader = make_loader(
                self.public, self.cfg.kd.batch_size, train=True, seed=self.cfg.seed + cur.number
            )
            local_bn = self.cfg.strategy.bn == "local"
            try:
                with on_device(self.model, self.device):
                    target = cur.teachers.target()
                    kd = distill(self.model, loader, target, self.cfg.kd, self.device, statistics=local_bn)
            except KDDiverged as err:  # the aggregate stands
                log.warning("round %d: KD diverged, the aggregated model is kept: %s", cur.number, err)
                summary["kd"] = kd_summary(err)
            else:
                new_flat = self.layout.flatten(shared_state(self.model))
                log.info(
                    "KD on %d public images: %d batches, MSE %.5f -> %.5f in %.1f s",
                    len(self.public),
                    kd.batches,
                    kd.loss_first,
                    kd.loss_last,
                    kd.seconds,
                )
                summary["kd"] = kd_summary(kd)
        del result
        self.global_flat = new_flat
        self.global_state = self.layout.unflatten(*new_flat)
        if self.clustering is not None:
            if self.clustering.grouping_round(cur.number):
                self.clustering.group(self.global_state)
            if self.clustering.active:  # the groups first: the global checkpoint commits the round
                summary["groups"] = dict(sorted(self.clustering.groups.items()))
                self.journal.save_groups(cur.number, self.clustering.tensors(), self.clustering.metadata())
        summary["round_seconds"] = round(time.time() - cur.started, 3)
        records = [  # what each site scored before training: the model it trained from
            {  # (the record's own keys last: a site's metrics cannot overwrite them)
                **m.metrics,
                "round": cur.number - 1,
                "site": s,
                "model": "group" if s in cur.group_of else "global",
            }
            for s, m in sorted(cur.accepted.items())
            if m.metrics
        ]
        self.journal.save_records(cur.number, [*records, summary])  # (kept for a kill after the commit)
        self.journal.save_global(
            cur.number, self.global_state, self.cfg.model, self.cfg.input, self.cfg.strategy.bn
        )
        self._record([*records, summary])
        self.metrics.round_closed(summary)
        self.journal.prune(cur.number, self.cfg.keep_checkpoints)
        self.completed = cur.number
        self.phase = "waiting"
        log.info("round %d closed: %d updates aggregated", cur.number, len(summary["weights"]))

    def _run_round(self, r: int) -> None:
        """One round, open to deployed (its buffers are freed on return, before the next one opens)."""
        cur = self._open_round(r)
        while not self._collect(cur):
            self._restart(cur)
        self._close(cur)
        del cur
        self.trim_heap()
        self._maybe_deploy(r)

    def _final_evaluation(self) -> None:
        """The evaluation round after the last one: every online site evaluates the final model on its
        query/gallery; the reports are recorded as the global model's metrics of the last round.
        Bounded by `deadline_s`; a site that goes offline or fails is not waited for."""
        r, last = self.cfg.rounds, self.cfg.rounds - 1
        if not self.cfg.final_eval or self.journal.has_summary("evaluation", last):
            return
        settle = time.monotonic() + min(self.cfg.wait_for_sites_s, STATUS_SETTLE_S)
        while len(self._eligible()) < self.cfg.min_sites and time.monotonic() < settle:
            if self.stopping.wait(0.2):
                raise Stopped
        if not self._eligible():
            log.warning("no site online: the final model is not evaluated")
            return
        cur = self._open_round(r, train=False)
        while True:
            if self.stopping.wait(0.1):
                raise Stopped
            with self.lock:
                self._drop_revoked(cur)
                for site in cur.waiting():
                    if self.online.get(site, ("offline", None))[0] == "offline":
                        cur.failed[site] = "offline"
                waiting = cur.waiting()
                self._say_progress(cur)
            if not waiting or time.time() >= cur.deadline:
                break
        with self.lock:
            self.current = None
        records = [
            {**m, "round": last, "site": s, "model": "global"} for s, m in sorted(cur.reports.items()) if m
        ]
        summary = {
            "round": last,
            "kind": "evaluation",
            "selected": cur.selected,
            "reported": sorted(cur.reports),
            "failed": dict(sorted(cur.failed.items())),
            "missing": sorted(cur.waiting()),
            "seconds": round(time.time() - cur.started, 3),
        }
        self._record([*records, summary])
        self.phase = "waiting"
        log.info(
            "final model evaluated at %d of %d sites%s",
            len(records),
            len(cur.selected),
            f" (no report from: {', '.join(summary['missing'])})" if summary["missing"] else "",
        )

    def _serve_final_deployment(self) -> None:
        """After the run: online sites that do not serve the last deployment yet (one killed during its
        transfer, or whose disk was full) may still ask for it, and nobody else sends the file once
        `serve` exits. It is sent while they ask (each one's requests taken within the rate limit and its
        copy budget, FINAL_DEPLOY_QUIET_S at most apart, counted from now), for at most
        `final_deploy_wait_s`."""
        manifest = latest_deployment(self.journal.root)
        if manifest is None or self.cfg.final_deploy_wait_s <= 0:
            return
        start = time.monotonic()
        said = False
        while True:
            with self.lock:
                behind = sorted(
                    s
                    for s, facts in self.facts.items()
                    if self.online.get(s, ("offline", None))[0] != "offline"
                    and facts.deployed != manifest.version
                )
            if not behind:
                return
            now = time.monotonic()
            taken = self.deployments.resender.last_taken
            asking = [s for s in behind if now - max(start, taken(s)) < FINAL_DEPLOY_QUIET_S]
            if now - start >= self.cfg.final_deploy_wait_s or not asking:
                log.warning(
                    "%s do not serve the last deployment %s (`cloud-aggregator deploy --round %d --linger S` "
                    "sends it to them)",
                    ", ".join(behind),
                    manifest.version,
                    manifest.round,
                )
                return
            if not said:
                said = True
                log.info(
                    "sending the last deployment %s while %s may still ask for it (at most %.0f s)",
                    manifest.version,
                    ", ".join(behind),
                    self.cfg.final_deploy_wait_s,
                )
            if self.stopping.wait(0.5):
                return

    def _finish_close(self) -> None:
        """What the last committed round's close did not get to before a kill: its records into
        metrics.jsonl, its journaled updates deleted."""
        pending = self.journal.pending_records(self.completed)
        if pending:
            self._record(pending)
            log.info("round %d: its summary recorded after a restart", self.completed)
        self.journal.prune(self.completed, self.cfg.keep_checkpoints)

    def _record(self, records: list[dict]) -> None:
        """Append to metrics.jsonl, and to what the dashboard shows."""
        self.journal.append_metrics(records)
        with self.lock:
            self.history.add(records)

    def view(self, history: bool = True) -> View:
        """The federation as the dashboard shows it (GET /api/v1/federation; docs/operations.md); without
        `history` (plots and rejections), what the Prometheus state series need."""
        with self.lock:
            cur = self.current
            uploading = {}
            for site, m in cur.manifests.items() if cur else ():
                t = cur.transfers.get(site)
                uploading[site] = [t.received() if t else 0, m.blob.chunks]
            run = {
                "rounds": self.cfg.rounds,
                "completed": self.completed,
                "phase": self.phase,
                "round": cur.number if cur else None,
                "train": cur.train if cur else None,
                "started": cur.started if cur else None,
                "deadline": cur.deadline if cur else None,
                "selected": list(cur.selected) if cur else [],
                "accepted": sorted(cur.accepted) if cur else [],
                "reported": sorted(cur.reports) if cur else [],
                "failed": dict(sorted(cur.failed.items())) if cur else {},
                "uploading": uploading,
                "waiting": sorted(cur.waiting()) if cur else [],
                "restarts": cur.restarts if cur else 0,
                "extensions": cur.extensions if cur else 0,
            }
            last = self.history.latest
            sites = []
            for site, facts in sorted(self.facts.items()):
                state, status_round = self.online.get(site, ("offline", None))
                sites.append(
                    {
                        "site": site,
                        "state": "uploading" if site in uploading else state,
                        "status_round": status_round,
                        "selected": site in run["selected"],
                        **asdict(facts),
                        **{k: last.get(site, {}).get(k) for k in ("rank1", "mAP", "mINP")},
                    }
                )
            doc: View = {"federation": self.cfg.federation, "time": time.time(), "run": run, "sites": sites}
            if history:
                doc["history"] = {"metrics": self.history.metrics, "rounds": list(self.history.rounds)}
                doc["rejections"] = list(self.history.rejections)
            return doc

    def _deploy_due(self, r: int) -> bool:
        every = self.cfg.deploy_every
        return bool(every) and r >= 0 and ((r + 1) % every == 0 or r == self.cfg.rounds - 1)

    def _maybe_deploy(self, r: int) -> None:
        if not self._deploy_due(r):
            return
        try:
            deploy_round(self.endpoint, self.journal.root, self.deploy_images, r, self.cfg.deploy_precision)
            record_scheduled(self.journal.root, r)
        except ManifestUnacknowledged:  # (recorded: it goes out again with the reconnect, not again later)
            record_scheduled(self.journal.root, r)
            log.warning("round %d deployed; the broker is away: its manifest goes out when it is back", r)
        except Exception as err:  # the run goes on; the sites keep their current model
            log.warning("round %d not deployed: %s", r, err)

    def stop(self) -> None:
        """Ask `run()` to return (from another thread or a signal handler); the state on disk is kept."""
        self.stopping.set()

    def run(self) -> None:
        """Run the remaining rounds; returns when done or stopped. StateDirError when the state dir failed;
        OSError when the metrics port cannot be served."""
        web = None
        if self.cfg.metrics_port is not None:
            from cloud.dashboard import create_app
            from reid.http_server import BackgroundServer

            web = BackgroundServer(
                create_app(self.view, self.metrics.registry), self.cfg.metrics_host, self.cfg.metrics_port
            )
            self.metrics_url = web.start()
            log.info("dashboard on %s/ (metrics: %s/metrics)", self.metrics_url, self.metrics_url)
        self.endpoint.start()
        self.resender.start()
        self.deployments.start()
        if self.completed + 1 < self.cfg.rounds:  # the last run's RunEnd, retained, would tell sites that
            # start before the first round opens that this run is over (they would leave): clear it
            self.endpoint.send(self.topics.round, b"", retain=True, timeout=30)
            self.journal.mark_complete(None)
        try:
            if self._deploy_due(self.completed) and scheduled_round(self.journal.root) < self.completed:
                log.info("round %d's deployment did not finish before a restart: now", self.completed)
                self._maybe_deploy(self.completed)
            for r in range(self.completed + 1, self.cfg.rounds):
                with log_context(round=r):
                    self._run_round(r)
            with log_context(round=self.cfg.rounds):
                self._final_evaluation()
            end = RunEnd(federation=self.cfg.federation, rounds=self.cfg.rounds, run_id=self.run_id)
            self.round_payload = encode_message(end)
            self.endpoint.send(self.topics.round, self.round_payload, retain=True, timeout=30)
            self.endpoint.set_state("idle", self.completed)
            self.phase = "done"
            self.journal.mark_complete(self.cfg.rounds)
            log.info("run complete: %d rounds", self.cfg.rounds)
            self._serve_final_deployment()
        except Stopped:
            done = f"after round {self.completed}" if self.completed >= 0 else "before the first round closed"
            log.info("stopped %s; start again on the same state dir to resume", done)
        except StateDirError as err:
            self._fail(err)
        finally:
            self.stopping.set()
            self.endpoint.stop()
            self.resender.stop()
            self.deployments.stop()
            if web is not None:
                web.stop()
        if self.fatal is not None:
            raise self.fatal
