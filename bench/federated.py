"""The learning study: does federation beat training alone on a non-IID federation, and what do CDW and
KD add? The FedReID paper's comparison (reference/fedreid-seed-code.md section 8), reproduced on the
synthetic federation through the in-process simulator, with several seeds.

    .venv/bin/python bench/federated.py                      # default: < 60 min on 2 CPU cores
    .venv/bin/python bench/federated.py --quick              # the `make bench` smoke version (minutes)
    .venv/bin/python bench/federated.py --full               # GPU: ResNet-50 at 256x128, more data
    .venv/bin/python bench/federated.py --data DIR --public DIR   # real data sets: DIR/<site>/...
    .venv/bin/python bench/federated.py --pretrain-epochs 20 --domains --min-queries 50  # pretrained, domains
    .venv/bin/python bench/federated.py --scenario camera    # federated by camera (each camera a client)

Methods: local (each site alone), fedpav, cdw (FedPav + CDW weights), kd (FedPav + server KD), cdw_kd,
central (pooled training: the upper bound). Every method gets the same compute: `local_epochs` x
`rounds` epochs per site. The synthetic federation is generated once, with settings fixed before any
run (seed 0: sizes spread `size_ratio`x, per-site camera styles, a public KD set); the seeds vary
training. Federated methods are scored with the global model, `local` with each site's own model,
`central` with the pooled model. Federated methods are also scored with each site's *own* model after
the last round's local training from the global model (the model the paper's CDW claim is about;
`--no-site-models` skips this). Writes `<out>/study.json`, `<out>/study.md` (the tables) and
`<out>/study.png` (rank-1 per round, for the largest and the smallest site).

With `--data DIR`, every sub-folder of DIR is one site, in any layout `reid.data.read_dataset` reads
(Market-1501/Duke, CUHK03-NP, MSMT17 lists, the FedReID `pytorch/` layout); `--public` is the unlabeled
KD set (required by the kd methods).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloud.simulate import SimulationConfig, Simulator
from cloud.strategy import KDConfig, StrategyConfig
from reid.data import DatasetLayoutError, InputSpec, read_dataset
from reid.data.camera_split import client_sites, split_by_camera
from reid.model import ModelSpec
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig

METHODS = ("local", "fedpav", "cdw", "kd", "cdw_kd", "cluster", "central")
# federated methods: the global model; clustering: each site's group model (what its site trains from)
SCORED_AS = {"local": "local", "central": "global", "cluster": "group"}


def scored(method: str) -> str:
    return SCORED_AS.get(method, "global")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_study(args: argparse.Namespace, sites: list[Path], public: Path | None, out: Path) -> dict:
    site_of = client_sites(sites)
    base = SimulationConfig(
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        eval_local=args.site_models,
        model=ModelSpec(arch=args.arch),
        input=InputSpec(height=args.height, width=args.width),
        train=TrainConfig(lr_head=args.lr, lr_backbone=args.lr, batch_size=args.batch_size),
        strategy=StrategyConfig(bn=args.bn),
        kd=KDConfig(every=args.kd_every, epochs=1, max_seconds=args.kd_seconds),
        pretrained=args.pretrained,
    )
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}  # method -> seed -> site -> rank-1 per round
    finals: dict[str, dict[int, dict[str, dict[str, float]]]] = {}  # method -> seed -> site -> metrics
    site_models: dict[str, dict[int, dict[str, dict[str, float]]]] = {}  # federated: the sites' own models
    seconds: dict[str, float] = {}
    for method in args.methods:
        start = time.perf_counter()
        for seed in args.seeds:
            cfg = base.model_copy(update={"algorithm": method, "seed": seed})
            run_dir = out / "runs" / method / f"seed{seed}"
            needs_public = method in ("kd", "cdw_kd")
            records = Simulator(cfg, sites, run_dir, public if needs_public else None).run()
            if not records:  # already complete: read back what it wrote
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            evals = merge_clients([r for r in records if r.get("model") == scored(method)], site_of)
            per_site: dict[str, list[float]] = {}
            for r in sorted(evals, key=lambda r: r["round"]):
                per_site.setdefault(r["site"], []).append(r["rank1"])
            curves.setdefault(method, {})[seed] = per_site
            last = max(r["round"] for r in evals)
            finals.setdefault(method, {})[seed] = last_metrics(evals, last)
            own = merge_clients([r for r in records if r.get("model") == "local"], site_of)
            if method not in ("local", "central") and own:
                site_models.setdefault(method, {})[seed] = last_metrics(own, last)
            print(
                f"{method} seed {seed}: mean rank-1 {statistics.fmean(v[-1] for v in per_site.values()):.1f}"
            )
        seconds[method] = time.perf_counter() - start
    return {"curves": curves, "finals": finals, "site_models": site_models, "seconds": seconds}


def merge_clients(evals: list[dict], site_of: dict[str, str]) -> list[dict]:
    """Records of per-camera clients merged into their sites (rank-1 and mAP averaged over the clients
    scored in a round); records already named by their site pass through."""
    merged: dict[tuple[int, str], list[dict]] = {}
    for r in evals:
        merged.setdefault((r["round"], site_of.get(r["site"], r["site"])), []).append(r)
    return [
        {
            "round": round_,
            "site": site,
            **{m: statistics.fmean(r[m] for r in rs) for m in ("rank1", "mAP")},
        }
        for (round_, site), rs in merged.items()
    ]


def last_metrics(evals: list[dict], last: int) -> dict[str, dict[str, float]]:
    return {r["site"]: {"rank1": r["rank1"], "mAP": r["mAP"]} for r in evals if r["round"] == last}


def metric_table(by_seed: dict[int, dict[str, dict[str, float]]], site_names: list[str]) -> dict:
    """site (and "mean") -> metric -> (mean, std) over seeds."""
    table = {}
    for site in [*site_names, "mean"]:
        cell = {}
        for metric in ("rank1", "mAP"):
            if site == "mean":
                values = [statistics.fmean(s[n][metric] for n in site_names) for s in by_seed.values()]
            else:
                values = [s[site][metric] for s in by_seed.values()]
            cell[metric] = mean_std(values)
        table[site] = cell
    return table


def beating(table: dict, local: dict, site_names: list[str]) -> dict[str, list[str]]:
    """For each method of `table`: the sites where its rank-1 beats local training's."""
    return {
        method: [site for site in site_names if row[site]["rank1"][0] > local[site]["rank1"][0]]
        for method, row in table.items()
        if method != "local"
    }


