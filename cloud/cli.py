"""`cloud-aggregator`: the cloud command line (synthetic federations, the in-process simulator)."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from reid.choices import Algorithm, Arch, BNPolicy, Estimator, OutlierRule, Transport, Weighting
from reid.config import ConfigError, load_config
from reid.console import device_option, fail, metrics_table, progress_bar
from reid.logs import configure_logging

if TYPE_CHECKING:
    from cloud.simulate import SimulationConfig

app = typer.Typer(help="FedReID Edge cloud aggregator.", no_args_is_help=True)
out = Console()


@app.callback()
def main(log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR")) -> None:
    """FedReID Edge cloud aggregator."""
    configure_logging(log_level)


@app.command()
def synthesize(
    out_dir: Path = typer.Option(..., "--out", help="empty folder to write the federation to"),
    sites: int = typer.Option(6, min=1),
    seed: int = typer.Option(0),
    train_images_max: int = typer.Option(
        1200, help="training images of the largest site (at least 2 identities' worth: 32 by default)"
    ),
    size_ratio: float = typer.Option(20.0, help="largest / smallest site, in training images"),
    public_images: int = typer.Option(400, help="unlabeled images for server-side KD"),
    height: int = typer.Option(256, min=32),
    width: int = typer.Option(128, min=16),
    domains: bool = typer.Option(
        False, "--domains", help="sites differ as real data sets do (docs/datasets.md)"
    ),
    min_queries: int = typer.Option(0, min=0, help="queries per site at least (50: 1 query <= 2 points)"),
) -> None:
    """Write a synthetic non-IID federation (Market-1501 layout per site + a public KD set)."""
    from reid.synthetic import SyntheticConfig, generate_federation, total_images

    cfg = SyntheticConfig(
        seed=seed,
        sites=sites,
        train_images_max=train_images_max,
        size_ratio=size_ratio,
        public_images=public_images,
        height=height,
        width=width,
        domains=domains,
        min_queries=min_queries,
    )
    try:
        with progress_bar() as bar:
            task = bar.add_task("rendering", total=total_images(cfg))
            summaries = generate_federation(cfg, out_dir, progress=lambda n: bar.update(task, advance=n))
    except FileExistsError as err:
        raise typer.BadParameter(str(err)) from None
    rows = [
        {
            "site": s.name,
            "cameras": s.cameras,
            "train ids": s.train_ids,
            "train images": s.train_images,
            "query": s.query_images,
            "gallery": s.gallery_images,
        }
        for s in summaries
    ]
    out.print(metrics_table(f"Synthetic federation in {out_dir} (public set: {public_images} images)", rows))


@app.command()
def pretrain(
    out_file: Path = typer.Option(..., "--out", help="the weights file to write (for --pretrained)"),
    data: Path = typer.Option(
        None, help="source domain: a folder of data sets (default: a synthetic source, built once)"
    ),
    epochs: int = typer.Option(20, min=1),
    arch: Arch = typer.Option("resnet18"),
    height: int = typer.Option(128, min=16),
    width: int = typer.Option(64, min=16),
    batch_size: int = typer.Option(32, min=2),
    lr: float = typer.Option(0.02, help="head and backbone learning rate (from scratch)"),
    seed: int = typer.Option(1000, help="seeds the synthetic source (keep it apart from the sites' seed)"),
    source_images: int = typer.Option(
        1200, min=16, help="training images of the synthetic source's largest site"
    ),
    device: str = typer.Option("auto", callback=device_option),
) -> None:
    """Train a backbone on a source domain disjoint from every site, as ImageNet weights stand in where
    they cannot be downloaded; `--pretrained FILE` of `simulate` / `serve` then starts from it."""
    from cloud.simulate import MODEL, SimulationConfig, Simulator
    from reid.data import DatasetLayoutError, InputSpec, detect_layout
    from reid.model import ModelSpec
    from reid.synthetic import SyntheticConfig, cached_federation
    from reid.train import TrainConfig

    work = out_file.with_name(out_file.name + ".work")  # the source and the training run, resumable
    if data is None:
        source = SyntheticConfig(
            seed=seed,
            sites=4,
            train_images_max=source_images,
            public_images=0,
            height=height,
            width=width,
            domains=True,
        )
        if not (work / "source" / "federation.json").is_file():
            out.print(f"building the synthetic source domain (seed {seed}, its own styles) in {work}")
        try:
            data = cached_federation(source, work / "source") / "sites"
        except FileExistsError as err:
            raise typer.BadParameter(str(err), param_hint="--out") from None
    config = SimulationConfig(
        algorithm="central",
        rounds=epochs,
        eval_every=epochs,
        seed=seed,
        model=ModelSpec(arch=arch),
        input=InputSpec(height=height, width=width),
        train=TrainConfig(batch_size=batch_size, lr_head=lr, lr_backbone=lr, device=device),
    )
    try:
        try:
            detect_layout(data)
            sources = [data]  # one data set
        except DatasetLayoutError:
            sources = _site_dirs(data)  # a folder of data sets
        with progress_bar(transient=False) as bar:
            task = bar.add_task("pretraining: epochs", total=epochs)
            sim = Simulator(
                config, sources, work / "run", None, lambda r, _: bar.update(task, completed=r + 1)
            )
            sim.try_resume()
            sim.run()
    except (ValueError, DatasetLayoutError) as err:
        raise typer.BadParameter(str(err)) from None
    out_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "run" / MODEL, out_file)
    out.print(f"wrote {out_file}: start a federation from it with --pretrained {out_file}")


@app.command()
def split(
    data: Path = typer.Option(..., help="a folder of site data sets (one folder per site, any layout)"),
    out_dir: Path = typer.Option(..., "--out", help="empty folder for the per-camera clients"),
    by: str = typer.Option("camera", help="how to split: camera (the benchmark's second scenario)"),
    copy: bool = typer.Option(False, "--copy/--link", help="copy the images instead of linking them"),
    min_images: int = typer.Option(8, min=1, help="cameras with fewer training images are left out"),
) -> None:
    """Split each site into per-camera clients (federated-by-camera); evaluation stays on the site's
    query/gallery. The result is a folder of sites for `simulate --data` and `edge-agent start`."""
    from reid.data.camera_split import split_by_camera
    from reid.data.layouts import DatasetLayoutError

    if by != "camera":
        raise typer.BadParameter(f"unknown split {by!r}: camera is the one there is", param_hint="--by")
    try:
        clients, skipped = split_by_camera(_site_dirs(data), out_dir, copy=copy, min_images=min_images)
    except (FileExistsError, DatasetLayoutError) as err:
        raise typer.BadParameter(str(err)) from None
    rows = [{"client": c.name, "site": c.site, "camera": c.camera, "train images": c.train_images,
             "identities": c.identities} for c in clients]  # fmt: skip
    out.print(metrics_table(f"{len(clients)} per-camera clients in {out_dir}", rows))
    for s in skipped:
        out.print(f"left out: {s['site']} camera {s['camera']}: {s['reason']}")


def _site_dirs(sites_dir: Path) -> list[Path]:
    """The site folders of a folder of sites; their names are the sites' ids (as on the wire)."""
    from protocol.topics import check_site_name
    from reid.data import DatasetLayoutError, detect_layout

    if not sites_dir.is_dir():
        raise typer.BadParameter(f"folder not found: {sites_dir}", param_hint="--data")
    with contextlib.suppress(DatasetLayoutError):
        layout = detect_layout(sites_dir)
        raise typer.BadParameter(
            f"{sites_dir} is one site's data set ({layout}); --data takes a folder with one data set folder "
            "per site",
            param_hint="--data",
        )
    dirs = sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise typer.BadParameter(
            f"no site folders in {sites_dir} (expected one data set folder per site)", param_hint="--data"
        )
    for p in dirs:
        try:
            check_site_name(p.name, "site folder name")
        except ValueError as err:
            raise typer.BadParameter(f"{err} (the site's id): rename {p}", param_hint="--data") from None
    return dirs


