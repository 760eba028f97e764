"""The learning study: does federation beat training alone on a non-IID federation, and what do CDW and
KD add? The FedReID paper's comparison (reference/fedreid-seed-code.md section 8), reproduced on the
synthetic federation through the in-process simulator, with several seeds.

    .venv/bin/python bench/federated.py                      # the paper's setting: ~57 min on 2 CPU cores
    .venv/bin/python bench/federated.py --validation 0.25    # the same on held-out training identities
    .venv/bin/python bench/federated.py --from-scratch       # without the pretrained start
    .venv/bin/python bench/federated.py --quick              # a smoke version (<= 10 min)
    .venv/bin/python bench/federated.py --resume             # go on with an interrupted study
    .venv/bin/python bench/federated.py --full               # GPU: ResNet-50 at 256x128, more data
    .venv/bin/python bench/federated.py --data DIR --public DIR --pretrained W  # real data: DIR/<site>/

The default is the paper's setting: a pretrained start (`cloud-aggregator pretrain` on a synthetic source
domain disjoint from the sites, built once and cached in --out; `--pretrained FILE` for real weights),
sites that differ as data sets do (`--domains`, at least 50 queries each), and both scenarios of the
benchmark: federated by data set (each site a client) and by camera (each camera of each site a client,
scored on its site's query/gallery). `--validation F` holds out a fraction F of each site's training
identities as its query/gallery and never reads the test splits: settings are chosen there.

Methods: direct (the federation's start model, no training, each site's BatchNorm statistics estimated
on its training images, AdaBN: what any training has to beat), local (each site alone), fedpav, fednova
(FedPav with each delta normalised by its site's path length: the shipped default), cdw (FedPav + CDW
weights), kd (FedPav + server KD), cdw_kd, cluster (client clustering), central (pooled training: the
upper bound; trained once, since by camera it pools the same images into the same classes when no
camera is left out). `--ditto L` also trains each site a personal model (Ditto, lambda L) and scores it
as the site's own model; `--start-mix A,B` also scores each federated method's final global model mixed
with the start model in weight space (by data set); `--gate-from DIR` adds the shipped default with the
adoption gate (`reid.adoption`): per seed and site, the model a site serves when it chooses between the
federation's global model and its own locally trained one on DIR's validation runs of the same settings
(`--validation ... --validation-distractors --methods local,fednova`), scored on this study's test
runs. Every method gets the same compute: `local_epochs` x
`rounds` epochs per site. The synthetic federation is generated once, with settings fixed before any
run (seed 0: sizes spread `size_ratio`x, per-site camera styles, a public KD set); the seeds vary
training. Federated methods are scored with the global model, `local` with each site's own model,
`central` with the pooled model. Federated methods are also scored with each site's *own* model after
the last round's local training from the global model (the model the paper's CDW claim is about;
`--no-site-models` skips this). Writes `<out>/study.json`, `<out>/study.md` (the tables, per scenario)
and `<out>/study-<scenario>.png` (rank-1 per round, for the largest and the smallest site).

With `--data DIR`, every sub-folder of DIR is one site, in any layout `reid.data.read_dataset` reads
(Market-1501/Duke, CUHK03-NP, MSMT17 lists, the FedReID `pytorch/` layout); `--public` is the unlabeled
KD set (required by the kd methods).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cloud.simulate import CHECKPOINT, SimulationConfig, Simulator
from cloud.site_round import SiteJob, SiteWorker
from cloud.strategy import KDConfig, StrategyConfig
from reid.adoption import prefer_own
from reid.data import DatasetLayoutError, InputSpec, read_dataset
from reid.data.camera_split import client_sites, split_by_camera
from reid.data.validation_split import hold_out
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig, adapt_to_site

METHODS = ("direct", "local", "fedpav", "fednova", "cdw", "kd", "cdw_kd", "cluster", "central")
SHIPPED = "fednova"  # what `serve` runs by default: FedPav weights + fednova, no KD (and --bn local, as here)
ROUNDS = 5  # from a pretrained start the curves are flat after 2-3 rounds (docs/benchmarks.md)
# federated methods: the global model; clustering: each site's group model (what its site trains from)
SCORED_AS = {"local": "local", "central": "global", "cluster": "group"}


def scored(method: str) -> str:
    return SCORED_AS.get(method, "global")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_study(
    args: argparse.Namespace, sites: list[Path], public: Path | None, out: Path, methods: list[str]
) -> dict:
    """Every method x seed on these sites (or clients); the sites' own models are scored when each client is
    a site (federated by camera they would be each camera's own model: not scored, to save the time). By
    camera the simulator scores each site once, each camera's crops embedded by its own client's model
    (`cloud.camera_scoring`), so every record is a site's."""
    site_of = client_sites(sites)
    base = study_config(args, site_models=args.site_models and not site_of)
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}  # method -> seed -> site -> rank-1 per round
    finals: dict[str, dict[int, dict[str, dict[str, float]]]] = {}  # method -> seed -> site -> metrics
    site_models: dict[str, dict[int, dict[str, dict[str, float]]]] = {}  # federated: the sites' own models
    seconds: dict[str, float] = {}
    for method in methods:
        start = time.perf_counter()
        for seed in args.seeds:
            personal = args.ditto if method not in ("local", "central") else None
            update = {
                "algorithm": method,
                "seed": seed,
                "ditto": personal,
                "eval_global": method != "cluster",
            }
            cfg = base.model_copy(update=update)  # (clustering's global model is not in the tables)
            run_dir = out / "runs" / method / f"seed{seed}"
            if not args.resume:
                shutil.rmtree(run_dir, ignore_errors=True)
            needs_public = method in ("kd", "cdw_kd")
            sim = Simulator(cfg, sites, run_dir, public if needs_public else None)
            if args.resume:
                try:
                    sim.try_resume()
                except ValueError as err:  # a run of other settings in the same place
                    sys.exit(f"--resume: {err}")
            sim.run()
            records = run_records(run_dir)
            evals = [r for r in records if r.get("model") == scored(method)]
            per_site: dict[str, list[float]] = {}
            for r in sorted(evals, key=lambda r: r["round"]):
                per_site.setdefault(r["site"], []).append(r["rank1"])
            curves.setdefault(method, {})[seed] = per_site
            last = max(r["round"] for r in evals)
            finals.setdefault(method, {})[seed] = last_metrics(evals, last)
            own = [r for r in records if r.get("model") == "local"]
            if method not in ("local", "central") and own:
                site_models.setdefault(method, {})[seed] = last_metrics(own, last)
            print(
                f"{method} seed {seed}: mean rank-1 {statistics.fmean(v[-1] for v in per_site.values()):.1f}"
            )
        seconds[method] = time.perf_counter() - start
    return {"curves": curves, "finals": finals, "site_models": site_models, "seconds": seconds}


