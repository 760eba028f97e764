"""Benchmark: bytes on the wire per site per round for each delta encoding, the round wall time of a
real 3-agent federation on loopback split into compute, aggregation, KD and the rest (transfer + idle),
and the aggregator's peak memory with 2, 4 and 8 sites.

    .venv/bin/python bench/round.py [--rounds 3] [--skip-federation] [--skip-memory] [--memory-sites 2 4 8]
        [--scraped]

Bytes: a real delta (one local epoch of training on a synthetic site) of the ResNet-18 and ResNet-50
shared states, encoded as fp32 / fp16 / int8 / int8+zstd and framed as 1 MB chunk messages plus the
manifest, i.e. exactly what a site publishes. Round split: `cloud-aggregator simulate --transport mqtt`
settings of `make demo` (3 agent processes, ResNet-18, 128x64, fp16 uploads); round 0 is excluded
(agent start-up). Overhead = round wall time - (slowest site's load + evaluate + train + encode) -
aggregation - KD. With `--scraped`, the same federation runs again with the aggregator's metrics port
on and GET /metrics, the dashboard page and its JSON each requested once a second (issue: the
dashboard must not slow a round; target: within 1 point of the overhead without it).

Memory: `cloud-aggregator serve` as its own process (ResNet-50 at 64x32, fp16 uploads, 2 rounds) with K
real agents on tiny synthetic sites; its resident set is sampled every 20 ms from /proc. Growth = the
peak (VmHWM) minus the resident set when round 0 is announced (model, global state and buffers built),
in units of the fp32 shared state. Writes bench/results/round.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import torch
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import ServeConfig
from cloud.local_federation import agent_command, run_local_federation
from protocol.broker import LocalBroker, free_port, parse_url
from protocol.chunks import split_blob
from protocol.codec import encode_state
from protocol.topics import Topics
from reid.data import InputSpec
from reid.model import ModelSpec, build_model, shared_state
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig, train_local

ENCODINGS = [("fp32", False), ("fp16", False), ("int8", False), ("int8", True)]
MANIFEST_BYTES = 700  # an UpdateManifest is about this size


def wire_bytes(blob: bytes) -> int:
    return sum(len(m) for m in split_blob(blob, "ab" * 16)) + MANIFEST_BYTES


def delta_sizes(arch: str, site_dir: Path, spec: InputSpec) -> dict[str, float]:
    torch.manual_seed(0)
    site = SiteData(site_dir, spec, batch_size=32)
    model = build_model(ModelSpec(arch=arch), site.num_classes)
    base = shared_state(model)
    train_local(model, site.train_loader(), TrainConfig(epochs=1, lr_head=0.02, lr_backbone=0.02))
    trained = shared_state(model)
    delta = {k: (trained[k] - base[k]).numpy() for k in base}
    return {
        f"{enc}{'+zstd' if z else ''}": wire_bytes(encode_state(delta, enc, compress=z)) / 1e6
        for enc, z in ENCODINGS
    }


class Scraper:
    """What Prometheus and an open dashboard do: GET /metrics, the page and its JSON once a second."""

    def __init__(self, port: int) -> None:
        self.url, self.stop, self.count = f"http://127.0.0.1:{port}", threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for path in ("/metrics", "/", "/api/v1/federation"):
                try:
                    httpx.get(self.url + path, timeout=5)
                    self.count += 1
                except httpx.HTTPError:
                    pass  # (before the aggregator serves, after it stops)


def federation_split(rounds: int, workdir: Path, scraped: bool = False) -> list[dict]:
    """Round timings of a 3-agent federation; with `scraped`, with the metrics port on and scraped."""
    fed = workdir / "federation"
    if not fed.is_dir():
        generate_federation(SyntheticConfig(sites=3, train_images_max=800, height=128, width=64), fed)
    port = free_port()
    scraper = Scraper(port) if scraped else None
    cfg = ServeConfig(
        federation="bench",
        state_dir=workdir / ("scraped" if scraped else "plain") / "cloud",
        rounds=rounds,
        min_sites=3,
        deadline_s=3600,
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=128, width=64),
        lr_head=0.02,
        lr_backbone=0.02,
        upload_encoding="fp16",
        metrics_port=port if scraped else None,
    )
    metrics = run_local_federation(
        cfg, sorted((fed / "sites").iterdir()), workdir / ("scraped" if scraped else "plain")
    )
    if scraper is not None:
        scraper.stop.set()
        print(f"(scraped {scraper.count} times)")
    rows = []
    for rec in map(json.loads, metrics.read_text().splitlines()):
        if rec.get("kind") != "round" or rec["round"] == 0:
            continue
        compute = max(sum(v for k, v in t.items() if k != "fetch") for t in rec["site_timings"].values())
        kd = rec.get("kd", {}).get("seconds", 0.0)
        overhead = rec["round_seconds"] - compute - rec["aggregate_seconds"] - kd
        rows.append(
            {
                "round": rec["round"],
                "wall_s": rec["round_seconds"],
                "slowest_compute_s": compute,
                "aggregate_s": rec["aggregate_seconds"],
                "kd_s": kd,
                "overhead_s": overhead,
                "overhead_pct": 100 * overhead / rec["round_seconds"],
                "fetch_s": {s: t["fetch"] for s, t in rec["site_timings"].items()},
                "upload_mb": {s: b / 1e6 for s, b in rec["upload_bytes"].items()},
            }
        )
    return rows


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def aggregator_memory(k: int, workdir: Path, arch: str = "resnet50") -> dict:
    """Peak resident memory of a `serve` process over a 2-round run with `k` real agents."""
    fed = workdir / f"k{k}"
    generate_federation(
        SyntheticConfig(sites=k, train_images_max=64, size_ratio=1, public_images=0, height=64, width=32),
        fed,
    )
    state_mb = sum(v.numel() * 4 for v in shared_state(build_model(ModelSpec(arch=arch), 2)).values()) / 1e6
    with LocalBroker() as broker:
        started = threading.Event()
        host, port, _ = parse_url(broker.url)
        watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{k}")
        watcher.on_message = lambda c, u, m: m.payload and started.set()  # (empty: the topic cleared)
        watcher.connect(host, port)
        watcher.subscribe(Topics("bench").round, qos=1)
        watcher.loop_start()
        serve = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "serve", "--federation", "bench", "--broker", broker.url,
             "--state-dir", str(fed / "cloud"), "--rounds", "2", "--min-sites", str(k), "--deadline", "600",
             "--arch", arch, "--height", "64", "--width", "32", "--upload-encoding", "fp16"],
            stdout=subprocess.DEVNULL, stderr=open(fed / "serve.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        agents = [
            subprocess.Popen(
                agent_command(site, broker.url, "bench", fed / "edge", "cpu"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for site in sorted((fed / "sites").iterdir())
        ]
        baseline = peak = 0
        try:
            while serve.poll() is None:
                try:
                    if not baseline and started.is_set():
                        baseline = _proc_kib(serve.pid, "VmRSS")
                    peak = _proc_kib(serve.pid, "VmHWM")
                except (OSError, KeyError):
                    break
                time.sleep(0.02)
            serve.wait(timeout=600)
        finally:
            for proc in agents:
                proc.terminate()
                proc.wait(timeout=30)
            watcher.loop_stop()
    if serve.returncode != 0 or not baseline:
        raise RuntimeError(f"serve failed (exit {serve.returncode}); see {fed / 'serve.log'}")
    growth_mb = (peak - baseline) * 1024 / 1e6
    return {
        "sites": k,
        "state_mb": state_mb,
        "baseline_mb": baseline * 1024 / 1e6,
        "peak_mb": peak * 1024 / 1e6,
        "growth_mb": growth_mb,
        "growth_states": growth_mb / state_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--scraped", action="store_true", help="also run the federation with its metrics and page scraped 1/s"
    )
    parser.add_argument("--memory-sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round.json")
    args = parser.parse_args()
    result: dict = {"benchmark": "round"}
    with tempfile.TemporaryDirectory() as tmp:
        generate_federation(
            SyntheticConfig(sites=1, train_images_max=128, public_images=0, height=64, width=32),
            Path(tmp) / "one",
        )
        site = Path(tmp) / "one" / "sites" / "site00"
        result["wire_mb"] = {
            arch: delta_sizes(arch, site, InputSpec(height=64, width=32)) for arch in ("resnet18", "resnet50")
        }
        for arch, sizes in result["wire_mb"].items():
            print(
                f"{arch}: "
                + ", ".join(f"{k} {v:.2f} MB ({sizes['fp32'] / v:.1f}x)" for k, v in sizes.items())
            )
        if not args.skip_federation:
            rows = federation_split(args.rounds, Path(tmp) / "fed")
            result["rounds"] = rows
            for row in rows:
                print(
                    f"round {row['round']}: wall {row['wall_s']:.1f} s = slowest compute "
                    f"{row['slowest_compute_s']:.1f} + aggregation {row['aggregate_s']:.2f} "
                    f"+ KD {row['kd_s']:.1f} + rest {row['overhead_s']:.2f} s ({row['overhead_pct']:.1f} %)"
                )
            result["median_overhead_pct"] = statistics.median(r["overhead_pct"] for r in rows)
            print(f"median overhead beyond compute: {result['median_overhead_pct']:.1f} %")
            if args.scraped:
                rows = federation_split(args.rounds, Path(tmp) / "fed", scraped=True)
                result["scraped_rounds"] = rows
                result["scraped_median_overhead_pct"] = statistics.median(r["overhead_pct"] for r in rows)
                print(
                    f"with /metrics, the page and its JSON scraped once a second: median overhead "
                    f"{result['scraped_median_overhead_pct']:.1f} % "
                    f"(without: {result['median_overhead_pct']:.1f} %)"
                )
        if not args.skip_memory:
            result["memory"] = []
            for k in args.memory_sites:
                row = aggregator_memory(k, Path(tmp) / "memory")
                result["memory"].append(row)
                print(
                    f"aggregator with {k} sites: RSS {row['baseline_mb']:.0f} MB at round 0, peak "
                    f"{row['peak_mb']:.0f} MB: +{row['growth_mb']:.0f} MB = {row['growth_states']:.2f} x the "
                    f"fp32 shared state ({row['state_mb']:.0f} MB)"
                )
            first = result["memory"][0]
            for row in result["memory"][1:]:
                ratio = row["growth_mb"] / first["growth_mb"]
                print(f"peak growth, {row['sites']} vs {first['sites']} sites: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
