"""Benchmark: how long the aggregator takes to handle an honest message while a site floods it.

    .venv/bin/python bench/floods.py [--seconds 8] [--probes 40]

A real aggregator (ResNet-18 at 128x64: a 45 MB global model) runs a round on a private mosquitto.
One honest site sends probes: a status document with a new counter, timed from its publish until the
aggregator has recorded it (the same message thread handles every topic). Each probe is measured with no
flood, then during each flood from a second client publishing as fast as it can (QoS 0):

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
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud.server import Aggregator, ServeConfig
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


def run(seconds: float, probes: int) -> dict:
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

        def forged_request(i: int) -> bytes:
            doc = {"schema_version": 1, "kind": "resend", "blob_id": cur.blob_ref.blob_id, "indices": every}
            return json.dumps({**doc, "requester": f"forged-{i}"}).encode()

        huge = blob_ref(b"x" * 4096, 1024).model_copy(update={"size": 50 << 30, "chunks": 51_200})
        manifest = encode_message(
            UpdateManifest(site="b", round=0, base_hash=cur.base_hash, blob=huge, n_samples=1, cdw=0.5,
                           loss=1.0, train_seconds=1.0)
        )  # fmt: skip
        floods: dict[str, tuple[str, Callable[[int], bytes]] | None] = {
            "quiet": None,
            "status": (topics.status("b"), lambda i: _status("b", i)),
            "global/resend": (topics.global_resend, forged_request),
            "deploy/resend": (topics.deploy_resend, forged_request),
            "manifests": (topics.site("b", "update"), lambda i: manifest),
        }
        results: dict[str, dict] = {}
        counter = 1
        for name, flood in floods.items():
            stop = threading.Event()
            sent = {"n": 0}
            attacker = _client(broker.url, f"attacker-{name.replace('/', '-')}")

            def pour(flood=flood, stop=stop, sent=sent, attacker=attacker) -> None:
                while flood is not None and not stop.is_set():
                    topic, make = flood
                    attacker.publish(topic, make(sent["n"]), qos=0)
                    sent["n"] += 1
                    if sent["n"] % 200 == 0:
                        time.sleep(0.001)  # let paho's network thread drain its queue

            before = published["bytes"]
            pourer = threading.Thread(target=pour, daemon=True)
            pourer.start()
            start = time.monotonic()
            time.sleep(0.5 if flood else 0)
            lat = probe_latencies(agg, honest, topics, probes, counter)
            counter += probes
            while time.monotonic() - start < seconds and flood is not None:
                time.sleep(0.1)
            stop.set()
            pourer.join()
            elapsed = time.monotonic() - start
            attacker.loop_stop()
            attacker.disconnect()
            time.sleep(2.5)  # let a resend in flight finish before the next case
            results[name] = {
                "flood_messages": sent["n"],
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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "floods.json")
    args = parser.parse_args()
    results = run(args.seconds, args.probes)
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
