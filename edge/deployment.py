"""Receiving deployed models at a site and swapping the inference model atomically.

`Deployments` follows the retained ``deploy`` manifest. For a new version it collects the file's chunks
from ``deploy/chunks`` (broadcast once when the model is deployed); when none arrive, or the transfer
stalls, for `idle_s` it asks for the missing ones on ``deploy/resend`` (a site that was offline at
deployment time gets the model this way). The complete file goes to one installer thread, which:

1. checks the whole-file sha256 against the manifest *and* the contract inside it (the contract's
   sha256 must equal the blob's), writes ``models/<version>-<sha12>/model.onnx`` + its contract,
2. when the federation keeps BatchNorm layers at the sites (``strategy.bn = "local"``: the file keeps
   them separate), re-exports the model with this site's own (the agent's ``private_bn.safetensors``;
   the deployed ones when it has none yet), their statistics estimated on its images under the deployed
   weights (AdaBN; `export.site_batchnorm`, parity-gated: what the agent scores, too);
   optionally quantises it to int8 on this site's own images with the retrieval gate (``deploy_int8``)
   and builds a TensorRT engine (``deploy_engine``, when TensorRT and a GPU are present),
3. with the adoption gate (``[adoption]``: the site's own model and a labelled validation set of its own),
   scores the result and the site's own model on that set and keeps the better (`reid.adoption`; the
   federation's on a tie); the choice and both scores go into ``current.json`` and one log line,
4. opens it with `FeatureExtractor` (which enforces the contract), and only then
5. swaps: ``models/current.json`` is replaced atomically and `current()` returns the new extractor.

The gate decides again when the agent starts with other adoption settings than those of the choice in
``current.json`` (the gate turned on or off, another own model or validation folder): the deployment's
own file stays in its folder for this.

Until the swap the previous model keeps serving; a failed check, gate or build never replaces it (one
log line says why). A manifest created before the one of the model now served is refused: a replayed
old (validly signed) manifest cannot roll a site back; a deliberate rollback is a new `deploy` of the
old round, which carries a new creation time. The site's BatchNorm layers not fitting, int8 rejected or
TensorRT missing fall back to the verified ONNX model (one log line says why). The previous model folder
is kept as a fallback; older ones are removed.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import re
import shutil
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from export.contract import (
    ContractError,
    contract_path,
    file_sha256,
    load_contract,
    received_contract,
    write_contract,
)
from export.runtime import FeatureExtractor
from protocol.chunks import ChunkError, ForeignChunk, InboundBlob, check_ref, parse_chunk, sha256_hex
from protocol.messages import ChunkRequest, Deployment, MessageError, encode_message, parse_message
from protocol.mqtt import Endpoint
from reid.files import disk_full
from reid.logs import SaidOnce, bound, log_context

log = logging.getLogger(__name__)
POINTER = "current.json"
UNANSWERED_WAIT_S = 60.0  # the longest wait between requests for a deployment nobody answers
INSTALL_RETRY_S = 60.0  # a deployment this site's disk could not take (full) is installed again after this


def current_model(state_dir: Path) -> Path | None:
    """The model file an agent's state folder serves inference with (None before any deployment)."""
    pointer = state_dir / "models" / POINTER
    if not pointer.is_file():
        return None
    try:
        path = state_dir / "models" / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; no deployed model", pointer)
        return None
    return path if path.is_file() else None


class DeploymentRejected(RuntimeError):
    pass


class AdoptionConfig(BaseModel):
    """The adoption gate (docs/operations.md, "The adoption gate")."""

    model_config = ConfigDict(extra="forbid")

    own_model: Path = Field(
        description="this site's own model: an ONNX file with its contract sidecar (edge-agent train, then "
        "cloud-aggregator export --model)"
    )
    validation: Path = Field(
        description="a labelled data set folder (query + gallery) that neither model trained on"
    )

    @field_validator("own_model")
    @classmethod
    def _model_file(cls, value: Path) -> Path:
        if not value.is_file() or not contract_path(value).is_file():
            raise ValueError(f"no ONNX model with its contract sidecar (<model>.json) at {value}")
        return value

    @field_validator("validation")
    @classmethod
    def _validation_folder(cls, value: Path) -> Path:
        from reid.data import DatasetLayoutError, read_dataset

        try:  # at start, not at the first deployment: a query and a gallery in any supported layout
            read_dataset(value, need_train=False)
        except DatasetLayoutError as err:
            raise ValueError(f"not a labelled validation folder (a query and a gallery): {err}") from None
        return value