def _final_rows(records: list[dict]) -> list[dict[str, object]]:
    evals = [r for r in records if "model" in r and "rank1" in r]  # (not sites without valid queries)
    if not evals:
        return []
    last = max(r["round"] for r in evals)
    rows: dict[str, dict[str, object]] = {}
    for r in evals:
        if r["round"] == last:
            row = rows.setdefault(r["site"], {"site": r["site"]})
            row[f"{r['model']} rank-1"] = r["rank1"]
            row[f"{r['model']} mAP"] = r["mAP"]
    # a site may lack a column (sampled or failed in the last round: no local score): "-", and each mean is
    # over the sites that have the score
    keys = list(dict.fromkeys(k for row in rows.values() for k in row if k != "site"))
    table: list[dict[str, object]] = [
        {"site": s, **{k: row.get(k, "-") for k in keys}} for s, row in rows.items()
    ]
    means = {k: [float(row[k]) for row in rows.values() if k in row] for k in keys}
    table.append({"site": "mean", **{k: sum(v) / len(v) for k, v in means.items()}})
    return table


@app.command()
def simulate(
    out_dir: Path = typer.Option(Path("simulation"), "--out", help="run folder: metrics, plot, checkpoint"),
    transport: Transport = typer.Option("none", help="none: in-process; mqtt: broker + agent processes"),
    sites_dir: Path = typer.Option(None, "--data", help="folder of site data sets (default: synthetic)"),
    public_dir: Path = typer.Option(None, "--public", help="public unlabeled images for KD"),
    synthetic_sites: int = typer.Option(
        6, "--sites", min=1, help="sites to generate when --data is not given"
    ),
    synthetic_images: int = typer.Option(1200, min=32, help="training images of the largest synthetic site"),
    algorithm: Algorithm = typer.Option("fedpav"),
    rounds: int = typer.Option(10, min=1),
    local_epochs: int = typer.Option(1, min=1),
    eval_every: int = typer.Option(1, min=1),
    arch: Arch = typer.Option("resnet18"),
    pretrained: Path = typer.Option(None, help="local torchvision ImageNet weights or a FedReID model file"),
    height: int = typer.Option(128, min=16),
    width: int = typer.Option(64, min=16),
    batch_size: int = typer.Option(32, min=2),
    lr_head: float = typer.Option(0.02),
    lr_backbone: float = typer.Option(0.02),
    bn: BNPolicy = typer.Option("local", help="BatchNorm policy: local, average or first"),
    weighting: Weighting = typer.Option("cdw", help="for cdw algorithms: cdw or cdw_x_size"),
    estimator: Estimator = typer.Option("mean"),
    clip_norm: float = typer.Option(None, help="clip each delta to this L2 norm"),
    outlier_rule: OutlierRule = typer.Option("none"),
    kd_every: int = typer.Option(1, min=1),
    kd_epochs: int = typer.Option(1, min=1),
    kd_lr: float = typer.Option(5e-4),
    kd_max_batches: int = typer.Option(None, min=1),
    kd_max_seconds: float = typer.Option(None),
    dp_noise: float = typer.Option(
        None, min=0, help="differential privacy at the sites: noise multiplier sigma"
    ),
    dp_clip: float = typer.Option(1.0, help="with --dp-noise: clip each site's delta to this L2 norm"),
    seed: int = typer.Option(0),
    fraction: float = typer.Option(1.0, min=0.001, max=1.0, help="fraction of the sites sampled per round"),
    sites_per_round: int = typer.Option(
        None, min=1, help="sites sampled per round (a seeded draw each round)"
    ),
    quorum: int = typer.Option(1, min=1, help="site results a round needs to close (else the run stops)"),
    groups: int = typer.Option(2, min=2, help="with --algorithm cluster: groups of sites, one model each"),
    cluster_after: int = typer.Option(
        1, min=1, help="with --algorithm cluster: rounds of one global model before the sites are grouped"
    ),
    ditto: float = typer.Option(
        None,
        min=0.0,
        help="Ditto: each site also trains a personal model pulled towards the global one with this "
        "lambda, scored as its own model (docs/algorithms.md)",
    ),
    executor: str = typer.Option(
        "local", help="where the sites run: local (this process) or ray (a local Ray instance or a cluster)"
    ),
    ray_address: str = typer.Option(
        None, help="with --executor ray: 'auto' or HOST:PORT of a running cluster (default: start one here)"
    ),
    site_cpus: float = typer.Option(1.0, min=0.01, help="with --executor ray: CPUs per site job"),
    site_gpus: float = typer.Option(
        0.0, min=0.0, help="with --executor ray: GPUs per site job (0.25: four sites per GPU)"
    ),
    threads: int = typer.Option(
        None, min=1, help="torch threads per site (equal threads give bit-identical results on any executor)"
    ),
    device: str = typer.Option("auto", callback=device_option),
    fresh: bool = typer.Option(False, help="discard a previous run in --out instead of resuming it"),
) -> None:
    """Run a whole federation in one process, or its sites on Ray (resumes an interrupted run in --out)."""
    from cloud.executors import ExecutorConfig, ExecutorUnavailable
    from cloud.metrics_log import read_metrics
    from cloud.plots import plot_rounds
    from cloud.simulate import CHECKPOINT, METRICS, MODEL, RoundFailed, SimulationConfig, Simulator
    from cloud.strategy import KDConfig, StrategyConfig
    from cloud.strategy.clustering import ClusterConfig
    from protocol.broker import BrokerError
    from reid.data import DatasetLayoutError, InputSpec, read_dataset
    from reid.model import ModelError, ModelSpec
    from reid.privacy import DPConfig
    from reid.synthetic import SyntheticConfig, cached_federation
    from reid.train import TrainConfig

    if ditto is not None and algorithm in ("local", "central"):
        raise typer.BadParameter(
            f"personalises a federation's sites, not {algorithm} training", param_hint="--ditto"
        )
    if ditto is not None and transport == "mqtt":
        raise typer.BadParameter("personal models are simulated with --transport none", param_hint="--ditto")
    if fresh and out_dir.exists():
        for name in (CHECKPOINT, METRICS, MODEL):
            (out_dir / name).unlink(missing_ok=True)
    if sites_dir is None:
        synthetic = SyntheticConfig(
            seed=seed,
            sites=synthetic_sites,
            train_images_max=synthetic_images,
            height=max(height, 32),
            width=max(width, 16),
        )
        try:
            federation = cached_federation(synthetic, out_dir / "federation")
        except FileExistsError as err:
            raise typer.BadParameter(str(err), param_hint="--out") from None
        sites_dir, public_dir = federation / "sites", public_dir or federation / "public"
    config = SimulationConfig(
        algorithm=algorithm,
        rounds=rounds,
        local_epochs=local_epochs,
        eval_every=eval_every,
        seed=seed,
        model=ModelSpec(arch=arch),
        input=InputSpec(height=height, width=width),
        train=TrainConfig(batch_size=batch_size, lr_head=lr_head, lr_backbone=lr_backbone, device=device),
        strategy=StrategyConfig(
            bn=bn, weighting=weighting, estimator=estimator, clip_norm=clip_norm, outlier_rule=outlier_rule
        ),
        kd=KDConfig(
            every=kd_every, epochs=kd_epochs, lr=kd_lr, max_batches=kd_max_batches, max_seconds=kd_max_seconds
        ),
        dp=DPConfig(enabled=bool(dp_noise), noise_multiplier=dp_noise or 1.0, clip_norm=dp_clip),
        pretrained=str(pretrained) if pretrained else None,
        fraction=fraction,
        sites_per_round=sites_per_round,
        quorum=quorum,
        cluster=ClusterConfig(groups=groups, after=cluster_after),
        ditto=ditto,
    )
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"unknown executor {executor!r}: local or ray", param_hint="--executor")
    if executor == "local" and (site_cpus != 1.0 or site_gpus or ray_address):  # (they were ignored)
        raise typer.BadParameter("--site-cpus, --site-gpus and --ray-address go with --executor ray")
    placement = ExecutorConfig(
        kind=executor,  # type: ignore[arg-type]
        ray_address=ray_address,
        site_cpus=site_cpus,
        site_gpus=site_gpus,
        threads=threads,
    )
    sites = _site_dirs(sites_dir)
    if transport == "mqtt" and (fraction < 1 or sites_per_round):
        raise typer.BadParameter("client sampling is for --transport none (serve has its own: fraction)")
    if transport == "mqtt" and executor != "local":
        raise typer.BadParameter("--executor is for --transport none (agents are processes of their own)")
    try:
        if transport == "mqtt":
            metrics_path = _simulate_mqtt(config, sites, public_dir, out_dir, fresh)
        else:
            if placement.kind == "local" or ray_address is None:  # (the sites' folders are here to read)
                for site in sites:  # a broken one is said now, not dropped at its first job of every round
                    read_dataset(site)
            with progress_bar(transient=False) as bar:
                task = bar.add_task(f"{algorithm}: rounds", total=rounds)
                sim = Simulator(
                    config,
                    sites,
                    out_dir,
                    public_dir,
                    on_round=lambda r, _: bar.update(task, completed=r + 1),
                    executor=placement,
                )
                sim.try_resume()
                bar.update(task, completed=sim.completed)
                sim.run()
            metrics_path = out_dir / METRICS
    except (ValueError, DatasetLayoutError, ModelError, BrokerError) as err:
        raise typer.BadParameter(str(err)) from None
    except (ExecutorUnavailable, RoundFailed) as err:
        out.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    records = read_metrics(metrics_path)
    plot = plot_rounds(
        records, out_dir / "rounds.png", f"{algorithm} ({transport}), {len(sites)} sites, {arch}"
    )
    out.print(
        metrics_table(
            f"{algorithm} after {rounds} rounds ({metrics_path}, plot {plot})", _final_rows(records)
        )
    )


