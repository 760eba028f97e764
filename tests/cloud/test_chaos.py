"""Chaos: a seeded schedule kills (SIGKILL or SIGTERM) the aggregator, the broker and the agents at
random moments of a 10-round federation on mosquitto, and restarts them. The run must finish with
rounds strictly increasing, every acknowledged update aggregated exactly once, no stall longer than the
deadline rule allows, and a bounded state dir."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud.local_federation import agent_command
from protocol.broker import LocalBroker, free_port, parse_url

ROUNDS = 10
DEADLINE_S = 12.0
EXTENSIONS = 1
RESTART_SLACK_S = 40.0  # a killed process comes back after <= 3 s and needs ~10 s to import torch


def _summaries(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "round"]


class AckRecorder:
    """Every ack the aggregator publishes (subscribing again after each broker restart)."""

    def __init__(self, url: str) -> None:
        host, port, _ = parse_url(url)
        self.messages: list[bytes] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="chaos-acks")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("fedreid/v1/chaos/sites/+/ack", qos=1)
        self.client.on_message = lambda c, u, m: self.messages.append(bytes(m.payload))
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect(host, port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Proc:
    """A restartable child process with its log."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name, self.command, self.log = name, command, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop with `sig`; a SIGTERM must end the process on its own within 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} ignored signal {sig}") from None


def test_chaos_kills_at_random_moments_never_stall_the_federation(tiny_federation, tmp_path, mosquitto_url):
    del mosquitto_url  # the fixture makes sure mosquitto exists (CI: fail, not skip); we run our own
    rng = random.Random(12)
    port = free_port()
    broker = LocalBroker(port=port, workdir=tmp_path)
    broker.start()
    url = broker.url
    sites = sorted((tiny_federation / "sites").iterdir())[1:]  # the two small sites
    state = tmp_path / "cloud"
    config = tmp_path / "cloud.toml"
    config.write_text(
        f'federation = "chaos"\nbroker = "{url}"\nstate_dir = "{state}"\n'
        f"rounds = {ROUNDS}\nmin_sites = 2\nquorum = 1\ndeadline_s = {DEADLINE_S}\n"
        f"max_extensions = {EXTENSIONS}\ntransfer_idle_s = 1.0\nkeep_checkpoints = 2\n"
        "batch_size = 16\nlr_head = 0.02\nlr_backbone = 0.02\n"
        '[model]\narch = "resnet18"\n[input]\nheight = 64\nwidth = 32\n'
    )
    aggregator = Proc(
        "aggregator",
        [sys.executable, "-m", "cloud.cli", "serve", "--config", str(config)],
        tmp_path / "aggregator.log",
    )
    agents = [
        Proc(
            s.name,
            agent_command(s, url, "chaos", tmp_path / "edge", device="cpu"),
            tmp_path / f"{s.name}.log",
        )
        for s in sites
    ]
    children = [aggregator, *agents]
    for child in children:
        child.start()
    recorder = AckRecorder(url)
    metrics = state / "chaos" / "metrics.jsonl"
    seen_at: dict[int, float] = {}
    kills: list[str] = []
    started = time.monotonic()
    next_kill = started + rng.uniform(3, 8)
    stall_bound = DEADLINE_S * (EXTENSIONS + 1) + RESTART_SLACK_S
    last_progress = started
    try:
        while len(_summaries(metrics)) < ROUNDS:
            now = time.monotonic()
            for summary in _summaries(metrics):
                if summary["round"] not in seen_at:
                    seen_at[summary["round"]] = now
                    last_progress = now
            assert now - last_progress < stall_bound * 2, f"stalled; kills so far: {kills}"
            if aggregator.proc.poll() not in (None, 0):
                raise AssertionError(f"the aggregator died by itself: {aggregator.log.read_text()[-2000:]}")
            if now >= next_kill:
                victim = rng.choice(["aggregator", "broker", *[a.name for a in agents]])
                kills.append(victim)
                if victim == "broker":
                    broker.stop()
                    time.sleep(rng.uniform(0.2, 2.0))
                    broker = LocalBroker(port=port, workdir=tmp_path)
                    broker.start()
                else:
                    child = next(c for c in children if c.name == victim)
                    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                    kills[-1] += "/TERM" if sig == signal.SIGTERM else ""
                    child.kill(sig)
                    time.sleep(rng.uniform(0.2, 2.0))
                    child.start()
                next_kill = time.monotonic() + rng.uniform(3, 8)
            time.sleep(0.2)
        for summary in _summaries(metrics):
            seen_at.setdefault(summary["round"], time.monotonic())
        assert aggregator.proc.wait(timeout=60) == 0
        recorder.stop()
    finally:
        for child in children:
            child.kill()
        broker.stop()
    summaries = _summaries(metrics)
    assert [s["round"] for s in summaries] == list(range(ROUNDS))  # each round once, in order
    assert len(kills) >= 8, kills
    assert {"aggregator", "broker"} <= {k.split("/")[0] for k in kills}, kills
    assert any(k.endswith("/TERM") for k in kills), kills
    times = [started, *(seen_at[r] for r in range(ROUNDS))]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"kills: {kills}; seconds between rounds: {[round(g, 1) for g in gaps]}")
    assert max(gaps) < stall_bound, (gaps, kills)
    by_round = {s["round"]: s for s in summaries}
    acked = {
        (doc["site"], doc["round"]) for doc in (json.loads(p) for p in recorder.messages) if doc["accepted"]
    }
    for site, r in acked:  # acknowledged = aggregated, and each update counted once
        assert site in by_round[r]["accepted"], (site, r)
    assert all(len(s["accepted"]) == len(set(s["accepted"])) >= 1 for s in summaries)
    run_dir = state / "chaos"
    checkpoint = max(p.stat().st_size for p in run_dir.glob("rounds/*/global.safetensors"))
    assert sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) < 4 * checkpoint
    assert not list(run_dir.glob("rounds/*/updates"))