def run_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def gated(result: dict, runs: Path, seeds: list[int]) -> dict:
    """The adoption gate on a study's test runs: per seed, each site's choice between the shipped global
    model and its own locally trained one, made on the validation runs in `runs` (`reid.adoption`, the
    agent's rule), and the test scores of the chosen model."""
    finals: dict[int, dict[str, dict[str, float]]] = {}
    choices: dict[int, dict[str, str]] = {}
    for seed in seeds:
        chosen = {}
        for method in ("local", SHIPPED):
            records = run_records(runs / method / f"seed{seed}")
            evals = [r for r in records if r.get("model") == scored(method)]
            chosen[method] = last_metrics(evals, max(r["round"] for r in evals))
        test_own, test_fed = result["finals"]["local"][seed], result["finals"][SHIPPED][seed]
        if set(chosen["local"]) != set(test_own):
            sys.exit(f"--gate-from: sites {sorted(chosen['local'])}, this study's {sorted(test_own)}")
        own = {s: prefer_own(chosen["local"][s], chosen[SHIPPED][s]) for s in test_own}
        choices[seed] = {s: "own" if own[s] else "federation" for s in test_own}
        finals[seed] = {s: (test_own if own[s] else test_fed)[s] for s in test_own}
    return {"finals": finals, "choices": choices}