def _simulate_mqtt(
    config: SimulationConfig, sites: list[Path], public: Path | None, out_dir: Path, fresh: bool
) -> Path:
    """The same study as a real federation: broker, aggregator and one agent process per site."""
    from cloud.config import ServeConfig
    from cloud.local_federation import run_local_federation
    from cloud.strategy import AdmissionConfig
    from reid.data import read_dataset

    if config.algorithm in ("local", "central"):
        raise ValueError(f"--transport mqtt runs a federation, not {config.algorithm}")
    if fresh:
        shutil.rmtree(out_dir / "cloud", ignore_errors=True)
        shutil.rmtree(out_dir / "edge", ignore_errors=True)
    t = config.train
    serve = ServeConfig(
        federation="simulation",
        state_dir=out_dir / "cloud",
        rounds=config.rounds,
        min_sites=len(sites),
        deadline_s=3600,
        seed=config.seed,
        model=config.model,
        input=config.input,
        pretrained=config.pretrained,
        local_epochs=config.local_epochs,
        batch_size=t.batch_size,
        lr_head=t.lr_head,
        lr_backbone=t.lr_backbone,
        strategy=config.effective_strategy(),
        kd=config.kd,
        kd_enabled=config.uses_kd,
        public=public,
        eval_every=config.eval_every,
        cluster=config.cluster if config.algorithm == "cluster" else None,
        # these sites are the user's own folders: their sizes are known, so the admission caps scale
        # with them (a large honest site is not clipped to the median one's step)
        admission=AdmissionConfig(site_samples={p.name: len(read_dataset(p).train) for p in sites}),
    )
    return run_local_federation(serve, sites, out_dir, device=config.train.device)


