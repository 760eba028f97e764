"""The aggregator's read-only web face on `metrics_port`: the dashboard page (cloud/dashboard.html, one
file: no build step, nothing fetched from elsewhere), the JSON it draws (GET /api/v1/federation, the
aggregator's `view()`), and Prometheus GET /metrics. Nothing here changes anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cloud.metrics_log import strict_json
from cloud.monitoring import View

PAGE = Path(__file__).with_name("dashboard.html")


def create_app(view: Callable[[], View], registry: CollectorRegistry) -> FastAPI:
    # only the three documented things: no OpenAPI page, and no redirect of `/metrics/` built from the
    # request's Host header (it sent browsers to any host a client named)
    app = FastAPI(
        title="FedReID Edge aggregator",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/v1/federation")
    def federation() -> JSONResponse:
        return JSONResponse(strict_json(view()))  # (a NaN anywhere made every later answer a 500)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