def study_config(args: argparse.Namespace, site_models: bool = False) -> SimulationConfig:
    """Every run's settings but its method and seed; `site_models`: score the sites' own models too."""
    return SimulationConfig(
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        eval_every=args.eval_every,
        refresh_bn_stats=args.refresh_bn_stats,
        eval_local="last" if site_models else False,  # the tables read the last round
        model=ModelSpec(arch=args.arch),
        input=InputSpec(height=args.height, width=args.width),
        train=TrainConfig(lr_head=args.lr, lr_backbone=args.lr_backbone, batch_size=args.batch_size),
        strategy=StrategyConfig(bn=args.bn),
        kd=KDConfig(every=args.kd_every, epochs=1, max_seconds=args.kd_seconds),
        pretrained=args.pretrained,
    )


def direct_transfer(args: argparse.Namespace, sites: list[Path]) -> dict:
    """The "direct" row: each site scored, per seed, by the federated runs' start model (the same seeded
    init: the pretrained backbone, a new embedding block) with its BatchNorm statistics estimated on the
    site's training images, as a site serves a model (`reid.train.adapt_to_site`). No training: the same in
    both scenarios (scored per site)."""
    start = time.perf_counter()
    spec = InputSpec(height=args.height, width=args.width)
    data = {path.name: SiteData(path, spec, args.batch_size) for path in sites}
    finals: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        init = start_state(args, seed)
        finals[seed] = {}
        for name, site in data.items():
            model = build_model(ModelSpec(arch=args.arch), 1)
            model.load_state_dict(init)
            adapt_to_site(model, None, site.statistics_loader())
            summary = site.evaluate(model).summary()
            finals[seed][name] = {"rank1": summary["rank1"], "mAP": summary["mAP"]}
        mean = statistics.fmean(s["rank1"] for s in finals[seed].values())
        print(f"direct seed {seed}: mean rank-1 {mean:.1f}")
    curves = {seed: {name: [m["rank1"]] for name, m in by_site.items()} for seed, by_site in finals.items()}
    return {"finals": finals, "curves": curves, "seconds": time.perf_counter() - start}


def start_state(args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    """The federated runs' start model of `seed` (the same seeded init as `cloud.simulate.Simulator`'s)."""
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch=args.arch), 1, args.pretrained).state_dict()