@app.command()
def serve(
    config: Path = typer.Option(None, "--config", help="cloud.toml; flags override its keys"),
    federation: str = typer.Option(None),
    broker: str = typer.Option(None, help="auto (a private local mosquitto) or mqtt(s)://host:port"),
    identity_dir: Path = typer.Option(None, help="the provisioned aggregator folder (mutual TLS)"),
    state_dir: Path = typer.Option(None, help="checkpoints, journal and metrics"),
    rounds: int = typer.Option(None, min=1),
    device: str = typer.Option(None, callback=device_option, help="where KD runs (default auto)"),
    min_sites: int = typer.Option(None, min=1),
    fraction: float = typer.Option(None),
    deadline: float = typer.Option(None, help="seconds of collection per round"),
    quorum: int = typer.Option(None, min=1),
    arch: str = typer.Option(None, help="model.arch"),
    height: int = typer.Option(None, help="input.height"),
    width: int = typer.Option(None, help="input.width"),
    local_epochs: int = typer.Option(None, min=1),
    batch_size: int = typer.Option(None, min=2, help="the sites' training batch size"),
    lr_head: float = typer.Option(None, help="the sites' classifier learning rate (default 0.02)"),
    lr_backbone: float = typer.Option(
        None, help="the sites' backbone learning rate (default 0.02; the paper's 0.005 with --pretrained)"
    ),
    pretrained: str = typer.Option(None, help="initial backbone: local ImageNet weights or a model file"),
    bn: str = typer.Option(None, help="strategy.bn: first, average or local"),
    weighting: str = typer.Option(None, help="strategy.weighting: fedpav, cdw or cdw_x_size"),
    kd: bool = typer.Option(None, "--kd/--no-kd"),
    public: Path = typer.Option(None, help="public unlabeled images for KD"),
    groups: int = typer.Option(
        None, min=2, help="client clustering (cluster.groups): groups of sites, each with its own model"
    ),
    cluster_after: int = typer.Option(
        None, min=1, help="cluster.after: rounds of one global model before the sites are grouped"
    ),
    upload_encoding: str = typer.Option(None, help="fp32, fp16 or int8"),
    metrics_port: int = typer.Option(
        None, min=0, max=65535, help="serve the dashboard page and Prometheus /metrics on this port"
    ),
    metrics_host: str = typer.Option(None, help="listen address of --metrics-port (default 127.0.0.1)"),
) -> None:
    """Run the federation's rounds (resumes from --state-dir after a stop or a crash)."""
    from cloud.config import ServeConfig
    from cloud.journal import StateDirError
    from cloud.provision import aggregator_broker
    from cloud.server import Aggregator
    from protocol.broker import BrokerError

    overrides = {
        "federation": federation,
        "broker": broker,
        "identity_dir": identity_dir,
        "state_dir": state_dir,
        "rounds": rounds,
        "min_sites": min_sites,
        "fraction": fraction,
        "deadline_s": deadline,
        "quorum": quorum,
        "model.arch": arch,
        "input.height": height,
        "input.width": width,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "lr_head": lr_head,
        "lr_backbone": lr_backbone,
        "pretrained": pretrained,
        "strategy.bn": bn,
        "strategy.weighting": weighting,
        "kd_enabled": kd,
        "public": public,
        "cluster.groups": groups,
        "cluster.after": cluster_after,
        "upload_encoding": upload_encoding,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "device": device,
    }
    try:
        cfg = load_config(ServeConfig, config, overrides)
        with aggregator_broker(cfg.broker, cfg.identity_dir) as (url, which):
            if cfg.broker == "auto":  # (plain: a command to copy must not be wrapped or marked up)
                out.print(which, soft_wrap=True, markup=False, highlight=False)
            aggregator = Aggregator(cfg, url)
            signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
            aggregator.run()
    except (ConfigError, ValueError, BrokerError) as err:
        raise typer.BadParameter(str(err)) from None
    except (StateDirError, OSError) as err:
        out.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None


