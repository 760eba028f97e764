"""Benchmark: feature extraction at the camera, PyTorch eager vs. ONNX Runtime fp32 / fp16 / int8, at
batch 1 and 32, with the retrieval each one gives on the same site, measured side by side in one run.

    .venv/bin/python bench/inference.py [--arch resnet50] [--height 256 --width 128] [--threads 2]
        [--checkpoint global.safetensors] [--repeats 5] [--quick]

Without --checkpoint the network is trained from scratch for --train-epochs on a synthetic site
generated at the input size (so weights, activations and int8 ranges are those of a ReID-trained
network, not of a random one); its query/gallery give the retrieval of every backend, and its
training crops calibrate int8. What matters is the *difference* between backends. Timings exclude
decoding and preprocessing (the same preprocessed array feeds every backend) and are medians over
interleaved repeats; ratios are given against the better eager layout and against eager NCHW.
Prints a table and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from safetensors.torch import load_file

from export.onnx_export import export_onnx
from export.quantize import RetrievalBudget, quantize_int8, site_retrieval
from export.runtime import FeatureExtractor
from reid.data import InputSpec
from reid.model import ModelSpec, build_model, load_shared_state
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig, train_local


def timed(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="a global.safetensors (shared state) to load")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--train-epochs", type=int, default=2, help="without --checkpoint: train this long")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 128x64 (the make bench preset)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.height, args.width, args.repeats = "resnet18", 128, 64, 3
    torch.set_num_threads(args.threads)
    spec, input_spec = ModelSpec(arch=args.arch), InputSpec(height=args.height, width=args.width)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        synth = SyntheticConfig(
            sites=1, train_images_max=320, public_images=0, height=args.height, width=args.width
        )
        generate_federation(synth, tmp_path / "fed")
        site = SiteData(tmp_path / "fed" / "sites" / "site00", input_spec, batch_size=32)
        torch.manual_seed(0)
        model = build_model(spec, site.num_classes)
        if args.checkpoint:
            load_shared_state(model, load_file(str(args.checkpoint)))
        else:
            print(f"training {args.arch} for {args.train_epochs} epochs on {site.num_train_images} crops ...")
            train_cfg = TrainConfig(epochs=args.train_epochs, lr_head=0.02, lr_backbone=0.02, seed=0)
            train_local(model, site.train_loader(), train_cfg)
        model = model.to(memory_format=torch.contiguous_format).eval()
        calib = site.cdw_images(32)
        print(f"exporting {args.arch} {args.height}x{args.width} ...", flush=True)
        paths = {p: tmp_path / f"model.{p}.onnx" for p in ("fp32", "fp16", "int8")}
        export_onnx(model, input_spec, paths["fp32"], calib, precision="fp32")
        export_onnx(model, input_spec, paths["fp16"], calib, precision="fp16")
        loose = RetrievalBudget(max_rank1_drop=100, max_map_drop=100)  # report the delta, do not gate here
        quantize_int8(paths["fp32"], site.splits, paths["int8"], loose)
        backends = {
            p: FeatureExtractor(path, ["CPUExecutionProvider"], 32, args.threads) for p, path in paths.items()
        }

        file_mb = {p: path.stat().st_size / 1e6 for p, path in paths.items()}
        # retrieval on the site's query/gallery (no flip), eager first
        retrieval = {"eager": site.evaluate(model, flip=False).summary()}
        for p, fx in backends.items():
            retrieval[f"ort_{p}"] = site_retrieval(fx, site.splits)[0].summary()

        x32 = calib.numpy()
        inputs = {1: x32[:1].copy(), 32: x32}
        cl_model = build_model(spec, site.num_classes)
        cl_model.load_state_dict(model.state_dict())
        cl_model.eval().to(memory_format=torch.channels_last)

        def eager(m: torch.nn.Module, x: np.ndarray, cl: bool) -> Callable[[], object]:
            t = torch.from_numpy(x)
            t = t.contiguous(memory_format=torch.channels_last) if cl else t

            def run() -> object:
                with torch.inference_mode():
                    return m.embed(t)

            return run

        def ort(fx: FeatureExtractor) -> Callable[[np.ndarray], Callable[[], object]]:
            return lambda x: lambda: fx.backend.run(x)

        variants: dict[str, Callable[[np.ndarray], Callable[[], object]]] = {
            "eager_nchw": lambda x: eager(model, x, False),
            "eager_channels_last": lambda x: eager(cl_model, x, True),
            **{f"ort_{p}": ort(fx) for p, fx in backends.items()},
        }
        seconds: dict[int, dict[str, list[float]]] = {b: {v: [] for v in variants} for b in inputs}
        for b, x in inputs.items():
            calls = 20 if b == 1 else 2
            for fn in variants.values():
                fn(x)()  # warm-up
            names = list(variants)
            for r in range(args.repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    seconds[b][name].append(timed(variants[name](x), calls))
            print(f"batch {b}: timed {args.repeats} x {calls} calls per variant", flush=True)

    throughput = {b: {v: b / statistics.median(s) for v, s in per.items()} for b, per in seconds.items()}
    rows = []
    for b, per in throughput.items():
        eager_best = max(per["eager_nchw"], per["eager_channels_last"])
        for v, ips in per.items():
            rows.append(
                {
                    "batch": b,
                    "variant": v,
                    "images_per_s": ips,
                    "vs_eager": ips / eager_best,
                    "vs_eager_nchw": ips / per["eager_nchw"],
                }
            )
    summary = {
        "benchmark": "inference",
        "arch": args.arch,
        "input": f"{args.height}x{args.width}",
        "threads": args.threads,
        "trained_weights": bool(args.checkpoint),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "file_mb": file_mb,
        "throughput": rows,
        "retrieval": retrieval,
        "retrieval_delta_vs_eager": {
            k: {m: v[m] - retrieval["eager"][m] for m in ("rank1", "mAP")} for k, v in retrieval.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\n{args.arch} {args.height}x{args.width}, {args.threads} threads ({summary['machine']})")
    print(
        f"{'batch':>5} {'variant':<22} {'img/s':>8} {'x best eager':>12} {'x NCHW':>7}   rank-1 / mAP (delta)"
    )
    for row in rows:
        key = row["variant"] if row["variant"].startswith("ort") else "eager"
        ret, delta = retrieval[key], summary["retrieval_delta_vs_eager"][key]
        print(
            f"{row['batch']:>5} {row['variant']:<22} {row['images_per_s']:>8.1f} {row['vs_eager']:>12.2f} "
            f"{row['vs_eager_nchw']:>7.2f}   "
            f"{ret['rank1']:.1f} / {ret['mAP']:.1f} ({delta['rank1']:+.1f} / {delta['mAP']:+.1f})"
        )


if __name__ == "__main__":
    main()
