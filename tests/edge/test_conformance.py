"""Conformance: a real `edge-agent start` against an aggregator written from docs/protocol.md alone
(paho, json, hashlib, struct, safetensors and zstandard on the aggregator's side; the model's initial
values come from the project, its blob is built by hand). Each step names the spec rule it pins."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import time

import numpy as np
import paho.mqtt.client as paho
import zstandard
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.numpy import load, save

from cloud.local_federation import agent_command
from reid.model import ModelSpec, batchnorm_keys, build_model, shared_state
from tests.cloud.test_federation import _wait

FED = "agent-conformance"
ROOT = f"fedreid/v1/{FED}"
CHUNK = 1 << 20


def chunks(blob: bytes, blob_id: str) -> list[bytes]:
    """docs/protocol.md, Chunks."""
    count = max(1, -(-len(blob) // CHUNK))
    out = []
    for index in range(count):
        data = blob[index * CHUNK : (index + 1) * CHUNK]
        header = {
            "blob_id": blob_id,
            "index": index,
            "count": count,
            "chunk_size": CHUNK,
            "blob_size": len(blob),
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        head = json.dumps(header).encode()
        out.append(b"FRC1" + struct.pack(">I", len(head)) + head + data)
    return out


def blob_ref(blob: bytes, encoding: str = "fp32") -> dict:
    digest = hashlib.sha256(blob).hexdigest()
    size = len(blob)
    return {"blob_id": digest[:32], "size": size, "sha256": digest, "chunks": max(1, -(-size // CHUNK)),
            "encoding": encoding, "compressed": False}  # fmt: skip


class SpecAggregator:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"spec-agg-{time.time_ns()}")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect(host, int(port))
        for topic in ("status/+", "sites/+/update", "sites/+/chunks", "sites/+/eval", "global/resend"):
            self.client.subscribe(f"{ROOT}/{topic}", qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"{ROOT}/{topic}", payload, qos=1, retain=retain).wait_for_publish(10)

    def docs(self, leaf: str) -> list[dict]:
        return [json.loads(p) for t, p in list(self.messages) if t.endswith(leaf) and p]

    def stop(self) -> None:
        for topic in ("round", "status/aggregator"):  # retained documents of this test
            self.publish(topic, b"", retain=True)
        self.client.loop_stop()
        self.client.disconnect()


def round_start(round_: int, blob: bytes, site: str, **fields) -> bytes:
    doc = {
        "schema_version": 1,
        "kind": "round_start",
        "federation": FED,
        "round": round_,
        "base_hash": hashlib.sha256(blob).hexdigest(),
        "blob": blob_ref(blob),
        "model": {"arch": "resnet18", "height": 64, "width": 32},
        "training": {"batch_size": 16, "lr_head": 0.02, "lr_backbone": 0.02},
        "deadline": time.time() + 600,
        "selected": [site],
        **fields,
    }
    return json.dumps(doc).encode()


def test_an_agent_follows_the_spec(tiny_federation, tmp_path, mosquitto_url):
    site = sorted((tiny_federation / "sites").iterdir())[1]
    state = {k: v.numpy() for k, v in shared_state(build_model(ModelSpec(arch="resnet18"), 1)).items()}
    base = save(state, metadata={"format": "fedreid-blob/1;encoding=fp32"})  # "exactly one entry"
    agg = SpecAggregator(mosquitto_url)
    status = {"schema_version": 1, "kind": "status", "node": "aggregator", "role": "aggregator"}
    agg.publish(
        "status/aggregator", json.dumps({**status, "state": "online", "time": time.time()}).encode(), True
    )
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 (closed below)
    (tmp_path / "edge.toml").write_text("ack_wait_s = 3.0\n")  # (flags give the rest)
    command = agent_command(site, mosquitto_url, FED, tmp_path / "edge", device="cpu")
    agent = subprocess.Popen([*command, "--config", str(tmp_path / "edge.toml")], stdout=log, stderr=log)
    try:
        # "registers a last will ... state offline" and announces itself online
        assert _wait(
            lambda: any(
                d["node"] == site.name and d["state"] == "online" for d in agg.docs(f"status/{site.name}")
            ),
            60,
        )

        # RoundStart (retained), then the chunks; chunk 1 is "lost": "after 5 s without progress ...
        # publishes a ChunkRequest with the missing indices"
        # keep_local_bn: "send a zero delta for every BatchNorm key"
        training = {"batch_size": 16, "lr_head": 0.02, "lr_backbone": 0.02, "keep_local_bn": True}
        agg.publish("round", round_start(0, base, site.name, evaluate=True, upload_encoding="int8",
                                         upload_compressed=True, training=training), retain=True)  # fmt: skip
        frames = chunks(base, blob_ref(base)["blob_id"])
        for i, frame in enumerate(frames):
            if i != 1:
                agg.publish("global/chunks", frame)
        # (chunks published before the agent's subscription took effect are missed too: answer what it
        # asks for, still without chunk 1, until it asks for exactly what it misses)
        seen = 0
        while True:
            assert _wait(lambda: len(agg.docs("global/resend")) > seen, 30)  # noqa: B023
            request = agg.docs("global/resend")[seen]
            seen += 1
            assert request["kind"] == "resend" and request["requester"] == site.name
            assert request["blob_id"] == blob_ref(base)["blob_id"] and 1 in request["indices"]
            if request["indices"] == [1]:
                break
            for i in request["indices"]:
                if i != 1:
                    agg.publish("global/chunks", frames[i])
        agg.publish("global/chunks", frames[1])

        # the update: a manifest naming the base hash, its chunks, the blob as the round asked
        assert _wait(lambda: agg.docs(f"sites/{site.name}/update"), 180), (tmp_path / "agent.log").read_text()
        manifest = agg.docs(f"sites/{site.name}/update")[0]
        assert manifest["site"] == site.name and manifest["round"] == 0
        assert manifest["base_hash"] == hashlib.sha256(base).hexdigest()
        assert set(manifest["metrics"]) <= {"rank1", "rank5", "rank10", "mAP", "mINP", "valid_queries"}
        ref = manifest["blob"]
        assert ref["encoding"] == "int8" and ref["compressed"] is True

        def upload() -> dict[int, bytes]:
            got = {}
            for topic, payload in list(agg.messages):
                if topic.endswith(f"sites/{site.name}/chunks"):
                    (length,) = struct.unpack(">I", payload[4:8])
                    header = json.loads(payload[8 : 8 + length])
                    if header["blob_id"] == ref["blob_id"]:
                        got[header["index"]] = payload[8 + length :]
            return got

        assert _wait(lambda: len(upload()) == ref["chunks"], 60)
        blob = b"".join(upload()[i] for i in range(ref["chunks"]))
        # "size/sha256 ... of the blob as sent (after compression)"
        assert len(blob) == ref["size"] and hashlib.sha256(blob).hexdigest() == ref["sha256"]
        assert blob[:4] == b"\x28\xb5\x2f\xfd"
        delta = load(zstandard.ZstdDecompressor().decompress(blob))
        floats = [k for k, v in state.items() if v.dtype.kind == "f"]
        # "<name> as I8 plus <name>::scale, F32 of shape [1]"; integers I64; never the classifier
        assert set(delta) == set(state) | {k + "::scale" for k in floats}
        assert all(delta[k].dtype == np.int8 and delta[k + "::scale"].shape == (1,) for k in floats)
        assert all(delta[k].dtype == np.int64 for k in state if k not in floats)
        assert all(np.abs(delta[k]).max() == 127 for k in floats if delta[k].any())  # s = max|x| / 127
        bn = batchnorm_keys(state)
        assert bn and all(not delta[k].any() for k in bn)  # the site's BatchNorm layers did not leave it
        assert all(delta[k].any() for k in floats if k not in bn)  # every other weight trained
        assert (tmp_path / "edge" / site.name / "private_bn.safetensors").is_file()

        # "while it has no ack, publish its manifest again every ack_wait_s", and no more once acked
        assert _wait(lambda: len(agg.docs(f"sites/{site.name}/update")) >= 2, 30)
        assert all(d == manifest for d in agg.docs(f"sites/{site.name}/update"))
        ack = {"schema_version": 1, "kind": "ack", "site": site.name, "round": 0, "blob_id": ref["blob_id"]}
        agg.publish(f"sites/{site.name}/ack", json.dumps({**ack, "accepted": True}).encode())
        assert _wait(lambda: b"acknowledged by the aggregator" in (tmp_path / "agent.log").read_bytes(), 30)
        announced = len(agg.docs(f"sites/{site.name}/update"))

        # the evaluation round: "fetch the blob, ... evaluate ..., publish an EvalReport"
        final = {
            k: np.asarray(v + (delta[k] * delta[k + "::scale"][0] if k in floats else delta[k]), v.dtype)
            for k, v in state.items()
        }  # fmt: skip ("value = q * s"; 0-d counts stay arrays)
        final_blob = save(final, metadata={"format": "fedreid-blob/1;encoding=fp32"})
        agg.publish("round", round_start(1, final_blob, site.name, evaluate=True, train=False), retain=True)
        for frame in chunks(final_blob, blob_ref(final_blob)["blob_id"]):
            agg.publish("global/chunks", frame)
        assert _wait(lambda: agg.docs(f"sites/{site.name}/eval"), 120), (tmp_path / "agent.log").read_text()
        report = agg.docs(f"sites/{site.name}/eval")[0]
        assert report["round"] == 1 and report["base_hash"] == hashlib.sha256(final_blob).hexdigest()
        assert report["metrics"]["valid_queries"] > 0 and 0 <= report["metrics"]["rank1"] <= 100
        # no training in an evaluation round, and the acknowledged update is not announced again
        assert len(agg.docs(f"sites/{site.name}/update")) == announced

        # rule 0: round 0 again under another run_id (the aggregator lost the acknowledged update):
        # the site drops its progress and trains it again
        agg.publish("round", round_start(0, base, site.name, training=training, run_id="0123abcd" * 2), True)
        for frame in frames:
            agg.publish("global/chunks", frame)
        assert _wait(lambda: len(agg.docs(f"sites/{site.name}/update")) > announced, 120)
        again = agg.docs(f"sites/{site.name}/update")[-1]
        assert again["round"] == 0 and again["base_hash"] == manifest["base_hash"]
        assert (
            json.loads((tmp_path / "edge" / site.name / "progress.json").read_text())["run_id"]
            == "0123abcd" * 2
        )
        ack = {**ack, "blob_id": again["blob"]["blob_id"]}
        agg.publish(f"sites/{site.name}/ack", json.dumps({**ack, "accepted": True}).encode())

        agg.publish("round", json.dumps({"schema_version": 1, "kind": "run_end", "federation": FED,
                                         "rounds": 1}).encode(), retain=True)  # fmt: skip
        assert agent.wait(timeout=60) == 0  # "--exit-when-done": RunEnd ends it
        assert agg.docs(f"status/{site.name}")[-1]["state"] == "offline"
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
        agg.stop()
