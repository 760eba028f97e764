"""A real multi-process federation on one machine (`cloud-aggregator simulate --transport mqtt`).

A private broker (mosquitto), the aggregator in this process, and one `edge-agent start` subprocess per
site, talking MQTT exactly as they would across a network. Agent logs go to `<out>/agents/<site>.log`.
After the run, `<out>/model.safetensors` is the final global model and `<out>/batchnorm/<site>.safetensors`
the BatchNorm layers each site kept (under bn=local): the files `simulate --transport none` writes, so
`evaluate`, `export --model --site-batchnorm` take either run's folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from cloud.config import ServeConfig
from cloud.server import Aggregator
from protocol.broker import auto_broker
from reid.files import atomic_write
from reid.weights import find_model

log = logging.getLogger(__name__)


def agent_command(
    site_dir: Path, broker_url: str, federation: str, state_dir: Path, device: str = "auto"
) -> list[str]:
    """The `edge-agent start` command line of one site, exiting when the run ends."""
    return [
        sys.executable,
        "-m",
        "edge.cli",
        "start",
        "--site",
        site_dir.name,
        "--data",
        str(site_dir),
        "--federation",
        federation,
        "--broker",
        broker_url,
        "--state-dir",
        str(state_dir),
        "--device",
        device,
        "--exit-when-done",
    ]


def run_local_federation(
    cfg: ServeConfig, site_dirs: list[Path], out: Path, device: str = "auto", broker_url: str | None = None
) -> Path:
    """Run every round; returns the aggregator's metrics file. Agents are stopped whatever happens.

    Without `broker_url`, a private broker is started for the run (mosquitto, else embedded amqtt).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "agents").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = broker_url or stack.enter_context(auto_broker()).url
        procs: list[tuple[str, subprocess.Popen]] = []
        try:
            for site_dir in site_dirs:
                logfile = open(out / "agents" / f"{site_dir.name}.log", "wb")  # noqa: SIM115 (owned by the child)
                cmd = agent_command(site_dir, url, cfg.federation, out / "edge", device)
                procs.append((site_dir.name, subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)))
            log.info("broker %s, %d edge agents started", url, len(procs))
            Aggregator(cfg.model_copy(update={"broker": url}), url).run()
            _write_outputs(cfg, site_dirs, out)
            for name, proc in procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    log.warning("agent %s did not exit after the run; stopping it", name)
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return cfg.state_dir / cfg.federation / "metrics.jsonl"


def _write_outputs(cfg: ServeConfig, site_dirs: list[Path], out: Path) -> None:
    """The final global model and the sites' kept BatchNorm layers, where `simulate` puts them."""
    atomic_write(out / "model.safetensors", find_model(cfg.state_dir / cfg.federation).read_bytes())
    shutil.rmtree(out / "batchnorm", ignore_errors=True)
    for site in site_dirs:
        kept = out / "edge" / site.name / "private_bn.safetensors"  # (the agents' state dir: out / "edge")
        if kept.is_file():
            atomic_write(out / "batchnorm" / f"{site.name}.safetensors", kept.read_bytes())
