"""Benchmark: the agent's local-training loop (reid.train.train_local + reid.site data) vs. a bare PyTorch
loop on the same model, the same images and the same threads, measured side by side in one run.

    .venv/bin/python bench/train_loop.py [--arch resnet18] [--height 256 --width 128] [--images 640]
        [--device cuda]

The bare loop is what a researcher writes: ImageFolder-style dataset, default collate, SGD with the same
parameter groups, NCHW tensors; a second bare variant uses channels_last like our CPU path. Runs are
interleaved, in a rotating order, so that machine drift hits all variants alike; ratios are of the
medians. Prints the ratios and writes bench/results/train_loop.json. With `--device cuda` every variant
trains on the GPU, the bare ones with the same mixed precision as ours (autocast + GradScaler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reid.data import InputSpec, train_transform
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig, make_optimizer, resolve_device, train_local


class PlainDataset(Dataset):
    def __init__(self, site: SiteData) -> None:
        self.paths = [r.path for r in site.splits.train]
        self.labels = site.labels
        self.transform = train_transform(site.input_spec)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), self.labels[i]


def bare_epoch(site: SiteData, spec: ModelSpec, config: TrainConfig, channels_last: bool) -> float:
    """On CUDA the bare loop uses mixed precision as ours does (autocast + GradScaler) and pinned memory."""
    torch.manual_seed(0)
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    model = build_model(spec, site.num_classes)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(
        PlainDataset(site), batch_size=config.batch_size, shuffle=True, drop_last=True, pin_memory=cuda
    )
    images = 0
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, memory_format=fmt, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=cuda):
            loss = criterion(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        images += len(y)
    if cuda:
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def ours_epoch(site: SiteData, spec: ModelSpec, config: TrainConfig) -> float:
    torch.manual_seed(0)
    model = build_model(spec, site.num_classes)
    return train_local(model, site.train_loader(), config).images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--images", type=int, default=640, help="training images (one epoch per run)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved runs per variant (median)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: every variant runs there")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_loop.json")
    args = parser.parse_args()

    spec = ModelSpec(arch=args.arch)
    config = TrainConfig(epochs=1, seed=0, device=args.device)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        synth = SyntheticConfig(
            sites=1,
            train_images_max=args.images,
            public_images=0,
            height=args.height,
            width=args.width,
            images_per_id_max=8,
        )
        generate_federation(synth, tmp)
        site = SiteData(Path(tmp) / "sites" / "site00", InputSpec(height=args.height, width=args.width))
        results: dict[str, list[float]] = {"ours": [], "bare_nchw": [], "bare_channels_last": []}
        bare_epoch(site, spec, config, channels_last=True)  # warm-up: allocator, page cache, oneDNN kernels
        runs = {
            "ours": lambda: ours_epoch(site, spec, config),
            "bare_nchw": lambda: bare_epoch(site, spec, config, channels_last=False),
            "bare_channels_last": lambda: bare_epoch(site, spec, config, channels_last=True),
        }
        names = list(runs)
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                results[name].append(runs[name]())
            line = ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items())
            print(f"repeat {r + 1}: {line}", flush=True)

    best = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "benchmark": "train_loop",
        "arch": args.arch,
        "input": f"{args.height}x{args.width}",
        "train_images": len(site.splits.train),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "images_per_s": results,
        "median_images_per_s": best,
        "ratio_ours_vs_bare_nchw": best["ours"] / best["bare_nchw"],
        "ratio_ours_vs_bare_channels_last": best["ours"] / best["bare_channels_last"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        f"{args.arch} {args.height}x{args.width}, {summary['device']}, {summary['threads']} threads: "
        f"ours {best['ours']:.1f} img/s, "
        f"bare NCHW {best['bare_nchw']:.1f}, bare channels_last {best['bare_channels_last']:.1f} -> "
        f"ratio {summary['ratio_ours_vs_bare_nchw']:.2f} (vs NCHW), "
        f"{summary['ratio_ours_vs_bare_channels_last']:.2f} (vs channels_last)"
    )


if __name__ == "__main__":
    main()
