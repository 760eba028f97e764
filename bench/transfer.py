"""Benchmark: broadcasting a model blob to 3 receivers through mosquitto on loopback, ours vs. bare paho.

    .venv/bin/python bench/transfer.py [--mb 100] [--receivers 3] [--repeats 3]

``ours``: `protocol.mqtt.Endpoint.publish_blob` (1 MB chunks with a JSON header and per-chunk sha256) to
receivers that parse, hash-check and reassemble every chunk and verify the whole-blob sha256.
``bare``: the same bytes as 1 MB QoS 1 paho messages carrying a 4-byte index, written into a preallocated
buffer, no checks. Receivers are separate processes; the time runs from the first publish to the last
receiver holding the complete blob. Also reports each receiver's peak RSS growth over its idle RSS.
Prints the ratios and writes bench/results/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import struct
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from protocol.broker import LocalBroker, parse_url
from protocol.chunks import Reassembler, parse_chunk
from protocol.mqtt import Endpoint
from protocol.topics import Topics

CHUNK = 1 << 20


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def receive_ours(url: str, name: str, ready, done) -> None:
    topics = Topics("bench")
    state: dict = {}

    def on_chunk(topic: str, payload: bytes) -> None:
        header, data = parse_chunk(payload)
        if "r" not in state:
            state["r"] = Reassembler(header, spool_bytes=1 << 40)
        state["r"].add(header, data)
        if state["r"].complete:
            state["r"].result()  # whole-blob sha256
            done.put((name, time.time(), _rss_mb() - state["base"]))

    endpoint = Endpoint(url, topics, name, "site", {topics.global_chunks: on_chunk}, announce=False).start()
    time.sleep(0.3)
    state["base"] = _rss_mb()
    ready.put(name)
    time.sleep(600)
    endpoint.stop()


def receive_bare(url: str, name: str, size: int, ready, done) -> None:
    host, port, _ = parse_url(url)
    count = -(-size // CHUNK)
    buffer = bytearray(size)
    got = set()
    base = _rss_mb()

    def on_message(client, userdata, msg) -> None:
        (index,) = struct.unpack(">I", msg.payload[:4])
        buffer[index * CHUNK : index * CHUNK + len(msg.payload) - 4] = msg.payload[4:]
        got.add(index)
        if len(got) == count:
            done.put((name, time.time(), _rss_mb() - base))

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
    client.on_message = on_message
    client.connect(host, port)
    client.subscribe("bench/bare", qos=1)
    client.loop_start()
    time.sleep(0.3)
    ready.put(name)
    time.sleep(600)


def send_ours(url: str, blob: bytes) -> None:
    endpoint = Endpoint(url, Topics("bench"), "sender", "aggregator", announce=False).start()
    endpoint.publish_blob(endpoint.topics.global_chunks, blob, "ab" * 16, CHUNK)
    endpoint.stop()


def send_bare(url: str, blob: bytes) -> None:
    host, port, _ = parse_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare-sender")
    client.max_inflight_messages_set(20)
    client.connect(host, port)
    client.loop_start()
    view = memoryview(blob)
    infos = [
        client.publish("bench/bare", struct.pack(">I", i) + bytes(view[i * CHUNK : (i + 1) * CHUNK]), qos=1)
        for i in range(-(-len(blob) // CHUNK))
    ]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def run(mode: str, url: str, blob: bytes, receivers: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    procs = []
    for i in range(receivers):
        args = (
            (url, f"{mode}-r{i}", ready, done)
            if mode == "ours"
            else (url, f"{mode}-r{i}", len(blob), ready, done)
        )
        p = ctx.Process(target=receive_ours if mode == "ours" else receive_bare, args=args, daemon=True)
        p.start()
        procs.append(p)
    for _ in procs:
        ready.get(timeout=60)
    start = time.time()
    (send_ours if mode == "ours" else send_bare)(url, blob)
    results = [done.get(timeout=300) for _ in procs]
    for p in procs:
        p.terminate()
    return max(r[1] for r in results) - start, max(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer.json")
    args = parser.parse_args()
    blob = os.urandom(args.mb << 20)
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
    with LocalBroker() as broker:
        for r in range(args.repeats):
            for mode in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                results[mode].append(run(mode, broker.url, blob, args.receivers))
                seconds, rss = results[mode][-1]
                print(
                    f"{mode}: {seconds:.2f} s to {args.receivers} receivers "
                    f"({args.mb / seconds:.0f} MB/s each), receiver peak RSS growth {rss:.0f} MB",
                    flush=True,
                )
    median = {m: statistics.median(t for t, _ in v) for m, v in results.items()}
    peak = {m: max(rss for _, rss in v) for m, v in results.items()}
    summary = {
        "benchmark": "transfer",
        "blob_mb": args.mb,
        "receivers": args.receivers,
        "seconds": {m: [t for t, _ in v] for m, v in results.items()},
        "median_seconds": median,
        "throughput_ratio_ours_vs_bare": median["bare"] / median["ours"],
        "receiver_peak_rss_growth_mb": peak,
        "ours_peak_rss_over_blob": peak["ours"] / args.mb,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        f"{args.mb} MB to {args.receivers} receivers: ours {median['ours']:.2f} s, "
        f"bare {median['bare']:.2f} s -> "
        f"throughput ratio {summary['throughput_ratio_ours_vs_bare']:.2f}; receiver peak RSS growth "
        f"{peak['ours']:.0f} MB ({summary['ours_peak_rss_over_blob']:.2f}x the blob)"
    )


if __name__ == "__main__":
    main()
