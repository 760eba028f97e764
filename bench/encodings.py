"""Benchmark: what each delta encoding costs on the wire and in accuracy, side by side in one run.

    .venv/bin/python bench/encodings.py [--rounds 4] [--sites 4] [--arch resnet18] [--quick]

The same synthetic federation, seed and FedPav run is repeated with every delta passed through the wire
codec exactly as an agent uploads it (`SimulationConfig.wire`): no codec (the in-memory reference),
fp32, fp16, int8 (per-tensor), int8 + zstd. Prints bytes per site per round (and the ratio to fp32)
and the global model's mean rank-1 / mAP after the last round (and the difference to the reference).
Writes bench/results/encodings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from cloud.simulate import SimulationConfig, Simulator
from reid.data import InputSpec
from reid.model import ModelSpec
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig

WIRES = ("none", "fp32", "fp16", "int8", "int8+zstd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--train-images-max", type=int, default=320)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 3 sites")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encodings.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.sites, args.train_images_max = 2, 3, 160
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        synth = SyntheticConfig(
            sites=args.sites,
            train_images_max=args.train_images_max,
            size_ratio=8,
            public_images=0,
            height=64,
            width=32,
        )
        generate_federation(synth, Path(tmp) / "fed")
        sites = sorted((Path(tmp) / "fed" / "sites").iterdir())
        for wire in WIRES:
            cfg = SimulationConfig(
                algorithm="fedpav",
                rounds=args.rounds,
                eval_local=False,
                eval_every=args.rounds,
                model=ModelSpec(arch=args.arch),
                input=InputSpec(height=64, width=32),
                train=TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
                wire=wire,
            )
            records = Simulator(cfg, sites, Path(tmp) / wire).run()
            last = max(r["round"] for r in records if r.get("model") == "global")
            evals = [r for r in records if r.get("model") == "global" and r["round"] == last]
            sizes = [b for r in records if r.get("kind") == "round" for b in r.get("wire_bytes", {}).values()]
            results[wire] = {
                "bytes_per_site_round": statistics.fmean(sizes) if sizes else None,
                "rank1": statistics.fmean(r["rank1"] for r in evals),
                "mAP": statistics.fmean(r["mAP"] for r in evals),
            }
            print(f"{wire}: {results[wire]}", flush=True)
    ref, fp32 = results["none"], results["fp32"]["bytes_per_site_round"]
    summary = {
        "benchmark": "encodings",
        "arch": args.arch,
        "rounds": args.rounds,
        "sites": args.sites,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\n{'encoding':<10} {'MB/site/round':>14} {'x fp32':>7} {'rank-1':>7} {'mAP':>6}  (vs no codec)")
    for wire, r in results.items():
        size = r["bytes_per_site_round"]
        mb = f"{size / 1e6:.2f}" if size else "-"
        ratio = f"{size / fp32:.3f}" if size else "-"
        print(
            f"{wire:<10} {mb:>14} {ratio:>7} {r['rank1']:>7.1f} {r['mAP']:>6.1f}  "
            f"({r['rank1'] - ref['rank1']:+.1f} / {r['mAP'] - ref['mAP']:+.1f})"
        )


if __name__ == "__main__":
    main()
