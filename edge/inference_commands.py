"""The camera-side inference commands of `edge-agent`: extract, search, quantize, build-engine and
serve-features.

They run exported models only (ONNX Runtime or TensorRT through `export.runtime.FeatureExtractor`),
never PyTorch eager. `--model` takes a model file, or an agent's state folder, meaning the model the
federation last deployed there.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from reid.console import fail, metrics_table

if TYPE_CHECKING:
    from export.gallery import Gallery
    from export.runtime import FeatureExtractor

out = Console()
ModelOpt = typer.Option(
    ..., "--model", help="a model (.onnx/.engine with its contract) or an agent state folder"
)


def resolve_model(path: Path) -> Path:
    """A model file as given, or the deployed model of an agent's state folder."""
    if not path.exists():
        raise typer.BadParameter(f"model not found: {path}", param_hint="--model")
    if path.is_dir():
        from edge.deployment import current_model

        found = current_model(path)
        if found is None:
            raise typer.BadParameter(f"{path}: no deployed model in this state folder", param_hint="--model")
        return found
    if path.suffix == ".safetensors":
        raise typer.BadParameter(
            f"{path} is a PyTorch model file; these commands run exported models: "
            f"cloud-aggregator export --model {path} --images CROPS --out model.onnx",
            param_hint="--model",
        )
    return path


def _extractor(model_path: Path) -> FeatureExtractor:
    from export.contract import ContractError
    from export.runtime import FeatureExtractor

    try:
        return FeatureExtractor(resolve_model(model_path))
    except ContractError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None


def extract(
    model_path: Path = ModelOpt,
    images: Path = typer.Option(..., help="a folder of person crops"),
    out_path: Path = typer.Option(Path("features.npz"), "--out"),
    flip: bool = typer.Option(False, help="add the features of the mirrored crops"),
) -> None:
    """Extract L2-normalised features of every crop in a folder into an .npz (with names, model version)."""
    from export.gallery import extract_folder

    if not out_path.parent.is_dir():  # (said before the work, not after it)
        raise typer.BadParameter(f"{out_path.parent} is not a folder", param_hint="--out")
    fx = _extractor(model_path)
    try:
        gallery = extract_folder(fx, images, flip=flip)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--images") from None
    try:
        gallery.save(out_path)
    except OSError as err:
        fail(out, f"cannot write {out_path}: {err}")
    out.print(
        f"{len(gallery.names)} features ({gallery.features.shape[1]}-d, model {gallery.version or '-'}) "
        f"written to {out_path}"
    )


def _load_gallery(fx: FeatureExtractor, path: Path, reindex: bool) -> Gallery:
    from export.gallery import Gallery, GalleryError, extract_folder

    if path.suffix != ".npz":
        try:
            return extract_folder(fx, path)
        except ValueError as err:  # (a folder without crops, crops none of which can be read)
            raise typer.BadParameter(str(err), param_hint="--gallery") from None
    try:
        gallery = Gallery.load(path)
        try:
            gallery.check_model(fx, path)
        except GalleryError:
            if not reindex:
                raise
            gallery = gallery.reindex(fx)
            gallery.save(path)
            out.print(f"{path}: re-indexed {len(gallery.names)} crops with model {gallery.version or '-'}")
        return gallery
    except GalleryError as err:
        raise typer.BadParameter(str(err), param_hint="--gallery") from None


def search(
    model_path: Path = ModelOpt,
    gallery_path: Path = typer.Option(..., "--gallery", help="a folder of crops or a features .npz"),
    query: Path = typer.Option(..., help="a query crop or a folder of them"),
    top_k: int = typer.Option(10, min=1),
    reindex: bool = typer.Option(False, help="re-extract a .npz gallery made by another model (and save it)"),
    html: Path = typer.Option(None, "--html", help="write the query and its top-k crops to this HTML page"),
    png: Path = typer.Option(None, "--png", help="write the query and its top-k crops to this PNG"),
) -> None:
    """Rank the gallery for each query crop by cosine similarity."""
    from export.gallery import search as rank_gallery
    from export.render import render_html, render_png
    from reid.data.layouts import read_image_folder

    fx = _extractor(model_path)
    gallery = _load_gallery(fx, gallery_path, reindex)
    try:
        queries = [query] if query.is_file() else read_image_folder(query)
        features, readable = fx.extract(queries)  # an unreadable crop: one warning, the others searched
        queries = [queries[i] for i in readable]
        order, sims = rank_gallery(gallery, features, top_k)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--query") from None
    ranked = []
    for q, idx, sim in zip(queries, order, sims, strict=True):
        ranked.append([(gallery.path_of(i), float(s)) for i, s in zip(idx, sim, strict=True)])
        rows = [
            {"rank": r + 1, "gallery": gallery.names[i], "similarity": f"{s:.4f}"}
            for r, (i, s) in enumerate(zip(idx, sim, strict=True))
        ]
        out.print(metrics_table(f"query {q.name}", rows))
    title = f"top-{top_k} with model {fx.contract.version or fx.path.name}"
    if png:
        render_png(queries, ranked, png)
        out.print(f"written: {png}")
    if html:
        render_html(queries, ranked, html, title)
        out.print(f"written: {html}")


