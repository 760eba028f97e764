"""Conformance: the aggregator against a site written from docs/protocol.md alone. The sending side
uses paho, json, hashlib, struct and safetensors only (no project code for the wire format), so a
disagreement between the spec and the code fails here. Each test names the spec rule it pins."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.numpy import load, save

from cloud.server import Aggregator, ServeConfig
from tests.cloud.test_federation import TINY, _wait

FED = "conformance"
ROOT = f"fedreid/v1/{FED}"
CHUNK = 65536


def frame(blob_id: str, index: int, blob: bytes) -> bytes:
    """docs/protocol.md, Chunks: b"FRC1" | uint32 BE header length | header JSON | data."""
    data = blob[index * CHUNK : (index + 1) * CHUNK]
    header = {
        "blob_id": blob_id,
        "index": index,
        "count": max(1, -(-len(blob) // CHUNK)),
        "chunk_size": CHUNK,
        "blob_size": len(blob),
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    head = json.dumps(header).encode()
    return b"FRC1" + struct.pack(">I", len(head)) + head + data


class SpecSite:
    """A site as a third party would write it from the spec."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.round: dict | None = None
        self.global_chunks: dict[int, bytes] = {}
        self.acks: list[dict] = []
        self.requests: list[tuple[str, dict]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"spec-{time.time_ns()}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        for topic in (
            f"{ROOT}/round",
            f"{ROOT}/global/chunks",
            f"{ROOT}/sites/+/ack",
            f"{ROOT}/sites/+/resend",
        ):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/round"):
            doc = json.loads(msg.payload)
            if doc["kind"] == "round_start":
                self.round = doc
        elif msg.topic.endswith("/global/chunks"):
            (length,) = struct.unpack(">I", msg.payload[4:8])
            header = json.loads(msg.payload[8 : 8 + length])
            self.global_chunks[header["index"]] = msg.payload[8 + length :]
        elif msg.topic.endswith("/ack"):
            self.acks.append(json.loads(msg.payload))
        else:
            self.requests.append((msg.topic.split("/")[-2], json.loads(msg.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"{ROOT}/{topic}", payload, qos=1, retain=retain).wait_for_publish(10)

    def publish_chunks(self, site: str, blob_id: str, delta: bytes, indices: range) -> None:
        sent = [
            self.client.publish(f"{ROOT}/sites/{site}/chunks", frame(blob_id, i, delta), qos=1)
            for i in indices
        ]
        for info in sent:
            info.wait_for_publish(30)

    def online(self, site: str) -> None:
        doc = {"schema_version": 1, "kind": "status", "node": site, "role": "site", "state": "online"}
        self.publish(f"status/{site}", json.dumps({**doc, "round": None, "time": time.time()}).encode(), True)

    def delta(self) -> tuple[bytes, str]:
        """A small fp16 delta of every tensor of the global model (names and shapes from its blob)."""
        assert self.round is not None
        ref = self.round["blob"]
        assert _wait(lambda: len(self.global_chunks) == ref["chunks"])
        blob = b"".join(self.global_chunks[i] for i in range(ref["chunks"]))
        assert hashlib.sha256(blob).hexdigest() == ref["sha256"] == self.round["base_hash"]
        tensors = {
            k: (np.full(v.shape, 0.001, np.float16) if v.dtype.kind == "f" else np.zeros(v.shape, v.dtype))
            for k, v in load(blob).items()
        }
        delta = save(tensors, metadata={"format": "fedreid-blob/1;encoding=fp16"})
        return delta, hashlib.sha256(delta).hexdigest()[:32]

    def manifest(self, site: str, delta: bytes, blob_id: str, **fields) -> bytes:
        assert self.round is not None
        blob = {
            "blob_id": blob_id,
            "size": len(delta),
            "sha256": hashlib.sha256(delta).hexdigest(),
            "chunks": max(1, -(-len(delta) // CHUNK)),
            "encoding": "fp16",
            "compressed": False,
        }
        doc = {
            "schema_version": 1,
            "kind": "update",
            "site": site,
            "round": self.round["round"],
            "base_hash": self.round["base_hash"],
            "blob": blob,
            "n_samples": 10,
            "cdw": 0.5,
            "loss": 1.0,
            "train_seconds": 1.0,
            **fields,
        }
        return json.dumps(doc).encode()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_site_written_from_the_spec_takes_part_in_a_round(tmp_path, mosquitto_url):
    cfg = ServeConfig(
        federation=FED, state_dir=tmp_path, rounds=1, min_sites=2, deadline_s=120, transfer_idle_s=0.5, **TINY
    )
    agg = Aggregator(cfg, mosquitto_url)
    site = SpecSite(mosquitto_url)
    site.online("a")
    site.online("b")
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: site.round is not None)
        assert site.round["selected"] == ["a", "b"]
        delta, blob_id = site.delta()
        count = -(-len(delta) // CHUNK)
        # "A site answers requests for its pending update ... It may publish its manifest again first:
        # a manifest with the same blob_id ... keeps the chunks already received."
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))
        site.publish_chunks("a", blob_id, delta, range(count - 1))
        assert _wait(lambda: any(s == "a" for s, _ in site.requests), timeout=30)
        first = next(r for s, r in site.requests if s == "a")
        assert first["indices"] == [count - 1] and first["blob_id"] == blob_id
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))  # the same manifest again
        site.publish_chunks("a", blob_id, delta, range(count - 1, count))  # then only what was asked
        assert _wait(lambda: any(a["site"] == "a" and a["accepted"] for a in site.acks), timeout=30)
        assert all(r["indices"] == [count - 1] for s, r in site.requests if s == "a")  # never the rest again
        # "Every rejection naming a round is an UpdateAck" on the sender's topic, also for a manifest that
        # names another site than its topic; the round summary lists it.
        site.publish("sites/b/update", site.manifest("a", delta, blob_id))
        assert _wait(lambda: any(a["site"] == "b" and not a["accepted"] for a in site.acks), timeout=30)
        site.publish("sites/b/update", site.manifest("b", delta, blob_id))
        site.publish_chunks("b", blob_id, delta, range(count))
        assert _wait(lambda: any(a["site"] == "b" and a["accepted"] for a in site.acks), timeout=30)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        agg.stop()
        site.stop()
    summary = json.loads((tmp_path / FED / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["accepted"] == ["a", "b"]
    assert [r["site"] for r in summary["rejected"]] == ["b"] and "topic" in summary["rejected"][0]["reason"]
