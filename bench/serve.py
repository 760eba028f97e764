"""Benchmark: the camera site's feature service (`edge-agent serve-features`) against its ceiling and its
floor, side by side in one run, and gallery search latency by gallery size.

    .venv/bin/python bench/serve.py [--arch resnet50 --height 256 --width 128] [--clients 16]
        [--seconds 20] [--gallery 10000 100000 1000000] [--quick]

* ceiling: the same ONNX model through a bare ONNX Runtime session at batch 32 in a loop (crops
  already preprocessed: no HTTP, no decoding);
* ours: the service with dynamic batching (max batch 32, 5 ms), `--clients` concurrent clients each
  sending single JPEG crops over HTTP keep-alive (closed loop);
* floor: the same service with batching off (max batch 1: one model run per request);
* latency (p50/p99) of ours under an open-loop load of 50 % and 90 % of its measured peak;
* search: `GalleryStore.search` (exact cosine, blocked, top 10) over N random 512-d entries.

The model is randomly initialised (speed does not depend on the weights). Prints a table and writes
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from edge.feature_service import FeatureService, ServiceConfig, running
from edge.gallery_store import GalleryStore
from export.onnx_export import export_onnx
from export.runtime import FeatureExtractor
from reid.data import InputSpec
from reid.model import ModelSpec, build_model


def crops(count: int, spec: InputSpec) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        img = Image.fromarray(rng.integers(0, 255, (spec.height, spec.width, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling(model: Path, spec: InputSpec, seconds: float) -> float:
    fx = FeatureExtractor(model, batch_size=32)
    batch = np.random.default_rng(0).standard_normal((32, 3, spec.height, spec.width)).astype(np.float32)
    fx.run(batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fx.run(batch)
        done += 32
    return done / (time.perf_counter() - start)


def closed_loop(url: str, payloads: list[bytes], clients: int, seconds: float) -> tuple[float, list[float]]:
    """Crops/s and latencies with `clients` threads each sending one crop after the other."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> int:
        n = 0
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                response = http.post("/v1/embed", content=payloads[(i + n) % len(payloads)])
                if response.status_code == 200:
                    n += 1
                    with lock:
                        latencies.append(time.perf_counter() - t)
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - start), latencies


def open_loop(url: str, payloads: list[bytes], rate: float, seconds: float) -> list[float]:
    """Latencies (from the scheduled send time) under a fixed arrival rate."""
    latencies: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    def send(i: int, due: float) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=60)
        response = local.http.post("/v1/embed", content=payloads[i % len(payloads)])
        if response.status_code == 200:
            with lock:
                latencies.append(time.perf_counter() - due)

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        for i in range(int(rate * seconds)):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(send, i, due)
    return latencies


def service_run(model: Path, folder: Path, max_batch: int, fn):
    service = FeatureService(model, folder / f"gallery-{max_batch}.db", ServiceConfig(max_batch=max_batch))
    try:
        with running(service) as url:
            return fn(url)
    finally:
        service.close()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def search_latency(size: int, repeats: int = 5) -> float:
    """Median ms of one top-10 search over `size` random entries (the in-memory index only)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = GalleryStore(Path(tmp) / "g.db", 512)
        rng = np.random.default_rng(1)
        feats = rng.standard_normal((size, 512), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        store.ids, store.features = np.arange(1, size + 1, dtype=np.int64), feats
        store.cameras, store.times = np.full(size, "cam", dtype=object), np.zeros(size)
        query = feats[:1]
        store.search(query, 10)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            store.search(query, 10)
            times.append(time.perf_counter() - t)
        store.close()
        return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--gallery", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--quick", action="store_true", help="resnet18 at 128x64, 5 s per phase, 10k/100k search")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = p.parse_args()
    if args.quick:
        args.arch, args.height, args.width, args.seconds, args.gallery = (
            "resnet18",
            128,
            64,
            5,
            [10_000, 100_000],
        )
    spec = InputSpec(height=args.height, width=args.width)
    results: dict[str, object] = {
        "arch": args.arch,
        "input": [args.height, args.width],
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = build_model(ModelSpec(arch=args.arch), 10).eval()
        images = torch.randn(8, 3, args.height, args.width)
        path = folder / "model.onnx"
        export_onnx(model, spec, path, images, version="bench")
        del model
        payloads = crops(64, spec)
        peak_ceiling = ceiling(path, spec, args.seconds)
        ours, lat_peak = service_run(
            path, folder, 32, lambda url: closed_loop(url, payloads, args.clients, args.seconds)
        )
        floor, _ = service_run(
            path, folder, 1, lambda url: closed_loop(url, payloads, args.clients, args.seconds)
        )
        loads = {}
        for share in (0.5, 0.9):
            lat = service_run(
                path, folder, 32, lambda url, s=share: open_loop(url, payloads, s * ours, args.seconds)
            )
            loads[f"{int(share * 100)}%"] = {
                "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99),
                "requests": len(lat),
            }
    results |= {
        "ceiling_crops_per_s": peak_ceiling,
        "ours_crops_per_s": ours,
        "floor_crops_per_s": floor,
        "ours_vs_ceiling": ours / peak_ceiling,
        "ours_vs_floor": ours / floor,
        "peak_latency": {"p50_ms": pct(lat_peak, 50), "p99_ms": pct(lat_peak, 99)},
        "latency_under_load": loads,
        "search_ms": {str(n): search_latency(n) for n in args.gallery},
    }
    print(f"{args.arch} {args.height}x{args.width}, {args.clients} clients, {os.cpu_count()} CPUs")
    print(f"ceiling (bare ONNX Runtime, batch 32): {peak_ceiling:.1f} crops/s")
    print(f"ours (HTTP, dynamic batching):         {ours:.1f} crops/s = {ours / peak_ceiling:.2f} x ceiling")
    print(f"floor (HTTP, batch 1 per request):     {floor:.1f} crops/s; ours / floor = {ours / floor:.2f}")
    print(f"latency at peak: p50 {pct(lat_peak, 50):.0f} ms, p99 {pct(lat_peak, 99):.0f} ms")
    for name, figures in loads.items():
        print(f"latency at {name} of peak: p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms")
    for n, ms in results["search_ms"].items():  # type: ignore[union-attr]
        print(f"search, {int(n):,} entries: {ms:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
