"""Benchmark: the camera site's feature service (`edge-agent serve-features`) against its ceiling and its
floor, side by side in one run, and gallery search latency by gallery size.

    .venv/bin/python bench/serve.py [--arch resnet50 --height 256 --width 128] [--clients 16]
        [--seconds 15] [--precisions fp32 int8] [--payload person|noise] [--gallery 10000 100000 1000000]
        [--quick]

* ceiling: the same ONNX model through a bare ONNX Runtime session at batch 32 in a loop (crops
  already preprocessed: no HTTP, no decoding), measured right before and after ours, the higher kept;
* ours: `edge-agent serve-features` (its own process) with dynamic batching (max batch 32, 5 ms),
  `--clients` concurrent clients each sending single JPEG crops over HTTP keep-alive (closed loop; crops
  of people from a synthetic site, resized to the model's input, JPEG quality 90; `--payload noise`:
  uniform noise instead, six times the bytes and twice the decoding time),
  from a light asyncio load generator in this process (bench/loadgen.py: about a tenth of a Python HTTP
  client's CPU per request, which on a 2-core machine the service would otherwise lose to it);
* floor: the same service with batching off (max batch 1: one model run per request);
* latency (p50/p99) of ours under an open-loop load of 50 % and 90 % of its measured peak;
* all of the above for each precision: fp32, and int8 (static QDQ, calibrated on a small synthetic
  site by `export.quantize.quantize_int8`, the retrieval gate opened: speed only);
* re-embedding during live traffic: a gallery of `--reembed` entries made by one model, a second model
  deployed into the followed state folder while clients send crops at 50 % of the peak; entries/s
  re-embedded (until the swap) and the live requests' p50/p99 meanwhile (served by the old model);
* search: `GalleryStore.search` (exact cosine, blocked, top 10) over N random 512-d entries: median
  latency, the index's memory (N x 512 x 4 bytes) and the peak memory one search allocates on top
  (tracemalloc).

The models are randomly initialised (speed does not depend on the weights). Prints a table and writes
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
from loadgen import Target, closed_loop, open_loop  # bench/loadgen.py, beside this script
from PIL import Image

from edge.gallery_store import GalleryStore, NewEntry
from export.contract import contract_path
from export.onnx_export import export_onnx
from export.quantize import RetrievalBudget, quantize_int8
from export.runtime import FeatureExtractor
from reid.data import InputSpec
from reid.data.layouts import read_dataset
from reid.model import ModelSpec, build_model
from reid.synthetic import SyntheticConfig, generate_federation


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def crops(count: int, spec: InputSpec, folder: Path, payload: str = "person") -> list[bytes]:
    """`count` JPEG crops at the model's input size: people of a synthetic site ("person", about 5 KB
    each), or uniform noise ("noise", about 30 KB: the worst case for the JPEG decoder)."""
    if payload == "noise":
        rng = np.random.default_rng(0)
        shape = (spec.height, spec.width, 3)
        return [_jpeg(Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))) for _ in range(count)]
    records = read_dataset(synthetic_site(spec, folder)).train[:count]
    return [_jpeg(Image.open(r.path).convert("RGB").resize((spec.width, spec.height))) for r in records]


def ceiling(model: Path, seconds: float) -> float:
    fx = FeatureExtractor(model, batch_size=32)
    c = fx.contract
    batch = np.random.default_rng(0).standard_normal((32, 3, c.height, c.width)).astype(np.float32)
    fx.run(batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fx.run(batch)
        done += 32
    return done / (time.perf_counter() - start)


def embed_target(url: str, payloads: list[bytes]) -> Target:
    """Single-crop POST /v1/embed requests, as a tracker sends them."""
    return Target(url, "/v1/embed", payloads, "image/jpeg")


@contextlib.contextmanager
def serving(model: Path, gallery: Path, max_batch: int = 32) -> Iterator[str]:
    """`edge-agent serve-features` in a process of its own (as at a site: the clients are other
    processes, and do not share the service's interpreter); yields its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "edge.cli", "serve-features", "--model", str(model)]
    command += ["--gallery", str(gallery), "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {' '.join(command)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def service_run(model: Path, folder: Path, max_batch: int, fn):
    with serving(model, folder / f"gallery-{model.stem}-{max_batch}.db", max_batch) as url:
        return fn(url)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def search_figures(size: int, repeats: int = 5) -> dict[str, float]:
    """Median ms of one top-10 search over `size` random entries (the in-memory index only), the index's
    MB and the peak MB one search allocates."""
    with tempfile.TemporaryDirectory() as tmp:
        store = GalleryStore(Path(tmp) / "g.db", 512)
        rng = np.random.default_rng(1)
        feats = rng.standard_normal((size, 512), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        store.ids, store.features = np.arange(1, size + 1, dtype=np.int64), feats
        store.cameras, store.times = np.full(size, "cam", dtype=object), np.zeros(size)
        query = feats[:1]
        tracemalloc.start()
        store.search(query, 10)
        scratch = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            store.search(query, 10)
            times.append(time.perf_counter() - t)
        store.close()
        return {
            "ms": statistics.median(times) * 1000,
            "index_mb": feats.nbytes / 1e6,
            "search_peak_mb": scratch / 1e6,
        }


def export_model(arch: str, spec: InputSpec, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch=arch), 10).eval()
    export_onnx(model, spec, path, torch.randn(8, 3, spec.height, spec.width), version=f"bench-{seed}")
    return path


def synthetic_site(spec: InputSpec, folder: Path) -> Path:
    """A small synthetic site (64 training images) under `folder`, generated once."""
    site = folder / "fed" / "sites" / "site00"
    if not site.is_dir():
        synth = SyntheticConfig(
            sites=1, train_images_max=64, public_images=0, height=spec.height, width=spec.width
        )
        generate_federation(synth, folder / "fed")
    return site


def int8_model(fp32: Path, spec: InputSpec, folder: Path) -> Path:
    """`fp32` quantised on a small synthetic site (gate opened: only the speed matters here)."""
    out = folder / "model.int8.onnx"
    loose = RetrievalBudget(max_rank1_drop=100, max_map_drop=100, min_mean_cosine=-1)
    quantize_int8(fp32, read_dataset(synthetic_site(spec, folder)), out, loose, calibration_images=64)
    return out


def reembedding(old: Path, new: Path, folder: Path, payloads: list[bytes], entries: int, rate: float):
    """(entries/s re-embedded, live latencies) when `new` is deployed under traffic at `rate` crops/s."""
    fx = FeatureExtractor(old, batch_size=32)
    gallery = folder / "reembed.db"
    store = GalleryStore(gallery, fx.contract.output_dim)
    for start in range(0, entries, 32):
        crops = [payloads[i % len(payloads)] for i in range(start, min(entries, start + 32))]
        feats = fx([Image.open(io.BytesIO(c)).convert("RGB") for c in crops])
        store.add(
            [NewEntry(crop=c, camera="c1") for c in crops], feats, (fx.contract.version, fx.contract.sha256)
        )
    store.close()
    state = folder / "agent"  # an agent's state folder, as the service follows it
    for name, source in (("old", old), ("new", new)):
        (state / "models" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, state / "models" / name / "model.onnx")
        shutil.copy(contract_path(source), contract_path(state / "models" / name / "model.onnx"))
    pointer = state / "models" / "current.json"
    pointer.write_text(json.dumps({"path": "old/model.onnx"}))
    new_sha = FeatureExtractor(new).contract.sha256
    swapped = threading.Event()
    took: list[float] = []

    def deploy_and_wait(url: str) -> None:
        time.sleep(2.0)  # traffic first
        pointer.write_text(json.dumps({"path": "new/model.onnx"}))
        started = None
        while True:  # from the first sight of the re-embedding to the swap
            info = httpx.get(f"{url}/v1/gallery", timeout=10).json()
            if started is None and info["reindexing"]:
                started = time.perf_counter()
            if info["model"]["sha256"] == new_sha:
                took.append(time.perf_counter() - (started or time.perf_counter()))
                break
            time.sleep(0.05)
        swapped.set()

    with serving(state, gallery) as url:
        threading.Thread(target=deploy_and_wait, args=(url,), daemon=True).start()
        latencies = open_loop(embed_target(url, payloads), rate, 0, until=swapped)
    return entries / took[0], latencies


def precision_run(model: Path, payloads: list[bytes], clients: int, seconds: float) -> dict[str, object]:
    """Ceiling, ours, floor and latency under load for one model file. The ceiling is measured right
    before and right after ours, and the higher one kept (the machine's speed drifts: the ratio must not
    flatter us)."""
    folder = model.parent
    before = ceiling(model, seconds)
    ours, lat_peak = service_run(
        model, folder, 32, lambda url: closed_loop(embed_target(url, payloads), clients, seconds)
    )
    peak_ceiling = max(before, ceiling(model, seconds))
    floor, _ = service_run(
        model, folder, 1, lambda url: closed_loop(embed_target(url, payloads), clients, seconds)
    )
    loads = {}
    for share in (0.5, 0.9):
        lat = service_run(
            model, folder, 32, lambda url, s=share: open_loop(embed_target(url, payloads), s * ours, seconds)
        )
        loads[f"{int(share * 100)}%"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "requests": len(lat)}
    return {
        "ceiling_crops_per_s": peak_ceiling,
        "ours_crops_per_s": ours,
        "floor_crops_per_s": floor,
        "ours_vs_ceiling": ours / peak_ceiling,
        "ours_vs_floor": ours / floor,
        "peak_latency": {"p50_ms": pct(lat_peak, 50), "p99_ms": pct(lat_peak, 99)},
        "latency_under_load": loads,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument(
        "--payload",
        choices=["person", "noise"],
        default="person",
        help="what clients send: people from a synthetic site, or uniform noise (the decoder's worst case)",
    )
    p.add_argument("--precisions", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    p.add_argument("--reembed", type=int, default=256, help="gallery entries re-embedded under traffic")
    p.add_argument("--gallery", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--quick", action="store_true", help="resnet18 at 128x64, 5 s per phase, 10k/100k search")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = p.parse_args()
    if args.quick:
        args.arch, args.height, args.width, args.seconds, args.reembed = "resnet18", 128, 64, 5, 128
        args.gallery = [10_000, 100_000]
    spec = InputSpec(height=args.height, width=args.width)
    results: dict[str, object] = {
        "arch": args.arch,
        "input": [args.height, args.width],
        "cpus": os.cpu_count(),
        "clients": args.clients,
    }
    print(
        f"{args.arch} {args.height}x{args.width}, {args.clients} clients, {os.cpu_count()} CPUs", flush=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = {"fp32": export_model(args.arch, spec, folder / "model.onnx", seed=0)}
        if "int8" in args.precisions:
            models["int8"] = int8_model(models["fp32"], spec, folder)
        payloads = crops(64, spec, folder, args.payload)
        results["payload"] = {"kind": args.payload, "mean_bytes": sum(map(len, payloads)) / len(payloads)}
        print(
            f"payload: {args.payload} crops, {results['payload']['mean_bytes'] / 1000:.1f} KB each",
            flush=True,
        )
        for precision in args.precisions:
            r = precision_run(models[precision], payloads, args.clients, args.seconds)
            results[precision] = r
            print(
                f"[{precision}] ceiling (bare ONNX Runtime, batch 32): {r['ceiling_crops_per_s']:.1f} crops/s"
            )
            print(
                f"[{precision}] ours (HTTP, dynamic batching): {r['ours_crops_per_s']:.1f} crops/s "
                f"= {r['ours_vs_ceiling']:.2f} x ceiling"
            )
            print(
                f"[{precision}] floor (HTTP, batch 1 per request): {r['floor_crops_per_s']:.1f} crops/s; "
                f"ours / floor = {r['ours_vs_floor']:.2f}"
            )
            peak = r["peak_latency"]
            print(f"[{precision}] latency at peak: p50 {peak['p50_ms']:.0f} ms, p99 {peak['p99_ms']:.0f} ms")
            for name, fig in r["latency_under_load"].items():
                print(
                    f"[{precision}] at {name} of peak: p50 {fig['p50_ms']:.0f} ms, p99 {fig['p99_ms']:.0f} ms"
                )
        second = export_model(args.arch, spec, folder / "second" / "model.onnx", seed=1)
        rate = 0.5 * results["fp32"]["ours_crops_per_s"] if "fp32" in results else 1.0
        per_s, lat = reembedding(models["fp32"], second, folder, payloads, args.reembed, rate)
        results["reembed"] = {
            "entries": args.reembed,
            "entries_per_s": per_s,
            "traffic_crops_per_s": rate,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "requests": len(lat),
        }
        print(
            f"re-embedding {args.reembed} entries under {rate:.1f} crops/s: {per_s:.1f} entries/s; "
            f"live p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms ({len(lat)} requests)"
        )
    results["search"] = {str(n): search_figures(n) for n in args.gallery}
    for n, fig in results["search"].items():  # type: ignore[union-attr]
        print(
            f"search, {int(n):,} entries: {fig['ms']:.1f} ms; index {fig['index_mb']:.0f} MB, "
            f"one search allocates {fig['search_peak_mb']:.1f} MB at most"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