def _round_option(value: str) -> str:
    """--round: `latest` or a round number (-1: the initial model)."""
    if value != "latest" and not re.fullmatch(r"-1|\d{1,9}", value):
        raise typer.BadParameter(f"{value!r}: a round number or latest")
    return value


def _run_dir(state_dir: Path, federation: str) -> Path:
    root = state_dir / federation
    if not (root / "run.json").is_file():
        raise typer.BadParameter(f"no run in {root} (expected run.json)", param_hint="--state-dir")
    return root


@app.command()
def status(
    state_dir: Path = typer.Option(Path("state/cloud"), help="the aggregator's --state-dir"),
    federation: str = typer.Option("default"),
    broker: str = typer.Option(None, help="also show live site status from this broker (mqtt://...)"),
    identity_dir: Path = typer.Option(
        None,
        help="a provisioned identity folder for mqtts://: the operator's (the aggregator's would take over "
        "the running aggregator's session)",
    ),
) -> None:
    """Show the run: rounds done, the open round, who reported, and (with --broker) who is online and
    which deployed model each site serves."""
    from cloud.journal import Journal
    from cloud.observer import observe
    from protocol.broker import BrokerError

    root = _run_dir(state_dir, federation)
    journal = Journal(root, read_only=True)  # (a watcher: it must not move a damaged checkpoint aside)
    newest = journal.newest_round()
    done = newest if newest is not None else -1
    open_round = journal.open_round()
    evaluation = open_round is not None and not open_round.get("train", True)  # after the last round
    finished = evaluation and journal.has_summary("evaluation", done)
    if open_round and (open_round["round"] <= done or finished):
        open_round = None
    rows: list[dict[str, object]] = []
    if open_round:
        reported = {site for site, _ in journal.journaled_updates(open_round["round"])}
        answer = {s: "-" if evaluation else "yes" if s in reported else "no" for s in open_round["selected"]}
        rows = [{"site": s, "selected": "yes", "reported": answer[s]} for s in open_round["selected"]]
    if broker:
        try:
            live = observe(broker, federation, identity_dir)
        except (BrokerError, ValueError) as err:  # (ValueError: not a provisioned identity folder)
            fail(out, str(err))
        names = {str(r["site"]) for r in rows} | {n for n, (role, *_) in live.items() if role == "site"}
        by_site = {str(r["site"]): r for r in rows}
        rows = [
            {
                **by_site.get(n, {"site": n, "selected": "no", "reported": "-"}),
                "status": live.get(n, ("", "?", ""))[1],
                "serving": live.get(n, ("", "?", ""))[2] or "-",
            }
            for n in sorted(names)
        ]
        phase = live.get("aggregator", ("", "not connected"))[1]
        if "round" in live:
            phase += f"; {live['round'][1]}"
    elif open_round:
        phase = "evaluating" if evaluation else "collecting"
    elif journal.complete() is not None:
        phase = "run complete"
    else:
        phase = "between rounds"
    what = "evaluation round" if evaluation else "round"
    title = f"{federation}: {done + 1} rounds done; " + (
        f"{what} {open_round['round']} open ({phase})" if open_round else phase
    )
    out.print(title)
    if rows:
        out.print(metrics_table("sites", rows))