def summarise(result: dict, site_names: list[str], sizes: dict[str, int]) -> dict:
    table: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    fluctuation: dict[str, float] = {}
    jumps: dict[str, float] = {}
    for method, by_seed in result["finals"].items():
        table[method] = metric_table(by_seed, site_names)
        stds = [
            statistics.pstdev(curve[-10:])
            for per_site in result["curves"][method].values()
            for curve in per_site.values()
            if len(curve) >= 2
        ]
        fluctuation[method] = statistics.fmean(stds) if stds else float("nan")
        steps = [
            abs(b - a)
            for per_site in result["curves"][method].values()
            for curve in per_site.values()
            for a, b in zip(curve[-6:], curve[-5:], strict=False)
        ]
        jumps[method] = statistics.fmean(steps) if steps else float("nan")
    site_table = {m: metric_table(by_seed, site_names) for m, by_seed in result["site_models"].items()}
    local = table.get("local")
    return {
        "table": table,
        "site_model_table": site_table,
        "fluctuation": fluctuation,
        "jumps": jumps,
        "beats_local": beating(table, local, site_names) if local else {},
        "site_models_beat_local": beating(site_table, local, site_names) if local else {},
        "sizes": sizes,
    }


def table_lines(table: dict, site_names: list[str], extra: dict[str, list[str]] | None = None) -> list[str]:
    lines = []
    for method, row in table.items():
        cells = [
            "{:.1f}+-{:.1f} / {:.1f}+-{:.1f}".format(*row[n]["rank1"], *row[n]["mAP"])
            for n in [*site_names, "mean"]
        ]
        lines.append(f"| {method} | " + " | ".join(cells + (extra or {}).get(method, [])) + " |")
    return lines


