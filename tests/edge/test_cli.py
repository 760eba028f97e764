"""`edge-agent train` and `edge-agent evaluate` end to end on a tiny synthetic site."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time

from typer.testing import CliRunner

from cloud.config import ServeConfig
from cloud.local_federation import agent_command
from cloud.server import Aggregator
from edge.cli import app
from reid.files import hold_lock
from tests.cloud.test_federation import TINY

runner = CliRunner()


def _map_values(output: str) -> list[str]:
    """The mAP column of the printed tables (rank-1, rank-5, mAP, mINP, queries are the last columns)."""
    rows = [line for line in output.splitlines() if re.search(r"│\s*\d+\s*│\s*$", line)]
    return [re.findall(r"[\d.]+", row)[-3] for row in rows]


def test_train_then_evaluate_reports_the_same_model(tiny_federation, tmp_path):
    site = tiny_federation / "sites" / "site01"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(site),
            "--arch",
            "resnet18",
            "--height",
            "64",
            "--width",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path),
            "--eval-every",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rank-1" in result.output and "Local training on site01" in result.output
    trained = _map_values(result.output)
    assert len(trained) == 3  # init + 2 epochs
    ckpt = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["evaluate", "--data", str(site), "--model", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert _map_values(result.output) == trained[-1:]
    # a camera site's evaluation set without training images (it was: "train split not found")
    held_out = tmp_path / "held_out"
    for split in ("query", "bounding_box_test"):
        shutil.copytree(site / split, held_out / split)
    result = runner.invoke(app, ["evaluate", "--data", str(held_out), "--model", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert _map_values(result.output) == trained[-1:]


def test_bad_data_folder_is_a_clear_error(tmp_path):
    # (a short path: the error panel wraps at 80 columns, and a long tmp_path would be cut across lines)
    result = runner.invoke(app, ["evaluate", "--data", "nowhere", "--arch", "resnet18"])
    assert result.exit_code != 0
    assert "not found" in result.output and "nowhere" in result.output
    result = runner.invoke(
        app, ["evaluate", "--data", str(tmp_path), "--model", str(tmp_path / "m.safetensors")]
    )
    assert result.exit_code != 0
    assert "model not found" in result.output


def test_a_taken_metrics_port_is_a_clear_error(tiny_federation, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["start", "--site", "s1", "--data", str(tiny_federation / "sites" / "site00")]
        args += ["--state-dir", str(tmp_path), "--broker", "mqtt://127.0.0.1:1", "--metrics-port", str(port)]
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in " ".join(result.output.replace("│", " ").split())


def test_a_device_that_does_not_exist_or_is_not_here_is_a_clear_error(tiny_federation, tmp_path):
    import torch

    site = str(tiny_federation / "sites" / "site00")

    def said(result) -> str:
        assert result.exit_code == 2, result.output
        return " ".join(result.output.replace("│", " ").split())

    assert "unknown device 'tpu': auto, cpu, cuda or cuda:N" in said(
        runner.invoke(app, ["train", "--data", site, "--device", "tpu"])
    )
    config = tmp_path / "edge.toml"
    config.write_text(f'site = "s1"\ndata = "{site}"\ndevice = "tpu"\n')
    text = said(runner.invoke(app, ["start", "--config", str(config), "--state-dir", str(tmp_path)]))
    joined = "".join(text.split())  # (the panel wraps the long path anywhere)
    assert "edge.toml:device" in joined and "unknowndevice'tpu'" in joined  # the file and the key
    if not torch.cuda.is_available():
        args = ["evaluate", "--data", site, "--arch", "resnet18", "--device", "cuda"]
        text = said(runner.invoke(app, args))
        assert "device 'cuda' requested but this machine has no CUDA" in text


def test_an_identity_folder_that_is_not_one_is_named_at_start(tiny_federation, tmp_path):
    site = str(tiny_federation / "sites" / "site00")
    config = tmp_path / "edge.toml"
    (tmp_path / "id").mkdir()
    (tmp_path / "id" / "ca.crt").write_text("x")
    cases = ((tmp_path / "nope", "identity folder not found"), (tmp_path / "id", "no client.crt"))
    for folder, said in cases:
        config.write_text(f'site = "s1"\ndata = "{site}"\nidentity_dir = "{folder}"\n')
        result = runner.invoke(app, ["start", "--config", str(config), "--state-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output
        text = "".join(result.output.replace("│", " ").split())  # (the panel wraps long paths)
        assert "identity_dir" in text and said.replace(" ", "") in text


def test_a_data_folder_of_no_known_layout_is_an_error_at_start_not_when_selected(tmp_path):
    (tmp_path / "crops" / "x").mkdir(parents=True)
    args = ["start", "--site", "s1", "--data", str(tmp_path / "crops"), "--state-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "unknown data set layout" in " ".join(result.output.replace("│", " ").split())
    (tmp_path / "crops" / "bounding_box_train").mkdir()  # a Market layout with no image in it
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no images in" in " ".join(result.output.replace("│", " ").split())


def test_a_site_id_that_cannot_go_on_the_wire_is_refused_at_start(tiny_federation, tmp_path):
    site = str(tiny_federation / "sites" / "site00")
    result = runner.invoke(
        app, ["start", "--site", "Märkt 1501", "--data", site, "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output  # (was a traceback from the topic builder)
    assert "site: String should match pattern" in " ".join(result.output.replace("│", " ").split())


def test_a_second_agent_on_one_state_folder_is_refused(tiny_federation, tmp_path):
    """Two agents on one site's folder both trained and uploaded each round and broke each other's model
    installs: the second process now stops at once with one line (the lock dies with its holder)."""
    site = str(tiny_federation / "sites" / "site00")
    command = [sys.executable, "-m", "edge.cli", "start", "--site", "s1", "--data", site]
    command += ["--state-dir", str(tmp_path), "--broker", "mqtt://127.0.0.1:1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (tmp_path / "s1" / "agent.lock").exists():  # (it is held before the agent connects)
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            time.sleep(0.1)
        time.sleep(0.5)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is in use by another edge-agent of site s1" in " ".join(
            second.stderr.replace("│", " ").split()
        )
    finally:
        first.terminate()
        first.wait(timeout=30)
    assert hold_lock(tmp_path / "s1" / "agent.lock") is not None  # the first one's lock went with it


def test_a_sigterm_while_training_ends_the_agent_cleanly(tiny_federation, tmp_path, mosquitto_url):
    """SIGTERM (systemd, docker stop) while the site trains: the training stops at its next batch and the
    agent exits 0. It waited 1 s for the trainer and left with torch still running in it: the process
    aborted ("terminate called without an active exception", exit 134) (2026-12-05 chaos audit)."""
    cfg = ServeConfig(
        federation="term", state_dir=tmp_path / "cloud", rounds=1, min_sites=1, deadline_s=600, **TINY
    )
    cfg = cfg.model_copy(update={"local_epochs": 200})  # (minutes of training: it is stopped long before)
    agg = Aggregator(cfg, mosquitto_url)
    thread = threading.Thread(target=agg.run, daemon=True)
    site = tiny_federation / "sites" / "site00"
    command = agent_command(site, mosquitto_url, "term", tmp_path / "edge", "cpu")
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        thread.start()
        deadline = time.monotonic() + 120
        while agg.online.get("site00", ("",))[0] != "training" and time.monotonic() < deadline:
            assert agent.poll() is None
            time.sleep(0.2)
        time.sleep(3)  # (into the epochs)
        agent.terminate()
        out, _ = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agg.stop()
        thread.join(timeout=30)
    assert agent.returncode == 0, out[-2000:]
    assert "training of round 0 stopped" in out