@app.command()
def report(
    state_dir: Path = typer.Option(Path("state/cloud"), help="the aggregator's --state-dir"),
    federation: str = typer.Option("default"),
    out_dir: Path = typer.Option(Path("report"), "--out", help="where to write report.md and rounds.png"),
) -> None:
    """Per-site rank-1/mAP per round and round timings, as a markdown table and a PNG plot."""
    from cloud.metrics_log import read_metrics
    from cloud.plots import markdown_report, plot_rounds

    root = _run_dir(state_dir, federation)
    metrics = root / "metrics.jsonl"
    if not metrics.is_file():
        raise typer.BadParameter(f"no metrics yet in {root}")
    records = read_metrics(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_report(records)
    (out_dir / "report.md").write_text(f"# {federation}\n\n![rounds](rounds.png)\n\n{table}")
    plot_rounds(records, out_dir / "rounds.png", federation)
    typer.echo(table)
    typer.echo(f"written: {out_dir / 'report.md'}, {out_dir / 'rounds.png'}")


@app.command("export")
def export_model(
    state_dir: Path = typer.Option(Path("state/cloud"), help="the aggregator's --state-dir"),
    federation: str = typer.Option("default"),
    round_: str = typer.Option("latest", "--round", help="a round number or latest", callback=_round_option),
    model_path: Path = typer.Option(
        None,
        "--model",
        help="instead of --state-dir: a model file or folder (edge-agent train, simulate or serve output)",
    ),
    images: Path = typer.Option(..., help="a folder of real images for the parity gate (32 are used)"),
    out_path: Path = typer.Option(Path("model.onnx"), "--out"),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 weights/activations, fp32 inputs and outputs"),
    int8_calibration: Path = typer.Option(
        None,
        "--int8-calibration",
        help="a site data set: int8 calibrated on its train crops, gated on its query/gallery retrieval",
    ),
    int8_max_drop: float = typer.Option(1.0, min=0, help="points of rank-1 and of mAP int8 may lose"),
    site_batchnorm: Path = typer.Option(
        None,
        "--site-batchnorm",
        help="with --site-data: that site's BatchNorm layers (its agent's private_bn.safetensors, or "
        "simulate's batchnorm/<site>.safetensors)",
    ),
    site_data: Path = typer.Option(
        None,
        "--site-data",
        help="for runs with bn local: a site's data set; export the model that site serves (BatchNorm "
        "statistics estimated on its training images, with its own layers given by --site-batchnorm)",
    ),
) -> None:
    """Export a global model to ONNX with its contract sidecar; fails unless ONNX Runtime matches PyTorch.

    With --int8-calibration the result is the int8 model (the fp32 one is kept as <out>.fp32.onnx).
    Calibration images should be a site's own: run this at the site, or use `edge-agent quantize`."""
    from cloud.deploy import DeployError, keeps_batchnorm_local, load_round
    from export.contract import contract_path
    from export.onnx_export import ExportError, export_onnx, parity_images
    from export.quantize import RetrievalBudget, quantize_int8
    from export.site_batchnorm import STATS_SUFFIX, VERSION_SUFFIX
    from reid.data import DatasetLayoutError, read_dataset, read_image_folder, statistics_loader
    from reid.model import ModelError
    from reid.train import adapt_to_site
    from reid.weights import GLOBAL_BATCHNORM_NOTE, load_checkpoint, read_site_batchnorm

    if fp16 and int8_calibration:
        raise typer.BadParameter("choose one of --fp16 and --int8-calibration")
    if site_batchnorm is not None and site_data is None:
        raise typer.BadParameter(
            "--site-batchnorm needs --site-data: the site's statistics are estimated on its images",
            param_hint="--site-batchnorm",
        )
    try:
        if model_path is not None:
            ckpt = load_checkpoint(model_path)
            model, input_spec = ckpt.model.eval(), ckpt.input_spec
            version = (
                f"{federation}/round-{ckpt.meta['round']}"
                if "round" in ckpt.meta
                else f"{ckpt.meta['site']}/own"  # a site's own model (edge-agent train)
                if "site" in ckpt.meta
                else model_path.stem
            )
            bn_local = ckpt.batchnorm_kept_local
        else:
            run_dir = _run_dir(state_dir, federation)
            r, model, input_spec = load_round(run_dir, "latest" if round_ == "latest" else int(round_))
            version, bn_local = f"{federation}/round-{r}", keeps_batchnorm_local(run_dir)
        if site_data is not None:  # the model that site serves (as its agent re-exports a deployment)
            if not bn_local:
                raise ModelError(
                    "--site-data is for runs with bn local: this model's BatchNorm layers are shared"
                )
            site_bn = read_site_batchnorm(site_batchnorm) if site_batchnorm is not None else None
            train = [r.path for r in read_dataset(site_data).train]
            if adapt_to_site(model, site_bn, statistics_loader(train, input_spec)) == 0:
                raise ExportError(f"{site_data}: no readable training image to estimate the statistics on")
            version += STATS_SUFFIX if site_bn is None else VERSION_SUFFIX
        elif bn_local:
            out.print(f"[yellow]note[/]: {GLOBAL_BATCHNORM_NOTE}")
        batch = parity_images(read_image_folder(images), input_spec)
    except (DeployError, DatasetLayoutError, ModelError, ExportError) as err:
        raise typer.BadParameter(str(err)) from None
    fp32_path = out_path.with_name(out_path.stem + ".fp32.onnx") if int8_calibration else out_path
    try:
        precision = "fp16" if fp16 else "fp32"
        contract, parity = export_onnx(
            model, input_spec, fp32_path, batch, version=version, precision=precision
        )
    except ExportError as err:
        raise typer.BadParameter(str(err)) from None
    out.print(
        f"{fp32_path} ({contract.precision}, {contract.exporter} exporter, opset {contract.opset}, "
        f"{version}): "
        f"parity on {parity.images} images min cosine {parity.min_cosine:.6f}, "
        f"max abs diff {parity.max_abs_diff:.2e}; contract {contract_path(fp32_path)}"
    )
    if int8_calibration:
        try:
            splits = read_dataset(int8_calibration)
            budget = RetrievalBudget(max_rank1_drop=int8_max_drop, max_map_drop=int8_max_drop)
            report = quantize_int8(fp32_path, splits, out_path, budget)
        except (DatasetLayoutError, ExportError) as err:
            fail(out, err)
        out.print(f"{out_path} (int8): accepted on {splits.root.name}: {report.describe()}")


@app.command()
def deploy(
    state_dir: Path = typer.Option(Path("state/cloud"), help="the aggregator's --state-dir"),
    federation: str = typer.Option("default"),
    round_: str = typer.Option("latest", "--round", help="a round number or latest", callback=_round_option),
    broker: str = typer.Option(..., help="the federation's broker (mqtt://host:port or mqtts://...)"),
    images: Path = typer.Option(..., help="a folder of real images for the parity gate (32 are used)"),
    fp16: bool = typer.Option(False, "--fp16", help="deploy the fp16 model (half the bytes)"),
    linger: float = typer.Option(
        0.0, min=0, help="then answer sites' requests for the model this long (a running serve always does)"
    ),
    identity_dir: Path = typer.Option(
        None,
        help="the provisioned aggregator folder (mqtts:// with signing); it takes over a running serve's "
        "session: deploy by hand while serve is stopped",
    ),
) -> None:
    """Export a round's global model and publish it for the sites to serve inference with."""
    from cloud.deploy import DeployError, DeploymentSource, deploy_round, record_scheduled, scheduled_round
    from cloud.observer import no_broker
    from protocol.mqtt import Endpoint
    from protocol.topics import Topics
    from reid.data import DatasetLayoutError, read_image_folder
    from reid.weights import round_checkpoints

    root = _run_dir(state_dir, federation)
    try:
        endpoint = Endpoint(
            broker, Topics(federation), "deployer", "aggregator", announce=False, identity_dir=identity_dir
        )
    except ValueError as err:  # a broker URL or an identity folder that is not one
        fail(out, str(err))
    source = DeploymentSource(endpoint, root)
    endpoint.start()
    source.start()
    try:
        if not endpoint.connected.wait(15):
            fail(out, no_broker(broker, identity_dir))
        manifest = deploy_round(
            endpoint,
            root,
            read_image_folder(images),
            "latest" if round_ == "latest" else int(round_),
            "fp16" if fp16 else "fp32",
        )
        # the operator decided what the sites serve as of the newest round: a restart of `serve` does not
        # redo a scheduled deployment of those rounds over it (also not one that failed before)
        record_scheduled(root, max(scheduled_round(root), round_checkpoints(root)[-1][0]))
        out.print(
            f"deployed {manifest.version} ({manifest.blob.encoding}, {manifest.blob.size / 1e6:.1f} MB, "
            f"sha256 {manifest.blob.sha256[:12]}) on {broker}"
        )
        if linger:
            out.print(f"answering the sites' requests for the model for {linger:.0f} s (Ctrl-C stops)")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait(linger)
    except (DeployError, DatasetLayoutError, OSError) as err:
        fail(out, err)
    finally:
        source.stop()
        endpoint.stop()


provision_app = typer.Typer(help="Trust material: CA, TLS certificates, ACL, signing keys.")
app.add_typer(provision_app, name="provision")


@provision_app.callback(invoke_without_command=True)
def provision(
    ctx: typer.Context,
    federation: str = typer.Option(None, help="the federation name"),
    sites: str = typer.Option(None, help="comma-separated site identities"),
    out_dir: Path = typer.Option(None, "--out", help="the folder to create"),
    broker_host: str = typer.Option("127.0.0.1", help="the broker's host name (in its certificate)"),
    port: int = typer.Option(8883, help="the broker's TLS port"),
) -> None:
    """Create a federation's CA, broker and per-identity certificates, signing keys, mosquitto config, ACL."""
    from cloud.provision import ProvisionError, Provisioning

    if ctx.invoked_subcommand is not None:
        return
    if not (federation and sites and out_dir):
        raise typer.BadParameter("--federation, --sites and --out are required")
    try:
        prov = Provisioning.create(out_dir, federation, [s for s in sites.split(",") if s], broker_host, port)
    except (ProvisionError, ValueError) as err:
        fail(out, err)
    out.print(
        f"provisioned {federation} in {out_dir}: CA, broker ({broker_host}:{port}), "
        f"aggregator, operator (read-only: `status --identity-dir`) and {len(prov.sites)} sites; give each "
        "node only its own folder"
    )
    out.print(f"broker: mosquitto -c {out_dir / 'broker' / 'mosquitto.conf'}")


@provision_app.command("add-site")
def provision_add_site(
    out_dir: Path = typer.Option(..., "--out", help="the provisioned folder"),
    site: str = typer.Option(..., help="the new site identity"),
) -> None:
    """Issue a certificate and signing key for a new site and add it to the ACL and every keyring."""
    from cloud.provision import ProvisionError, Provisioning

    try:
        Provisioning(out_dir).add_site(site)
    except (ProvisionError, ValueError) as err:
        fail(out, err)
    out.print(f"added {site}: give it {out_dir / site}; send SIGHUP to mosquitto and redistribute keys.json")


@provision_app.command("revoke-site")
def provision_revoke_site(
    out_dir: Path = typer.Option(..., "--out", help="the provisioned folder"),
    site: str = typer.Option(..., help="the site identity to revoke"),
) -> None:
    """Revoke a site: its certificate goes on the CRL, it leaves the ACL and every keyring."""
    from cloud.provision import ProvisionError, Provisioning

    try:
        Provisioning(out_dir).revoke_site(site)
    except (ProvisionError, ValueError) as err:
        fail(out, err)
    out.print(f"revoked {site}: send SIGHUP to mosquitto (re-reads ACL and CRL) and redistribute keys.json")


if __name__ == "__main__":
    app()