def adopt(serving: Path, gate: AdoptionConfig, folder: Path) -> tuple[Path, dict[str, object]]:
    """The file to serve, the federation's `serving` or a copy of the site's own model put into `folder`,
    chosen on the validation set by `reid.adoption.prefer_own`, and what was measured (for current.json).
    The federation's model when the gate cannot decide (one log line says why)."""
    from export.quantize import site_retrieval
    from reid.adoption import prefer_own
    from reid.data import read_dataset

    try:
        splits = read_dataset(gate.validation, need_train=False)
        scores = {
            "federation": site_retrieval(FeatureExtractor(serving), splits)[0].summary(),
            "own": site_retrieval(FeatureExtractor(gate.own_model), splits)[0].summary(),
        }
    except Exception as err:  # a missing or broken file or folder: the federation's model still serves
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("adoption gate not applied (%s); serving the federation's model", reason)
        return serving, {"adopted": "federation", "gate_error": reason}
    own = prefer_own(scores["own"], scores["federation"])
    fed, mine = scores["federation"], scores["own"]
    log.info(
        "adoption gate on %d validation queries: %s model serves (rank-1 / mAP: federation %s, own %s)",
        int(fed.get("valid_queries", 0)),
        "this site's own" if own else "the federation's",
        *(f"{s['rank1']:.1f} / {s['mAP']:.1f}" if "rank1" in s else "-" for s in (fed, mine)),
    )
    record: dict[str, object] = {"adopted": "own" if own else "federation", "validation": scores}
    if not own:
        return serving, record
    copy = folder / "model.own.onnx"
    shutil.copyfile(gate.own_model, copy)
    shutil.copyfile(contract_path(gate.own_model), contract_path(copy))
    return copy, record


