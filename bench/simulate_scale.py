"""Scale-out of the simulator (`cloud-aggregator simulate --executor ray`), measured side by side.

Part 1, executors: the same 6-site simulation (ResNet-18 64x32, 3 rounds, FedPav) run three ways in one
go: `local` with torch on every core, `local` with one thread, and `ray` with single-thread workers
(one per core). Prints the wall times and their ratio, and compares results: ray against local with
the same threads per site must be bit-identical (global state and every metric); against all-core local
they differ by float rounding only (the thread count changes the order of float sums).

Part 2, clients: per-camera clients (`cloud-aggregator split --by camera`) of a synthetic federation,
10 sampled per round, on the ray executor with 20, 40 and 60 clients: training rounds per minute, the
driver's peak RSS (each run in its own process) and the bytes that go through the object store per
round (the global state once per pass, whatever the number of sites).

    .venv/bin/python bench/simulate_scale.py            # ~10 min on 2 cores
    .venv/bin/python bench/simulate_scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloud.executors import ExecutorConfig
from cloud.simulate import CHECKPOINT, METRICS, SimulationConfig, Simulator
from reid.data import InputSpec
from reid.data.camera_split import split_by_camera
from reid.model import ModelSpec
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig


def sim_config(rounds: int, sites_per_round: int | None = None, eval_every: int = 1) -> SimulationConfig:
    return SimulationConfig(
        algorithm="fedpav",
        rounds=rounds,
        eval_every=eval_every,
        eval_local=False,
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        train=TrainConfig(batch_size=32, lr_head=0.02, lr_backbone=0.02, device="cpu"),
        sites_per_round=sites_per_round,
    )


def one_run(spec: dict) -> dict:
    """One simulation in this process (the child side of `--one`): wall, rounds, peak RSS, traffic."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    executor = ExecutorConfig(kind=spec["executor"], site_cpus=1, threads=spec.get("threads"))
    cfg = sim_config(spec["rounds"], spec.get("sites_per_round"), spec.get("eval_every", 1))
    sites = [Path(p) for p in spec["sites"]]
    out = Path(spec["out"])
    start = time.perf_counter()
    Simulator(cfg, sites, out, executor=executor).run()
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    rounds = [r for r in records if r.get("kind") == "round"]
    timing = {r["round"]: r["seconds"] for r in records if r.get("kind") == "timing"}
    evaluated = {r["round"] for r in records if r.get("model") == "global"}
    train_only = [s for r, s in timing.items() if r not in evaluated]
    return {
        "wall_s": wall,
        "round_s": [timing[r] for r in sorted(timing)],
        "train_round_s": train_only,
        "site_train_s": [v for r in rounds for v in r["train_seconds"].values()],
        "executor": [r.get("executor", {}) for r in rounds],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def child(spec: dict) -> dict:
    """`one_run` in a fresh process, so that peak RSS and Ray's instance belong to that run alone."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"run {spec['out']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scores(out: Path) -> list[dict]:
    drop = {"seconds", "train_seconds", "executor"}
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in lines if r.get("kind") != "timing"]


def global_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / CHECKPOINT))


def compare(a: Path, b: Path) -> dict:
    sa, sb = global_state(a), global_state(b)
    identical = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = {(r["site"], r["round"]): r["rank1"] for r in scores(a) if "rank1" in r}
    rb = {(r["site"], r["round"]): r["rank1"] for r in scores(b) if "rank1" in r}
    diffs = [float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k.startswith("global/")]
    return {
        "bit_identical": identical and scores(a) == scores(b),
        "max_rank1_diff": max(abs(ra[k] - rb[k]) for k in ra),
        "max_state_diff": max(diffs),
    }


def part1(tmp: Path, args: argparse.Namespace) -> dict:
    fed = tmp / "six"
    generate_federation(
        SyntheticConfig(
            seed=3, sites=6, train_images_max=args.images, size_ratio=4, public_images=0, height=64, width=32
        ),
        fed,
    )
    sites = [str(p) for p in sorted((fed / "sites").iterdir())]
    cores = os.cpu_count() or 1
    runs = {
        "local, all cores": {"executor": "local"},
        "local, 1 thread": {"executor": "local", "threads": 1},
        f"ray, {cores} x 1 thread": {"executor": "ray", "threads": 1},
    }
    results = {}
    for name, spec in runs.items():
        out = tmp / "part1" / name.replace(" ", "").replace(",", "_")
        spec = {**spec, "rounds": args.rounds, "sites": sites, "out": str(out)}
        results[name] = {**child(spec), "out": out}
        print(f"  {name}: {results[name]['wall_s']:.1f} s")
    names = list(runs)
    local, local1, ray = (results[n] for n in names)
    return {
        "wall_s (with start-up)": {n: round(r["wall_s"], 1) for n, r in results.items()},
        "rounds_s (without)": {n: round(sum(r["round_s"]), 1) for n, r in results.items()},
        "ray / local (all cores), rounds": round(sum(ray["round_s"]) / sum(local["round_s"]), 2),
        "ray / local (1 thread), rounds": round(sum(ray["round_s"]) / sum(local1["round_s"]), 2),
        "ray / local (all cores), wall": round(ray["wall_s"] / local["wall_s"], 2),
        "ray vs local 1 thread": compare(local1["out"], ray["out"]),
        "ray vs local all cores": compare(local["out"], ray["out"]),
        "site_train_s_mean": round(sum(local1["site_train_s"]) / len(local1["site_train_s"]), 2),
    }


def part2(tmp: Path, args: argparse.Namespace) -> dict:
    fed = tmp / "cams"
    generate_federation(
        SyntheticConfig(
            seed=5,
            sites=args.camera_sites,
            train_images_max=args.camera_images,
            size_ratio=2,
            max_cameras=6,
            public_images=0,
            height=64,
            width=32,
        ),
        fed,
    )
    clients, _ = split_by_camera(sorted((fed / "sites").iterdir()), tmp / "clients")
    print(f"  {len(clients)} per-camera clients from {args.camera_sites} sites")
    rows = {}
    for n in args.clients:
        if n > len(clients):
            print(f"  only {len(clients)} clients: skipping {n}")
            continue
        sites = [str(tmp / "clients" / c.name) for c in clients[:n]]
        spec = {
            "executor": "ray",
            "threads": 1,
            "rounds": args.camera_rounds,
            "sites_per_round": 10,
            "eval_every": 10_000,  # the global model is scored after the last round only
            "sites": sites,
            "out": str(tmp / "part2" / str(n)),
        }
        r = child(spec)
        train_rounds = r["train_round_s"]
        per_round = sum(train_rounds) / len(train_rounds)
        first = r["executor"][0]
        state_bytes = first.get("put_bytes", 0) / max(1, first.get("puts", 1))
        rows[n] = {
            "rounds_per_min": round(60 / per_round, 2),
            "train_round_s": round(per_round, 2),
            "final_round_with_eval_s": round(r["round_s"][-1], 1),
            "driver_peak_rss_mb": round(r["peak_rss_mb"]),
            "puts_per_round": first.get("puts"),
            "object_store_put_mb_per_round": round(first.get("put_bytes", 0) / 2**20, 1),
            "results_mb_per_round": round(first.get("result_bytes", 0) / 2**20, 1),
            "per_site_puts_would_be_mb": round(state_bytes * 10 / 2**20, 1),
        }
        print(f"  {n} clients: {rows[n]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller sites and 20/40 clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=400, help="training images of part 1's largest site")
    parser.add_argument("--camera-sites", type=int, default=16)
    parser.add_argument("--camera-images", type=int, default=480)
    parser.add_argument("--camera-rounds", type=int, default=4)
    parser.add_argument("--clients", default="20,40,60")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    if args.quick:
        args.images, args.rounds, args.camera_rounds, args.clients = 160, 2, 3, "20,40"
    args.clients = [int(c) for c in args.clients.split(",")]
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        print("part 1: executors side by side")
        p1 = part1(Path(tmp), args)
        print(json.dumps(p1, indent=1))
        print("part 2: per-camera clients, 10 per round, ray executor")
        p2 = part2(Path(tmp), args)
        print(json.dumps(p2, indent=1))


if __name__ == "__main__":
    main()
