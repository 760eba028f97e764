"""Rich progress bars, result tables and option checks shared by the edge and cloud command lines."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer import BadParameter

console = Console(stderr=True)


def device_option(value: str | None) -> str | None:
    """A `--device` flag's callback: an unknown device name is a one-line usage error."""
    from reid.train import DeviceError, check_device_name

    try:
        return value if value is None else check_device_name(value)
    except DeviceError as err:
        raise BadParameter(str(err)) from None


def progress_bar(transient: bool = True) -> Progress:
    """A progress bar on stderr (stdout stays clean for tables and pipes)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def metrics_table(title: str, rows: Iterable[Mapping[str, object]]) -> Table:
    """A table whose columns are the keys of the first row; floats are printed with one decimal. Cells
    are plain text (no markup: a value may be a peer's text)."""
    rows = list(rows)
    table = Table(title=title)
    if not rows:
        return table
    for key in rows[0]:
        table.add_column(str(key), justify="left" if key in {"site", "model", "stage"} else "right")
    for row in rows:
        table.add_row(*(Text(f"{v:.1f}" if isinstance(v, float) else str(v)) for v in row.values()))
    return table


def fail(out: Console, error: Exception | str) -> None:
    """Print one error line (literally: no markup, no wrapping) and exit the command with status 1."""
    import typer

    out.print(f"error: {error}", style="red", markup=False, soft_wrap=True, highlight=False)
    raise typer.Exit(1)