def markdown(summary: dict, site_names: list[str], header: str) -> str:
    sizes = summary["sizes"]
    cols = [f"{n} ({sizes[n]})" for n in site_names] + ["mean"]
    lines = [header, "", "rank-1 / mAP (%), mean +- std over seeds; columns: site (training images)", ""]
    lines.append("| method | " + " | ".join(cols) + " | fluctuation | jumps |")
    lines.append("| --- | " + " | ".join("---" for _ in cols) + " | --- | --- |")
    smoothness = {
        m: [f"{summary['fluctuation'][m]:.2f}", f"{summary['jumps'][m]:.2f}"] for m in summary["table"]
    }
    lines += table_lines(summary["table"], site_names, smoothness)
    lines += [
        "",
        "fluctuation: std of rank-1 over the last 10 evaluations; jumps: mean |change of rank-1| between",
        "consecutive evaluations over the last 5 steps; both averaged over sites and seeds.",
        "",
    ]
    for method, sites in summary["beats_local"].items():
        lines.append(
            f"- {method} beats local training (rank-1) at {len(sites)}/{len(site_names)} sites: {sites}"
        )
    if summary["site_model_table"]:
        lines += [
            "",
            "Federated methods scored with each site's own model after the last round's local training:",
            "",
            "| method | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---" for _ in cols) + " |",
            *table_lines(summary["site_model_table"], site_names),
            "",
        ]
        for method, sites in summary["site_models_beat_local"].items():
            lines.append(
                f"- {method}, sites' own models, beat local training (rank-1) at "
                f"{len(sites)}/{len(site_names)} sites: {sites}"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, site_names: list[str], sizes: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest, smallest = max(site_names, key=sizes.get), min(site_names, key=sizes.get)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, site in zip(axes, (largest, smallest), strict=True):
        for method, by_seed in result["curves"].items():
            curves = [per_site[site] for per_site in by_seed.values()]
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=method, marker="." if n < 30 else None)
        ax.set_title(f"{site} ({sizes[site]} training images)")
        ax.set_xlabel("evaluation (round)")
        ax.set_ylabel("rank-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument(
        "--train-images-max", type=int, default=400, help="training images at the largest site"
    )
    parser.add_argument("--size-ratio", type=float, default=20.0)
    parser.add_argument("--public-images", type=int, default=200)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="16: the smallest site has 20 images")
    parser.add_argument("--lr", type=float, default=0.02, help="head and backbone (from scratch, see docs)")
    parser.add_argument("--bn", default="average", choices=["first", "average", "local"])
    parser.add_argument("--kd-every", type=int, default=1)
    parser.add_argument("--kd-seconds", type=float, default=30.0)
    parser.add_argument(
        "--pretrained", help="local torchvision weights (or a FedReID model file) for the backbone"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="pretrained start without downloads: `cloud-aggregator pretrain` on a synthetic source domain "
        "(disjoint from the sites) for this many epochs, cached in --out and used as --pretrained",
    )
    parser.add_argument("--domains", action="store_true", help="synthetic sites that differ as data sets do")
    parser.add_argument(
        "--scenario",
        choices=["dataset", "camera"],
        default="dataset",
        help="federated by data set (each site a client) or by camera (cloud-aggregator split --by camera)",
    )
    parser.add_argument("--min-queries", type=int, default=0, help="queries per synthetic site at least")
    parser.add_argument("--data", type=Path, help="real data: a folder with one data set folder per site")
    parser.add_argument("--public", type=Path, help="with --data: the public unlabeled images for KD")
    parser.add_argument(
        "--no-site-models",
        dest="site_models",
        action="store_false",
        help="do not score federated methods with each site's own model (saves one evaluation per round)",
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 rounds, 4 small sites")
    parser.add_argument("--full", action="store_true", help="GPU preset: ResNet-50, 256x128, more data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "federated")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.sites, args.train_images_max, args.public_images = "0,1", 4, 4, 240, 64
        args.size_ratio = 8.0
    if args.full:
        args.arch, args.height, args.width, args.train_images_max, args.rounds = (
            "resnet50",
            256,
            128,
            4000,
            40,
        )
        args.public_images = 1000
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown or len(args.seeds) < 1:
        parser.error(f"unknown methods {sorted(unknown)}")
    if args.data:
        if not args.data.is_dir():
            parser.error(f"--data: not a folder: {args.data}")
        if {"kd", "cdw_kd"} & set(args.methods) and not (args.public and args.public.is_dir()):
            parser.error("the kd methods need --public DIR (unlabeled images for distillation) with --data")

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.pretrain_epochs:  # built once per architecture and size, then reused
        weights = (
            args.out
            / f"pretrained-{args.arch}-{args.height}x{args.width}-{args.pretrain_epochs}ep.safetensors"
        )
        if not weights.is_file():
            command = [sys.executable, "-m", "cloud.cli", "pretrain", "--out", str(weights)]
            command += ["--epochs", str(args.pretrain_epochs), "--arch", args.arch]
            command += [
                "--height",
                str(args.height),
                "--width",
                str(args.width),
                "--batch-size",
                str(args.batch_size),
            ]
            subprocess.run(command, check=True)
        args.pretrained = str(weights)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            public_dir = args.public.resolve() if args.public else None  # may sit inside --data
            sites = sorted(p for p in args.data.iterdir() if p.is_dir() and p.resolve() != public_dir)
            public = args.public
            data_desc = f"data sets in {args.data}"
        else:
            synth = SyntheticConfig(
                seed=0,
                sites=args.sites,
                train_images_max=args.train_images_max,
                size_ratio=args.size_ratio,
                public_images=args.public_images,
                height=args.height,
                width=args.width,
                domains=args.domains,
                min_queries=args.min_queries,
            )
            generate_federation(synth, Path(tmp))
            sites = sorted((Path(tmp) / "sites").iterdir())
            public = Path(tmp) / "public"
            data_desc = f"synthetic federation {synth.model_dump()}"
        if args.scenario == "camera":  # each camera of each site a client, scored on its site's query/gallery
            clients, skipped = split_by_camera(sites, Path(tmp) / "cameras", min_images=4)
            sites = [Path(tmp) / "cameras" / c.name for c in clients]
            data_desc += f"; federated by camera: {len(clients)} clients, left out {skipped}"
        site_of = client_sites(sites)  # per-camera clients: tables and curves are per site
        sizes: dict[str, int] = {}
        try:
            for s in sites:
                name = site_of.get(s.name, s.name)
                sizes[name] = sizes.get(name, 0) + len(read_dataset(s).train)
        except DatasetLayoutError as err:
            parser.error(f"--data: {err}")
        if len(sites) < 2:
            parser.error(f"a federation needs at least 2 sites; found {len(sites)}")
        result = run_study(args, sites, public, args.out)
    wall = time.perf_counter() - start
    names = list(sizes)
    summary = summarise(result, names, sizes)
    header = (
        f"## Learning study ({args.arch} {args.height}x{args.width}, {len(names)} sites, "
        f"{args.rounds} rounds x {args.local_epochs} local epoch, seeds {args.seeds}; "
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; wall {wall / 60:.1f} min)"
    )
    (args.out / "study.md").write_text(markdown(summary, names, header))
    plot(result, names, sizes, args.out / "study.png")
    (args.out / "study.json").write_text(
        json.dumps(
            {
                **summary,
                "curves": result["curves"],
                "seconds": result["seconds"],
                "wall_s": wall,
                "data": data_desc,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=1,
        )
    )
    print((args.out / "study.md").read_text())
    print(f"written: {args.out / 'study.md'}, {args.out / 'study.png'}, {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
