"""Watching a real 2-site federation on mosquitto: the aggregator's Prometheus series, scraped over HTTP
and parsed as the exposition format, move as the rounds do; the dashboard page, rendered by headless
Chromium during the run, shows both sites with their state and plots their evaluations; an agent's own
/metrics follows its training and uploads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from cloud.config import ServeConfig
from cloud.local_federation import agent_command
from cloud.server import Aggregator
from protocol.broker import free_port, parse_url
from protocol.messages import BlobRef, UpdateManifest, encode_message
from protocol.topics import Topics
from tests.cloud.test_federation import TINY, _wait
from tests.conftest import missing

FED = "watched"
ROUNDS = 3
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@dataclass
class Watched:
    agg: Aggregator
    thread: threading.Thread
    sites: list[str]
    agent_metrics: str
    scrapes: list[tuple[Samples, dict]] = field(default_factory=list)  # (series, view) while it ran


@pytest.fixture(scope="module")
def watched(tiny_federation, tmp_path_factory, mosquitto_url) -> Iterator[Watched]:
    tmp = tmp_path_factory.mktemp("watched")
    sites = sorted((tiny_federation / "sites").iterdir())[:2]
    cfg = ServeConfig(
        federation=FED, state_dir=tmp / "cloud", rounds=ROUNDS, min_sites=2, metrics_port=0, **TINY
    )
    agent_port = free_port()
    procs = []
    for i, site in enumerate(sites):
        extra = ["--metrics-port", str(agent_port)] if i == 0 else []
        with open(tmp / f"{site.name}.log", "wb") as log:
            command = [*agent_command(site, mosquitto_url, FED, tmp / "edge"), *extra]
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    agg = Aggregator(cfg, mosquitto_url)
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    run = Watched(agg, thread, [s.name for s in sites], f"http://127.0.0.1:{agent_port}")

    def poll() -> None:  # what a Prometheus server and an open page see, every 0.3 s
        while thread.is_alive():
            try:
                if agg.metrics_url:
                    series = scrape(agg.metrics_url)
                    view = httpx.get(f"{agg.metrics_url}/api/v1/federation", timeout=10).json()
                    run.scrapes.append((series, view))
            except httpx.HTTPError:
                pass  # (the server stops with the run)
            time.sleep(0.3)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:  # one refused update while round 0 is open (a future round, on site 0's topic)
        assert _wait(lambda: agg.current is not None, 120)
        _publish(mosquitto_url, Topics(FED).site(run.sites[0], "update"), _future_manifest(run.sites[0]))
        yield run
    finally:
        agg.stop()
        thread.join(timeout=60)
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)


def _future_manifest(site: str) -> bytes:
    blob = BlobRef(blob_id="ab" * 16, size=10, sha256="0" * 64, chunks=1)
    m = UpdateManifest(
        site=site, round=77, base_hash="0" * 64, blob=blob, n_samples=1, cdw=0, loss=0, train_seconds=0
    )
    return encode_message(m)


def _publish(url: str, topic: str, payload: bytes) -> None:
    host, port, _ = parse_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def test_the_dashboard_in_a_real_browser_shows_both_sites_and_plots_points(watched, tmp_path):
    browser = _browser()
    if browser is None:
        missing("headless Chromium not found (make setup installs chromium-headless-shell as root)")
    agg = watched.agg

    def evaluated_and_running() -> bool:  # round 1 open: round 0's manifests brought evaluations
        v = agg.view()
        return v["run"]["round"] is not None and v["run"]["round"] >= 1 and len(v["history"]["metrics"]) >= 2

    assert _wait(evaluated_and_running, 300), agg.view()
    url = f"{agg.metrics_url}/"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    shot = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"
    out = tmp_path / "dashboard.png"
    subprocess.run(
        [*common, "--window-size=1280,900", f"--screenshot={out}", url], capture_output=True, timeout=120
    )
    assert thread_alive(watched), "the run ended before the page was read"
    for site in watched.sites:
        assert f'<tr data-site="{site}" data-state="' in dom, dom[:3000]
    states = {
        site: dom.split(f'<tr data-site="{site}" data-state="')[1].split('"')[0] for site in watched.sites
    }
    assert all(s in ("online", "training", "uploading", "idle") for s in states.values()), states
    assert dom.count('class="point"') >= 2, "the rank-1 plot has no points"
    assert "phase: collecting" in dom or "phase: aggregating" in dom
    assert out.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("FEDREID_UPDATE_SCREENSHOT"):  # docs/operations.md shows it
        shot.parent.mkdir(exist_ok=True)
        shutil.copy(out, shot)


def thread_alive(run: Watched) -> bool:
    return run.thread.is_alive()


def test_metrics_move_as_the_rounds_do(watched):
    agg, sites = watched.agg, watched.sites

    # the agent's own series while it works (scraped before its process exits with the run)
    agent: list[Samples] = []
    while watched.thread.is_alive():
        with contextlib.suppress(httpx.HTTPError):
            agent.append(scrape(watched.agent_metrics))
        time.sleep(0.3)
    watched.thread.join()
    assert agg.phase == "done"

    scrapes = watched.scrapes
    assert len(scrapes) > 10
    seen_phases = {
        p
        for s, _ in scrapes
        for p in ("collecting", "aggregating", "evaluating")
        if value(s, "fedreid_round_phase", phase=p) == 1
    }
    assert {"collecting", "evaluating"} <= seen_phases, seen_phases
    completed = [value(s, "fedreid_rounds_completed_total") for s, _ in scrapes]
    assert completed == sorted(completed) and completed[0] == 0 and completed[-1] >= ROUNDS - 1
    for site in sites:  # each site seen training at some point, and as online
        states = {
            st
            for s, _ in scrapes
            for st in ("training", "online", "uploading")
            if value(s, "fedreid_site_state", site=site, state=st) == 1
        }
        assert "training" in states or "uploading" in states, (site, states)

    # at the end (the registry the endpoint served): every round counted, bytes = the summaries' bytes
    final = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in agg.metrics.registry.collect()
        for s in family.samples
    }
    assert len(agg.history.rounds) == ROUNDS
    assert value(final, "fedreid_rounds_completed_total") == ROUNDS
    assert value(final, "fedreid_round_seconds_count") == ROUNDS
    assert value(final, "fedreid_round_phase", phase="done") == 1
    records = [json.loads(line) for line in (agg.journal.root / "metrics.jsonl").read_text().splitlines()]
    for site in sites:
        assert value(final, "fedreid_updates_accepted_total", site=site) == ROUNDS
        sent = sum(r["upload_bytes"][site] for r in records if r.get("kind") == "round")
        assert value(final, "fedreid_received_bytes_total", site=site) == sent
        rank1 = value(final, "fedreid_site_rank1_ratio", site=site)  # the final evaluation
        final_eval = [r for r in records if r.get("site") == site and r.get("round") == ROUNDS - 1]
        assert rank1 is not None and rank1 == pytest.approx(final_eval[-1]["rank1"] / 100)
        assert value(final, "fedreid_site_last_update_round", site=site) == ROUNDS - 1
    assert value(final, "fedreid_updates_rejected_total", site=sites[0], reason="no_round") == 1
    assert any("future round 77" in r["reason"] for r in agg.view()["rejections"])

    # the agent: it trained, uploaded what the aggregator received from it, and ended waiting
    assert agent, "the agent's /metrics never answered"
    last = agent[-1]
    assert value(last, "fedreid_agent_rounds_total") == ROUNDS
    assert value(last, "fedreid_agent_last_round") == ROUNDS - 1
    sent = sum(r["upload_bytes"][sites[0]] for r in records if r.get("kind") == "round")
    assert value(last, "fedreid_agent_upload_bytes_total") >= sent
    assert value(last, "fedreid_agent_train_images_per_second") > 0
    assert any(value(s, "fedreid_agent_phase", phase="training") == 1 for s in agent)
