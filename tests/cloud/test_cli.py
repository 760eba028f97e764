"""`cloud-aggregator synthesize` writes a readable federation and refuses to overwrite one."""

from __future__ import annotations

from typer.testing import CliRunner

from cloud.cli import app
from reid.data import read_dataset

runner = CliRunner()


def test_synthesize_writes_sites_and_refuses_a_non_empty_folder(tmp_path):
    args = [
        "synthesize",
        "--out",
        str(tmp_path / "fed"),
        "--sites",
        "2",
        "--train-images-max",
        "64",
        "--size-ratio",
        "2",
        "--public-images",
        "8",
        "--height",
        "64",
        "--width",
        "32",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "site00" in result.output and "site01" in result.output
    assert len(read_dataset(tmp_path / "fed" / "sites" / "site01").train) >= 16
    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert "not empty" in again.output


def test_the_command_lines_start_without_torch():
    """`--help` and argument errors answer at once: importing the CLIs loads no torch, numpy or ONNX
    Runtime (each command imports what it needs when it runs)."""
    import subprocess
    import sys

    heavy = ("torch", "torchvision", "numpy", "onnxruntime", "paho")
    code = f"import sys, cloud.cli, edge.cli; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
