"""`edge-agent`: the camera-site command line (federation agent, local training baseline, evaluation;
the inference commands live in `edge.inference_commands`)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from edge import inference_commands
from reid.choices import Arch
from reid.config import ConfigError, load_config
from reid.console import device_option, metrics_table, progress_bar
from reid.logs import configure_logging, log_context

if TYPE_CHECKING:
    import torch

    from reid.data import InputSpec
    from reid.site import SiteData

app = typer.Typer(help="FedReID Edge agent: runs at a camera site.", no_args_is_help=True)
out = Console()
log = logging.getLogger("edge")

DataOpt = typer.Option(..., "--data", help="the site's data set folder (any supported layout)")


@app.callback()
def main(log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR")) -> None:
    """FedReID Edge agent."""
    configure_logging(log_level)


def _site(
    data: Path, spec: InputSpec, batch_size: int, workers: int = 0, seed: int = 0, need_train: bool = True
) -> SiteData:
    from reid.data import DatasetLayoutError
    from reid.site import SiteData

    try:
        return SiteData(data, spec, batch_size, workers, seed, need_train)
    except DatasetLayoutError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None


def _device(name: str) -> torch.device:
    from reid.train import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as err:
        raise typer.BadParameter(str(err), param_hint="--device") from None


def _metric_row(stage: str, metrics, **extra: object) -> dict[str, object]:
    s = metrics.summary()
    return {
        "stage": stage,
        **extra,
        "rank-1": s.get("rank1", "-"),
        "rank-5": s.get("rank5", "-"),
        "mAP": s.get("mAP", "-"),
        "mINP": s.get("mINP", "-"),
        "queries": int(s["valid_queries"]),
    }


@app.command()
def train(
    data: Path = DataOpt,
    out_dir: Path = typer.Option(
        None, "--out", help="where to write model.safetensors (default state/<site>)"
    ),
    arch: Arch = typer.Option("resnet50", help="backbone"),
    pretrained: Path = typer.Option(
        None, help="local torchvision ImageNet weights (.pth/.safetensors) or a FedReID model file/folder"
    ),
    last_stride: int = typer.Option(2, min=1, max=2),
    height: int = typer.Option(256, min=16),
    width: int = typer.Option(128, min=16),
    epochs: int = typer.Option(1, min=1),
    batch_size: int = typer.Option(32, min=2),
    lr_head: float = typer.Option(0.02, help="the federation's default (serve, simulate); 0.05 in the paper"),
    lr_backbone: float = typer.Option(
        0.02, help="the federation's default; the paper's 0.005 suits ImageNet weights"
    ),
    eval_every: int = typer.Option(1, min=0, help="evaluate every N epochs (0: only at the end)"),
    device: str = typer.Option("auto", callback=device_option),
    workers: int = typer.Option(
        None, min=0, help="data loader worker processes (default: none on a CPU, up to 8 with CUDA)"
    ),
    seed: int = typer.Option(0),
) -> None:
    """Train a model on the site's data alone (the paper's "local training" baseline) and evaluate it."""
    from reid.data import InputSpec
    from reid.model import ModelError, ModelSpec, build_model
    from reid.train import TrainConfig, loader_workers, train_local
    from reid.weights import save_checkpoint

    dev = _device(device)
    workers = loader_workers(workers, dev)
    site = _site(data, InputSpec(height=height, width=width), batch_size, workers, seed)
    with log_context(site=site.name):
        config = TrainConfig(
            epochs=1,
            batch_size=batch_size,
            lr_head=lr_head,
            lr_backbone=lr_backbone,
            device=device,
            num_workers=workers,
            seed=seed,
        )
        try:
            model = build_model(ModelSpec(arch=arch, last_stride=last_stride), site.num_classes, pretrained)
        except ModelError as err:
            raise typer.BadParameter(str(err)) from None
        log.info(
            "%d training images, %d identities, %s on %s", site.num_train_images, site.num_classes, arch, dev
        )
        rows = [_metric_row("init", site.evaluate(model.to(dev), dev), epoch=0, loss="-", **{"img/s": "-"})]
        loader = site.train_loader()
        with progress_bar() as bar:
            task = bar.add_task("training", total=epochs * len(loader))
            for epoch in range(1, epochs + 1):
                result = train_local(model, loader, config, progress=lambda d, t: bar.update(task, advance=1))
                log.info(
                    "epoch %d: loss %.3f, %.1f images/s, %d corrupt images skipped",
                    epoch,
                    result.loss,
                    result.images_per_s,
                    result.skipped_images,
                )
                if (eval_every and epoch % eval_every == 0) or epoch == epochs:
                    metrics = site.evaluate(model, dev)
                    rows.append(
                        _metric_row(
                            "local",
                            metrics,
                            epoch=epoch,
                            loss=f"{result.loss:.3f}",
                            **{"img/s": round(result.images_per_s, 1)},
                        )
                    )
        target = out_dir or Path("state") / site.name
        path = save_checkpoint(
            target / "model.safetensors",
            model,
            site.input_spec,
            meta={"site": site.name, "epochs": str(epochs)},
        )
        out.print(metrics_table(f"Local training on {site.name} ({arch}, {height}x{width})", rows))
        log.info("model written to %s", path)


@app.command()
def evaluate(
    data: Path = DataOpt,
    model_path: Path = typer.Option(
        None, "--model", help="a model file or folder (edge-agent train, simulate or serve output)"
    ),
    arch: Arch = typer.Option("resnet50", help="backbone, when no --model is given"),
    pretrained: Path = typer.Option(
        None, help="local torchvision ImageNet weights, when no --model is given"
    ),
    height: int = typer.Option(256, min=16, help="input height, when no --model is given"),
    width: int = typer.Option(128, min=16, help="input width, when no --model is given"),
    batch_size: int = typer.Option(64, min=1),
    flip: bool = typer.Option(True, help="sum the features of the image and its mirror"),
    device: str = typer.Option("auto", callback=device_option),
    site_batchnorm: Path = typer.Option(
        None,
        "--site-batchnorm",
        help="with --model of a run with bn local: this site's BatchNorm layers (private_bn.safetensors, "
        "or simulate's batchnorm/<site>.safetensors)",
    ),
) -> None:
    """Print rank-1/5, mAP and mINP of a model on the site's query/gallery (Market-1501 protocol).

    A model of a run with bn local is scored as this site serves it: with its BatchNorm layers
    (--site-batchnorm; else the global ones), their statistics estimated on its training images."""
    from reid.data import DatasetLayoutError, InputSpec
    from reid.model import ModelError, ModelSpec, build_model
    from reid.train import adapt_to_site
    from reid.weights import load_checkpoint, read_site_batchnorm

    site_bn, bn_local = None, False
    try:
        if model_path is not None:
            ckpt = load_checkpoint(model_path)
            model, spec = ckpt.model, ckpt.input_spec
            if site_batchnorm is not None:
                site_bn = read_site_batchnorm(site_batchnorm)
            bn_local = site_bn is not None or ckpt.batchnorm_kept_local
        elif site_batchnorm is not None:
            raise typer.BadParameter("--site-batchnorm goes with --model", param_hint="--site-batchnorm")
        else:
            model = build_model(ModelSpec(arch=arch), 1, pretrained)
            spec = InputSpec(height=height, width=width)
            if pretrained is None:
                log.warning("no --model and no --pretrained: evaluating a randomly initialised network")
    except ModelError as err:
        raise typer.BadParameter(str(err)) from None
    dev = _device(device)
    site = _site(data, spec, batch_size, need_train=bn_local)  # (statistics: training images)
    with log_context(site=site.name):
        if bn_local:  # the model this site serves (as its deployments)
            try:
                seen = adapt_to_site(model, site_bn, site.statistics_loader(), dev)
            except ModelError as err:
                raise typer.BadParameter(str(err), param_hint="--site-batchnorm") from None
            log.info(
                "%s BatchNorm layers, statistics estimated on %d of its training images",
                "this site's" if site_bn is not None else "no --site-batchnorm: the global",
                seen,
            )
        try:
            metrics = site.evaluate(model.to(dev), dev, flip=flip)
        except DatasetLayoutError as err:
            raise typer.BadParameter(str(err), param_hint="--data") from None
        name = model_path.name if model_path else f"{arch} ({'pretrained' if pretrained else 'random init'})"
        out.print(metrics_table(f"{site.name}: {name}", [_metric_row("evaluate", metrics)]))


@app.command()
def start(
    config: Path = typer.Option(None, "--config", help="edge.toml; flags override its keys"),
    site: str = typer.Option(None, help="this site's id (A-Z a-z 0-9 _ . -)"),
    data: Path = typer.Option(None, help="the site's data set folder"),
    federation: str = typer.Option(None),
    broker: str = typer.Option(None, help="mqtt://host:port or mqtts://host:port"),
    identity_dir: Path = typer.Option(None, help="this site's provisioned folder (mutual TLS with mqtts://)"),
    state_dir: Path = typer.Option(None, help="classifier, progress and models of this site"),
    device: str = typer.Option(None, help="auto (CUDA when present), cpu, cuda", callback=device_option),
    workers: int = typer.Option(None, min=0),
    exit_when_done: bool = typer.Option(None, "--exit-when-done/--keep-running"),
    local_epochs: int = typer.Option(None, min=1, help="override the aggregator's local epochs"),
    evaluate: str = typer.Option(None, help="round (when the aggregator asks), always or never"),
    upload_encoding: str = typer.Option(None, help="override the delta encoding: fp32, fp16 or int8"),
    compress: bool = typer.Option(None, "--compress/--no-compress", help="zstd on the delta blob"),
    metrics_port: int = typer.Option(None, min=0, max=65535, help="serve Prometheus /metrics on this port"),
    serve_port: int = typer.Option(
        None, min=0, max=65535, help="also serve features of the deployed model here (docs/serving.md)"
    ),
) -> None:
    """Join the federation: train on local data when a round selects this site, upload deltas."""
    from edge.agent import Agent, AgentConfig, StateDirInUse
    from edge.agent_metrics import MetricsPortError
    from reid.train import DeviceError

    overrides = {
        "site": site,
        "data": data,
        "federation": federation,
        "broker": broker,
        "identity_dir": identity_dir,
        "state_dir": state_dir,
        "device": device,
        "workers": workers,
        "exit_when_done": exit_when_done,
        "local_epochs": local_epochs,
        "evaluate": evaluate,
        "upload_encoding": upload_encoding,
        "upload_compressed": compress,
        "serve_features.port": serve_port,
        "metrics_port": metrics_port,
    }
    try:
        cfg = load_config(AgentConfig, config, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    with log_context(site=cfg.site):
        try:
            agent = Agent(cfg)
        except DeviceError as err:
            raise typer.BadParameter(str(err), param_hint="device") from None
        except StateDirInUse as err:
            raise typer.BadParameter(str(err), param_hint="--state-dir") from None
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        try:
            agent.run()
        except MetricsPortError as err:
            raise typer.BadParameter(str(err), param_hint="--metrics-port") from None


app.command()(inference_commands.extract)
app.command()(inference_commands.search)
app.command()(inference_commands.quantize)
app.command("build-engine")(inference_commands.build_engine)
app.command("serve-features")(inference_commands.serve_features)


if __name__ == "__main__":
    app()
