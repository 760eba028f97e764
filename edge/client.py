"""A typed Python client of the camera site's feature service (`edge-agent serve-features`), for trackers
and video-management glue: embeddings, gallery additions and deletions, search. One keep-alive HTTP
connection pool (httpx); every answer is validated into the documents of edge.feature_api.

    with FeatureClient("http://127.0.0.1:8080") as client:
        ids = client.add([jpeg_bytes], camera="cam-3", track="17")
        hits = client.search(crop=query_jpeg, top_k=5, cameras=["cam-1", "cam-3"]).hits
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import httpx

from edge.feature_api import (
    AddResponse,
    DeleteResponse,
    EmbedResponse,
    GalleryInfo,
    SearchRequest,
    SearchResponse,
)


class ServiceError(RuntimeError):
    """The service refused a request; `status` is the HTTP status, `retry_after` set on 503."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class FeatureClient:
    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3) -> None:
        """`retries`: how often a 503 (queue full) is retried after the server's Retry-After."""
        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code < 400:
                return response.json()
            try:
                detail = str(response.json().get("detail"))
            except ValueError:
                detail = response.text[:300]
            retry = response.headers.get("retry-after")
            error = ServiceError(response.status_code, detail, float(retry) if retry else None)
            if response.status_code != 503 or error.retry_after is None or attempt == self.retries:
                raise error
            time.sleep(error.retry_after)
        raise AssertionError("unreachable")

    @staticmethod
    def _files(crops: Sequence[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("crop", (f"crop{i}", data, "application/octet-stream")) for i, data in enumerate(crops)]

    def embed(self, crops: Sequence[bytes]) -> EmbedResponse:
        """L2-normalised features of JPEG/PNG crops, with the model that made them."""
        return EmbedResponse.model_validate(self._call("POST", "/v1/embed", files=self._files(crops)))

    def add(
        self,
        crops: Sequence[bytes],
        camera: str = "",
        time: float | None = None,
        track: str = "",
        labels: dict[str, str] | None = None,
    ) -> list[int]:
        params: dict[str, str | float] = {
            "camera": camera,
            "track": track,
            "labels": json.dumps(labels or {}),
        }
        if time is not None:
            params["time"] = time
        doc = self._call("POST", "/v1/gallery", params=params, files=self._files(crops))
        return AddResponse.model_validate(doc).ids

    def gallery(self) -> GalleryInfo:
        return GalleryInfo.model_validate(self._call("GET", "/v1/gallery"))

    def delete(self, entry_id: int) -> int:
        return DeleteResponse.model_validate(self._call("DELETE", f"/v1/gallery/{entry_id}")).deleted

    def delete_older_than(self, seconds: float) -> int:
        doc = self._call("DELETE", "/v1/gallery", params={"older_than_s": seconds})
        return DeleteResponse.model_validate(doc).deleted

    def search(
        self,
        crop: bytes | None = None,
        feature: Sequence[float] | None = None,
        top_k: int = 10,
        cameras: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        model_sha256: str | None = None,
    ) -> SearchResponse:
        """By a crop (embedded by the service) or by a feature of the gallery's model."""
        if (crop is None) == (feature is None):
            raise ValueError("give one of crop and feature")
        if feature is not None:
            request = SearchRequest(
                feature=list(feature), model_sha256=model_sha256, top_k=top_k, cameras=list(cameras),
                since=since, until=until,
            )  # fmt: skip
            doc = self._call(
                "POST",
                "/v1/search",
                content=request.model_dump_json(),
                headers={"content-type": "application/json"},
            )
        else:
            params: dict[str, object] = {"top_k": top_k, "camera": list(cameras)}
            params |= {k: v for k, v in (("since", since), ("until", until)) if v is not None}
            doc = self._call(
                "POST",
                "/v1/search",
                params=params,
                content=crop,
                headers={"content-type": "application/octet-stream"},
            )
        return SearchResponse.model_validate(doc)

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200