def start_mixes(args: argparse.Namespace, sites: list[Path], out: Path, methods: list[str]) -> dict:
    """`--start-mix`: each federated method's final global model mixed with the start model in weight
    space (WiSE-FT, Wortsman et al. 2022: alpha x start + (1 - alpha) x global, every float weight, the
    site's own BatchNorm layers included), scored at each site by the simulator's own scoring of a global
    model (`cloud.site_round.SiteWorker.evaluate`). Alpha 0 is the global model's own score. Returns
    "<method> mixed <alpha>" -> seed -> site -> metrics."""
    worker = SiteWorker(study_config(args))  # (scoring reads only the model, input and BatchNorm settings)
    mixes: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for method in methods:
        for seed in args.seeds:
            start = start_state(args, seed)
            saved = load_file(str(out / "runs" / method / f"seed{seed}" / CHECKPOINT))
            final = {k.removeprefix("global/"): v for k, v in saved.items() if k.startswith("global/")}
            for index, site in enumerate(sites):
                mine = f"site/{site.name}/private/"
                private = {k.removeprefix(mine): v for k, v in saved.items() if k.startswith(mine)}
                for alpha in args.start_mix:
                    mixed = {  # BatchNorm statistics stay the site's: the estimate's prior
                        k: alpha * start[k] + (1 - alpha) * v
                        if v.is_floating_point() and ".running_" not in k
                        else v
                        for k, v in {**final, **private}.items()
                    }
                    job = SiteJob(
                        index, site.name, str(site), args.rounds, private={k: mixed[k] for k in private}
                    )
                    result = worker.evaluate(job, mixed)
                    if result.metrics is None:
                        sys.exit(f"--start-mix: {method} seed {seed} at {site.name}: {result.error}")
                    row = mixes.setdefault(f"{method} mixed {alpha:.2f}", {}).setdefault(seed, {})
                    row[site.name] = {"rank1": result.metrics["rank1"], "mAP": result.metrics["mAP"]}
    return mixes


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
            for a, b in zip(curve[-6:], curve[-6:][1:], strict=False)  # the last 5 steps (fewer if shorter)
        ]
        jumps[method] = statistics.fmean(steps) if steps else float("nan")
    site_table = {m: metric_table(by_seed, site_names) for m, by_seed in result["site_models"].items()}
    mix_table = {m: metric_table(by_seed, site_names) for m, by_seed in result.get("start_mixes", {}).items()}
    gate = result.get("gate")
    gate_table = {f"{SHIPPED} + gate": metric_table(gate["finals"], site_names)} if gate else {}
    local = table.get("local")
    return {
        "table": table,
        "site_model_table": site_table,
        "start_mix_table": mix_table,
        "gate_table": gate_table,
        "gate_choices": gate["choices"] if gate else {},
        "gate_beats_local": beating(gate_table, local, site_names) if gate and local else {},
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


def markdown(summary: dict, site_names: list[str], header: str, ditto: float | None = None) -> str:
    sizes = summary["sizes"]
    cols = [f"{n} ({sizes[n]})" for n in site_names] + ["mean"]
    lines = [header, "", "rank-1 / mAP (%), mean +- std over seeds; columns: site (training images)", ""]
    lines.append("| method | " + " | ".join(cols) + " | fluctuation | jumps |")
    lines.append("| --- | " + " | ".join("---" for _ in cols) + " | --- | --- |")
    smoothness = {  # (a single evaluation per run, --eval-every = rounds, has neither: "-")
        m: [f"{v:.2f}" if math.isfinite(v) else "-" for v in (summary["fluctuation"][m], summary["jumps"][m])]
        for m in summary["table"]
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
            "Federated methods scored with each site's own model after the last round's local training:"
            if ditto is None
            else f"Federated methods scored with each site's personal model (Ditto, lambda {ditto}):",
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
    if summary["start_mix_table"]:
        lines += [
            "",
            "Final global models mixed with the start model in weight space (alpha x start + (1 - alpha) x "
            "global; --start-mix):",
            "",
            "| method | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---" for _ in cols) + " |",
            *table_lines(summary["start_mix_table"], site_names),
        ]
    if summary.get("gate_table"):
        own = {s: sum(c[s] == "own" for c in summary["gate_choices"].values()) for s in site_names}
        lines += [
            "",
            f"The shipped default with the adoption gate: each site serves whichever of the {SHIPPED} global "
            "model and its own locally trained model scores higher on its validation runs (--gate-from), "
            "scored here:",
            "",
            "| method | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---" for _ in cols) + " |",
            *table_lines(summary["gate_table"], site_names),
            "",
            "- seeds in which the site chose its own model: "
            + ", ".join(f"{s} {own[s]}/{len(summary['gate_choices'])}" for s in site_names),
        ]
        for method, sites in summary["gate_beats_local"].items():
            lines.append(
                f"- {method} beats local training (rank-1) at {len(sites)}/{len(site_names)} sites: {sites}"
            )
    verdict = summary.get("verdicts", {})
    if verdict:
        ranked = ", ".join(f"{m} {verdict['mean_rank1'][m]:.1f}" for m in verdict["ranking"])
        lines += ["", f"- mean rank-1, best first: {ranked}"]
        if "margin_over_fedpav" in verdict:
            margins = ", ".join(
                f"{m} {d:+.1f}" for m, d in verdict["margin_over_fedpav"].items() if m != "fedpav"
            )
            lines.append(f"- over FedPav (mean rank-1 points): {margins}")
        if "shipped_below_local" in verdict:
            below = verdict["shipped_below_local"]
            lines.append(
                f"- the shipped default ({SHIPPED}, global or site model) is below local training at "
                f"{len(below)}/{len(site_names)} sites{': ' + str(below) if below else ''}"
            )
        if "gated_below_local" in verdict:
            below = verdict["gated_below_local"]
            lines.append(
                f"- with the adoption gate it is below local training at {len(below)}/{len(site_names)} "
                f"sites{': ' + str(below) if below else ''}"
            )
        if "shipped_gap_to_central" in verdict:
            lines.append(
                f"- central pooled training minus the shipped default: "
                f"{verdict['shipped_gap_to_central']:+.1f}"
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


def verdicts(summary: dict, site_names: list[str]) -> dict:
    """The issue's targets, read off one scenario's tables: methods ranked by mean rank-1, each
    method's margin over FedPav, and whether the shipped default scores at least local training at every
    site (global or site model) and within 5 points of central training on the mean."""
    table, own = summary["table"], summary["site_model_table"]
    mean = {m: row["mean"]["rank1"][0] for m, row in table.items()}
    out: dict = {"ranking": sorted(mean, key=mean.get, reverse=True), "mean_rank1": mean}
    if "fedpav" in mean:
        out["margin_over_fedpav"] = {m: round(v - mean["fedpav"], 2) for m, v in mean.items()}
    if SHIPPED in table and "local" in table:
        local = table["local"]
        best = {
            site: max(
                table[SHIPPED][site]["rank1"][0],
                own.get(SHIPPED, {}).get(site, {"rank1": (-1, 0)})["rank1"][0],
            )
            for site in site_names
        }
        out["shipped_below_local"] = [s for s in site_names if best[s] < local[s]["rank1"][0]]
        for row in summary.get("gate_table", {}).values():
            out["gated_below_local"] = [s for s in site_names if row[s]["rank1"][0] < local[s]["rank1"][0]]
    if SHIPPED in mean and "central" in mean:
        out["shipped_gap_to_central"] = round(mean["central"] - mean[SHIPPED], 2)
    return out


def study_sites(
    args: argparse.Namespace, tmp: Path, parser: argparse.ArgumentParser
) -> tuple[list[Path], Path | None, str]:
    """The federation's site folders (before any camera split), the public KD set, and a description."""
    if args.data:
        public_dir = args.public.resolve() if args.public else None  # may sit inside --data
        sites = sorted(p for p in args.data.iterdir() if p.is_dir() and p.resolve() != public_dir)
        public, desc = args.public, f"data sets in {args.data}"
        for site in sites:  # every site readable before minutes of pretraining and training
            try:
                read_dataset(site)
            except DatasetLayoutError as err:
                parser.error(f"--data: {err}")
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
            min_queries=args.min_queries,  # the same federation for validation and test
        )
        generate_federation(synth, tmp)
        sites, public = sorted((tmp / "sites").iterdir()), tmp / "public"
        desc = f"synthetic federation {synth.model_dump()}"
    if args.validation:
        try:
            sites = hold_out(
                sites, tmp / "validation", fraction=args.validation, distractors=args.validation_distractors
            )
        except (ValueError, DatasetLayoutError) as err:
            parser.error(f"--validation: {err}")
        desc += f"; validation: {args.validation:.0%} of each site's training identities as query/gallery"
        desc += ", the others' images as gallery distractors" if args.validation_distractors else ""
    return sites, public, desc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument(
        "--refresh-bn-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="under bn=local, score the global model with each site's BatchNorm statistics estimated anew "
        "under the global weights (AdaBN; affine weights kept), as the sites serve it; --no-: with those "
        "of their training (the stale ones)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="score the global model every N rounds (and after the last): the curves and the fluctuation "
        "measure need 1",
    )
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
    parser.add_argument("--lr", type=float, default=0.02, help="the head's learning rate")
    parser.add_argument("--lr-backbone", type=float, help="the backbone's (default: --lr)")
    parser.add_argument("--bn", default="local", choices=["first", "average", "local"])
    parser.add_argument("--kd-every", type=int, default=1)
    parser.add_argument("--kd-seconds", type=float, default=30.0)
    parser.add_argument(
        "--pretrained", help="local torchvision weights (or a FedReID model file) for the backbone"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=20,
        help="without --pretrained: `cloud-aggregator pretrain` on a synthetic source domain (disjoint from "
        "the sites) for this many epochs, cached in --out's parent and used as --pretrained",
    )
    parser.add_argument("--from-scratch", action="store_true", help="no pretrained start")
    parser.add_argument(
        "--domains",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic sites that differ as data sets do",
    )
    parser.add_argument(
        "--scenario",
        choices=["dataset", "camera", "both"],
        default="both",
        help="federated by data set (each site a client), by camera (cloud-aggregator split --by camera), "
        "or both",
    )
    parser.add_argument(
        "--min-queries",
        type=int,
        default=50,
        help="queries per synthetic site at least (50: <= 2 points each)",
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        help="hold out this fraction of each site's training identities as its query/gallery (the test "
        "splits are not read): for choosing settings",
    )
    parser.add_argument(
        "--validation-distractors",
        action="store_true",
        help="with --validation: the identities that stay in training join each site's gallery as "
        "distractors (a small site's held-out people are otherwise searched among themselves)",
    )
    parser.add_argument("--data", type=Path, help="real data: a folder with one data set folder per site")
    parser.add_argument("--public", type=Path, help="with --data: the public unlabeled images for KD")
    parser.add_argument(
        "--ditto",
        type=float,
        help="Ditto personalisation of the federated methods with this lambda: the sites' own models are "
        "their personal models",
    )
    parser.add_argument(
        "--no-site-models",
        dest="site_models",
        action="store_false",
        help="do not score federated methods with each site's own model (saves one evaluation per round)",
    )
    parser.add_argument(
        "--start-mix",
        help="by data set: also score each federated method's final global model mixed with the start model "
        "in weight space at these alphas (comma-separated, 0 to 1: the share of the start; WiSE-FT)",
    )
    parser.add_argument(
        "--gate-from",
        type=Path,
        help="also score the shipped default with the adoption gate, each site choosing between the "
        "global model and its own on the validation runs of this folder (a study of the same settings "
        "with --validation, --methods local,fednova at least)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs an interrupted study of the same settings left in --out and run only the rest "
        "(default: every run starts afresh)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 seeds, 2 rounds, 3 small sites, scored after the last round"
    )
    parser.add_argument("--full", action="store_true", help="GPU preset: ResNet-50, 256x128, more data")
    parser.add_argument("--out", type=Path, help="default: bench/results/federated[-validation|-scratch]")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.sites, args.train_images_max, args.public_images = "0,1", 2, 3, 160, 48
        args.size_ratio, args.min_queries, args.pretrain_epochs, args.eval_every = 6.0, 20, 2, 2
    if args.full:
        args.arch, args.height, args.width, args.train_images_max, args.rounds = (
            "resnet50",
            256,
            128,
            4000,
            40,
        )
        args.public_images = 1000
    if args.lr_backbone is None:
        args.lr_backbone = args.lr
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown or len(args.seeds) < 1:
        parser.error(f"unknown methods {sorted(unknown)}")
    try:
        args.start_mix = [float(a) for a in args.start_mix.split(",") if a] if args.start_mix else []
    except ValueError:
        parser.error(f"--start-mix: comma-separated numbers, got {args.start_mix!r}")
    if not all(0.0 <= a <= 1.0 for a in args.start_mix) or (args.start_mix and args.scenario == "camera"):
        parser.error("--start-mix: alphas from 0 to 1, for the scenario by data set")
    if not 0.0 <= args.validation < 1.0:
        parser.error("--validation: a fraction in (0, 1), or 0 for the test splits")
    if args.gate_from is not None and (
        args.validation or not {"local", SHIPPED} <= set(args.methods) or not args.gate_from.is_dir()
    ):
        parser.error(
            f"--gate-from: a folder of validation runs, for a test-split study whose methods include local "
            f"and {SHIPPED}"
        )
    scenarios = ["dataset", "camera"] if args.scenario == "both" else [args.scenario]
    for scenario, method, seed in itertools.product(scenarios, ("local", SHIPPED), args.seeds):
        run = (args.gate_from or Path()) / scenario / "runs" / method / f"seed{seed}"
        if args.gate_from is not None and not (run / "metrics.jsonl").is_file():
            parser.error(f"--gate-from: no validation run of {method}, seed {seed}, by {scenario}: {run}")
    if args.validation_distractors and not args.validation:
        parser.error("--validation-distractors: only with --validation (the test splits are as they are)")
    if args.data:
        if not args.data.is_dir():
            parser.error(f"--data: not a folder: {args.data}")
        if {"kd", "cdw_kd"} & set(args.methods) and not (args.public and args.public.is_dir()):
            parser.error("the kd methods need --public DIR (unlabeled images for distillation) with --data")
    if args.out is None:
        suffix = "-validation" if args.validation else "-scratch" if args.from_scratch else ""
        args.out = Path(__file__).parent / "results" / f"federated{suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries, everything, results = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        base_sites, public, data_desc = study_sites(args, Path(tmp), parser)
        if args.from_scratch:
            args.pretrained = None
        elif not args.pretrained:  # built once per architecture and size, then reused by every study
            args.pretrained = str(pretrained_backbone(args))
        direct = direct_transfer(args, base_sites) if "direct" in args.methods else None
        for scenario in scenarios:
            sites = base_sites
            desc = data_desc
            skipped: list[dict] = []
            if scenario == "camera":  # each camera of each site a client, scored on its site's query/gallery
                clients, skipped = split_by_camera(base_sites, Path(tmp) / "cameras", min_images=4)
                sites = [Path(tmp) / "cameras" / c.name for c in clients]
                desc += f"; federated by camera: {len(clients)} clients, left out {skipped}"
            site_of = client_sites(sites)  # per-camera clients: tables and curves are per site
            sizes: dict[str, int] = {}
            for s in sites:  # (every one was read before: study_sites)
                name = site_of.get(s.name, s.name)
                sizes[name] = sizes.get(name, 0) + len(read_dataset(s).train)
            if len(sites) < 2:
                parser.error(f"a federation needs at least 2 sites; found {len(sites)}")
            # pooled training does not depend on how the sites are split into clients: when no camera is
            # left out, central by camera trains on exactly the images and classes it had by data set
            reuse = (
                scenario == "camera"
                and not skipped
                and "central" in results.get("dataset", {}).get("finals", {})
            )
            methods = [m for m in args.methods if m != "direct" and not (reuse and m == "central")]
            result = results[scenario] = run_study(args, sites, public, args.out / scenario, methods)
            if scenario == "dataset" and args.start_mix:
                mixed = [m for m in methods if m not in ("local", "central", "cluster")]
                result["start_mixes"] = start_mixes(args, sites, args.out / scenario, mixed)
            if args.gate_from is not None:
                result["gate"] = gated(result, args.gate_from / scenario / "runs", args.seeds)
            if direct is not None:  # first in every table
                for key in ("curves", "finals", "seconds"):
                    result[key] = {"direct": direct[key], **result[key]}
            if reuse:
                for key in ("curves", "finals", "seconds"):
                    result[key]["central"] = results["dataset"][key]["central"]
            names = list(sizes)
            summary = summarise(result, names, sizes)
            summary["verdicts"] = verdicts(summary, names)
            summaries[scenario] = summary
            everything[scenario] = {
                **summary,
                "curves": result["curves"],
                "seconds": result["seconds"],
                "data": desc,
            }
            plot(result, names, sizes, args.out / f"study-{scenario}.png")
    wall = time.perf_counter() - start
    start_desc = f"pretrained ({Path(args.pretrained).name})" if args.pretrained else "from scratch"
    split_desc = (
        f"validation split ({args.validation:.0%} of training identities)"
        if args.validation
        else "test split"
    )
    header = (
        f"## Learning study ({args.arch} {args.height}x{args.width} {start_desc}, {args.rounds} rounds x "
        f"{args.local_epochs} local epoch, seeds {args.seeds}, {split_desc}; {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"wall {wall / 60:.1f} min)"
    )
    sections = [header, ""]
    for scenario, summary in summaries.items():
        names = list(summary["sizes"])
        sections.append(
            markdown(
                summary,
                names,
                f"### Federated by {'data set' if scenario == 'dataset' else 'camera'}",
                args.ditto,
            )
        )
    (args.out / "study.md").write_text("\n".join(sections))
    (args.out / "study.json").write_text(
        json.dumps(
            {
                "scenarios": everything,
                "wall_s": wall,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=1,
        )
    )
    print((args.out / "study.md").read_text())
    print(f"written: {args.out / 'study.md'}, {args.out / 'study.json'} and the plots in {args.out}")


def pretrained_backbone(args: argparse.Namespace) -> Path:
    """The cached synthetic-source backbone for this architecture and input size (built on first use)."""
    weights = (
        args.out.parent
        / f"pretrained-{args.arch}-{args.height}x{args.width}-{args.pretrain_epochs}ep.safetensors"
    )
    if not weights.is_file():
        command = [sys.executable, "-m", "cloud.cli", "pretrain", "--out", str(weights)]
        command += ["--epochs", str(args.pretrain_epochs), "--arch", args.arch, "--height", str(args.height)]
        command += ["--width", str(args.width), "--batch-size", str(args.batch_size)]
        subprocess.run(command, check=True)
    return weights


if __name__ == "__main__":
    main()
