"""The JSON documents of the camera site's feature service (`edge-agent serve-features`), shared by the
server (edge.feature_service) and the typed client (edge.client); the server's OpenAPI schema is built
from them (GET /openapi.json). Also the service's settings (`ServiceConfig`), light enough for the
agent's configuration to embed."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Doc):
    """The model that made a set of features: features of different models are never comparable."""

    version: str
    sha256: str


class EmbedResponse(_Doc):
    model: ModelRef
    features: list[list[float]] = Field(description="one L2-normalised feature per crop, in order")


class GalleryEntry(_Doc):
    id: int
    camera: str = Field(description="the camera that saw the crop")
    time: float = Field(description="capture time, Unix seconds (retention deletes by it)")
    track: str = Field(description="the tracker's track id, if any")
    labels: dict[str, str] = Field(description="free labels")


class AddResponse(_Doc):
    ids: list[int]
    model: ModelRef


class DeleteResponse(_Doc):
    deleted: int


class GalleryInfo(_Doc):
    entries: int
    model: ModelRef | None = Field(description="the model of the gallery's features; null when empty")
    reindexing: bool = Field(description="being embedded again with the served model")


class SearchRequest(_Doc):
    """Search with a feature (from /v1/embed of the same model); with a crop, POST the image instead."""

    feature: list[Finite] = Field(min_length=1, max_length=65536)
    model_sha256: str | None = Field(None, description="the model that made `feature` (checked if given)")
    top_k: int = Field(10, ge=1, le=1000)
    cameras: list[str] = Field(default_factory=list, max_length=1000, description="only these cameras")
    since: Finite | None = Field(None, description="only entries captured at or after this time")
    until: Finite | None = Field(None, description="only entries captured at or before this time")


class Hit(GalleryEntry):
    score: float = Field(description="cosine similarity, higher is closer")


class SearchResponse(_Doc):
    model: ModelRef = Field(description="the model of the gallery (and of the query)")
    hits: list[Hit]


class Problem(_Doc):
    detail: str


class ServiceConfig(BaseModel):
    """Settings of `edge-agent serve-features`."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="listen address (loopback by default)")
    port: int = Field(8080, ge=0, le=65535, description="listen port (0: any free port)")
    max_batch: int = Field(32, ge=1, le=4096, description="crops per model run at most")
    max_delay_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a crop waits for others to batch with"
    )
    max_queue: int = Field(512, ge=1, description="crops waiting at most; beyond: 503 with Retry-After")
    max_crop_bytes: int = Field(4 << 20, ge=1024, description="largest crop file accepted")
    max_crop_pixels: int = Field(4096 * 4096, ge=64, description="largest crop (width x height) decoded")
    max_crops_per_request: int = Field(64, ge=1, description="crops in one request at most")
    retention_s: float | None = Field(None, gt=0, description="delete gallery entries older than this")
    follow_every_s: float = Field(2.0, gt=0, description="how often a followed agent's deployment is checked")
