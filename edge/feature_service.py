"""`edge-agent serve-features`: embeddings and gallery search over HTTP at a camera site.

FastAPI on uvicorn (the OpenAPI schema comes with it, GET /openapi.json). Request handlers decode and
preprocess crops on the server's thread pool (so that work runs in parallel across requests) and queue
them on one `DynamicBatcher`, which runs the exported model through `export.runtime.FeatureExtractor`.
The gallery is an `edge.gallery_store.GalleryStore`; when it holds features of another model than the
one served, it is embedded again in the background from its kept crops, and searches answer 503 until
that is done (features of two models are never compared).

Endpoints (docs/serving.md): POST /v1/embed, POST|GET|DELETE /v1/gallery, DELETE /v1/gallery/{id},
POST /v1/search, GET /healthz, /readyz, /metrics (Prometheus). Nothing a client sends can stop the
service: undecodable or oversized crops are a 4xx naming the problem, a full queue is a 503 with
Retry-After, and any other failure of one request is a 500 with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from edge.batcher import DynamicBatcher, QueueFull
from edge.feature_api import (
    AddResponse,
    DeleteResponse,
    EmbedResponse,
    GalleryInfo,
    Hit,
    ModelRef,
    SearchRequest,
    SearchResponse,
    ServiceConfig,
)
from edge.gallery_store import GalleryStore, GalleryStoreError, NewEntry, OtherModel
from export.runtime import FeatureExtractor
from protocol.messages import untrusted_json
from reid.data.images import to_rgb
from reid.logs import SaidOnce

log = logging.getLogger(__name__)
GAP_WAIT_S = 1.0  # how long a re-embedding batch waits for the live queue to empty
REEMBED_RUN_S = 0.1  # a re-embedding batch holds the model about this long: a live batch waits for it
RETRY_S = 30.0  # what failed for a while (a service that could not start, a full disk) is tried this often
RETENTION_EVERY_S = 60.0  # how often entries past retention_s are deleted
# A request of at most this many pixels (about 4 crops of 256x128, 1-2 ms of decoding) is decoded on the
# event loop itself; larger ones in a worker thread. Handing a single crop to a worker thread costs more
# than it saves on two cores: one more runnable thread preempts the model's, and the model's parallel
# operators wait for the preempted one (int8 ResNet-50 on 2 cores, 16 clients: 176 -> 195 crops/s,
# docs/benchmarks.md).
INLINE_DECODE_PIXELS = 4 * 256 * 128
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # a camera or track name: no control characters (NUL, newlines)
FORM_PART_BYTES = 4096  # a multipart part's boundary and headers, at most, beside its crop
MAX_JSON_BYTES = 1 << 20  # a JSON search request (a 65,536-d feature is about 1.3 MB of text: 8,192-d fits)
T = TypeVar("T")


def _preprocessing(served: Served) -> tuple:
    c = served.extractor.contract
    return (c.input_name, c.height, c.width, tuple(c.mean), tuple(c.std), c.scale)


class CropError(ValueError):
    """A crop a client sent cannot be used; the text names it and why."""


@dataclass(frozen=True)
class Served:
    extractor: FeatureExtractor

    @property
    def ref(self) -> ModelRef:
        c = self.extractor.contract
        return ModelRef(version=c.version, sha256=c.sha256)


class Metrics:
    """The service's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fedreid_edge_requests", "HTTP requests by endpoint and status", ["endpoint", "code"], registry=r
        )
        self.latency = Histogram(
            "fedreid_edge_request_seconds", "HTTP request latency", ["endpoint"], registry=r
        )
        self.batch_size = Histogram(
            "fedreid_edge_batch_size",
            "crops per model run",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.batch_seconds = Histogram("fedreid_edge_batch_seconds", "seconds per model run", registry=r)
        self.crops = Counter("fedreid_edge_crops", "crops embedded", registry=r)
        self.rejected = Counter(
            "fedreid_edge_rejected", "requests refused, by reason", ["reason"], registry=r
        )
        self.queue = Gauge("fedreid_edge_queue_crops", "crops waiting for the model", registry=r)
        self.gallery = Gauge("fedreid_edge_gallery_entries", "entries in the gallery", registry=r)
        self.model = Gauge("fedreid_edge_model_info", "the served model", ["version", "sha256"], registry=r)


def _undecodable(index: int, err: Exception) -> CropError:
    said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # (PIL names its buffer)
    return CropError(f"crop {index}: not a decodable image ({type(err).__name__}: {said})")


def open_crop(data: bytes, index: int, cfg: ServiceConfig) -> Image.Image:
    """The crop's image, its header read and checked against the limits, its pixels not decoded yet."""
    if not data:
        raise CropError(f"crop {index}: empty")
    if len(data) > cfg.max_crop_bytes:
        raise CropError(f"crop {index}: {len(data)} bytes, more than {cfg.max_crop_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # a header claiming ~180 M pixels or more
        raise CropError(f"crop {index}: more than {cfg.max_crop_pixels} pixels ({err})") from None
    except Exception as err:  # PIL raises many kinds for hostile bytes
        raise _undecodable(index, err) from None
    if img.width * img.height > cfg.max_crop_pixels:
        raise CropError(f"crop {index}: {img.width}x{img.height} pixels, more than {cfg.max_crop_pixels}")
    return img


def load_crop(img: Image.Image, index: int) -> Image.Image:
    """An opened crop decoded, turned upright by its EXIF orientation, in RGB."""
    try:
        return to_rgb(img)
    except Exception as err:  # truncated or corrupt image data
        raise _undecodable(index, err) from None


def decode_crop(data: bytes, index: int, cfg: ServiceConfig) -> Image.Image:
    return load_crop(open_crop(data, index, cfg), index)


# Crops decoded at once in this process (each up to `max_crop_pixels`, ~50 MB of RGB and as much again in
# transient copies at 4096 x 4096): decoding is CPU work, so more at once would only hold more memory.
# A request is decoded one crop at a time, each made into its (3, H, W) model input before the next
# (64 crops of 4096 x 4096 in one request took the service to 9.2 GB when all were decoded first).
DECODERS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def crop_inputs(
    crops: Sequence[bytes], served: Served, cfg: ServiceConfig, first: int = 0, bounded: bool = True
) -> np.ndarray:
    """The model inputs (N, 3, H, W) of `crops` for `served`; CropError names the first bad one
    (numbered from `first`). At most one decoded crop of this call exists at a time; with `bounded`, it
    also waits for one of the process's `DECODERS` (not on the event loop: its crops are small, and it
    must not wait behind a large decode in a worker thread)."""
    out = []
    for i, data in enumerate(crops, first):
        with DECODERS if bounded else contextlib.nullcontext():
            out.append(served.extractor.preprocess([decode_crop(data, i, cfg)]))
    return np.concatenate(out)


class FeatureService:
    def __init__(self, model: Path, gallery: Path, cfg: ServiceConfig, follow: Path | None = None) -> None:
        """`follow`: an agent's state folder; the service then adopts each model deployed there."""
        self.cfg = cfg
        self.metrics = Metrics()
        # (no spinning: while a new model embeds the gallery, two models take turns on the same cores)
        self.served = Served(FeatureExtractor(model, batch_size=cfg.max_batch, spin=False))
        self._show_model()
        self.store = GalleryStore(gallery, self.served.extractor.contract.output_dim)
        self.metrics.gallery.set(len(self.store))
        self.batcher = DynamicBatcher(
            self._run, cfg.max_batch, cfg.max_delay_ms, cfg.max_queue, on_batch=self._observe_batch
        )
        self.reindexing = threading.Event()
        self.compute = threading.Lock()  # one model run at a time: live batches and re-embedding alternate
        self.green: Served | None = None  # the model the gallery is being embedded with, if any
        self.live_batches = 0  # model runs for requests so far
        self.stopping = threading.Event()
        self.rejected_sha = ""  # a deployed model that could not be adopted (not tried again)
        if self.store.unembedded(self.served.ref.sha256, limit=1):  # another model's, or rows lost
            self.reindexing.set()  # (no model of the gallery's is loaded: searches wait for this)
            threading.Thread(target=self._embed_until_done, name="reindex", daemon=True).start()
        elif self.store.model_sha256 == self.served.ref.sha256:
            self.store.drop_staged()
        if follow is not None:
            threading.Thread(target=self._follow, args=(follow,), name="follow", daemon=True).start()
        if cfg.retention_s:
            threading.Thread(target=self._retention, name="retention", daemon=True).start()

    # -- model ---------------------------------------------------------------------------------------
    def _show_model(self) -> None:
        self.metrics.model.clear()
        self.metrics.model.labels(self.served.ref.version, self.served.ref.sha256).set(1)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, Served]:
        served = self.served
        with self.compute:
            return served.extractor.run(batch), served

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.live_batches += 1
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.crops.inc(size)

    async def embed(self, crops: list[bytes]) -> tuple[np.ndarray, Served]:
        """Features of the crops, through the batcher, with the model that made them. CropError /
        QueueFull for what cannot be done."""
        if not crops:
            raise CropError("no crop in the request")
        if len(crops) > self.cfg.max_crops_per_request:
            raise CropError(f"{len(crops)} crops in one request, more than {self.cfg.max_crops_per_request}")
        served = self.served
        pixels = sum(
            img.width * img.height for img in (open_crop(d, i, self.cfg) for i, d in enumerate(crops))
        )
        if pixels <= INLINE_DECODE_PIXELS:  # (every header checked before any crop is decoded)
            batch = crop_inputs(crops, served, self.cfg, bounded=False)
        else:
            batch = await run_in_threadpool(crop_inputs, crops, served, self.cfg)
        while True:
            future = self.batcher.submit(batch)
            self.metrics.queue.set(self.batcher.queued)
            features, ran = await asyncio.wrap_future(future)
            if ran is served or _preprocessing(ran) == _preprocessing(served):
                return features, ran
            # (the model was swapped between preprocessing and the batch, to one that preprocesses
            # differently: once more with the new one)
            served = self.served
            batch = await run_in_threadpool(crop_inputs, crops, served, self.cfg)

    async def with_gallery(
        self, crops: list[bytes], use: Callable[[np.ndarray, Served], T]
    ) -> tuple[T, Served]:
        """`use(features, model)` on the gallery (in a worker thread) with the crops' features; when a new
        model was adopted between embedding and `use` (OtherModel), once more with the new model."""
        for attempt in range(2):
            features, served = await self.embed(crops)
            try:
                return await run_in_threadpool(use, features, served), served
            except OtherModel:
                if attempt:
                    raise HTTPException(
                        503, "the model changed twice meanwhile", {"Retry-After": "1"}
                    ) from None
        raise AssertionError("unreachable")

    # -- following deployments -------------------------------------------------------------------------
    def _follow(self, state_dir: Path) -> None:
        """Adopt each model the agent deploys in `state_dir` (its models/current.json)."""
        from edge.deployment import current_model
        from export.contract import load_contract

        refusal = SaidOnce()  # (a file that stays bad is said once, not every follow_every_s)
        not_before = 0.0  # after a failure that may pass (a full disk), the next try waits RETRY_S
        while not self.stopping.wait(self.cfg.follow_every_s):
            path, sha = current_model(state_dir), ""
            try:
                sha = load_contract(path).sha256 if path is not None else ""
                if (
                    not sha
                    or sha in (self.served.ref.sha256, self.rejected_sha)
                    or time.monotonic() < not_before
                ):
                    continue
                green = Served(FeatureExtractor(path, batch_size=self.cfg.max_batch, spin=False))
                dim = green.extractor.contract.output_dim
                if dim != self.store.dim:
                    raise GalleryStoreError(f"{dim}-d features, the gallery's are {self.store.dim}-d")
                self._adopt(green)
            except Exception as err:  # the current model keeps serving
                passing = isinstance(err, (sqlite3.OperationalError, OSError))  # (the file itself is fine)
                if refusal.new(f"{path}: {err}"):
                    log.warning(
                        "deployed model %s not adopted: %s%s",
                        path,
                        err,
                        f"; trying again in {RETRY_S:.0f} s" if passing else "",
                    )
                if passing:
                    not_before = time.monotonic() + RETRY_S
                else:
                    self.rejected_sha = sha

    def _embed_gallery(self, served: Served) -> int:
        """Stage `served`'s features of every gallery entry that has none yet, batch by batch (each batch
        is kept on disk: an interruption loses at most one). Entries whose crop no longer decodes are
        deleted. The number of entries embedded."""
        sha, after, done = served.ref.sha256, 0, 0

        def step() -> int:  # small runs (about REEMBED_RUN_S of the model): a live batch waits for one
            return max(1, min(self.cfg.max_batch // 4, round(REEMBED_RUN_S / self.batcher.seconds_per_crop)))

        while rows := self.store.unembedded(sha, after, limit=step()):
            after = rows[-1][0]
            good, damaged = [], []
            for entry_id, crop in rows:
                try:
                    good.append((entry_id, crop_inputs([crop], served, self.cfg, first=entry_id)))
                except CropError as err:  # decodable when added: the file was damaged since
                    log.warning("gallery entry %d cannot be embedded again, deleted: %s", entry_id, err)
                    damaged.append(entry_id)
            if damaged:
                self.store.delete(damaged)
            if good:
                # live requests first: embedding again uses the gaps they leave, but waits for one at
                # most GAP_WAIT_S, so that steady traffic cannot starve it (then the duty cycle below
                # still leaves the live requests three quarters of the model's time)
                gap_deadline = time.perf_counter() + GAP_WAIT_S
                while self.batcher.queued and not self.stopping.is_set():
                    if time.perf_counter() > gap_deadline:
                        break
                    time.sleep(0.005)
                batch = np.concatenate([x for _, x in good])
                live, clock = self.live_batches, time.perf_counter()
                with self.compute:
                    feats = served.extractor.run(batch)
                self.store.stage([i for i, _ in good], feats, sha)
                done += len(good)
                if self.live_batches != live:  # under traffic: at most a quarter of the model's time
                    self.stopping.wait(3 * (time.perf_counter() - clock))
            if self.stopping.is_set():
                raise RuntimeError("stopping")
        return done

    def _adopt(self, green: Served) -> None:
        """Embed the gallery with `green` while the current model keeps answering (blue/green), then
        switch the gallery and the served model at once, under the gallery's lock: no search ever
        compares features of two models. The new features are staged on disk as they are made, so a
        crash or stop resumes with the entries still missing; the old gallery stays whole until the
        switch."""
        self.reindexing.set()
        try:
            staged = self.store.begin_staging(green.ref.sha256)
            self.green = green
            log.info(
                "embedding %d gallery entries with model %s%s",
                self.store.stored() - staged,
                green.ref.version,
                f" ({staged} have their features already)" if staged else "",
            )
            self._embed_gallery(green)
            with self.store.lock:  # additions and searches wait for those added meanwhile and the switch
                self._embed_gallery(green)
                self.store.activate((green.ref.version, green.ref.sha256))
                self.served = green
                self._show_model()
            self.metrics.gallery.set(len(self.store))
            log.info(
                "now serving model %s (%s); gallery of %d entries embedded with it",
                green.ref.version,
                green.ref.sha256[:12],
                len(self.store),
            )
        except RuntimeError as err:
            if not self.stopping.is_set():
                raise
            log.info("gallery embedding interrupted (%s): it is done again at the next start", err)
        finally:
            self.green = None
            self.reindexing.clear()

    def _embed_until_done(self) -> None:
        """The gallery embedded with the served model at start (another model's, or rows lost), tried again
        every RETRY_S after a failure (a full disk, a locked file): the service answers 503 until it is
        done, so a thread that gave up left it answering 503 for good."""
        failure = SaidOnce()
        while not self.stopping.is_set():
            try:
                self._adopt(self.served)
                return
            except Exception as err:
                self.reindexing.set()  # (still to do)
                if failure.new(str(err)):
                    log.warning(
                        "embedding the gallery with model %s failed (%s: %s); trying again every %.0f s",
                        self.served.ref.version,
                        type(err).__name__,
                        err,
                        RETRY_S,
                    )
                if self.stopping.wait(RETRY_S):
                    return

    def stage_added(self, green: Served, crops: list[bytes], ids: list[int]) -> None:
        """Entries added while `green` embeds the gallery get its features at once, so that steady
        additions cannot outrun the re-embedding."""
        batch = crop_inputs(crops, green, self.cfg)
        with self.compute:
            features = green.extractor.run(batch)
        self.store.stage(ids, features, green.ref.sha256)

    def _retention(self) -> None:
        """A pass a minute; a pass that fails (a full disk: deleting needs room in the journal too) is one
        line, and the next one runs (the thread ended there, and retention with it, silently)."""
        while not self.stopping.wait(RETENTION_EVERY_S):
            try:
                self.delete_older_than(time.time() - float(self.cfg.retention_s or 0))
            except Exception as err:
                log.warning(
                    "retention pass failed (%s: %s); the next one is in %.0f s",
                    type(err).__name__,
                    err,
                    RETENTION_EVERY_S,
                )

    def delete_older_than(self, cutoff: float) -> int:
        gone = self.store.delete_older_than(cutoff)
        self.metrics.gallery.set(len(self.store))
        if gone:
            log.info("retention: %d gallery entries captured before %.0f deleted", gone, cutoff)
        return gone

    def gallery_ref(self) -> ModelRef | None:
        return (
            ModelRef(version=self.store.model_version, sha256=self.store.model_sha256)
            if len(self.store)
            else None
        )

    def ready(self) -> tuple[bool, str]:
        """Ready when the gallery holds the served model's features (while a new model is being adopted,
        the current one still answers: ready)."""
        if not len(self.store):
            return True, "ready"
        # Read in this order: the switch sets the gallery's model, then the served one, then clears
        # `green`; so a gallery already on the new model is seen with `green` still set or with the new
        # model served, never as a mismatch. (A request that embedded with the old model meanwhile is
        # done again with the new one: OtherModel.)
        gallery, green = self.store.model_sha256, self.green
        if gallery in (self.served.ref.sha256, green.ref.sha256 if green is not None else None):
            return True, "ready"
        return False, "the gallery is being embedded with the served model"

    def close(self) -> None:
        self.stopping.set()
        self.batcher.close()
        self.store.close()


async def _crops_of(request: Request, cfg: ServiceConfig, one: bool = False) -> list[bytes]:
    """The crops of a request: one raw image body, or the file parts of a multipart form (`one`: a
    search, which takes one crop: 422 for more). A body or part over the limits is refused (413) as it
    arrives: bodies were read whole first, and four 400 MB ones held 2.1 GB of a camera box's memory."""
    kind = request.headers.get("content-type", "").lower()
    if not kind.startswith("multipart/form-data"):
        return [await _body(request, cfg.max_crop_bytes, "crop 0")]
    crops = 1 if one else cfg.max_crops_per_request
    _refuse_declared(request, crops * (cfg.max_crop_bytes + FORM_PART_BYTES), f"a form of {crops} crops")
    # (file parts are spooled to disk past 1 MB by the form parser)
    form = await request.form(max_files=cfg.max_crops_per_request + 1, max_fields=16)
    parts = [part for _, part in form.multi_items() if hasattr(part, "read")]
    for i, part in enumerate(parts):
        if part.size is not None and part.size > cfg.max_crop_bytes:
            raise CropError(f"crop {i}: {part.size} bytes, more than {cfg.max_crop_bytes}")
    if one and len(parts) > 1:
        raise HTTPException(422, f"a search takes one crop; this request has {len(parts)}")
    return [await part.read() for part in parts]


def _refuse_declared(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise CropError(f"{what}: {declared} bytes, more than {limit}")


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused (413) past `limit` bytes as it arrives, not after it was read whole."""
    _refuse_declared(request, limit, what)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # (sent without Content-Length, or longer than it said)
            raise CropError(f"{what}: more than {limit} bytes")
    return bytes(body)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _said(errors: Sequence[Any]) -> str:
    """Validation errors in one line: `where: what` for the first three."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:3])


class _Observe:
    """Requests and latency per endpoint and status, as plain ASGI middleware (Starlette's
    BaseHTTPMiddleware costs a task and a memory stream per request). A request that raises gets a 500
    and one log line; the service goes on."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.m = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock, status, started = time.perf_counter(), 500, False

        async def sent(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception as err:  # one request failed; the service goes on
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(err).__name__, err)
            status = 500
            if not started:
                await _problem(500, f"internal error: {type(err).__name__}")(scope, receive, send)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.m.requests.labels(endpoint, str(status)).inc()
            self.m.latency.labels(endpoint).observe(time.perf_counter() - clock)


def create_app(service: FeatureService) -> FastAPI:
    # (no /docs page: it fetches its assets from a CDN, and camera sites are often offline)
    app = FastAPI(title="FedReID Edge feature service", version="1", docs_url=None, redoc_url=None)
    m = service.metrics
    app.add_middleware(_Observe, metrics=m)

    @app.exception_handler(CropError)
    async def crop_error(request: Request, err: CropError) -> JSONResponse:
        m.rejected.labels("bad_crop").inc()
        too_big = "more than" in str(err)
        return _problem(413 if too_big else 400, str(err))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        m.rejected.labels("queue_full").inc()
        retry = max(1, round(err.retry_after + 0.5))
        return _problem(503, str(err), {"Retry-After": str(retry)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _problem(422, _said(err.errors()))  # (one line, as every other error: not FastAPI's list)

    @app.exception_handler(sqlite3.OperationalError)
    async def storage_error(request: Request, err: sqlite3.OperationalError) -> JSONResponse:
        log.error("gallery write failed: %s", err)  # nothing of the request was kept
        full = "full" in str(err)
        return _problem(507 if full else 503, f"gallery: {err}", None if full else {"Retry-After": "5"})

    @app.exception_handler(GalleryStoreError)
    async def gallery_error(request: Request, err: GalleryStoreError) -> JSONResponse:
        return _problem(409, str(err))

    @app.post("/v1/embed", response_model=EmbedResponse)
    async def embed(request: Request) -> EmbedResponse:
        """L2-normalised features of one crop (raw JPEG/PNG body) or many (multipart file parts)."""
        features, served = await service.embed(await _crops_of(request, service.cfg))
        return EmbedResponse(model=served.ref, features=features.tolist())

    @app.post("/v1/gallery", response_model=AddResponse)
    async def add(
        request: Request,
        camera: str = Query("", max_length=200, pattern=PRINTABLE),
        capture_time: float | None = Query(
            None, alias="time", ge=0, le=1e11, allow_inf_nan=False, description="Unix seconds (default: now)"
        ),
        track: str = Query("", max_length=200, pattern=PRINTABLE),
        labels: str = Query("{}", max_length=4000, description="a JSON object of string labels"),
    ) -> AddResponse:
        """Add crops (raw body or multipart) with their metadata; the ids, in order."""
        try:
            tags = untrusted_json(labels)
            if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                raise ValueError
        except ValueError:
            raise HTTPException(422, "labels: a JSON object of string values") from None
        ok, why = service.ready()
        if not ok:
            raise HTTPException(503, why, {"Retry-After": "5"})
        crops = await _crops_of(request, service.cfg)
        when = time.time() if capture_time is None else capture_time
        entries = [NewEntry(c, camera, when, track, tags) for c in crops]
        ids, served = await service.with_gallery(
            crops, lambda f, s: service.store.add(entries, f, (s.ref.version, s.ref.sha256))
        )
        green = service.green
        if green is not None and green.ref.sha256 != served.ref.sha256:
            try:
                await run_in_threadpool(service.stage_added, green, crops, ids)
            except (sqlite3.OperationalError, OSError) as err:  # the entries are kept: answered 200 below
                # (an error answer for kept entries made a retrying client add them twice); the
                # re-embedding's last pass gives them the new model's features
                log.warning("entries %s: the new model's features wait for the re-embedding (%s)", ids, err)
        m.gallery.set(len(service.store))
        return AddResponse(ids=ids, model=served.ref)

    @app.get("/v1/gallery", response_model=GalleryInfo)
    async def gallery_info() -> GalleryInfo:
        return GalleryInfo(
            entries=len(service.store), model=service.gallery_ref(), reindexing=service.reindexing.is_set()
        )

    @app.delete("/v1/gallery/{entry_id}", response_model=DeleteResponse)
    async def delete_one(entry_id: int = PathParam(..., ge=0, le=2**63 - 1)) -> DeleteResponse:
        deleted = await run_in_threadpool(service.store.delete, [entry_id])
        m.gallery.set(len(service.store))
        if not deleted:
            raise HTTPException(404, f"no gallery entry {entry_id}")
        return DeleteResponse(deleted=deleted)

    @app.delete("/v1/gallery", response_model=DeleteResponse)
    async def delete_old(
        older_than_s: float = Query(
            ..., ge=0, allow_inf_nan=False, description="delete entries captured more than this ago"
        ),
    ) -> DeleteResponse:
        return DeleteResponse(
            deleted=await run_in_threadpool(service.delete_older_than, time.time() - older_than_s)
        )

    @app.post("/v1/search", response_model=SearchResponse)
    async def search(
        request: Request,
        top_k: int = Query(10, ge=1, le=1000),
        camera: list[str] = Query([], description="only these cameras (repeat the parameter)"),
        since: float | None = Query(None, allow_inf_nan=False),
        until: float | None = Query(None, allow_inf_nan=False),
    ) -> SearchResponse:
        """Top-k gallery entries for a crop (raw image body) or a feature (JSON SearchRequest)."""
        ok, why = service.ready()
        if not ok:
            raise HTTPException(503, why, {"Retry-After": "5"})
        if request.headers.get("content-type", "").lower().startswith("application/json"):
            try:
                query = SearchRequest.model_validate_json(
                    await _body(request, MAX_JSON_BYTES, "search request")
                )
            except ValidationError as err:
                raise HTTPException(422, f"search request: {_said(err.errors())}") from None
            with np.errstate(over="ignore"):
                feature = np.asarray(query.feature, np.float64)
                norm = float(np.linalg.norm(feature))
            if feature.shape != (service.store.dim,):
                raise HTTPException(
                    422, f"feature of {feature.size} values; the model gives {service.store.dim}"
                )
            if not 0 < norm < float("inf"):
                raise HTTPException(422, "feature: all zeros, or values too large to compare")
            feature = (feature / norm).astype(np.float32)
            version, sha = service.store.model
            if query.model_sha256 is not None:
                version, sha = "", query.model_sha256
            try:
                found = await run_in_threadpool(
                    service.store.search,
                    feature[None],
                    query.top_k,
                    query.cameras,
                    query.since,
                    query.until,
                    sha,
                )
            except OtherModel:
                raise HTTPException(409, "the feature was made by another model than the gallery's") from None
            model = ModelRef(version=version or service.store.model_version, sha256=sha)
        else:
            crops = await _crops_of(request, service.cfg, one=True)
            found, served = await service.with_gallery(
                crops, lambda f, s: service.store.search(f[:1], top_k, camera, since, until, s.ref.sha256)
            )
            model = served.ref
        entries = service.store.entries([i for i, _ in found[0]])
        hits = [
            Hit(score=score, **entries[i].__dict__) for i, score in found[0] if i in entries
        ]  # (an entry deleted meanwhile is left out)
        return SearchResponse(model=model, hits=hits)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, why = service.ready()
        body = {"ready": ok, "detail": why, "model": service.served.ref.model_dump()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        m.queue.set(service.batcher.queued)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def running(
    service: FeatureService, host: str = "127.0.0.1", port: int = 0
) -> contextlib.AbstractContextManager[str]:
    """The service on a uvicorn server in a thread of this process, while the block runs; yields its URL."""
    from reid.http_server import serving

    return serving(create_app(service), host, port)


def serve_deployed(state_dir: Path, cfg: ServiceConfig, stop: threading.Event) -> None:
    """The service beside an agent (`edge-agent start` with `[serve_features]`): it waits for the first
    model deployed in the agent's `state_dir`, serves it with the gallery `state_dir/gallery.db`, and
    adopts each later deployment, until `stop` is set. A failure to start (the port taken, the gallery
    in use) is one log line, and the service is tried again every RETRY_S seconds (one more line only
    when the reason changes): training goes on without it meanwhile."""
    from edge.deployment import current_model

    failure = SaidOnce()
    while True:
        while (model := current_model(state_dir)) is None:
            if stop.wait(cfg.follow_every_s):
                return
        try:
            _serve_until(stop, model, state_dir, cfg)
            return
        except Exception as err:
            if failure.new(str(err)):
                log.error("feature service not running: %s (trying again every %.0f s)", err, RETRY_S)
        if stop.wait(RETRY_S):
            return


def _serve_until(stop: threading.Event, model: Path, state_dir: Path, cfg: ServiceConfig) -> None:
    service = FeatureService(model, state_dir / "gallery.db", cfg, follow=state_dir)
    try:
        with running(service, cfg.host, cfg.port) as url:
            log.info("feature service on %s, model %s", url, service.served.ref.version)
            stop.wait()
    finally:
        service.close()