class Deployments:
    def __init__(
        self,
        state_dir: Path,
        endpoint: Endpoint,
        int8_data: Path | None = None,
        int8_max_drop: float = 1.0,
        engine: bool = False,
        max_bytes: int = 1 << 30,
        site_batchnorm: Path | None = None,
        site_data: Path | None = None,
        adoption: AdoptionConfig | None = None,
    ) -> None:
        self.dir = state_dir / "models"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = endpoint
        self.topics = endpoint.topics
        self.int8_data = int8_data
        self.int8_max_drop = int8_max_drop
        self.engine = engine
        self.max_bytes = max_bytes
        self.site_batchnorm = site_batchnorm  # served in place of the deployed ones when the file exists
        self.site_data = site_data  # the site's data set: parity images (and statistics) for BatchNorm
        self.adoption = adoption
        self.lock = threading.Lock()
        self.pending: tuple[Deployment, InboundBlob] | None = None
        self.pending_since = 0.0  # when the pending transfer last made progress (or was announced)
        self.unanswered = 0  # requests for the pending transfer since a chunk last came
        self.queued_sha: str | None = None  # fetched, waiting for or in the installer
        # fetched, but this site's disk failed its install: (manifest, model file, when to try again)
        self.retry: tuple[Deployment, bytes, float] | None = None
        self.retry_said = SaidOnce()  # (the deployment and error of a failed install: a warning once)
        self.jobs: queue.Queue[tuple[Deployment, bytes] | None] = queue.Queue()
        self.installed_sha: str | None = None
        self.installed_created = 0.0  # the served manifest's creation time: older manifests are replays
        self._current: FeatureExtractor | None = None
        self.version: str | None = None
        self.adopted = "federation"  # or "own": the adoption gate serves the site's own model
        self._load_current()
        endpoint.handlers[self.topics.deploy] = bound(self._on_manifest, endpoint.node)
        endpoint.handlers[self.topics.deploy_chunks] = bound(self._on_chunk, endpoint.node)
        self.installer = threading.Thread(target=self._install_loop, name="deploy-installer", daemon=True)
        self.installer.start()

    # -- serving --------------------------------------------------------------------------------------
    def current(self) -> FeatureExtractor | None:
        """The extractor inference should use now (swapped atomically when a new model is ready)."""
        with self.lock:
            return self._current

    def _gate_key(self) -> dict[str, str] | None:
        """What a choice of the adoption gate was made with (None: the gate is off)."""
        if self.adoption is None:
            return None
        own = self.adoption.own_model
        return {
            "own_sha256": file_sha256(own) if own.is_file() else "",
            "validation": str(self.adoption.validation.resolve()),
        }

    def _gated(self, federation: Path, folder: Path) -> tuple[Path, dict[str, object]]:
        """The file to serve of a deployment whose own (verified, prepared) file is `federation`, and the
        gate's fields of current.json (none when the gate is off). A gate that could not decide records no
        settings: the next start tries again."""
        if self.adoption is None:
            return federation, {}
        serving, record = adopt(federation, self.adoption, folder)
        return serving, record if "gate_error" in record else {**record, "gate": self._gate_key()}

    def _write_pointer(self, pointer: dict[str, object]) -> None:
        staged = self.dir / (POINTER + ".tmp")
        staged.write_text(json.dumps(pointer, indent=2))
        staged.replace(self.dir / POINTER)

    def _load_current(self) -> None:
        path = current_model(self.dir.parent)
        if path is None:
            return
        pointer = json.loads((self.dir / POINTER).read_text())
        federation = self.dir / pointer.get("federation_path", pointer["path"])
        if pointer.get("gate") != self._gate_key() and federation.is_file():
            log.info("the adoption settings changed since this deployment was installed: choosing again")
            try:
                path, fields = self._gated(federation, federation.parent)
            except OSError as err:  # (a full disk: the choice on file keeps serving)
                log.warning("adoption gate not applied again: %s", err)
            else:
                gate_fields = ("adopted", "validation", "gate_error", "gate")
                kept = {k: v for k, v in pointer.items() if k not in gate_fields}
                pointer = {**kept, **fields, "path": path.relative_to(self.dir).as_posix()}
                pointer["federation_path"] = federation.relative_to(self.dir).as_posix()
                self._write_pointer(pointer)
        try:
            fx = FeatureExtractor(path)
        except (ContractError, RuntimeError) as err:
            log.warning("the deployed model %s does not load (%s); waiting for a new deployment", path, err)
            return
        self._current, self.version = fx, pointer.get("version", fx.contract.version)
        self.installed_sha, self.installed_created = pointer.get("source_sha256"), pointer.get("created", 0.0)
        self.adopted = "own" if pointer.get("adopted") == "own" else "federation"
        self.endpoint.deployed = self.version
        log.info(
            "serving deployed model %s%s (%s)",
            self.version,
            ": this site's own model (adoption gate)" if self.adopted == "own" else "",
            fx.path.name,
        )

    # -- receiving (endpoint worker thread) -----------------------------------------------------------
    def _on_manifest(self, topic: str, payload: bytes) -> None:
        try:
            msg = parse_message(payload, Deployment)
            assert isinstance(msg, Deployment)
            contract = received_contract(msg.contract)
        except (MessageError, ValueError) as err:
            log.warning("dropped deployment manifest: %s", str(err).splitlines()[0])
            return
        if msg.federation != self.topics.federation:
            log.warning("dropped deployment manifest for federation %s", msg.federation)
            return
        if contract.sha256 != msg.blob.sha256:
            log.warning("dropped deployment %s: its contract and blob disagree", msg.version)
            return
        if why := check_ref(msg.blob, self.max_bytes):
            log.warning("dropped deployment %s: %s", msg.version, why)
            return
        with self.lock:
            if msg.blob.sha256 in (self.installed_sha, self.queued_sha):
                return  # already serving or installing it (the retained manifest comes at every reconnect)
            if self.retry is not None and self.retry[0].blob.sha256 == msg.blob.sha256:
                return  # held, to be installed again
            if self.pending and self.pending[0].blob.sha256 == msg.blob.sha256:
                return
            if msg.created <= self.installed_created:  # only the verified, served model counts here
                log.warning(
                    "dropped deployment %s: created before the model now served "
                    "(a replayed manifest cannot roll back; deploy the round again to roll back)",
                    msg.version,
                )
                return
            if self.pending:
                self.pending[1].close()
            self.retry = None  # (a newer deployment supersedes one held for another try)
            self.pending = (msg, InboundBlob(msg.blob, max_bytes=self.max_bytes))
            self.pending_since = time.monotonic()
            self.unanswered = 0
        log.info("deployment %s announced: fetching %d chunks", msg.version, msg.blob.chunks)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            header, data = parse_chunk(payload)
        except ChunkError as err:
            log.warning("dropped deployment chunk: %s", err)
            return
        with self.lock:
            if self.pending is None:
                return
            manifest, transfer = self.pending
            if header.blob_id != manifest.blob.blob_id:
                return  # a chunk of another (older or newer) deployment
            try:
                if transfer.add(header, data):
                    self.pending_since = time.monotonic()
                    self.unanswered = 0
                if not transfer.complete:
                    return
                blob = transfer.result()
            except ForeignChunk as err:
                log.warning(
                    "dropped deployment chunk, it disagrees with the manifest of %s: %s",
                    manifest.version,
                    err,
                )
                return
            except ChunkError as err:
                log.warning("deployment %s transfer failed: %s", manifest.version, err)
                return
            finally:
                if transfer.complete:
                    transfer.close()
            self.pending = None
            self.queued_sha = manifest.blob.sha256
            self.jobs.put((manifest, blob))

    def poll(self, idle_s: float) -> None:
        """Called periodically: a transfer without progress for `idle_s` asks for its missing chunks.
        Unanswered requests double the wait (up to a minute): nobody may be there to answer (a retained
        deployment outlives the `serve` that made it), which one line says after the third. A deployment
        whose install this site's disk failed is installed again when its time comes."""
        with self.lock:
            if self.retry is not None and time.monotonic() >= self.retry[2]:
                manifest, blob, _ = self.retry
                self.retry, self.queued_sha = None, manifest.blob.sha256
                self.jobs.put((manifest, blob))
            wait = min(idle_s * 2**self.unanswered, max(idle_s, UNANSWERED_WAIT_S))
            if self.pending is None or time.monotonic() - self.pending_since < wait:
                return
            self.pending_since = time.monotonic()
            self.unanswered += 1
            manifest, transfer = self.pending
            missing = transfer.missing()
            unanswered = self.unanswered
        request = ChunkRequest.first_of(self.endpoint.node, manifest.blob.blob_id, missing)
        with log_context(site=self.endpoint.node):
            if unanswered == 4:
                log.warning(
                    "deployment %s: no chunk came for 3 requests; nobody may be sending it (after a run, "
                    "`cloud-aggregator deploy --linger` does); still serving %s, asking less often",
                    manifest.version,
                    self.version or "nothing",
                )
            log.info("deployment %s: asking for %d missing chunks", manifest.version, len(missing))
        self.endpoint.publish(self.topics.deploy_resend, encode_message(request))

    # -- installing (installer thread) ----------------------------------------------------------------
    def _install_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            manifest, blob = job
            with log_context(site=self.endpoint.node):
                try:
                    self._install(manifest, blob)
                except OSError as err:  # this site's disk (full, say): the same file is installed again
                    with self.lock:
                        first = self.retry_said.new(f"{manifest.blob.sha256}: {err}")
                        self.retry = (manifest, blob, time.monotonic() + INSTALL_RETRY_S)
                    log.log(
                        logging.WARNING if first else logging.DEBUG,
                        "deployment %s could not be installed here: %s; still serving %s, trying again "
                        "every %.0f s",
                        manifest.version,
                        err,
                        self.version or "nothing",
                        INSTALL_RETRY_S,
                    )
                except Exception as err:  # never replace a working model with a broken one
                    log.warning(
                        "deployment %s rejected: %s; still serving %s",
                        manifest.version,
                        err,
                        self.version or "nothing",
                    )
                finally:
                    with self.lock:
                        self.queued_sha = None
                    self.jobs.task_done()

    def _install(self, manifest: Deployment, blob: bytes) -> None:
        if sha256_hex(blob) != manifest.blob.sha256:
            raise DeploymentRejected("the model file fails its sha256")
        contract = received_contract(manifest.contract)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", manifest.version)
        folder = self.dir / f"{slug}-{manifest.blob.sha256[:12]}"
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            model = tmp / "model.onnx"
            model.write_bytes(blob)
            write_contract(model, contract)
            federation = self._prepare(model)
            serving, gate = self._gated(federation, tmp)
            fx = FeatureExtractor(serving)  # loads and enforces the contract: the last check before the swap
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        relative = serving.relative_to(tmp)
        fx = FeatureExtractor(folder / relative)  # reopened at its final path
        pointer = {
            "path": f"{folder.name}/{relative.as_posix()}",
            "version": manifest.version,
            "source_sha256": manifest.blob.sha256,
            "created": manifest.created,
            "precision": fx.contract.precision,
            "installed": time.time(),
            "federation_path": f"{folder.name}/{federation.relative_to(tmp).as_posix()}",
            **gate,
        }
        with self.lock:
            previous = self._current
            self._write_pointer(pointer)
            self._current, self.version, self.installed_sha = fx, manifest.version, manifest.blob.sha256
            self.installed_created = manifest.created
            self.adopted = "own" if gate.get("adopted") == "own" else "federation"
        self.endpoint.deployed = manifest.version
        self.endpoint.restate()
        log.info(
            "now serving %s%s (%s, %s)",
            manifest.version,
            ": this site's own model (adoption gate)" if gate.get("adopted") == "own" else "",
            fx.contract.precision,
            ", ".join(fx.providers),
        )
        kept = previous.path.relative_to(self.dir).parts[0] if previous else ""
        self._prune(keep={folder.name, kept})

    def _prepare(self, model: Path) -> Path:
        """The file to serve: the verified ONNX (with the site's BatchNorm layers when it keeps them), or
        its int8 / TensorRT form when configured and good."""
        serving = self._with_site_batchnorm(model)
        if self.int8_data is not None:
            from export.onnx_export import ExportError
            from export.quantize import RetrievalBudget, quantize_int8
            from reid.data import read_dataset

            budget = RetrievalBudget(max_rank1_drop=self.int8_max_drop, max_map_drop=self.int8_max_drop)
            try:
                report = quantize_int8(
                    serving, read_dataset(self.int8_data), model.with_name("model.int8.onnx"), budget
                )
                serving = model.with_name("model.int8.onnx")
                log.info("int8 accepted on this site: %s", report.describe())
            except ExportError as err:
                log.warning("int8 not used (%s); serving the %s model", err, load_contract(serving).precision)
        if self.engine:
            from export.tensorrt import TensorRTError, build_engine_cached

            try:
                precision = load_contract(serving).precision
                built = build_engine_cached(
                    serving, fp16=True, int8=precision == "int8", cache_dir=model.parent
                )
                serving = built.path
            except TensorRTError as err:
                log.warning("no TensorRT engine (%s); serving %s with ONNX Runtime", err, serving.name)
        return serving

    def _with_site_batchnorm(self, model: Path) -> Path:
        """A deployment of a federation that keeps BatchNorm layers local (layers left separate) re-exported
        with this site's own (the deployed ones when it has none yet), their statistics estimated on its
        images; any other file, or when that fails, `model` as it is."""
        if self.site_data is None:
            return model
        from export.site_batchnorm import keeps_batchnorm, with_site_batchnorm
        from reid.data import read_dataset
        from reid.weights import read_site_batchnorm

        def reason(err: Exception) -> str:
            return str(err).splitlines()[0] if str(err) else type(err).__name__

        try:
            if not keeps_batchnorm(model):  # a federation that shares BatchNorm: the file is the model
                return model
            images = [r.path for r in read_dataset(self.site_data).train]
        except Exception as err:
            log.warning("serving the deployed model as it is: this site's images: %s", reason(err))
            return model
        own = (
            [self.site_batchnorm] if self.site_batchnorm is not None and self.site_batchnorm.is_file() else []
        )
        for source in [*own, None]:  # its own layers, else (or when they do not fit) the deployed ones
            out = model.with_name("model.site-bn.onnx" if source else "model.site-stats.onnx")
            try:
                site_bn = read_site_batchnorm(source) if source else None
                _, check, seen = with_site_batchnorm(model, site_bn, images, out)
            except Exception as err:  # any reason: the deployed model as it is is still a valid one to serve
                if disk_full(err):  # but not for good: the install is tried again (while the model it
                    # has, with this site's layers, is served), not served with layers no site trained
                    why = f"no room to put this site's BatchNorm layers in: {reason(err)}"
                    raise OSError(errno.ENOSPC, why) from None
                log.warning(
                    "%s: %s",
                    "this site's own BatchNorm layers not used"
                    if source
                    else "serving the deployed model as it is",
                    reason(err),
                )
                continue
            log.info(
                "%s, statistics estimated on %d of this site's images (parity min cosine %.6f)",
                "this site's BatchNorm layers put in"
                if source
                else "the deployed BatchNorm layers (none of this site's own yet)",
                seen,
                check.min_cosine,
            )
            return out
        return model

    def _prune(self, keep: set[str]) -> None:
        for folder in self.dir.iterdir():
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def busy(self) -> bool:
        """A deployment is being fetched or installed."""
        with self.lock:
            return self.pending is not None or self.jobs.unfinished_tasks > 0

    def stop(self, drain_s: float = 0.0, idle_s: float = 5.0) -> None:
        """Stop the installer, first letting a deployment in progress finish for up to `drain_s`."""
        deadline = time.monotonic() + drain_s
        while self.busy() and time.monotonic() < deadline:
            self.poll(idle_s)
            time.sleep(0.2)
        self.jobs.put(None)
        self.installer.join(timeout=60)
