"""`cloud-aggregator`: the cloud command line (synthetic federations for now)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from reid.console import metrics_table, progress_bar
from reid.logs import configure_logging
from reid.synthetic import SyntheticConfig, generate_federation, total_images

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
    train_images_max: int = typer.Option(1200, help="training images of the largest site"),
    size_ratio: float = typer.Option(20.0, help="largest / smallest site, in training images"),
    public_images: int = typer.Option(400, help="unlabeled images for server-side KD"),
    height: int = typer.Option(256, min=32),
    width: int = typer.Option(128, min=16),
) -> None:
    """Write a synthetic non-IID federation (Market-1501 layout per site + a public KD set)."""
    cfg = SyntheticConfig(
        seed=seed,
        sites=sites,
        train_images_max=train_images_max,
        size_ratio=size_ratio,
        public_images=public_images,
        height=height,
        width=width,
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
