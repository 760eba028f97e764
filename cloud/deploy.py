"""Deploying a global model to the sites: export it with the parity gate, then publish it on the broker.

The `Deployment` manifest (version, blob reference, contract) is published **retained** on ``deploy``,
so a site that connects days later still learns which model to serve; the model file itself is a blob
like any other (DESIGN: blobs are never retained): its chunks go out once on ``deploy/chunks`` and a
site that missed them asks on ``deploy/resend``. `DeploymentSource` answers those requests from the
run's state dir (``deployments/latest.json`` + the exported file), in `cloud-aggregator serve` for as
long as it runs, and in `cloud-aggregator deploy` for its ``--linger`` time. Both `cloud-aggregator
deploy` and the aggregator's ``deploy_every`` schedule go through `deploy_round`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from safetensors.torch import load_file

from export.contract import Contract
from export.onnx_export import export_onnx, parity_images
from protocol.chunks import DEFAULT_CHUNK_BYTES
from protocol.messages import BlobRef, ChunkRequest, Deployment, MessageError, encode_message, parse_message
from protocol.mqtt import Endpoint
from protocol.resend import ChunkResender
from protocol.topics import Topics
from reid.data import InputSpec
from reid.files import atomic_write, one_at_a_time
from reid.model import ModelSpec, ReIDModel, build_model, load_shared_state
from reid.weights import round_checkpoints

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """No such round, no usable parity images, or the export failed its gate."""


class ManifestUnacknowledged(DeployError):
    """The deployment is recorded (latest.json) but the broker did not take its manifest: a `serve` that
    reconnects publishes it again (`DeploymentSource.republish`); a one-shot `deploy` has not reached
    the sites."""


def _run_identity(run_dir: Path) -> dict:
    """The run's `run.json`; DeployError naming it when it cannot be read."""
    path = run_dir / "run.json"
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"{path} unreadable: {err}") from None
    if not isinstance(identity, dict):
        raise DeployError(f"{path} is not a run's record")
    return identity


def load_round(run_dir: Path, round_: int | Literal["latest"] = "latest") -> tuple[int, ReIDModel, InputSpec]:
    """The global model of a round (or the newest) of the run in `run_dir`, in eval mode; DeployError,
    naming the file, for a run record or checkpoint that cannot be read or does not fit."""
    identity = _run_identity(run_dir)
    try:
        spec, input_spec = (
            ModelSpec.model_validate(identity["model"]),
            InputSpec.model_validate(identity["input"]),
        )
    except (KeyError, ValueError) as err:
        raise DeployError(f"{run_dir / 'run.json'}: no usable model settings ({err})") from None
    chosen = [(r, p) for r, p in round_checkpoints(run_dir) if round_ == "latest" or r == int(round_)]
    if not chosen:
        raise DeployError(f"no global model for round {round_} in {run_dir / 'rounds'}")
    model = build_model(spec, 1)
    try:
        load_shared_state(model, load_file(str(chosen[-1][1])))
    except Exception as err:  # safetensors' own error type, an OSError, or a ModelError
        raise DeployError(f"{chosen[-1][1]}: not a readable checkpoint of this run's model ({err})") from None
    return chosen[-1][0], model.eval(), input_spec


def keeps_batchnorm_local(run_dir: Path) -> bool:
    """Whether the run in `run_dir` keeps the BatchNorm layers at the sites (``strategy.bn = "local"``)."""
    strategy = _run_identity(run_dir).get("strategy") or {}
    return isinstance(strategy, dict) and strategy.get("bn") == "local"


def _latest_path(run_dir: Path) -> Path:
    return run_dir / "deployments" / "latest.json"


def latest_deployment(run_dir: Path) -> Deployment | None:
    path = _latest_path(run_dir)
    if not path.is_file():
        return None
    try:
        message = parse_message(path.read_bytes(), Deployment)
    except MessageError as err:
        log.warning("ignoring %s: %s", path, err)
        return None
    assert isinstance(message, Deployment)
    return message


