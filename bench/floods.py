"""Benchmark: how long the aggregator takes to handle an honest message while a site floods it.

    .venv/bin/python bench/floods.py [--seconds 8] [--probes 40]

A real aggregator (ResNet-18 at 128x64: a 45 MB global model) runs a round on a private mosquitto.
One honest site sends probes: a status document with a new counter, timed from its publish until the
aggregator has recorded it (the same message thread handles every topic). Each probe is measured with no
flood, then during each flood from a second client, in its own process, publishing `--rate` messages
per second (QoS 0; about what a site's 10 Mbit/s uplink carries in small messages; above the rate at
which the aggregator's MQTT client reads messages, any subscriber falls behind at the broker, which
mosquitto cannot rate-limit: see docs/security.md):

* ``status``: valid status documents of another site;
* ``global/resend``: requests for every chunk of the global model, each with a new forged requester;
* ``deploy/resend``: the same on the deployment topic;
* ``manifests``: update manifests of a selected site claiming a 50 GB blob (each one rejected).

Prints the median and 95th-percentile probe latency per case, the ratio to the quiet case, and the
global-model bytes the aggregator published during each flood. Writes bench/results/floods.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import ServeConfig
from cloud.server import Aggregator
from protocol.broker import LocalBroker, parse_url
from protocol.chunks import blob_ref
from protocol.messages import UpdateManifest, encode_message
from protocol.topics import Topics
from reid.data import InputSpec
from reid.model import ModelSpec


def _client(url: str, name: str) -> paho.Client:
    host, port, _ = parse_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
    client.max_queued_messages_set(1000)
    client.connect(host, port)
    client.loop_start()
    return client


def _status(site: str, counter: int) -> bytes:
    doc = {"schema_version": 1, "kind": "status", "node": site, "role": "site", "state": "online"}
    return json.dumps({**doc, "time": 0, "round": counter}).encode()


def pour(url: str, topic: str, payloads: list[bytes], rate: float, stop, sent) -> None:
    """The attacker, in its own process (so that it competes for the broker and the CPU, not for the
    aggregator's interpreter lock): publishes `payloads` round-robin at QoS 0, `rate` per second."""
    client = _client(url, f"attacker-{os.getpid()}")
    n, start = 0, time.monotonic()
    while not stop.is_set():
        client.publish(topic, payloads[n % len(payloads)], qos=0)
        n += 1
        if n % 100 == 0:
            sent.value = n
            time.sleep(max(0.0005, start + n / rate - time.monotonic()))
    sent.value = n
    client.loop_stop()
    client.disconnect()


def probe_latencies(
    agg: Aggregator, client: paho.Client, topics: Topics, probes: int, first: int
) -> list[float]:
    out = []
    for i in range(first, first + probes):
        start = time.perf_counter()
        client.publish(topics.status("a"), _status("a", i), qos=1)
        while agg.online.get("a", ("", None))[1] != i:
            time.sleep(0.0005)
        out.append(time.perf_counter() - start)
        time.sleep(0.02)
    return out


def run(seconds: float, probes: int, rate: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        topics = Topics("floods")
        cfg = ServeConfig(
            federation="floods",
            state_dir=Path(tmp),
            rounds=1,
            min_sites=2,
            deadline_s=3600,
            model=ModelSpec(arch="resnet18"),
            input=InputSpec(height=128, width=64),
        )
        agg = Aggregator(cfg, broker.url)
        thread = threading.Thread(target=agg.run, daemon=True)
        thread.start()
        honest = _client(broker.url, "honest")
        honest.publish(topics.status("b"), _status("b", 0), qos=1, retain=True)
        honest.publish(topics.status("a"), _status("a", 0), qos=1, retain=True)
        while agg.current is None:
            time.sleep(0.05)
        cur = agg.current
        published = {"bytes": 0}
        spy = _client(broker.url, "spy")
        spy.on_message = lambda c, u, m: published.__setitem__("bytes", published["bytes"] + len(m.payload))
        spy.subscribe(topics.global_chunks, qos=0)
        time.sleep(1.0)
        every = list(range(cur.blob_ref.chunks))

        request = {"schema_version": 1, "kind": "resend", "blob_id": cur.blob_ref.blob_id, "indices": every}
        forged = [json.dumps({**request, "requester": f"forged-{i}"}).encode() for i in range(1000)]

        huge = blob_ref(b"x" * 4096, 1024).model_copy(update={"size": 50 << 30, "chunks": 51_200})
        manifest = encode_message(
            UpdateManifest(site="b", round=0, base_hash=cur.base_hash, blob=huge, n_samples=1, cdw=0.5,
                           loss=1.0, train_seconds=1.0)
        )  # fmt: skip
        floods: dict[str, tuple[str, list[bytes]] | None] = {
            "quiet": None,
            "status": (topics.status("b"), [_status("b", i) for i in range(1000)]),
            "global/resend": (topics.global_resend, forged),
            "deploy/resend": (topics.deploy_resend, forged),
            "manifests": (topics.site("b", "update"), [manifest]),
        }
        results: dict[str, dict] = {}
        counter = 1
        spawn = mp.get_context("spawn")
        for name, flood in floods.items():
            stop, sent = spawn.Event(), spawn.Value("q", 0)
            before = published["bytes"]
            pourer = None
            if flood is not None:
                args = (broker.url, *flood, rate, stop, sent)
                pourer = spawn.Process(target=pour, args=args, daemon=True)
                pourer.start()
                time.sleep(1.5)  # the attacker process is up and pouring
            start = time.monotonic()
            lat = probe_latencies(agg, honest, topics, probes, counter)
            counter += probes
            while time.monotonic() - start < seconds and flood is not None:
                time.sleep(0.1)
            stop.set()
            if pourer is not None:
                pourer.join(timeout=30)
            elapsed = time.monotonic() - start
            time.sleep(2.5)  # let a resend in flight finish before the next case
            results[name] = {
                "flood_messages": sent.value,
                "flood_seconds": elapsed,
                "median_ms": 1000 * statistics.median(lat),
                "p95_ms": 1000 * sorted(lat)[int(0.95 * (len(lat) - 1))],
                "global_mb_published": (published["bytes"] - before) / 1e6,
            }
        agg.stop()
        thread.join(timeout=30)
        for c in (honest, spy):
            c.loop_stop()
            c.disconnect()
    quiet = results["quiet"]
    for row in results.values():
        row["median_ratio"] = row["median_ms"] / quiet["median_ms"]
        row["p95_ratio"] = row["p95_ms"] / quiet["p95_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each flood")
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--rate", type=float, default=2000, help="flood messages per second")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "floods.json")
    args = parser.parse_args()
    results = run(args.seconds, args.probes, args.rate)
    for name, row in results.items():
        rate = row["flood_messages"] / row["flood_seconds"] if row["flood_messages"] else 0
        print(
            f"{name:14s} flood {row['flood_messages']:6d} msgs ({rate:7.0f}/s): honest message handled in "
            f"median {row['median_ms']:.1f} ms ({row['median_ratio']:.2f}x quiet), "
            f"p95 {row['p95_ms']:.1f} ms ({row['p95_ratio']:.2f}x); "
            f"global model published {row['global_mb_published']:.0f} MB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