def quantize(
    model_path: Path = typer.Option(..., "--model", help="the fp32 .onnx model (with its contract)"),
    data: Path = typer.Option(
        ..., "--data", help="this site's data set: train crops calibrate, query/gallery gate"
    ),
    out_path: Path = typer.Option(None, "--out", help="default: <model>.int8.onnx"),
    max_rank1_drop: float = typer.Option(1.0, min=0, help="points of rank-1 the int8 model may lose"),
    max_map_drop: float = typer.Option(1.0, min=0, help="points of mAP the int8 model may lose"),
    min_mean_cosine: float = typer.Option(
        0.95, min=-1, max=1, help="least mean cosine between the int8 and fp32 features of the site's crops"
    ),
    calibration_images: int = typer.Option(256, min=1),
) -> None:
    """int8 (static QDQ, per-channel) calibrated on this site's images, kept only if retrieval holds."""
    from export.contract import ContractError, load_contract
    from export.onnx_export import ExportError
    from export.quantize import RetrievalBudget, quantize_int8
    from reid.data import DatasetLayoutError, read_dataset

    target = out_path or model_path.with_name(model_path.stem + ".int8.onnx")
    try:
        load_contract(model_path)
        splits = read_dataset(data)
        report = quantize_int8(
            model_path,
            splits,
            target,
            RetrievalBudget(
                max_rank1_drop=max_rank1_drop, max_map_drop=max_map_drop, min_mean_cosine=min_mean_cosine
            ),
            calibration_images=calibration_images,
        )
    except (ContractError, DatasetLayoutError, ExportError) as err:
        fail(out, err)
    out.print(f"{target}: int8 accepted: {report.describe()}")


def build_engine(
    model_path: Path = typer.Option(..., "--model", help="the .onnx model (with its contract)"),
    fp16: bool = typer.Option(False, "--fp16", help="allow fp16 kernels"),
    int8: bool = typer.Option(False, "--int8", help="int8 from the model's Q/DQ nodes (an int8 .onnx)"),
    max_batch: int = typer.Option(32, min=1, help="the largest batch the engine accepts"),
    cache_dir: Path = typer.Option(None, help="engine cache (default: <model>.engines/ next to the model)"),
    images: Path = typer.Option(None, help="a folder of crops for the parity check (default: random inputs)"),
) -> None:
    """Build (or reuse from the cache) a TensorRT engine for this GPU, checked against ONNX Runtime."""
    from export.contract import ContractError
    from export.tensorrt import TensorRTError, build_engine_cached
    from reid.data.layouts import read_image_folder

    try:
        parity_images = read_image_folder(images)[:16] if images else None
        result = build_engine_cached(model_path, fp16, int8, max_batch, cache_dir, parity_images)
    except (ContractError, TensorRTError, ValueError) as err:
        fail(out, err)
    out.print(
        f"{result.path} ({'cached' if result.cached else f'built in {result.seconds:.0f} s'}; "
        f"parity vs ONNX Runtime min cosine {result.min_cosine:.5f})"
    )


def serve_features(
    model_path: Path = ModelOpt,
    gallery: Path = typer.Option(Path("gallery.db"), help="the gallery file (SQLite; created if missing)"),
    host: str = typer.Option("127.0.0.1", help="listen address (loopback by default)"),
    port: int = typer.Option(8080, min=0, max=65535),
    max_batch: int = typer.Option(32, min=1, help="crops per model run at most"),
    max_delay_ms: float = typer.Option(5.0, min=0, help="how long a crop waits for others to batch with"),
    max_queue: int = typer.Option(512, min=1, help="crops waiting at most (beyond: 503 + Retry-After)"),
    retention_days: float = typer.Option(None, min=0, help="delete gallery entries older than this"),
) -> None:
    """Embeddings and gallery search over HTTP (docs/serving.md), with dynamic batching."""
    import socket

    import uvicorn

    from edge.feature_api import ServiceConfig
    from edge.feature_service import FeatureService, create_app
    from edge.gallery_store import GalleryStoreError
    from export.contract import ContractError

    if retention_days == 0:  # (it meant "no retention", silently)
        raise typer.BadParameter(
            "0 days would delete entries as they come: leave it out to keep them all",
            param_hint="--retention-days",
        )
    cfg = ServiceConfig(
        host=host,
        port=port,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        retention_s=retention_days * 86400 if retention_days else None,
    )
    if not gallery.parent.is_dir():  # (a typo made a new empty gallery in a new folder)
        raise typer.BadParameter(f"{gallery.parent} is not a folder", param_hint="--gallery")
    model = resolve_model(model_path)
    try:  # bound first: a taken port is one line (no gallery made); port 0 is printed as the port it got
        listener = socket.create_server((host, port))
    except OSError as err:
        fail(out, f"cannot listen on {host}:{port}: {err}")
    try:
        follow = model_path if model_path.is_dir() else None  # an agent's folder: adopt its deployments
        service = FeatureService(model, gallery, cfg, follow=follow)
    except (ContractError, GalleryStoreError, OSError) as err:
        listener.close()
        fail(out, err)
    ref = service.served.ref
    bound = listener.getsockname()[1]
    out.print(f"serving {ref.version} ({ref.sha256[:12]}) on http://{host}:{bound}, gallery {gallery}")
    # uvicorn shuts down gracefully on SIGTERM (systemd, docker stop), then raises the signal again with
    # the handler it found: the default one ended the process there (exit 143) before the gallery was
    # closed, its data left in the -wal file beside it. This handler makes that a clean exit instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # (Ctrl-C, raised again by uvicorn after its graceful shutdown)
        pass
    finally:
        listener.close()
        service.close()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