def scheduled_round(run_dir: Path) -> int:
    """The round up to which `serve`'s scheduled deployments (`deploy_every`) are settled (-1: none): the
    round of the last one it made, or the newest round when an operator deployed by hand (`deploy
    --round k`, a rollback), so that a restart of `serve` does not undo that. A state dir from before
    this record: the round of the latest deployment. A record that cannot be read counts as settled up
    to the newest round (as after a deployment by hand), with one line: a restart never undoes one."""
    path = run_dir / "deployments" / "scheduled.json"
    if not path.exists():
        last = latest_deployment(run_dir)
        return last.round if last is not None else -1
    try:
        return int(json.loads(path.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        newest = round_checkpoints(run_dir)
        log.warning("%s unreadable (%s): no deployment is made again at this start", path, err)
        return newest[-1][0] if newest else -1


def record_scheduled(run_dir: Path, round_: int) -> None:
    atomic_write(run_dir / "deployments" / "scheduled.json", json.dumps({"round": round_}).encode())


def model_file(run_dir: Path, manifest: Deployment) -> Path:
    return run_dir / "deployments" / f"{manifest.round:05d}" / f"model.{manifest.blob.encoding}.onnx"


def publish_model(
    endpoint: Endpoint,
    run_dir: Path,
    model_path: Path,
    contract: Contract,
    round_: int,
) -> Deployment:
    """Record and publish an exported model (the retained manifest, then the chunks)."""
    topics: Topics = endpoint.topics
    blob = model_path.read_bytes()
    ref = BlobRef(
        blob_id=contract.sha256[:32],
        size=len(blob),
        sha256=contract.sha256,
        chunks=max(1, math.ceil(len(blob) / DEFAULT_CHUNK_BYTES)),
        encoding=contract.precision,
    )
    # two deployers at once (an operator's `deploy`, `serve`'s schedule) take turns from reading the one
    # before to the retained manifest: otherwise latest.json, from which resend requests are answered,
    # could name one model and the retained manifest the sites follow another (they would never get it)
    with one_at_a_time(run_dir / "deployments" / "publish.lock"):
        previous = latest_deployment(run_dir)
        manifest = Deployment(
            federation=topics.federation,
            version=contract.version,
            round=round_,
            blob=ref,
            contract=contract.model_dump(mode="json"),
            # after the one before whatever the clock says: sites refuse a manifest not newer than theirs,
            # so a clock stepped back must not make every later deployment look like a replay
            created=max(time.time(), previous.created + 1e-3) if previous is not None else time.time(),
        )
        if model_file(run_dir, manifest) != model_path:
            raise DeployError(f"{model_path}: deployed models live in {model_file(run_dir, manifest)}")
        payload = encode_message(manifest)
        atomic_write(_latest_path(run_dir), payload)  # recorded first: resend requests are answered from it
        info = endpoint.publish(topics.deploy, payload, retain=True)  # first: receivers expect the chunks
        info.wait_for_publish(60)
        if not info.is_published():
            raise ManifestUnacknowledged("the broker did not acknowledge the deployment manifest")
    endpoint.publish_blob(topics.deploy_chunks, blob, ref.blob_id, DEFAULT_CHUNK_BYTES)
    log.info(
        "deployed %s (%s, %.1f MB, %d chunks)",
        manifest.version,
        contract.precision,
        len(blob) / 1e6,
        ref.chunks,
    )
    return manifest


class DeploymentSource:
    """Answers the sites' ``deploy/resend`` requests with chunks of the run's latest deployed model
    (rate-limited and coalesced by `ChunkResender`, published off the message thread), and re-publishes
    the retained manifest after a reconnect (a restarted broker may have lost it). `start()` before use."""

    def __init__(self, endpoint: Endpoint, run_dir: Path, min_interval_s: float = 2.0) -> None:
        self.endpoint, self.run_dir = endpoint, run_dir
        self._cache: tuple[Deployment, bytes] | None = None
        self.resender = ChunkResender(
            endpoint,
            endpoint.topics.deploy_chunks,
            DEFAULT_CHUNK_BYTES,
            self._chunks_for,
            self._blob_of,
            min_interval_s,
            "deployed model",
        )
        endpoint.handlers[endpoint.topics.deploy_resend] = self.resender.on_request

    def start(self) -> None:
        self.resender.start()

    def stop(self) -> None:
        self.resender.stop()

    def _latest(self) -> tuple[Deployment, bytes] | None:
        manifest = latest_deployment(self.run_dir)
        if manifest is None:
            return None
        if self._cache is None or self._cache[0].blob.sha256 != manifest.blob.sha256:
            path = model_file(self.run_dir, manifest)
            blob = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(blob).hexdigest() != manifest.blob.sha256:
                log.warning("the deployed model file %s is missing or modified; not serving it", path)
                return None
            self._cache = (manifest, blob)
        return self._cache

    def _chunks_for(self, req: ChunkRequest) -> int | None:
        """Any site may fetch the current deployment; an older one is not served (the retained manifest
        tells the site what is current)."""
        manifest = latest_deployment(self.run_dir)
        return manifest.blob.chunks if manifest is not None and manifest.blob.blob_id == req.blob_id else None

    def _blob_of(self, blob_id: str) -> bytes | None:
        latest = self._latest()
        return latest[1] if latest is not None and latest[0].blob.blob_id == blob_id else None

    def republish(self) -> None:
        manifest = latest_deployment(self.run_dir)
        if manifest is not None:
            self.endpoint.publish(self.endpoint.topics.deploy, encode_message(manifest), retain=True)


def deploy_round(
    endpoint: Endpoint,
    run_dir: Path,
    images: Sequence[Path],
    round_: int | Literal["latest"] = "latest",
    precision: Literal["fp32", "fp16"] = "fp32",
) -> Deployment:
    """Export a round's global model (parity gate on `images`) and publish it to the sites.

    When the run keeps BatchNorm layers at the sites (``strategy.bn = "local"``) they stay separate in the
    file, so that each site serves the model with its own (`export.site_batchnorm`)."""
    r, model, input_spec = load_round(run_dir, round_)
    version = f"{endpoint.topics.federation}/round-{r}"
    out = run_dir / "deployments" / f"{r:05d}" / f"model.{precision}.onnx"
    from export.onnx_export import ExportError

    try:
        contract, parity = export_onnx(
            model,
            input_spec,
            out,
            parity_images(images, input_spec),
            version=version,
            precision=precision,
            keep_batchnorm=keeps_batchnorm_local(run_dir),
        )
    except ExportError as err:
        raise DeployError(f"round {r} not deployed: {err}") from None
    log.info("exported %s: parity min cosine %.6f", version, parity.min_cosine)
    return publish_model(endpoint, run_dir, out, contract, r)
