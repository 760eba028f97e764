"""Benchmark: folding K ResNet-50 shared states vs. the memory-bandwidth floor, measured in one run.

    .venv/bin/python bench/aggregate.py [--k 2 5 10] [--repeats 5]

Floor = (K + 1) x S / B: read K updates and write one result once (S = bytes of one fp32 shared state,
B = the copy bandwidth of this machine measured here with torch's copy_, read + write bytes counted).
No method can beat it; a streaming fold, which must also read and write the running sum for each
update, needs about 3 x K x S bytes.

Variants, each timed from K ready updates to the finished global state:
* ``per_key``: the textbook loop, sum_k w_k * state_k[key] per key (temporaries);
* ``flat_add``: flat buffers, one in-place ``add_`` per update, no validation;
* ``ours``: `cloud.strategy.StreamingAggregator.add_flat` (every update checked for NaN/Inf, FedPav
  weights, BN policy) + `finish()`, with updates given as flat buffers as the wire codec decodes them
  and the round's base and result buffers reused, as the aggregator does between rounds;
* ``ours_from_dicts``: the same, with updates given as state dicts (adds one flatten copy per update).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cloud.strategy import StrategyConfig, StreamingAggregator, Update
from cloud.strategy.flat import FlatLayout
from reid.model import ModelSpec, build_model, shared_state


def measure_copy_bandwidth(numel: int, repeats: int) -> float:
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / min(times)  # bytes read + written per second


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: page faults of fresh buffers are not the fold's cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


VARIANTS = ("per_key", "flat_add", "ours", "ours_from_dicts")


def bench_k(k: int, base: dict, layout: FlatLayout, bandwidth: float, repeats: int) -> dict[str, float]:
    flats = [
        layout.flatten(
            {
                key: v + 0.01 * torch.randn_like(v) if v.dtype.is_floating_point else v
                for key, v in base.items()
            }
        )
        for _ in range(k)
    ]
    dicts = [layout.unflatten(f, i) for f, i in flats]
    sizes = [1000 + 100 * j for j in range(k)]
    out = torch.empty(layout.float_numel)
    base_flat = layout.flatten(base)

    def per_key() -> None:
        total = sum(sizes)
        {
            key: sum(s / total * d[key] for s, d in zip(sizes, dicts, strict=True))
            for key in base
            if base[key].dtype.is_floating_point
        }

    def flat_add() -> None:
        torch.mul(flats[0][0], sizes[0], out=out)
        for (f, _), s in zip(flats[1:], sizes[1:], strict=True):
            out.add_(f, alpha=s)
        out.div_(sum(sizes))

    def ours() -> None:
        agg = StreamingAggregator(base, StrategyConfig(), base_flat=base_flat, out=out)
        for j, (f, i) in enumerate(flats):
            agg.add_flat(f"site{j}", f, i, sizes[j])
        agg.finish()

    def ours_from_dicts() -> None:
        agg = StreamingAggregator(base, StrategyConfig(), base_flat=base_flat, out=out)
        for j, d in enumerate(dicts):
            agg.add(Update(f"site{j}", d, sizes[j]))
        agg.finish()

    floor = (k + 1) * layout.float_numel * 4 / bandwidth
    row: dict[str, float] = {"k": k, "floor_ms": 1e3 * floor}
    for name, fn in zip(VARIANTS, (per_key, flat_add, ours, ours_from_dicts), strict=True):
        t = timed(fn, repeats)
        row[f"{name}_ms"] = 1e3 * t
        row[f"{name}_x_floor"] = t / floor
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregate.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = shared_state(build_model(ModelSpec(arch="resnet50"), 1))
    layout = FlatLayout(base)
    size_bytes = layout.float_numel * 4
    bandwidth = measure_copy_bandwidth(1 << 28, args.repeats)  # 1 GiB
    print(
        f"ResNet-50 shared state: {layout.float_numel / 1e6:.2f} M floats ({size_bytes / 1e6:.1f} MB), "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), {torch.get_num_threads()} threads"
    )

    results = []
    for k in args.k:
        row = bench_k(k, base, layout, bandwidth, args.repeats)
        results.append(row)
        print(
            f"K={k:>2}: floor {row['floor_ms']:.1f} ms | "
            + " | ".join(f"{n} {row[n + '_ms']:.1f} ms ({row[n + '_x_floor']:.2f}x)" for n in VARIANTS),
            flush=True,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "aggregate",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "state_bytes": size_bytes,
                "copy_bandwidth_gb_s": bandwidth / 1e9,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
